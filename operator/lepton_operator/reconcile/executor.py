"""Carry out a `Plan`: the status write, then deletes, then creates and patches, then events.

Writing status first records intent (a rescale's target, a restart's count) before any
pod is touched, so an operator killed mid-pass resumes the same step and never counts a
restart twice. The write carries a resourceVersion precondition: a `Conflict` means the
job changed since it was read, nothing else is done, and the pass is redone on fresh data.

Once the status is written, the plan's events are true, so they are posted even when a
later delete or create fails: a transient API error there is re-raised only after the
events went out (the loop then retries the pass; creates and deletes are idempotent). A
request the server refuses for good (403 RBAC, 422 admission) becomes a Warning event
`ApiRequestRefused` with the server's message, and the job is looked at again at the
resync period, so fixing RBAC or a quota heals it without a restart. A create whose name
an object the job does not own holds (`Kube.create` answers "taken") becomes a Warning
event `NameTaken` and is remembered in `ctx.taken`; the next pass sets the condition
`NameTaken` and tries the create again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Optional

from lepton_operator import metrics
from lepton_operator.api.conditions import (
    REASON_API_REQUEST_REFUSED,
    REASON_INSUFFICIENT_CAPACITY,
    REASON_NAME_TAKEN,
)
from lepton_operator.api.models import LeptonJobStatus
from lepton_operator.reconcile.context import JobKey, OperatorContext
from lepton_operator.reconcile.jobpass import WARNING, Plan
from lepton_operator.reconcile.kube import PermanentApiError, TransientApiError

log = logging.getLogger("lepton_operator.reconcile")


def status_patch(before: LeptonJobStatus, after: LeptonJobStatus) -> dict:
    """The merge patch from `before` to `after`: changed top-level fields only.

    Of `autoscaling` only `backoffUntil` is the core's (the capacity backoff);
    observations, decisions and `throughput` belong to the autoscaler and are never
    written back from a stale copy.
    """
    old, new = before.to_k8s(), after.to_k8s()
    patch: dict = {}
    for key in sorted(set(old) | set(new)):
        if key == "autoscaling":
            o, n = (old.get(key) or {}).get("backoffUntil"), (new.get(key) or {}).get("backoffUntil")
            if o != n:
                patch["autoscaling"] = {"backoffUntil": n}
        elif key == "throughput":
            continue
        elif old.get(key) != new.get(key):
            patch[key] = new.get(key)  # None removes the field
    return patch


@dataclasses.dataclass
class Applied:
    """What applying a plan left for the job's loop."""

    requeue_after: Optional[float] = None
    job_deleted: bool = False


async def apply_plan(
    ctx: OperatorContext, body: dict, before: LeptonJobStatus, result: Plan, logger: logging.Logger = log
) -> Applied:
    """Apply `result`, computed from the job `body` whose stored status was `before`.

    Raises `Conflict` when the status write lost a race (nothing was done) and
    `TransientApiError` when a delete or create failed after the events were posted.
    """
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    key: JobKey = (namespace, name)
    kube = ctx.kube

    patch = status_patch(before, result.status)
    if patch:
        body = await asyncio.to_thread(kube.patch_job_status, namespace, name, meta["resourceVersion"], patch) or body
        _count(before, result)
    metrics.set_job_phase(namespace, name, result.status.phase)

    refused: list[str] = []
    transient: list[TransientApiError] = []
    taken: list[str] = []  # "Kind name" of creates whose name an object not ours holds

    async def delete(kind: str, child: str, grace: Optional[int], uid: Optional[str]) -> None:
        try:
            if await asyncio.to_thread(kube.delete, namespace, kind, child, grace, uid):
                logger.info(f"deleted {kind} {child} (grace {grace})")
                if kind == "Pod" and uid:
                    ctx.expected.deleted(key, uid)
            elif kind == "Pod":
                ctx.pods.request_relist(key)  # our view still had it: check the index
        except PermanentApiError as e:
            refused.append(str(e))
        except TransientApiError as e:
            transient.append(e)

    async def create(obj: dict) -> None:
        try:
            outcome = await asyncio.to_thread(kube.create, obj)
            if outcome == "created":
                logger.info(f"created {obj['kind']} {obj['metadata']['name']}")
                if obj["kind"] == "Pod":
                    ctx.expected.created(key, obj)
            elif outcome == "taken":
                taken.append(f"{obj['kind']} {obj['metadata']['name']}")
        except PermanentApiError as e:
            refused.append(str(e))
        except TransientApiError as e:
            transient.append(e)

    for d in result.deletes:  # in order: highest worker index first
        await delete(d.kind, d.name, d.grace, d.uid)
    # Concurrently: a generation's workers are independent objects (the API thread pool
    # bounds how many calls are in flight).
    await asyncio.gather(*(create(obj) for obj in result.creates))
    for kind, child, change in result.patches:
        try:
            await asyncio.to_thread(kube.patch, namespace, kind, child, change)
            logger.info(f"patched {kind} {child}: {change}")
        except PermanentApiError as e:
            refused.append(str(e))
        except TransientApiError as e:
            transient.append(e)

    # The next pass reports these (condition NameTaken) and tries the creates again: once
    # the foreign object is gone, the job gets its own.
    if taken:
        ctx.taken[key] = frozenset(taken)
    else:
        ctx.taken.pop(key, None)
    events = list(result.events) + [(WARNING, REASON_API_REQUEST_REFUSED, text) for text in refused]
    events += [(WARNING, REASON_NAME_TAKEN, taken_message(what)) for what in sorted(taken)]
    await post_events(ctx, body, events, logger)
    for text in refused:
        logger.error(text)
    if transient:
        raise transient[0]

    if result.delete_job:
        logger.info("ttlSecondsAfterFinished passed: deleting the job")
        await asyncio.to_thread(kube.delete_job, namespace, name, uid)
        return Applied(job_deleted=True)
    requeue = result.requeue_after
    if refused:
        resync = ctx.config.resync_seconds
        requeue = resync if requeue is None else min(requeue, resync)
    return Applied(requeue_after=requeue)


async def post_events(
    ctx: OperatorContext, body: dict, events: list[tuple[str, str, str]], logger: logging.Logger = log
) -> None:
    """Post events about the job, skipping recent duplicates; a failure to post is logged
    (an event is worth less than the pass that produced it)."""
    uid = body["metadata"]["uid"]
    for type_, reason, message in events:
        if ctx.events.should_post((uid, type_, reason, message)):
            try:
                await asyncio.to_thread(ctx.kube.post_event, body, type_, reason, message)
            except (PermanentApiError, TransientApiError) as e:
                logger.warning(f"could not post event {reason}: {e}")


def taken_message(what: str) -> str:
    """The NameTaken event about one child ("Kind name") whose name an object not owned
    by the job holds."""
    return f"{what} exists and is not owned by this job: it is left alone, and the job's own is created once it is gone"


def _count(before: LeptonJobStatus, result: Plan) -> None:
    """Operator metrics from a pass whose status write succeeded."""
    after = result.status
    metrics.count_restarts(after.restarts - before.restarts)
    if len(after.rescale_history) != len(before.rescale_history) or after.last_rescale != before.last_rescale:
        if after.last_rescale is not None:
            metrics.count_rescale(after.last_rescale.reason)
    if any(reason == REASON_INSUFFICIENT_CAPACITY for _t, reason, _m in result.events):
        metrics.count_capacity_failure()
