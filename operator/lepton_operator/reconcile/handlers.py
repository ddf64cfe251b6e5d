"""kopf wiring, nothing else: indexes, triggers, the liveness probe, the per-job loop and
the autoscaler timer. Every handler gets the `OperatorContext` as kopf's `memo`.

- `@kopf.index` handlers keep the job's pods, Service and PVC (selected by the
  managed-by label) in memory, so a pass makes no list call (`loop.py`).
- `@kopf.on.event` handlers on the job and its children wake the job's loop.
- One `@kopf.daemon` per LeptonJob runs its reconcile loop (`loop.job_loop`).
- One `@kopf.timer` per LeptonJob runs the autoscaler (`autoscaling.autoscale_pass`:
  throughput and progress of every job, and elastic jobs' sizes when the allocator is off),
  ticks the cluster allocator (`allocation.allocator_tick`, one pass for all jobs, reading
  the `jobs_by_key` and `gpu_pods` indexes) and, with `spec.restart.hangSeconds > 0`, runs
  the hang watchdog (`watchdog.watchdog_pass`).

kopf's daemons put a finalizer on the job (kopf stops the daemon before the job goes).
Pods get none: children are removed by ownerReferences and the garbage collector. A job
deleted while the operator is down waits, Terminating, until the operator returns and
releases it; the GC then removes its pods (docs/reliability.md, row 9).
"""

from __future__ import annotations

from typing import Iterator

import kopf

from lepton_operator.api.models import GROUP, PLURAL, VERSION, RestartSpec
from lepton_operator.desired import LABEL_JOB_NAME, LABEL_MANAGED_BY, MANAGED_BY, JobRef
from lepton_operator.reconcile.allocation import allocate_soon, allocator_tick, gpu_pod_view, job_view
from lepton_operator.reconcile.autoscaling import autoscale_pass
from lepton_operator.reconcile.context import OperatorContext
from lepton_operator.reconcile.isolation import trim_network_policy
from lepton_operator.reconcile.loop import job_loop
from lepton_operator.reconcile.podcache import trim_pod
from lepton_operator.reconcile.watchdog import watchdog_pass

MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}
# The timers' tick; each job's own interval (>= 5 s) is checked against the time elapsed.
AUTOSCALER_TICK_SECONDS = 5.0
DEFAULT_HANG_SECONDS = RestartSpec.model_fields["hang_seconds"].default


# ------------------------------------------------------------------ indexes


@kopf.index("", "v1", "pods", labels=MANAGED)
async def pods_by_job(namespace, labels, body, **_):
    """Pods with our labels, by (namespace, job name); includes pods we do not own."""
    job = labels.get(LABEL_JOB_NAME)
    return {(namespace, job): trim_pod(body)} if job else {}


def _owners(meta) -> tuple:
    """The uids the object's ownerReferences point at: the pass counts only the job's own
    (an object carrying our labels is not ours for that)."""
    return tuple(ref.get("uid") for ref in meta.get("ownerReferences") or [])


@kopf.index("", "v1", "services", labels=MANAGED)
async def services_by_job(namespace, name, labels, meta, **_):
    """(name, owner uids) of each job's Services."""
    job = labels.get(LABEL_JOB_NAME)
    return {(namespace, job): (name, _owners(meta))} if job else {}


@kopf.index("", "v1", "persistentvolumeclaims", labels=MANAGED)
async def claims_by_job(namespace, name, labels, meta, **_):
    """(name, owner uids) of each job's claims."""
    job = labels.get(LABEL_JOB_NAME)
    return {(namespace, job): (name, _owners(meta))} if job else {}


# No version: kopf serves the preferred one (policy/v1beta1 before 1.21, policy/v1 after).
@kopf.index("policy", "poddisruptionbudgets", labels=MANAGED)
async def budgets_by_job(namespace, labels, spec, meta, **_):
    """(minAvailable, owner uids) of each job's PodDisruptionBudget."""
    job = labels.get(LABEL_JOB_NAME)
    return {(namespace, job): (spec.get("minAvailable"), _owners(meta))} if job else {}


async def network_policies_by_job(namespace, labels, body, **_):
    """Each job's NetworkPolicies (name, owners, spec: isolation.trim_network_policy)."""
    job = labels.get(LABEL_JOB_NAME)
    return {(namespace, job): trim_network_policy(body)} if job else {}


# ------------------------------------------------------------------ triggers and health


