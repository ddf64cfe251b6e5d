"""The cluster allocator's pass: every LeptonJob, the GPU capacity, one allocation.

Run by the active operator only (a kopf timer per job ticks it, and so does a job's loop
after a pass that asked for it; kopf pauses timers and daemons on replicas that are not the
peering leader). A pass runs every `--allocator-interval-seconds`; at once after a job's
pass that asked for one (its first pass, a finish, a suspension: `allocate_soon`); and at
the next tick, at most once a second, after a departure (`AllocatorMemory.wanted`). A job
the core has not passed yet (no `status.phase`) waits for that first pass: deciding on it
while the pass wrote its first status, and kopf its finalizer, made two of the three
writers meet a Conflict. It

1. lists the LeptonJobs, and reads the capacity: allocatable `nvidia.com/gpu` of Ready,
   schedulable nodes minus the GPUs requested by pods that are not LeptonJob workers
   (`capacity_view`), or, in namespaced mode, `--gpu-budget` minus nothing; the GPUs each
   job's pods hold now; each job's node pool when its nodeSelector/tolerations restrict it;
   for a `placement.mode: Pack` job the GPUs its largest topology domain has free
   (`pack_gpu_limits`); and the PriorityClasses (`job_priority`);
2. turns each job into a `scaling.allocator.JobState` (`job_state`: measurements from
   `status.autoscaling.observations`, remaining work from `status.remainingSamples`, the
   measured restart downtime) and calls the pure `allocate()`;
3. writes, per job (`plan_job_writes`): `spec.workers.replicas` when the target changed,
   the `Admitted` condition (the core creates no pod before it is True: gang admission)
   and `status.allocation` (the decision with its numbers); shrinks are written before
   grows, and the allocator releases a grow only once the GPUs are free.

The decision logic is in scaling/allocator.py; this module only reads and writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from datetime import datetime, timezone
from typing import Callable, Iterable, Optional

from lepton_operator import metrics
from lepton_operator.api.conditions import (
    CONDITION_ADMITTED,
    REASON_ADMITTED,
    REASON_ALLOCATOR_FLOOR,
    REASON_ALLOCATOR_GROW,
    REASON_ALLOCATOR_SHRINK,
)
from lepton_operator.api.models import (
    FINISHED_PHASES,
    AllocationStatus,
    InvalidJob,
    LeptonJobSpec,
    LeptonJobStatus,
    parse_job,
    parse_status,
)
from lepton_operator.desired import LABEL_JOB_NAME, LABEL_MANAGED_BY, MANAGED_BY
from lepton_operator.reconcile.autoscaling import warm_from
from lepton_operator.reconcile.conditions import condition_is_true, conditions_patch, get_condition
from lepton_operator.reconcile.context import AllocatorMemory, OperatorContext
from lepton_operator.reconcile.executor import post_events
from lepton_operator.reconcile.kube import Conflict, PermanentApiError, TransientApiError
from lepton_operator.reconcile.nodes import parse_time
from lepton_operator.scaling.allocator import Allocation, Capacity, JobState, allocate
from lepton_operator.scaling.policy import ScalingState, restart_seconds_estimate
from lepton_operator.scaling.throughput import Measurement

GPU = "nvidia.com/gpu"
# A decision that says the same is written again after this long (status.allocation.time
# shows it is alive); otherwise only changes are written, so a quiet cluster makes no writes.
REFRESH_SECONDS = 300.0
# A pass's writes in flight at once: half the default --api-threads, so the jobs' own passes
# still find threads.
WRITE_CONCURRENCY = 16
# Writes of one decision: a new job's version moves with kopf's finalizer and its first pass.
WRITE_ATTEMPTS = 3
# Passes wanted by arrivals and departures start at least this far apart (one pass for a burst).
MIN_SPACING_SECONDS = 1.0
# allocate_soon: how long a job's loop waits for a pass to start (a timer tick's period),
# and how often it looks meanwhile (while another pass runs).
ALLOCATE_SOON_SECONDS = 5.0
ALLOCATE_SOON_POLL_SECONDS = 0.25

log = logging.getLogger("lepton_operator.allocator")
JobKey = tuple[str, str]


# ------------------------------------------------------------------ capacity (pure)


def pod_gpus(pod: dict) -> int:
    """GPUs a pod requests (extended resources: requests equal limits; either may be given)."""
    total = 0
    spec = pod.get("spec") or {}
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        amount = (resources.get("limits") or {}).get(GPU) or (resources.get("requests") or {}).get(GPU)
        try:
            total += int(amount or 0)
        except (TypeError, ValueError):
            continue
    return total


def _tolerates(tolerations: list[dict], taint: dict) -> bool:
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if not t.get("key"):
            if t.get("operator") == "Exists":
                return True
            continue
        if t.get("key") != taint.get("key"):
            continue
        if t.get("operator") == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def node_fits_job(node: dict, spec: LeptonJobSpec) -> bool:
    """Can the job's workers go to this node (nodeSelector, NoSchedule/NoExecute taints)?"""
    labels = (node.get("metadata") or {}).get("labels") or {}
    if any(labels.get(k) != v for k, v in spec.node_selector.items()):
        return False
    tolerations = [t.to_k8s() for t in spec.tolerations]
    taints = (node.get("spec") or {}).get("taints") or []
    return all(_tolerates(tolerations, t) for t in taints if t.get("effect") in ("NoSchedule", "NoExecute"))


