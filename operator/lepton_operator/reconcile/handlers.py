"""kopf handlers: thin. Read the job and its pods, call `plan()`, write once, post events.

How a job is driven:

- One `@kopf.daemon` per LeptonJob runs a loop: one reconcile pass, then wait until
  something about the job changes (a trigger) or until the plan's `requeue_after` or the
  resync period (`CONFIG.resync_seconds`) passes. One loop per job means passes of a job
  never overlap, and nothing ever sleeps inside a kopf handler.
- Triggers come from `@kopf.on.event` handlers on the job, its pods, its Service and its
  PVC (selected by the managed-by label), so a pass follows a pod change within
  `CONFIG.debounce_seconds` (a burst of pod events makes one pass).
- Pods, Services and PVCs are read from kopf indexes (`@kopf.index`), kept current by
  kopf's watches: no list call per pass. The job itself is read with one GET per pass,
  so a pass always decides on the latest status (the watch may lag our own last write).
- Writes, in this order: the status (one merge patch with a resourceVersion precondition;
  a conflict means someone else wrote, so the pass is redone), then deletes, then
  creates, then events. Writing status first records intent (a rescale's target, a
  restart's count) before acting, so an operator killed mid-pass resumes the same step
  and never counts a restart twice. 409 AlreadyExists on a create and 404 on a delete
  are success.
- Errors: API trouble (5xx, timeouts) retries the pass with backoff (kopf's
  TemporaryError semantics, without leaving the loop); a request the server refuses for
  good (403 RBAC, 422 admission) becomes a Warning event with the server's message and is
  retried at the resync period, so fixing RBAC or a quota heals the job without a restart.
  An invalid spec marks the job Failed/InvalidSpec (see `plan`) but the loop keeps
  watching, so a corrected spec is picked up: on a 1.20 apiserver the schema cannot
  enforce the cross-field rules, and a failed job that can be fixed in place is kinder
  than one that must be recreated.

kopf's daemons put a finalizer on the job (kopf stops the daemon before the job goes).
Pods get none: children are removed by ownerReferences and the garbage collector. A job
deleted while the operator is down waits, Terminating, until the operator returns and
releases it; the GC then removes its pods (RELIABILITY row 9).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Optional

import kopf

from lepton_operator import metrics
from lepton_operator.api.models import (
    GROUP,
    PLURAL,
    REASON_INSUFFICIENT_CAPACITY,
    VERSION,
    InvalidJob,
    LeptonJobStatus,
    parse_job,
    parse_status,
)
from lepton_operator.desired import (
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    JobRef,
    checkpoint_pvc_name,
    service_name,
)
from lepton_operator.reconcile.config import CONFIG
from lepton_operator.reconcile.kube import Conflict, Kube, PermanentApiError, TransientApiError
from lepton_operator.reconcile.plan import Plan, plan

log = logging.getLogger("lepton_operator.reconcile")

MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}
EVENT_DEDUP_SECONDS = 600.0
WATCH_STALE_SECONDS = 120.0
MAX_BACKOFF_SECONDS = 30.0


# ------------------------------------------------------------------ shared state


class Triggers:
    """One asyncio.Event per job: set by watch events, awaited by the job's loop."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}

    def get(self, namespace: str, name: str) -> asyncio.Event:
        return self._events.setdefault((namespace, name), asyncio.Event())

    def fire(self, namespace: Optional[str], name: Optional[str]) -> None:
        if namespace and name:
            self.get(namespace, name).set()

    def drop(self, namespace: str, name: str) -> None:
        self._events.pop((namespace, name), None)


class EventRecorder:
    """Posts Kubernetes events, skipping an identical one posted recently.

    Passes repeat (every trigger, every resync), and a condition that persists (a pod
    we do not own holding a worker's name) would otherwise post the same Warning each
    time.
    """

    def __init__(self, window: float = EVENT_DEDUP_SECONDS) -> None:
        self.window = window
        self._posted: dict[tuple, float] = {}

    def should_post(self, key: tuple) -> bool:
        now = time.monotonic()
        self._posted = {k: t for k, t in self._posted.items() if now - t < self.window}
        if key in self._posted:
            return False
        self._posted[key] = now
        return True