@kopf.on.event("", "v1", "pods", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("", "v1", "persistentvolumeclaims", labels=MANAGED)
@kopf.on.event("policy", "poddisruptionbudgets", labels=MANAGED)
async def child_changed(namespace, labels, memo: OperatorContext, **_):
    """A child changed: wake its job's loop."""
    memo.triggers.fire(namespace, labels.get(LABEL_JOB_NAME))


def watch_network_policies() -> None:
    """Index NetworkPolicies and wake a job's loop when its policy changes. `lepton-operator
    run` calls this only with --network-policies: without it the operator neither watches
    NetworkPolicies nor needs RBAC for them."""
    group = ("networking.k8s.io", "v1", "networkpolicies")
    kopf.index(*group, labels=MANAGED)(network_policies_by_job)
    kopf.on.event(*group, labels=MANAGED, id="network_policy_changed")(child_changed)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def job_changed(type, namespace, name, meta, memo: OperatorContext, **_):
    """The job changed (spec, scale, status written by anyone): wake its loop."""
    if type in (None, "DELETED"):
        # Listed at start, or a departure: the allocator looks again. An arrival asks for
        # it after its first pass (the allocator waits for that pass: allocation.py).
        memo.allocator.wanted = True
    if type == "DELETED":
        memo.watch.forget((namespace, name))  # its loop has ended or is ending: nothing to watch
    else:
        memo.watch.watched((namespace, name), meta.get("resourceVersion"))
    memo.triggers.fire(namespace, name)


@kopf.on.probe(id="watch")
async def watch_probe(memo: OperatorContext, **_):
    """Liveness: fails when a job's watch or pod index lags the API (context.WatchHealth,
    podcache.PodCache): Kubernetes then restarts the operator, which lists afresh."""
    stale = memo.stale_watches()
    if stale:
        raise kopf.PermanentError(f"watch events stopped arriving for {', '.join(stale[:5])}")
    return "ok"


# ------------------------------------------------------------------ per-job loops


@kopf.daemon(GROUP, VERSION, PLURAL, id="reconcile", cancellation_timeout=10)
async def reconcile_loop(
    namespace,
    name,
    uid,
    body,
    stopped,
    logger,
    memo: OperatorContext,
    pods_by_job,
    services_by_job,
    claims_by_job,
    budgets_by_job,
    jobs_by_key,
    gpu_pods,
    **kwargs,
):
    """The job's reconcile loop (loop.job_loop); `body` is kopf's live view of the job,
    replaced at every watch event, from which the passes read it (loop.read_job)."""
    indexes = {
        "pods_by_job": pods_by_job,
        "services_by_job": services_by_job,
        "claims_by_job": claims_by_job,
        "budgets_by_job": budgets_by_job,
        "network_policies_by_job": kwargs.get("network_policies_by_job"),  # absent unless registered
    }
    job = JobRef(name=name, namespace=namespace, uid=uid)

    async def allocate() -> None:
        """An allocator pass after one of this job's passes asked for it (its first pass, a
        finish): at once, not at the next 5-s timer tick."""
        if memo.config.allocator:
            await allocate_soon(memo, logger, lambda: (_views(jobs_by_key), _views(gpu_pods)))

    await job_loop(memo, job, indexes, lambda: bool(stopped), logger, live=body, allocate=allocate)


@kopf.index(GROUP, VERSION, PLURAL)
async def jobs_by_key(namespace, name, body, **_):
    """Every LeptonJob as its watch last delivered it (allocation.job_view): the cluster
    allocator's pass reads these instead of listing the jobs."""
    return {(namespace, name): job_view(body)}


@kopf.index("", "v1", "pods")
async def gpu_pods(body, **_):
    """Every unfinished pod that requests GPUs, ours or not (allocation.gpu_pod_view): the
    allocator's capacity, without listing the cluster's pods each pass."""
    view = gpu_pod_view(body)
    return {"gpu": view} if view is not None else {}


def _views(index) -> Iterator[dict]:
    """The entries of a kopf index (a store per key)."""
    return (view for store in index.values() for view in store)


def _hang_seconds(spec) -> float:
    return float(((spec or {}).get("restart") or {}).get("hangSeconds", DEFAULT_HANG_SECONDS))


@kopf.timer(GROUP, VERSION, PLURAL, interval=AUTOSCALER_TICK_SECONDS)
async def tick(spec, name, namespace, body, logger, memo: OperatorContext, jobs_by_key, gpu_pods, **_):
    """One timer per job (a task each: one, not three, at a thousand jobs), every 5 s:

    - the autoscaler, every `spec.autoscaling.intervalSeconds` (autoscaling.autoscale_pass):
      measurements and progress for every job, the size of elastic ones with --no-allocator;
    - the cluster allocator's tick (allocation.allocator_tick: one pass for all jobs when
      due; every job ticks it, so it runs while any job exists; kopf pauses timers on a
      replica that is not the peering leader, so only the active operator allocates);
    - the hang watchdog when `spec.restart.hangSeconds > 0` (watchdog.watchdog_pass).

    `body` is kopf's live view of the job: the autoscaler and the watchdog read it (a GET
    only when it is older than a version the operator knows: loop.read_job)."""
    interval = ((spec or {}).get("autoscaling") or {}).get("intervalSeconds", AUTOSCALER_TICK_SECONDS)
    await autoscale_pass(memo, namespace, name, interval, logger, live=body)
    if memo.config.allocator:
        await allocator_tick(memo, logger, _views(jobs_by_key), _views(gpu_pods))
    hang = _hang_seconds(spec)
    if hang > 0:
        await watchdog_pass(memo, namespace, name, hang, logger, live=body)