def usable_gpu_nodes(nodes: list[dict]) -> dict[str, dict]:
    """Ready, schedulable nodes with allocatable GPUs, by name."""
    usable = {}
    for node in nodes:
        status = node.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if not ready or (node.get("spec") or {}).get("unschedulable"):
            continue
        try:
            gpus = int((status.get("allocatable") or {}).get(GPU) or 0)
        except (TypeError, ValueError):
            gpus = 0
        if gpus > 0:
            usable[node["metadata"]["name"]] = {**node, "gpus": gpus}
    return usable


def job_of_pod(pod: dict) -> Optional[JobKey]:
    """The LeptonJob a worker pod belongs to (by our labels), or None for any other pod."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(LABEL_MANAGED_BY) != MANAGED_BY or not labels.get(LABEL_JOB_NAME):
        return None
    return (meta.get("namespace", ""), labels[LABEL_JOB_NAME])


@dataclasses.dataclass(frozen=True)
class CapacityView:
    """What the allocator may hand out, and what each job holds now."""

    capacity: Capacity
    held: dict[JobKey, int]
    pools: dict[JobKey, Optional[str]]
    gpu_limits: dict[JobKey, int] = dataclasses.field(default_factory=dict)
    """Pack jobs: the most GPUs that fit one topology domain (`pack_gpu_limits`)."""


def capacity_view(nodes: list[dict], pods: list[dict], specs: dict[JobKey, LeptonJobSpec]) -> CapacityView:
    """Allocatable GPUs of usable nodes minus the GPUs of pods that are not workers of a
    LeptonJob in `specs`; each job's held GPUs; and, for a job whose nodeSelector or
    tolerations leave it fewer nodes than all, its pool (key: its selector and
    tolerations) with that pool's free GPUs."""
    usable = usable_gpu_nodes(nodes)
    foreign_on: dict[str, int] = {}  # node name ("" while unscheduled) -> GPUs of other pods
    held: dict[JobKey, int] = {key: 0 for key in specs}
    for pod in pods:
        gpus = pod_gpus(pod)
        if gpus == 0 or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        key = job_of_pod(pod)
        if key in held:
            held[key] += gpus
        else:
            node = (pod.get("spec") or {}).get("nodeName") or ""
            foreign_on[node] = foreign_on.get(node, 0) + gpus
    # Other pods still Pending will take GPUs somewhere: count them against the whole cluster.
    free = {name: max(0, n["gpus"] - foreign_on.get(name, 0)) for name, n in usable.items()}
    total = max(0, sum(free.values()) - foreign_on.get("", 0))
    pools: dict[JobKey, Optional[str]] = {}
    pool_gpus: dict[str, int] = {}
    for key, spec in specs.items():
        eligible = [name for name, node in usable.items() if node_fits_job(node, spec)]
        if len(eligible) == len(usable):
            pools[key] = None
            continue
        pool = json.dumps(
            {"nodeSelector": spec.node_selector, "tolerations": [t.to_k8s() for t in spec.tolerations]},
            sort_keys=True,
            separators=(",", ":"),
        )
        pools[key] = pool
        pool_gpus[pool] = sum(free[name] for name in eligible)
    return CapacityView(Capacity(total, pool_gpus), held, pools, pack_gpu_limits(usable, pods, specs))


