"""The operator's own Prometheus metrics: every collector lives here, behind small helpers.

Served by `lepton-operator run --metrics-port` (default 8081). The collectors use their
own registry so that importing this module twice (tests) never raises "duplicated
timeseries", and so that only operator metrics are exposed (plus process metrics).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector

from lepton_operator.api.models import PHASES

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

# Series labelled by job exist only for the jobs of the last allocator pass (the active
# ones): record_allocation() removes those of jobs that finished, were suspended or went,
# and forget_job() those of a deleted job, so their number is bounded by the active jobs.
# The same holds for restarts remaining (unfinished jobs) and metrics unavailable (jobs the
# autoscaler measures): their setters drop the series otherwise, and forget_job() too.
# Everything else is per operator. A deleted job leaves only its entry in `_phases`,
# which forget_job() drops.
JOBS = Gauge(
    "lepton_operator_jobs",
    "LeptonJobs this operator reconciles, by phase.",
    ["phase"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "lepton_operator_reconcile_duration_seconds",
    "Duration of one reconcile pass (read, plan, write), by outcome (ok, conflict, error).",
    ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
RESCALES = Counter(
    "lepton_operator_rescales_total",
    "Completed rescales (new generations), by reason (ManualScale, WorkerRestart, Resumed, ScaleUpPaysOff, ...).",
    ["reason"],
    registry=REGISTRY,
)
RESTARTS = Counter(
    "lepton_operator_worker_restarts_total",
    "Generations started because a worker failed or was lost.",
    registry=REGISTRY,
)
CAPACITY_FAILURES = Counter(
    "lepton_operator_scale_up_abandoned_total",
    "Scale-ups abandoned because the added workers could not be scheduled in time.",
    registry=REGISTRY,
)

# The cluster allocator (reconcile/allocation.allocator_pass sets these after every pass;
# only the active operator runs passes). The per-job series carry `namespace` and
# `job_name` like the trainer's series, so rules can join them. A scrape without
# honor_labels renames this `namespace` to `exported_namespace`; monitoring/rules reads it
# from there when it is set.
JOB_GPUS = Gauge(
    "lepton_operator_job_gpus",
    "GPUs the job's pods hold (requested by its live pods, Pending ones included), as the allocator saw them.",
    ["namespace", "job_name"],
    registry=REGISTRY,
)
JOB_ALLOCATED_WORKERS = Gauge(
    "lepton_operator_job_allocated_workers",
    "Workers the allocator's last decision gives the job (its target; 0 while queued).",
    ["namespace", "job_name"],
    registry=REGISTRY,
)
QUEUED_JOBS = Gauge(
    "lepton_operator_queued_jobs",
    "Jobs the allocator has not admitted (Queued: their min workers do not fit yet).",
    registry=REGISTRY,
)
JOB_QUEUED_SECONDS = Gauge(
    "lepton_operator_job_queued_seconds",
    "Seconds a queued job has waited since it was created (the series goes when it is admitted or gone).",
    ["namespace", "job_name"],
    registry=REGISTRY,
)
CLUSTER_GPUS = Gauge(
    "lepton_operator_cluster_gpus",
    "GPUs the allocator may hand out: allocatable GPUs of usable nodes minus other pods' (or --gpu-budget).",
    registry=REGISTRY,
)
# Set by the job's reconcile loop (reconcile/loop.py) after each applied pass, for
# unfinished jobs with a valid spec; the series goes when the job finishes or is forgotten.
JOB_RESTARTS_REMAINING = Gauge(
    "lepton_operator_job_restarts_remaining",
    "Restarts the job may still spend: spec.restart.maxRestarts - status.restarts (0: its next failure fails it).",
    ["namespace", "job_name"],
    registry=REGISTRY,
)
# Set by the autoscaler (reconcile/autoscaling.autoscale_pass) after its status write, for
# jobs it measures (Running, no rescale under way); the series goes while it does not.
JOB_METRICS_UNAVAILABLE = Gauge(
    "lepton_operator_job_metrics_unavailable",
    "1 while the job's condition MetricsUnavailable is True (the autoscaler cannot read its throughput), else 0.",
    ["namespace", "job_name"],
    registry=REGISTRY,
)
ALLOCATOR_PASSES = Counter(
    "lepton_operator_allocator_passes",
    "Completed allocator passes (a pass that failed on the API is not counted).",
    registry=REGISTRY,
)
ALLOCATOR_PASS_SECONDS = Histogram(
    "lepton_operator_allocator_pass_seconds",
    "Duration of one allocator pass, from the jobs listed to the writes done.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
STALE_WATCHES = Gauge(
    "lepton_operator_stale_watches",
    "Jobs whose watch or pod index has lagged the API for longer than the staleness limit (what fails liveness).",
    registry=REGISTRY,
)
REACTOR_RESTARTS = Counter(
    "lepton_operator_reactor_restarts_total",
    "Times the operator started its watches again after losing the API (reconcile/supervise.py).",
    registry=REGISTRY,
)

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
_UNSET = "Unknown"


def set_job_phase(namespace: str, name: str, phase: Optional[str]) -> None:
    """Record a job's current phase (None: not yet known); the gauge is recomputed."""
    with _lock:
        _phases[(namespace, name)] = phase or _UNSET
        _refresh()


