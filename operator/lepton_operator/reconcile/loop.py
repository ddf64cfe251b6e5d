"""A job's reconcile loop: one pass (read, plan, apply), then wait for a reason to look again.

One loop per LeptonJob (a kopf daemon, see handlers.py), so passes of a job never
overlap and nothing sleeps inside a kopf handler. After a pass the loop waits until
something about the job changes (a trigger from a watch event), the plan's
`requeue_after`, or the resync period, then `debounce_seconds` more so that a burst of
pod events makes one pass.

Pods, Services and PVCs are read from kopf indexes (kept current by kopf's watches: no
list call per pass), with the operator's own recent creates and deletes overlaid
(`Expectations`); a job's pods are re-listed now and then so that a stale index cannot
keep a deleted pod (`podcache.PodCache`). Nodes come from one shared, briefly cached list
(`nodes.NodeCache`) for node loss and drains. The job itself comes from kopf's live body
(the daemon's `body`, which kopf replaces at every watch event), and from a GET only when
that body is older than a version the operator already knows of (`WatchHealth.behind`: its
own last write, which the watch has not delivered yet) or after a status write lost a race.
A pass on a body that is stale anyway cannot do harm: its status write carries the body's
resourceVersion and gets a Conflict, and the pass is redone on a fresh GET.

Errors: a status conflict redoes the pass at once; API trouble (5xx, timeouts) retries
with exponential backoff up to `MAX_BACKOFF_SECONDS`; a request refused for good (403,
422) retries at the resync period; a bug is logged and retried with backoff, never ends
the loop. An invalid spec marks the job Failed/InvalidSpec (see `lifecycle`) but the loop
keeps watching, so a corrected spec is picked up.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from datetime import datetime, timezone
from typing import Awaitable, Callable, Mapping, Optional

from lepton_operator import metrics
from lepton_operator.api.models import FINALIZER, FINISHED_PHASES, InvalidJob, parse_job, parse_status
from lepton_operator.desired import JobRef, checkpoint_pvc_name, selector_string, service_name
from lepton_operator.reconcile import isolation
from lepton_operator.reconcile.context import JobKey, OperatorContext
from lepton_operator.reconcile.executor import apply_plan
from lepton_operator.reconcile.jobpass import Observed
from lepton_operator.reconcile.kube import Conflict, PermanentApiError, TransientApiError
from lepton_operator.reconcile.plan import plan
from lepton_operator.reconcile.podcache import nothing_waits_on_pods

log = logging.getLogger("lepton_operator.reconcile")

MAX_BACKOFF_SECONDS = 30.0

GONE = "gone"
FINALIZER_WAIT_SECONDS = 2.0


async def read_job(
    ctx: OperatorContext, namespace: str, name: str, live: Optional[Mapping] = None, fresh: bool = False
) -> Optional[dict]:
    """The job to decide on: a copy of kopf's `live` body when it is as new as anything the
    operator knows, else of the API's newer answer the watch has not delivered yet (its own
    last write or kopf's, `WatchHealth.newest`), else (or with `fresh`) a GET. None: the
    job is gone."""
    if live is not None and not fresh:
        version = (live.get("metadata") or {}).get("resourceVersion")
        if version and not ctx.watch.behind((namespace, name), version):
            return copy.deepcopy(dict(live))  # kopf swaps the live body under us at the next event
        newer = ctx.watch.newest((namespace, name))
        if newer is not None:
            return copy.deepcopy(newer)
    return await asyncio.to_thread(ctx.kube.get_job, namespace, name)


async def run_pass(
    ctx: OperatorContext,
    job: JobRef,
    indexes: dict,
    logger: logging.Logger = log,
    live: Optional[Mapping] = None,
    fresh: bool = False,
):
    """One pass over the job: read it (`read_job`), plan, apply. Returns the requeue delay
    (None: none asked for) or GONE when the job no longer exists (or is being deleted)."""
    namespace, name, key = job.namespace, job.name, (job.namespace, job.name)
    body = await read_job(ctx, namespace, name, live, fresh)
    if body is None or body["metadata"].get("uid") != job.uid:
        return GONE  # the loop's end forgets the job (OperatorContext.forget)
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        return GONE  # children go with the job (ownerReferences)

    try:
        spec = parse_job(name, body.get("spec") or {})
    except InvalidJob as e:
        spec = e
    status = parse_status(body.get("status"))
    now = datetime.now(timezone.utc)
    indexed = [dict(p) for p in indexes["pods_by_job"].get(key, [])]
    if ctx.pods.relist_due(key, settled=nothing_waits_on_pods(status.phase, status.rescale is not None)):
        listed = await asyncio.to_thread(ctx.kube.list_pods, namespace, selector_string(name))
        seen = ctx.pods.listed(key, indexed, listed)
    else:
        seen = ctx.pods.view(key, indexed)
    pods = ctx.expected.overlay(key, seen, now.isoformat())
    nodes = await asyncio.to_thread(ctx.nodes.get, ctx.kube.list_nodes)
    # Only the job's own children count: one that merely carries our labels is created
    # again, and its 409 reports the name as taken (NameTaken), never used or patched.
    service_exists = service_name(name) in owned(indexes["services_by_job"].get(key, []), job.uid)
    pvc_exists = checkpoint_pvc_name(name) in owned(indexes["claims_by_job"].get(key, []), job.uid)

    budgets = owned(indexes["budgets_by_job"].get(key, []), job.uid)
    budget = budgets[0] if budgets else None
    network = isolation.observe(ctx.config, indexes.get("network_policies_by_job"), key)
    observed = Observed(
        pods=pods,
        service_exists=service_exists,
        pvc_exists=pvc_exists,
        nodes=nodes,
        budget=budget,
        network=network,
        taken=ctx.taken.get(key, frozenset()),
        gated=ctx.config.allocator,
    )
    result = plan(job, meta.get("generation"), spec, status, observed, now, ctx.config.policy)
    applied = await apply_plan(ctx, body, status, result, logger)
    metrics.set_job_restarts_remaining(namespace, name, remaining_restarts(spec, result.status))
    metrics.set_stale_watches(len(ctx.stale_watches()))  # every loop passes each resync: fresh within 30 s
    finished = result.status.phase in FINISHED_PHASES and status.phase not in FINISHED_PHASES
    # Finished or suspended: its GPUs are free. New or resumed: it waits for admission.
    waits = result.status.phase in ("Queued", "Suspended") and status.phase != result.status.phase
    if finished or waits:
        ctx.allocator.wanted = True
        ctx.allocator.asked_by.add(key)  # the loop runs a pass at once
    return GONE if applied.job_deleted else applied.requeue_after


def remaining_restarts(spec, status) -> Optional[int]:
    """maxRestarts - restarts for an unfinished job with a valid spec, else None."""
    if isinstance(spec, InvalidJob) or status.phase in FINISHED_PHASES:
        return None
    return spec.restart.max_restarts - status.restarts


def owned(entries, uid: str) -> list:
    """The values of index entries `(value, owner uids)` that the job (`uid`) owns."""
    return [value for value, owners in entries if uid in owners]


async def job_loop(
    ctx: OperatorContext,
    job: JobRef,
    indexes: dict,
    stopped: Callable[[], bool],
    logger: logging.Logger = log,
    live: Optional[Mapping] = None,
    allocate: Optional[Callable[[], Awaitable[None]]] = None,
) -> None:
    """Reconcile the job until it is gone or `stopped()` turns true (`live`: kopf's live
    body of the job, see `read_job`). `allocate`: an allocator pass, run after a pass of
    this job that asked for one (`AllocatorMemory.asked_by`), so that a new job is
    admitted right after its first pass wrote its status."""
    key: JobKey = (job.namespace, job.name)
    trigger = ctx.triggers.get(key)
    failures = 0
    fresh = False
    try:
        if live is not None:
            await _until_finalized(ctx, key, live, trigger)
        while not stopped():
            trigger.clear()
            delay: Optional[float]
            try:
                with metrics.time_reconcile(conflicts=(Conflict,)):
                    outcome = await run_pass(ctx, job, indexes, logger, live, fresh)
                failures = 0
                fresh = False
                if outcome == GONE:
                    return
                delay = outcome
                if allocate is not None and key in ctx.allocator.asked_by:
                    ctx.allocator.asked_by.discard(key)
                    await allocate()
            except Conflict:
                fresh = True  # the job changed under us: redo at once on a fresh GET
                continue
            except TransientApiError as e:
                failures += 1
                delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2**failures)
                logger.warning(f"API trouble, retrying in {delay:.1f}s: {e}")
            except PermanentApiError as e:
                delay = ctx.config.resync_seconds
                logger.error(f"API refused a request, retrying in {delay:.0f}s: {e}")
            except Exception:  # a bug must not stop the job's loop for good
                failures += 1
                delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2**failures)
                logger.exception(f"reconcile pass failed, retrying in {delay:.1f}s")
            resync = ctx.config.resync_seconds
            await _wait(trigger, resync if delay is None else min(delay, resync))
            await asyncio.sleep(ctx.config.debounce_seconds)
    finally:
        ctx.forget(key)


def _finalized(body: Optional[Mapping]) -> bool:
    """Whether kopf's finalizer is on the job, or no longer expected (it is going)."""
    meta = (body or {}).get("metadata") or {}
    return FINALIZER in (meta.get("finalizers") or []) or bool(meta.get("deletionTimestamp"))


async def _until_finalized(ctx: OperatorContext, key: JobKey, live: Mapping, trigger: asyncio.Event) -> None:
    """Before a new job's first pass: kopf starts this loop as it adds its finalizer, and a
    pass on the body from before that patch would write on a stale version (a Conflict,
    then a GET). Wait for the patch's watch event (it fires `trigger` and updates `live`),
    or its answer (`WatchHealth.newest`): milliseconds, at most FINALIZER_WAIT_SECONDS."""
    deadline = time.monotonic() + FINALIZER_WAIT_SECONDS
    while True:
        trigger.clear()
        remaining = deadline - time.monotonic()
        if _finalized(live) or _finalized(ctx.watch.newest(key)) or remaining <= 0:
            return
        await _wait(trigger, remaining)


async def _wait(trigger: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(trigger.wait(), timeout=max(0.0, timeout))
    except asyncio.TimeoutError:
        pass