def pack_gpu_limits(usable: dict[str, dict], pods: list[dict], specs: dict[JobKey, LeptonJobSpec]) -> dict[JobKey, int]:
    """For each job with `placement.mode: Pack` and GPUs: the GPUs of the most whole workers
    that fit one topology domain now, counting what the job holds there as its own (its
    largest domain's free GPUs, plus its own). The allocator grows the job no further, so a
    Pack job is not promised GPUs spread over domains. A job whose smallest gang (min, or a
    fixed job's size) fits no single domain gets no limit: it takes the fewest domains.
    Nodes without the topology label, or that the job's nodeSelector/tolerations exclude,
    are in no domain."""
    packers = {
        key: spec
        for key, spec in specs.items()
        if spec.placement is not None
        and spec.placement.mode == "Pack"
        and spec.placement.topology_key
        and spec.resources.gpus > 0
    }
    if not packers:
        return {}
    used: dict[str, int] = {}  # node -> GPUs of every live pod on it
    own: dict[tuple[JobKey, str], int] = {}  # (job, node) -> GPUs of the job's pods on it
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        gpus = pod_gpus(pod)
        if not node or gpus == 0 or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        used[node] = used.get(node, 0) + gpus
        key = job_of_pod(pod)
        if key in packers:
            own[(key, node)] = own.get((key, node), 0) + gpus
    limits: dict[JobKey, int] = {}
    for key, spec in packers.items():
        per_worker, topology = spec.resources.gpus, spec.placement.topology_key
        domains: dict[str, int] = {}  # domain -> workers that fit there
        for name, node in usable.items():
            domain = ((node.get("metadata") or {}).get("labels") or {}).get(topology)
            if not domain or not node_fits_job(node, spec):
                continue
            free = node["gpus"] - used.get(name, 0) + own.get((key, name), 0)
            domains[domain] = domains.get(domain, 0) + max(0, free) // per_worker
        gang = spec.workers.min if spec.autoscaling.enabled else spec.requested_workers()
        largest = max(domains.values(), default=0)
        if largest >= gang:
            limits[key] = largest * per_worker
    return limits


def job_priority(spec: LeptonJobSpec, classes: dict[str, int]) -> int:
    """spec.priority, else the value of spec.priorityClassName, else the global default class, else 0."""
    if spec.priority is not None:
        return spec.priority
    if spec.priority_class_name:
        return classes.get(spec.priority_class_name, 0)
    return classes.get("", 0)


def priority_values(items: list[dict]) -> dict[str, int]:
    """PriorityClass name -> value; "" -> the value of the globalDefault class, if any."""
    values = {}
    for item in items:
        name = (item.get("metadata") or {}).get("name")
        value = int(item.get("value") or 0)
        values[name] = value
        if item.get("globalDefault"):
            values[""] = value
    return values


# ------------------------------------------------------------------ jobs (pure)


def _time(value: Optional[datetime], now: datetime) -> float:
    return ((value or now) - now).total_seconds()


def admitted(status: LeptonJobStatus) -> bool:
    """Admitted by the allocator, or started before it was in charge."""
    return condition_is_true(status, CONDITION_ADMITTED) or status.worker_generation > 0