class WatchHealth:
    """Detects a stuck watch: the job seen through kopf's watch lags the API for long.

    Each pass GETs the job; the job's watch handler records the resourceVersion it
    delivered. If they differ for longer than `WATCH_STALE_SECONDS` (well past the
    watch's server timeout, after which kopf reconnects), events are not arriving and the
    liveness probe fails, so Kubernetes restarts the operator (RELIABILITY row 7).
    """

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], str] = {}
        self.lagging_since: dict[tuple[str, str], float] = {}

    def watched(self, key: tuple[str, str], resource_version: Optional[str]) -> None:
        if resource_version:
            self.seen[key] = resource_version

    def compare(self, key: tuple[str, str], resource_version: Optional[str]) -> None:
        if self.seen.get(key) == resource_version:
            self.lagging_since.pop(key, None)
        else:
            self.lagging_since.setdefault(key, time.monotonic())

    def forget(self, key: tuple[str, str]) -> None:
        self.seen.pop(key, None)
        self.lagging_since.pop(key, None)

    def stale(self) -> list[str]:
        now = time.monotonic()
        return [f"{ns}/{name}" for (ns, name), t in self.lagging_since.items() if now - t > WATCH_STALE_SECONDS]


TRIGGERS = Triggers()
EVENTS = EventRecorder()
WATCH = WatchHealth()
_kube: Optional[Kube] = None


def set_kube(kube: Kube) -> None:
    """Use this API access (the CLI sets it at startup from the kubeconfig)."""
    global _kube
    _kube = kube


def get_kube() -> Kube:
    global _kube
    if _kube is None:
        from lepton_operator.reconcile.cli import api_client_from_environment

        _kube = Kube(api_client_from_environment())
    return _kube


# ------------------------------------------------------------------ indexes


def _trim_pod(body) -> dict:
    """The parts of a pod that plan() reads (kopf bodies are live views: copy)."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {})
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": [dict(r) for r in meta.get("ownerReferences") or []],
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {"nodeName": spec.get("nodeName")},
        "status": {
            "phase": status.get("phase"),
            "reason": status.get("reason"),
            "message": status.get("message"),
            "conditions": [dict(c) for c in status.get("conditions") or []],
            "containerStatuses": [
                {"name": cs.get("name"), "state": dict(cs.get("state") or {}), "lastState": dict(cs.get("lastState") or {})}
                for cs in status.get("containerStatuses") or []
            ],
        },
    }


@kopf.index("", "v1", "pods", labels=MANAGED)
async def pods_by_job(namespace, labels, body, **_):
    """Pods with our labels, by (namespace, job name); includes pods we do not own."""
    job = labels.get(LABEL_JOB_NAME)
    return {(namespace, job): _trim_pod(body)} if job else {}


@kopf.index("", "v1", "services", labels=MANAGED)
async def services_by_job(namespace, name, labels, **_):
    job = labels.get(LABEL_JOB_NAME)
    return {(namespace, job): name} if job else {}


@kopf.index("", "v1", "persistentvolumeclaims", labels=MANAGED)
async def claims_by_job(namespace, name, labels, **_):
    job = labels.get(LABEL_JOB_NAME)
    return {(namespace, job): name} if job else {}


class Expectations:
    """Pods this operator created or deleted that its index has not shown yet.

    The index follows a watch, so for a moment after a create it lacks the new pod and
    after a delete it still shows the old one without a deletionTimestamp. A pass in that
    moment would create or delete again (409s and 404s, or a 409 on a name just freed).
    Like Kubernetes' own controllers, remember what was done and overlay it on the index
    until the watch catches up, or `ttl` passes (the API, not memory, is the truth).
    """

    def __init__(self, ttl: float = 15.0):
        self.ttl = ttl
        self._created: dict[tuple, dict[str, tuple[float, dict]]] = {}
        self._deleted: dict[tuple, dict[str, float]] = {}

    def created(self, key: tuple, pod: dict) -> None:
        self._created.setdefault(key, {})[pod["metadata"]["name"]] = (time.monotonic(), pod)

    def deleted(self, key: tuple, name: str) -> None:
        self._deleted.setdefault(key, {})[name] = time.monotonic()

    def overlay(self, key: tuple, pods: list[dict], now_text: str) -> list[dict]:
        """`pods` from the index, with expected creations added and deletions marked."""
        fresh = time.monotonic() - self.ttl
        seen = {p["metadata"]["name"]: p for p in pods}
        created = {n: v for n, v in self._created.get(key, {}).items() if v[0] > fresh and n not in seen}
        deleted = {n: t for n, t in self._deleted.get(key, {}).items()
                   if t > fresh and n in seen and not seen[n]["metadata"].get("deletionTimestamp")}
        self._created[key], self._deleted[key] = created, deleted
        out = []
        for pod in pods:
            if pod["metadata"]["name"] in deleted:
                pod = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": now_text}}
            out.append(pod)
        for _, body in created.values():
            out.append({**body, "status": {"phase": "Pending"}})
        return out

    def forget(self, key: tuple) -> None:
        self._created.pop(key, None)
        self._deleted.pop(key, None)


EXPECTED = Expectations()


# ------------------------------------------------------------------ triggers


@kopf.on.event("", "v1", "pods", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("", "v1", "persistentvolumeclaims", labels=MANAGED)
async def child_changed(namespace, labels, **_):
    """A child changed: wake its job's loop."""
    TRIGGERS.fire(namespace, labels.get(LABEL_JOB_NAME))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def job_changed(namespace, name, meta, **_):
    """The job changed (spec, scale, status written by anyone): wake its loop."""
    WATCH.watched((namespace, name), meta.get("resourceVersion"))
    TRIGGERS.fire(namespace, name)