def forget_job(namespace: str, name: str) -> None:
    """The job is gone (deleted, or no longer ours): its per-job series go with it."""
    with _lock:
        _phases.pop((namespace, name), None)
        _refresh()
        _remove_job_series((namespace, name))
        _allocated.discard((namespace, name))
        _queued.discard((namespace, name))


_PER_JOB = (JOB_GPUS, JOB_ALLOCATED_WORKERS)
_allocated: set[tuple[str, str]] = set()  # jobs with JOB_GPUS / JOB_ALLOCATED_WORKERS series
_queued: set[tuple[str, str]] = set()  # jobs with a JOB_QUEUED_SECONDS series


def _remove(gauge: Gauge, key: tuple[str, str]) -> None:
    try:
        gauge.remove(*key)
    except KeyError:
        pass  # no such series


def _remove_job_series(key: tuple[str, str]) -> None:
    for gauge in (*_PER_JOB, JOB_QUEUED_SECONDS, JOB_RESTARTS_REMAINING, JOB_METRICS_UNAVAILABLE):
        _remove(gauge, key)


def set_job_restarts_remaining(namespace: str, name: str, remaining: Optional[int]) -> None:
    """Restarts the job may still spend; None (finished, invalid spec) removes the series."""
    with _lock:
        if remaining is None:
            _remove(JOB_RESTARTS_REMAINING, (namespace, name))
        else:
            JOB_RESTARTS_REMAINING.labels(namespace, name).set(max(0, remaining))


def set_job_metrics_unavailable(namespace: str, name: str, unavailable: Optional[bool]) -> None:
    """Whether the job's MetricsUnavailable condition is True; None (the autoscaler does not
    measure the job now) removes the series."""
    with _lock:
        if unavailable is None:
            _remove(JOB_METRICS_UNAVAILABLE, (namespace, name))
        else:
            JOB_METRICS_UNAVAILABLE.labels(namespace, name).set(1 if unavailable else 0)


def record_allocation(
    capacity: int,
    held_gpus: dict[tuple[str, str], int],
    targets: dict[tuple[str, str], int],
    queued_seconds: dict[tuple[str, str], float],
    seconds: float,
) -> None:
    """One completed allocator pass: the capacity it saw, per job (namespace, name) the GPUs
    held and the target, and how long each job it did not admit has waited. Jobs absent
    from `targets` (finished, suspended, deleted) lose their series; an admitted job loses
    its queued-seconds series."""
    with _lock:
        CLUSTER_GPUS.set(capacity)
        for key in _allocated - targets.keys():
            for gauge in _PER_JOB:
                _remove(gauge, key)
        for key, target in targets.items():
            JOB_GPUS.labels(*key).set(held_gpus.get(key, 0))
            JOB_ALLOCATED_WORKERS.labels(*key).set(target)
        _allocated.clear()
        _allocated.update(targets)
        for key in _queued - queued_seconds.keys():
            _remove(JOB_QUEUED_SECONDS, key)
        for key, waited in queued_seconds.items():
            JOB_QUEUED_SECONDS.labels(*key).set(max(0.0, waited))
        _queued.clear()
        _queued.update(queued_seconds)
        QUEUED_JOBS.set(len(queued_seconds))
        ALLOCATOR_PASSES.inc()
        ALLOCATOR_PASS_SECONDS.observe(max(0.0, seconds))


def _refresh() -> None:
    counts = {phase: 0 for phase in (*PHASES, _UNSET)}
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        JOBS.labels(phase=phase).set(count)


@contextmanager
def time_reconcile(conflicts: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Time a reconcile pass, labelled by outcome: "ok", "conflict" (it raised one of
    `conflicts`: the job changed under the pass, which is redone at once on a fresh read,
    the usual course of optimistic concurrency, so not an error) or "error"."""
    began = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    except conflicts:
        outcome = "conflict"
        raise
    finally:
        RECONCILE_SECONDS.labels(outcome=outcome).observe(time.perf_counter() - began)


def count_rescale(reason: str) -> None:
    RESCALES.labels(reason=reason).inc()


def count_restarts(n: int = 1) -> None:
    if n > 0:
        RESTARTS.inc(n)


def set_stale_watches(count: int) -> None:
    STALE_WATCHES.set(count)


def count_reactor_restart() -> None:
    REACTOR_RESTARTS.inc()


def count_capacity_failure() -> None:
    CAPACITY_FAILURES.inc()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` in a background thread (0: do not serve)."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)