def job_state(
    key: JobKey,
    body: dict,
    spec: LeptonJobSpec,
    status: LeptonJobStatus,
    held_gpus: int,
    pool: Optional[str],
    priority: int,
    now: datetime,
    gpu_limit: Optional[int] = None,
) -> JobState:
    """The allocator's view of one job (`now` is the clock; times become seconds from it;
    `gpu_limit`: a Pack job's largest topology domain, `pack_gpu_limits`)."""
    auto = spec.autoscaling
    created = parse_time(body["metadata"].get("creationTimestamp")) or now
    running = status.worker_generation > 0 and status.phase in ("Running", "Pending", "Rescaling")
    current = status.world_size if running else 0
    measurements = tuple(
        Measurement(
            o.world_size,
            o.throughput,
            age_seconds=max(0.0, (now - o.measured_at).total_seconds()),
            window_seconds=float(o.window_seconds or auto.window_seconds),
            comm_fraction=o.comm_fraction,
        )
        for o in status.autoscaling.observations
    )
    warm = warm_from(spec, status)
    fresh = any(
        o.world_size == current and (warm is None or o.measured_at >= warm) for o in status.autoscaling.observations
    )
    return JobState(
        key=f"{key[0]}/{key[1]}",
        min=spec.workers.min,
        max=spec.workers.max,
        step=auto.step,
        gpus_per_worker=spec.resources.gpus,
        priority=priority,
        created=_time(created, now),
        elastic=auto.enabled,
        requested=spec.requested_workers(),
        initial=spec.initial_workers,
        admitted=admitted(status),
        current=current,
        held_gpus=held_gpus,
        busy=status.rescale is not None or status.phase != "Running",
        settled=fresh,
        measurements=measurements,
        remaining_samples=status.remaining_samples,
        restart_seconds=restart_seconds_estimate(ScalingState.from_status(status).rescales),
        floor=auto.efficiency_threshold,
        queued_since=_time(created, now),
        pool=pool,
        gpu_limit=gpu_limit,
    )


@dataclasses.dataclass
class JobWrites:
    """What the allocator writes to one job, in order: replicas (before an admission, so
    the first generation starts at the allocated size), status, replicas (otherwise), events."""

    replicas: Optional[int] = None
    replicas_first: bool = False
    status_patch: dict = dataclasses.field(default_factory=dict)
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    shrink: bool = False


def plan_job_writes(
    body: dict, spec: LeptonJobSpec, status: LeptonJobStatus, decision: Allocation, now: datetime
) -> JobWrites:
    """The writes that carry one decision out (pure). Nothing when nothing changed."""
    writes = JobWrites()
    meta_gen = body["metadata"].get("generation")
    if decision.admitted:
        message = decision.message
        conditions = (
            None
            if condition_is_true(status, CONDITION_ADMITTED)
            else conditions_patch(status, CONDITION_ADMITTED, True, REASON_ADMITTED, message, now, meta_gen)
        )
    else:
        message = f"{decision.message} (place {decision.queue_position} in the queue)"
        current = get_condition(status, CONDITION_ADMITTED)
        waiting = current is not None and current.status == "False" and current.reason == decision.reason
        if waiting and not _refresh_due(status, now):
            conditions = None  # only the place moved: it is written again at the refresh
        else:
            conditions = conditions_patch(status, CONDITION_ADMITTED, False, decision.reason, message, now, meta_gen)
    if conditions is not None:
        writes.status_patch["conditions"] = conditions
        if decision.admitted:
            writes.events.append(("Normal", REASON_ADMITTED, decision.message[:1024]))
        elif not any(c.type == CONDITION_ADMITTED for c in status.conditions):
            writes.events.append(("Normal", decision.reason, message[:1024]))

    record = AllocationStatus(
        target=decision.target,
        reason=decision.reason,
        message=decision.message[:4096],
        predicted_throughput=_round(decision.predicted_throughput),
        marginal_gain=_round(decision.marginal_gain),
        why_not_more=decision.why_not_more[:1024] or None,
        why_not_less=(decision.why_not_less[:1024] or None) if decision.admitted else None,
        queue_position=decision.queue_position,
        time=now,
    )
    # A queued job's place alone does not make a write: as the jobs ahead are admitted every
    # place moves, and rewriting every queued job at every pass is O(queue) writes per pass
    # (a thousand at once when 1,000 jobs arrive). The place is as of the last write (`time`).
    last = status.allocation
    changed = last is None or (last.target, last.reason) != (record.target, record.reason)
    if changed or _refresh_due(status, now) or conditions is not None:
        writes.status_patch["allocation"] = record.to_k8s()

    if decision.admitted and spec.autoscaling.enabled and decision.target != spec.requested_workers():
        writes.replicas = decision.target
        writes.replicas_first = not admitted(status)
        writes.shrink = decision.target < status.world_size
        if decision.reason in (REASON_ALLOCATOR_GROW, REASON_ALLOCATOR_SHRINK, REASON_ALLOCATOR_FLOOR):
            writes.events.append(("Normal", decision.reason, decision.message[:1024]))
    return writes