@kopf.on.probe(id="watch")
async def watch_probe(**_):
    """Liveness: fails when a job's watch lags the API (see WatchHealth)."""
    stale = WATCH.stale()
    if stale:
        raise kopf.PermanentError(f"watch events stopped arriving for {', '.join(stale[:5])}")
    return "ok"


# ------------------------------------------------------------------ one pass


def status_patch(before: LeptonJobStatus, after: LeptonJobStatus) -> dict:
    """The merge patch from `before` to `after`: changed top-level fields only.

    Of `autoscaling` only `backoffUntil` is ours (the capacity backoff); observations and
    decisions belong to the autoscaler and are never written back from a stale copy.
    """
    old, new = before.to_k8s(), after.to_k8s()
    patch: dict = {}
    for key in sorted(set(old) | set(new)):
        if key == "autoscaling":
            o, n = (old.get(key) or {}).get("backoffUntil"), (new.get(key) or {}).get("backoffUntil")
            if o != n:
                patch["autoscaling"] = {"backoffUntil": n}
        elif key == "throughput":
            continue  # the autoscaler's
        elif old.get(key) != new.get(key):
            patch[key] = new.get(key)  # None removes the field
    return patch


class PassResult:
    """What the job's loop needs after a pass."""

    def __init__(self, requeue_after: Optional[float] = None, gone: bool = False):
        self.requeue_after = requeue_after
        self.gone = gone


