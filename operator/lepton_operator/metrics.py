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

# No series is labelled by job: series per job would grow with every job ever run. A
# deleted job leaves only its entry in `_phases`, which forget_job() drops.
JOBS = Gauge(
    "lepton_operator_jobs",
    "LeptonJobs this operator reconciles, by phase.",
    ["phase"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "lepton_operator_reconcile_duration_seconds",
    "Duration of one reconcile pass (read, plan, write), by outcome.",
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

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
_UNSET = "Unknown"


def set_job_phase(namespace: str, name: str, phase: Optional[str]) -> None:
    """Record a job's current phase (None: not yet known); the gauge is recomputed."""
    with _lock:
        _phases[(namespace, name)] = phase or _UNSET
        _refresh()


def forget_job(namespace: str, name: str) -> None:
    """The job is gone (deleted, or no longer ours)."""
    with _lock:
        _phases.pop((namespace, name), None)
        _refresh()


def _refresh() -> None:
    counts = {phase: 0 for phase in (*PHASES, _UNSET)}
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        JOBS.labels(phase=phase).set(count)


@contextmanager
def time_reconcile() -> Iterator[None]:
    """Time a reconcile pass; the outcome label says whether it raised."""
    began = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        RECONCILE_SECONDS.labels(outcome=outcome).observe(time.perf_counter() - began)


def count_rescale(reason: str) -> None:
    RESCALES.labels(reason=reason).inc()


def count_restarts(n: int = 1) -> None:
    if n > 0:
        RESTARTS.inc(n)


def count_capacity_failure() -> None:
    CAPACITY_FAILURES.inc()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` in a background thread (0: do not serve)."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)