def _refresh_due(status: LeptonJobStatus, now: datetime) -> bool:
    """Whether the allocation record is missing or `REFRESH_SECONDS` old."""
    last = status.allocation
    return last is None or (now - last.time).total_seconds() >= REFRESH_SECONDS


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(value, 3)


# ------------------------------------------------------------------ watch caches

JOB_META_READ = ("name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp")


def job_view(body) -> dict:
    """What the allocator reads of a LeptonJob, as kopf's watch last delivered it (the
    `jobs_by_key` index): so a pass lists no jobs. Its resourceVersion may be behind the
    API's: the pass then takes the newer answer it knows (`WatchHealth.newest`); a write on
    a stale one gets a Conflict, handled by `_write`."""
    meta = body.get("metadata") or {}
    return {
        "metadata": {k: meta[k] for k in JOB_META_READ if meta.get(k) is not None},
        "spec": body.get("spec") or {},
        "status": body.get("status") or {},
    }


def gpu_pod_view(body) -> Optional[dict]:
    """A pod that holds or waits for GPUs, reduced to what `capacity_view` reads (the
    `gpu_pods` index, over every pod the operator's watch sees); None for any other pod."""
    gpus = pod_gpus(body)
    phase = (body.get("status") or {}).get("phase")
    if gpus == 0 or phase in ("Succeeded", "Failed"):
        return None
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    return {
        "metadata": {
            "namespace": meta.get("namespace", ""),
            "labels": {k: labels[k] for k in (LABEL_MANAGED_BY, LABEL_JOB_NAME) if k in labels},
        },
        "spec": {"nodeName": (body.get("spec") or {}).get("nodeName"), "containers": [_gpus_container(gpus)]},
        "status": {"phase": phase},
    }


def _gpus_container(gpus: int) -> dict:
    return {"resources": {"limits": {GPU: str(gpus)}}}


# ------------------------------------------------------------------ the pass (I/O)


PRIORITY_CLASSES_MAX_AGE = 60.0  # seconds: PriorityClasses change rarely


def _priority_classes(ctx: OperatorContext, memory: AllocatorMemory) -> dict[str, int]:
    """PriorityClass values, listed at most every PRIORITY_CLASSES_MAX_AGE seconds."""
    if not memory.priority_classes_readable:
        return {}
    now = time.monotonic()
    if now - memory.priority_classes_at < PRIORITY_CLASSES_MAX_AGE:
        return memory.priority_classes
    try:
        memory.priority_classes = priority_values(ctx.kube.list_priority_classes())
        memory.priority_classes_at = now
    except (PermanentApiError, TransientApiError) as e:
        if isinstance(e, PermanentApiError):
            memory.priority_classes_readable = False
        log.warning(f"cannot read PriorityClasses, priorityClassName counts as 0: {e}")
        return {}
    return memory.priority_classes


def _read_world(
    ctx: OperatorContext, memory: AllocatorMemory, specs: dict[JobKey, LeptonJobSpec], gpu_pods: list[dict]
):
    """Capacity and priorities (blocking; run in a thread). `gpu_pods`: the pods holding
    GPUs, from the watch cache (the `gpu_pods` index: in namespaced mode, those of the
    watched namespaces)."""
    classes = _priority_classes(ctx, memory)
    if ctx.config.gpu_budget is not None:
        # The admin's budget is the capacity; only our own pods are counted against it.
        view = capacity_view([], [p for p in gpu_pods if job_of_pod(p) is not None], specs)
        return CapacityView(Capacity(ctx.config.gpu_budget), view.held, {key: None for key in specs}), classes
    if ctx.config.namespaces and not memory.warned_namespaced:
        # Namespaced mode: other namespaces' pods are out of sight (and out of RBAC).
        log.warning("namespaced mode without --gpu-budget: GPUs used by pods of other namespaces are not seen")
        memory.warned_namespaced = True
    # Nodes (their allocatable GPUs, taints and labels): the list the jobs' passes share, at
    # most `NodeCache.max_age` old; pods and jobs come from the watch caches.
    return capacity_view(ctx.nodes.listed(ctx.kube.list_nodes), gpu_pods, specs), classes