async def reconcile_job(namespace: str, name: str, uid: str, indexes: dict, logger=log) -> PassResult:
    """One pass: read, plan, write status, delete, create, post events."""
    kube = get_kube()
    body = await asyncio.to_thread(kube.get_job, namespace, name)
    if body is None or body["metadata"].get("uid") != uid:
        metrics.forget_job(namespace, name)
        return PassResult(gone=True)
    meta = body["metadata"]
    WATCH.compare((namespace, name), meta.get("resourceVersion"))
    if meta.get("deletionTimestamp"):
        return PassResult(gone=True)  # children go with the job (ownerReferences)

    job = JobRef(name=name, namespace=namespace, uid=uid)
    try:
        spec = parse_job(name, body.get("spec") or {})
    except InvalidJob as e:
        spec = e
    status = parse_status(body.get("status"))
    key = (namespace, name)
    now = datetime.now(timezone.utc)
    pods = EXPECTED.overlay(key, [dict(p) for p in indexes["pods_by_job"].get(key, [])], now.isoformat())
    service_exists = service_name(name) in set(indexes["services_by_job"].get(key, []))
    pvc_exists = checkpoint_pvc_name(name) in set(indexes["claims_by_job"].get(key, []))

    result: Plan = plan(job, meta.get("generation"), spec, status, pods, service_exists, pvc_exists, now)

    patch = status_patch(status, result.status)
    if patch:
        written = await asyncio.to_thread(kube.patch_job_status, namespace, name, meta["resourceVersion"], patch)
        body = written or body
        _count(status, result)
    metrics.set_job_phase(namespace, name, result.status.phase)

    refused: list[str] = []
    for kind, child, grace in result.deletes:
        try:
            if await asyncio.to_thread(kube.delete, namespace, kind, child, grace):
                logger.info(f"deleted {kind} {child} (grace {grace})")
            if kind == "Pod":
                EXPECTED.deleted(key, child)
        except PermanentApiError as e:
            refused.append(str(e))
    async def create(obj: dict) -> None:
        try:
            outcome = await asyncio.to_thread(kube.create, obj)
            if outcome == "created":
                logger.info(f"created {obj['kind']} {obj['metadata']['name']}")
                if obj["kind"] == "Pod":
                    EXPECTED.created(key, obj)
        except PermanentApiError as e:
            refused.append(str(e))

    # Concurrently: a generation's workers are independent objects (the executor's size
    # bounds how many calls are in flight).
    outcomes = await asyncio.gather(*(create(obj) for obj in result.creates), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome  # transient trouble: the loop retries the pass (creates are idempotent)

    events = list(result.events) + [("Warning", "ApiRequestRefused", text) for text in refused]
    for type_, reason, message in events:
        if EVENTS.should_post((uid, type_, reason, message)):
            try:
                await asyncio.to_thread(kube.post_event, body, type_, reason, message)
            except (PermanentApiError, TransientApiError) as e:
                logger.warning(f"could not post event {reason}: {e}")
    for text in refused:
        logger.error(text)

    if result.delete_job:
        logger.info("ttlSecondsAfterFinished passed: deleting the job")
        await asyncio.to_thread(kube.delete_job, namespace, name, uid)
        metrics.forget_job(namespace, name)
        return PassResult(gone=True)
    requeue = result.requeue_after
    if refused:
        requeue = CONFIG.resync_seconds if requeue is None else min(requeue, CONFIG.resync_seconds)
    return PassResult(requeue_after=requeue)


def _count(before: LeptonJobStatus, result: Plan) -> None:
    """Operator metrics from a pass whose status write succeeded."""
    after = result.status
    metrics.count_restarts(after.restarts - before.restarts)
    if len(after.rescale_history) != len(before.rescale_history) or after.last_rescale != before.last_rescale:
        if after.last_rescale is not None:
            metrics.count_rescale(after.last_rescale.reason)
    if any(reason == REASON_INSUFFICIENT_CAPACITY for _t, reason, _m in result.events):
        metrics.count_capacity_failure()


# ------------------------------------------------------------------ the loop


async def _wait(trigger: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(trigger.wait(), timeout=max(0.0, timeout))
    except asyncio.TimeoutError:
        pass


@kopf.daemon(GROUP, VERSION, PLURAL, id="reconcile", cancellation_timeout=10)
async def reconcile_loop(namespace, name, uid, stopped, logger, pods_by_job, services_by_job, claims_by_job, **_):
    """The job's loop: a pass, then wait for a trigger, a requeue or the resync period."""
    indexes = {"pods_by_job": pods_by_job, "services_by_job": services_by_job, "claims_by_job": claims_by_job}
    trigger = TRIGGERS.get(namespace, name)
    failures = 0
    try:
        while not stopped:
            trigger.clear()
            delay: Optional[float]
            try:
                with metrics.time_reconcile():
                    result = await reconcile_job(namespace, name, uid, indexes, logger)
                failures = 0
                if result.gone:
                    return
                delay = result.requeue_after
            except Conflict:
                delay = 0.0  # the job changed under us: redo at once on fresh data
            except TransientApiError as e:
                failures += 1
                delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2**failures)
                logger.warning(f"API trouble, retrying in {delay:.1f}s: {e}")
            except PermanentApiError as e:
                delay = CONFIG.resync_seconds
                logger.error(f"API refused a request, retrying in {delay:.0f}s: {e}")
            except Exception:  # a bug must not stop the job's loop for good
                failures += 1
                delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2**failures)
                logger.exception(f"reconcile pass failed, retrying in {delay:.1f}s")
            if delay == 0.0:
                continue  # a conflict: redo at once (kopf's finalizer write races the first pass)
            timeout = CONFIG.resync_seconds if delay is None else min(delay, CONFIG.resync_seconds)
            await _wait(trigger, timeout)
            await asyncio.sleep(CONFIG.debounce_seconds)
    finally:
        TRIGGERS.drop(namespace, name)
        WATCH.forget((namespace, name))
        EXPECTED.forget((namespace, name))


# The autoscaler's timer registers with the same (default) kopf registry.
from lepton_operator.reconcile import autoscaling  # noqa: E402, F401