async def allocator_tick(
    ctx: OperatorContext,
    logger: logging.Logger,
    jobs: Iterable[dict],
    gpu_pods: Iterable[dict],
    asked: bool = False,
) -> None:
    """Run a pass if one is due: the interval elapsed, or one was wanted (a job arrived or
    finished) and the last began a second ago, or at once when `asked` by a job's loop
    (`allocate_soon`). `jobs` and `gpu_pods`: the watch caches (`job_view`, `gpu_pod_view`
    entries)."""
    memory = ctx.allocator
    if memory.running:
        return
    mono = time.monotonic()
    due = mono - memory.last_run >= ctx.config.allocator_interval_seconds
    if not due and not (memory.wanted and (asked or mono - memory.last_run >= MIN_SPACING_SECONDS)):
        return
    memory.running, memory.wanted, memory.last_run = True, False, mono
    memory.started += 1
    try:
        await allocator_pass(ctx, logger, jobs, gpu_pods)
    except (TransientApiError, PermanentApiError) as e:
        logger.warning(f"allocator: {e}")
        memory.wanted = True
    finally:
        memory.running = False


async def allocate_soon(
    ctx: OperatorContext,
    logger: logging.Logger,
    caches: Callable[[], tuple[Iterable[dict], Iterable[dict]]],
) -> None:
    """Wait until an allocator pass starts after this call, running it from here as soon
    as no pass is under way (at most ALLOCATE_SOON_SECONDS: by then a job's timer has
    ticked it). For a job's loop after a pass that asked for one (`AllocatorMemory.asked_by`):
    a pass under way may not have seen what this pass wrote, and the next timer tick is up to 5 s
    away. Such a pass does not wait out the second between wanted passes: a new job's
    admission would wait for it whenever a pass ran as the job arrived (a timer's first
    tick), and at scale a pass takes longer than that anyway. `caches`: the watch caches'
    entries (jobs, GPU pods), read afresh at each try."""
    memory = ctx.allocator
    asked_at = memory.started
    deadline = time.monotonic() + ALLOCATE_SOON_SECONDS
    while memory.started == asked_at and time.monotonic() < deadline:
        await allocator_tick(ctx, logger, *caches(), asked=True)
        if memory.started == asked_at:
            await asyncio.sleep(ALLOCATE_SOON_POLL_SECONDS)


async def allocator_pass(
    ctx: OperatorContext,
    logger: logging.Logger,
    jobs_cached: Iterable[dict],
    gpu_pods: Iterable[dict],
) -> dict[str, Allocation]:
    """One allocation over every job this operator manages (from the watch caches: kopf
    watches exactly the namespaces it manages); see the module docstring."""
    bodies, pods = list(jobs_cached), list(gpu_pods)
    now = datetime.now(timezone.utc)
    jobs: dict[JobKey, tuple[dict, LeptonJobSpec, LeptonJobStatus]] = {}
    for body in bodies:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if ctx.watch.behind(key, meta.get("resourceVersion")):
            newer = ctx.watch.newest(key)  # the API's answer to a write the watch has not shown
            if newer is not None:
                body = job_view(newer)
                meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        try:
            spec = parse_job(meta["name"], body.get("spec") or {})
        except InvalidJob:
            continue  # the core marks it Failed/InvalidSpec
        status = parse_status(body.get("status"))
        if not status.phase or status.phase in FINISHED_PHASES or spec.suspend:
            continue  # not passed by the core yet (its first pass asks for a pass), or done
        jobs[key] = (body, spec, status)
    specs = {key: spec for key, (_, spec, _) in jobs.items()}
    view, classes = await asyncio.to_thread(_read_world, ctx, ctx.allocator, specs, pods)
    states = [
        job_state(
            key,
            body,
            spec,
            status,
            view.held.get(key, 0),
            view.pools.get(key),
            job_priority(spec, classes),
            now,
            gpu_limit=view.gpu_limits.get(key),
        )
        for key, (body, spec, status) in jobs.items()
    ]
    # In a thread: at a thousand jobs a pass takes seconds of CPU, which must not stall
    # kopf's event loop (watches, the per-job loops).
    decisions = await asyncio.to_thread(allocate, states, view.capacity, 0.0, ctx.config.allocator_settings)
    plans = []
    for key, (body, spec, status) in jobs.items():
        decision = decisions[f"{key[0]}/{key[1]}"]
        plans.append((key, body, decision, plan_job_writes(body, spec, status, decision, now)))
    # Shrinks first: their GPUs are what the grows of a later pass will use. Within each
    # group the writes go out together, WRITE_CONCURRENCY at a time: one after the other, a
    # pass admitting a thousand jobs waited for each write behind every job's own requests.
    limit = asyncio.Semaphore(WRITE_CONCURRENCY)

    async def write(key: JobKey, body: dict, decision: Allocation, writes: JobWrites) -> None:
        async with limit:
            await _write(ctx, key, body, decision, writes, now, logger)

    for shrinks in (True, False):
        await asyncio.gather(*(write(*plan) for plan in plans if plan[3].shrink == shrinks))
    metrics.record_allocation(
        view.capacity.total,
        view.held,
        {key: decisions[f"{key[0]}/{key[1]}"].target for key in jobs},
        {key: -s.queued_since for key, s in zip(jobs, states, strict=True) if not decisions[s.key].admitted},
        (datetime.now(timezone.utc) - now).total_seconds(),
    )
    return decisions


async def _write(
    ctx: OperatorContext,
    key: JobKey,
    body: dict,
    decision: Allocation,
    writes: JobWrites,
    now: datetime,
    logger: logging.Logger,
) -> None:
    """Carry out one job's decision. A job whose spec is unchanged (its generation) but
    whose version moved (kopf's finalizer on a new job, the job's own pass writing its
    status) gets the decision on the newer version at once: the API's answer the operator
    has, else a GET after a Conflict, up to WRITE_ATTEMPTS writes. So an arrival is
    admitted now, not at the next tick. A changed spec: the next tick decides again."""
    events = writes.events  # what the decision is, however many tries it takes
    newer = ctx.watch.newest(key)  # an answer that came while the pass ran
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        if newer is not None and newer["metadata"].get("resourceVersion") != body["metadata"]["resourceVersion"]:
            replanned = _replan(key, body, newer, decision, now)
            if replanned is None:
                ctx.allocator.wanted = True  # gone, going, or a new spec: decide again
                return
            body, writes = replanned
        try:
            await _send(ctx, key, body["metadata"]["resourceVersion"], writes)
            break
        except Conflict:
            if attempt == WRITE_ATTEMPTS:
                ctx.allocator.wanted = True
                return
            newer = ctx.watch.newest(key)
            if newer is None or newer["metadata"].get("resourceVersion") == body["metadata"]["resourceVersion"]:
                newer = await asyncio.to_thread(ctx.kube.get_job, *key) or {"metadata": {}}  # {}: gone
        except (TransientApiError, PermanentApiError) as e:
            logger.warning(f"allocator: {key[0]}/{key[1]}: {e}")
            ctx.allocator.wanted = True
            return
    if events:
        await post_events(ctx, body, events, logger)


def _replan(
    key: JobKey, body: dict, newer: dict, decision: Allocation, now: datetime
) -> Optional[tuple[dict, JobWrites]]:
    """The decision's writes on a newer version of the job, if its spec is the one decided
    on (the same generation) and it is not gone or going; else None."""
    meta = newer.get("metadata") or {}
    if not meta or meta.get("generation") != body["metadata"].get("generation") or meta.get("deletionTimestamp"):
        return None
    view = job_view(newer)
    spec = parse_job(key[1], view["spec"])  # the same generation: the spec the decision was for
    return view, plan_job_writes(view, spec, parse_status(view["status"]), decision, now)


async def _send(ctx: OperatorContext, key: JobKey, version: str, writes: JobWrites) -> None:
    """The job's writes in order, each on the version the one before answered."""
    namespace, name = key
    kube = ctx.kube
    if writes.replicas is not None and writes.replicas_first:
        written = await asyncio.to_thread(kube.patch_job_replicas, namespace, name, version, writes.replicas)
        version = written["metadata"]["resourceVersion"]
    if writes.status_patch:
        written = await asyncio.to_thread(kube.patch_job_status, namespace, name, version, writes.status_patch)
        version = written["metadata"]["resourceVersion"]
    if writes.replicas is not None and not writes.replicas_first:
        await asyncio.to_thread(kube.patch_job_replicas, namespace, name, version, writes.replicas)
