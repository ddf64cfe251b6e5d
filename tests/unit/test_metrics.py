"""The operator's own metrics (lepton_operator/metrics.py): the phase gauge counts the jobs
this operator reconciles, and a job that is forgotten leaves no trace in the registry."""

from __future__ import annotations

import pytest

from lepton_operator import metrics
from lepton_operator.reconcile.kube import Conflict, TransientApiError

pytestmark = pytest.mark.unit


def samples() -> list:
    """Every sample the operator's registry would expose on /metrics."""
    return [s for family in metrics.REGISTRY.collect() for s in family.samples]


def jobs_in(phase: str) -> float:
    """The gauge's value for the phase (0 before the first job set it)."""
    values = [s.value for s in samples() if s.name == "lepton_operator_jobs" and s.labels == {"phase": phase}]
    return sum(values)


def mentions(namespace: str, name: str) -> list:
    """Samples with the job's namespace or name in a label value."""
    return [s for s in samples() if {namespace, name} & set(s.labels.values())]


def test_the_phase_gauge_counts_jobs_and_forgets_them():
    running, failed = jobs_in("Running"), jobs_in("Failed")
    metrics.set_job_phase("metrics-ns", "a", "Running")
    metrics.set_job_phase("metrics-ns", "b", "Running")
    assert jobs_in("Running") == running + 2
    metrics.set_job_phase("metrics-ns", "b", "Failed")  # a job counts in one phase only
    assert (jobs_in("Running"), jobs_in("Failed")) == (running + 1, failed + 1)
    metrics.forget_job("metrics-ns", "a")
    metrics.forget_job("metrics-ns", "b")
    metrics.forget_job("metrics-ns", "b")  # twice: harmless
    assert (jobs_in("Running"), jobs_in("Failed")) == (running, failed)


def test_a_job_without_a_phase_counts_as_unknown_until_forgotten():
    unknown = jobs_in("Unknown")
    metrics.set_job_phase("metrics-ns", "new", None)
    assert jobs_in("Unknown") == unknown + 1
    metrics.forget_job("metrics-ns", "new")
    assert jobs_in("Unknown") == unknown


def test_no_series_is_labelled_by_job_so_a_deleted_job_leaves_none():
    # Series per job would grow with every job ever run; the gauge is by phase only.
    metrics.set_job_phase("metrics-ns-x", "metrics-job-x", "Running")
    metrics.count_rescale("ManualScale")
    metrics.count_restarts(1)
    with metrics.time_reconcile():
        pass
    assert mentions("metrics-ns-x", "metrics-job-x") == []
    metrics.forget_job("metrics-ns-x", "metrics-job-x")
    assert mentions("metrics-ns-x", "metrics-job-x") == []
    phases = {s.labels["phase"] for s in samples() if s.name == "lepton_operator_jobs"}
    assert phases == {*metrics.PHASES, "Unknown"}  # a bounded set of series


def test_a_pass_that_met_a_conflict_is_not_counted_as_an_error():
    # A Conflict is redone at once on a fresh read: counted as an error, a busy cluster's
    # conflicts would fire LeptonOperatorReconcileErrors with nothing in the log to act on.
    def passes(outcome: str) -> float:
        return value("lepton_operator_reconcile_duration_seconds_count", outcome=outcome) or 0.0

    before = {o: passes(o) for o in ("ok", "conflict", "error")}
    with metrics.time_reconcile(conflicts=(Conflict,)):
        pass
    with pytest.raises(Conflict), metrics.time_reconcile(conflicts=(Conflict,)):
        raise Conflict("the object has been modified")
    with pytest.raises(TransientApiError), metrics.time_reconcile(conflicts=(Conflict,)):
        raise TransientApiError("apiserver unavailable")
    with pytest.raises(KeyError), metrics.time_reconcile(conflicts=(Conflict,)):
        raise KeyError("a bug")
    assert {o: passes(o) - before[o] for o in before} == {"ok": 1, "conflict": 1, "error": 2}


# ------------------------------------------------------------------ the allocator's gauges


def value(name: str, **labels: str) -> float | None:
    """The sample's value, or None when the series does not exist."""
    found = [s.value for s in samples() if s.name == name and s.labels == labels]
    return found[0] if found else None


def series_of(namespace: str, name: str) -> list:
    """Samples labelled with the job (both its namespace and its name)."""
    return [s for s in samples() if s.labels.get("namespace") == namespace and s.labels.get("job_name") == name]


def test_an_allocator_pass_sets_capacity_gpus_targets_and_the_queue():
    passes = value("lepton_operator_allocator_passes_total") or 0.0
    a, b = ("alloc-ns", "a"), ("alloc-ns", "b")
    metrics.record_allocation(16, {a: 8, b: 0}, {a: 4, b: 0}, {b: 42.5}, 0.2)
    assert value("lepton_operator_cluster_gpus") == 16
    assert value("lepton_operator_job_gpus", namespace="alloc-ns", job_name="a") == 8
    assert value("lepton_operator_job_allocated_workers", namespace="alloc-ns", job_name="a") == 4
    assert value("lepton_operator_job_allocated_workers", namespace="alloc-ns", job_name="b") == 0
    assert value("lepton_operator_queued_jobs") == 1
    assert value("lepton_operator_job_queued_seconds", namespace="alloc-ns", job_name="b") == 42.5
    assert value("lepton_operator_job_queued_seconds", namespace="alloc-ns", job_name="a") is None  # admitted
    assert value("lepton_operator_allocator_passes_total") == passes + 1
    assert (value("lepton_operator_allocator_pass_seconds_count") or 0) >= 1
    for key in (a, b):
        metrics.forget_job(*key)


def test_admission_removes_the_wait_and_a_job_gone_from_the_pass_loses_its_series():
    a, b = ("alloc-ns2", "a"), ("alloc-ns2", "b")
    metrics.record_allocation(8, {a: 8}, {a: 8, b: 0}, {b: 10.0}, 0.1)
    metrics.record_allocation(8, {a: 4, b: 4}, {a: 4, b: 4}, {}, 0.1)  # b admitted
    assert value("lepton_operator_job_queued_seconds", namespace="alloc-ns2", job_name="b") is None
    assert value("lepton_operator_queued_jobs") == 0
    assert value("lepton_operator_job_gpus", namespace="alloc-ns2", job_name="b") == 4
    metrics.record_allocation(8, {b: 4}, {b: 4}, {}, 0.1)  # a finished: not in the pass
    assert series_of(*a) == []
    assert value("lepton_operator_job_gpus", namespace="alloc-ns2", job_name="b") == 4
    metrics.record_allocation(8, {}, {}, {}, 0.1)  # no job left
    assert series_of(*b) == []


def test_a_forgotten_job_loses_its_allocator_series_at_once():
    a = ("alloc-ns3", "queued")
    metrics.set_job_phase(*a, "Queued")
    metrics.record_allocation(0, {a: 0}, {a: 0}, {a: 5.0}, 0.1)
    assert mentions(*a) != []
    metrics.forget_job(*a)
    assert mentions(*a) == []
    metrics.forget_job(*a)  # twice: harmless
    metrics.record_allocation(0, {}, {}, {}, 0.1)  # a later pass does not trip over it
    assert mentions(*a) == []


def test_the_per_job_series_are_bounded_by_the_jobs_of_the_last_pass():
    jobs = {("alloc-churn", f"job-{i}"): 1 for i in range(50)}
    for key in jobs:  # fifty passes, each seeing one job: only the last one's series stay
        metrics.record_allocation(4, {key: 1}, {key: 1}, {key: 1.0}, 0.01)
    per_job = [s for s in samples() if s.labels.get("namespace") == "alloc-churn"]
    assert {s.labels["job_name"] for s in per_job} == {"job-49"}
    assert len(per_job) == 3  # gpus, allocated workers, queued seconds
    metrics.record_allocation(4, {}, {}, {}, 0.01)
    assert [s for s in samples() if s.labels.get("namespace") == "alloc-churn"] == []


class _FakeKube:
    """The reads an allocator pass makes, and writes that succeed."""

    def __init__(self, nodes: list[dict]) -> None:
        self.nodes = nodes

    def list_priority_classes(self) -> list[dict]:
        return []

    def list_nodes(self) -> list[dict]:
        return self.nodes

    def patch_job_status(self, namespace, name, version, patch) -> dict:
        return {"metadata": {"resourceVersion": str(int(version) + 1)}}

    def patch_job_replicas(self, namespace, name, version, replicas) -> dict:
        return {"metadata": {"resourceVersion": str(int(version) + 1)}}

    def post_event(self, body, type_, reason, message) -> None:
        pass


def _job(name: str, gpus: int, minimum: int, created: str) -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": "alloc-pass",
            "uid": f"uid-{name}",
            "resourceVersion": "1",
            "generation": 1,
            "creationTimestamp": created,
        },
        "spec": {"image": "trainer:1", "workers": {"min": minimum, "max": minimum}, "resources": {"gpus": gpus}},
        "status": {"phase": "Queued"},  # passed by the core once: the allocator decides on it
    }


def test_an_allocator_pass_records_what_it_saw_and_decided():
    import asyncio
    import logging

    from lepton_operator.reconcile.allocation import allocator_pass, job_view
    from lepton_operator.reconcile.context import OperatorContext

    node = {
        "metadata": {"name": "gpu-node"},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": {"nvidia.com/gpu": "8"}},
    }
    # "first" fits (2 workers x 4 GPUs); "second", created later, does not: it is queued.
    jobs = [_job("first", 4, 2, "2026-01-01T00:00:00Z"), _job("second", 8, 1, "2026-01-01T00:01:00Z")]
    ctx = OperatorContext(kube=_FakeKube([node]))
    passes = value("lepton_operator_allocator_passes_total") or 0.0
    decisions = asyncio.run(allocator_pass(ctx, logging.getLogger("test"), [job_view(j) for j in jobs], []))
    assert decisions["alloc-pass/first"].admitted and not decisions["alloc-pass/second"].admitted
    assert value("lepton_operator_cluster_gpus") == 8
    assert value("lepton_operator_job_allocated_workers", namespace="alloc-pass", job_name="first") == 2
    assert value("lepton_operator_job_gpus", namespace="alloc-pass", job_name="first") == 0  # no pods yet
    assert value("lepton_operator_queued_jobs") == 1
    waited = value("lepton_operator_job_queued_seconds", namespace="alloc-pass", job_name="second")
    assert waited is not None and waited > 3600  # created long ago
    assert value("lepton_operator_job_queued_seconds", namespace="alloc-pass", job_name="first") is None
    assert value("lepton_operator_allocator_passes_total") == passes + 1
    asyncio.run(allocator_pass(ctx, logging.getLogger("test"), [], []))  # both gone: no per-job series left
    assert [s for s in samples() if s.labels.get("namespace") == "alloc-pass"] == []
    assert value("lepton_operator_queued_jobs") == 0


# ------------------------------------------------------------------ restarts left, metrics unavailable


def test_restarts_remaining_and_metrics_unavailable_are_set_cleared_and_forgotten():
    key = ("gauges-ns", "job")
    metrics.set_job_restarts_remaining(*key, 1)
    metrics.set_job_metrics_unavailable(*key, True)
    assert value("lepton_operator_job_restarts_remaining", namespace="gauges-ns", job_name="job") == 1
    assert value("lepton_operator_job_metrics_unavailable", namespace="gauges-ns", job_name="job") == 1
    metrics.set_job_restarts_remaining(*key, -2)  # more restarts than allowed (maxRestarts lowered): 0
    metrics.set_job_metrics_unavailable(*key, False)
    assert value("lepton_operator_job_restarts_remaining", namespace="gauges-ns", job_name="job") == 0
    assert value("lepton_operator_job_metrics_unavailable", namespace="gauges-ns", job_name="job") == 0
    metrics.set_job_restarts_remaining(*key, None)  # finished
    metrics.set_job_metrics_unavailable(*key, None)  # not measured
    assert series_of(*key) == []
    metrics.set_job_restarts_remaining(*key, None)  # twice: harmless
    metrics.set_job_restarts_remaining(*key, 3)
    metrics.set_job_metrics_unavailable(*key, True)
    metrics.forget_job(*key)
    assert series_of(*key) == []


class _PassKube:
    """What one reconcile pass of a job reads and writes: the job (`status` as stored), no
    pods, no nodes; writes succeed."""

    def __init__(self, status: dict | None):
        self.status = status

    def get_job(self, namespace, name):
        spec = {"image": "trainer:1", "workers": {"min": 1, "max": 2}, "restart": {"maxRestarts": 3}}
        meta = {"name": name, "namespace": namespace, "uid": "uid-r", "resourceVersion": "1", "generation": 1}
        return {"metadata": meta, "spec": spec, "status": self.status}

    def list_pods(self, namespace, selector):
        return []

    def list_nodes(self):
        return []

    def patch_job_status(self, namespace, name, version, patch):
        return None

    def create(self, obj):
        return "created"

    def delete(self, namespace, kind, name, grace, uid=None):
        return True

    def patch(self, namespace, kind, name, change):
        pass

    def post_event(self, body, type_, reason, message):
        pass

    def delete_job(self, namespace, name, uid):
        pass


def _reconcile(status: dict | None) -> float | None:
    import asyncio

    from lepton_operator.desired import JobRef
    from lepton_operator.reconcile.context import OperatorContext
    from lepton_operator.reconcile.loop import run_pass

    ctx = OperatorContext(kube=_PassKube(status))
    indexes = {"pods_by_job": {}, "services_by_job": {}, "claims_by_job": {}, "budgets_by_job": {}}
    asyncio.run(run_pass(ctx, JobRef("restarts", "restarts-ns", "uid-r"), indexes))
    return value("lepton_operator_job_restarts_remaining", namespace="restarts-ns", job_name="restarts")


def test_a_reconcile_pass_sets_the_restarts_left_and_a_finished_job_has_none():
    assert _reconcile(None) == 3  # a new job: maxRestarts 3, none spent
    # Two restarts spent; the workers are gone (a disruption: it does not spend one).
    assert _reconcile({"phase": "Running", "restarts": 2, "workerGeneration": 3, "worldSize": 2}) == 1
    assert _reconcile({"phase": "Failed", "restarts": 3, "workerGeneration": 4}) is None  # finished: no series
    metrics.forget_job("restarts-ns", "restarts")


def test_a_reconcile_pass_exports_how_many_job_watches_lag_the_api():
    import asyncio

    from lepton_operator.desired import JobRef
    from lepton_operator.reconcile.context import OperatorContext, WatchHealth
    from lepton_operator.reconcile.loop import run_pass

    ctx = OperatorContext(kube=_PassKube(None))
    ctx.watch = WatchHealth(stale_after=0.0)
    indexes = {"pods_by_job": {}, "services_by_job": {}, "claims_by_job": {}, "budgets_by_job": {}}
    ctx.watch.watched(("restarts-ns", "restarts"), "1")  # this job's watch is up to date
    ctx.watch.watched(("other-ns", "other"), "1")
    ctx.watch.known(("other-ns", "other"), "2")  # its watch never delivered version 2
    asyncio.run(run_pass(ctx, JobRef("restarts", "restarts-ns", "uid-r"), indexes))
    assert value("lepton_operator_stale_watches") == 1
    ctx.watch.watched(("other-ns", "other"), "2")  # caught up
    asyncio.run(run_pass(ctx, JobRef("restarts", "restarts-ns", "uid-r"), indexes))
    assert value("lepton_operator_stale_watches") == 0
    metrics.forget_job("restarts-ns", "restarts")


def test_the_autoscaler_sets_metrics_unavailable_from_its_plan_after_the_status_write(monkeypatch):
    import asyncio
    import logging

    from lepton_operator.reconcile import autoscaling
    from lepton_operator.reconcile.config import OperatorConfig
    from lepton_operator.reconcile.context import OperatorContext
    from lepton_operator.scaling.prometheus import MetricsError, Sample

    running = {"phase": "Running", "worldSize": 2, "workerGeneration": 1}

    class Kube(_PassKube):
        written: list = []

        def get_job(self, namespace, name):
            body = super().get_job(namespace, name)
            body["spec"]["autoscaling"] = {"enabled": True}
            return body

        def patch_job_status(self, namespace, name, version, patch):
            self.written.append(patch)
            return {"metadata": {"resourceVersion": "2"}}

        def patch_job_replicas(self, namespace, name, version, replicas):
            return {"metadata": {"resourceVersion": "3"}}

    measured: list = [MetricsError("connection", "refused")]
    monkeypatch.setattr(autoscaling, "measure", lambda *args: measured[0])
    monkeypatch.setattr(autoscaling, "read_progress", lambda *args: None)
    kube = Kube(running)
    ctx = OperatorContext(kube=kube, config=OperatorConfig(prometheus_url="http://prometheus:9090"))

    def tick() -> float | None:
        ctx.autoscaler_memory(("unavail-ns", "job")).last_run = None
        asyncio.run(autoscaling.autoscale_pass(ctx, "unavail-ns", "job", 60, logging.getLogger("test")))
        return value("lepton_operator_job_metrics_unavailable", namespace="unavail-ns", job_name="job")

    assert tick() == 1 and kube.written  # the condition was written True
    kube.status = {**running, "conditions": kube.written[-1]["conditions"]}
    assert tick() == 1  # still unavailable: the stored condition says so
    measured[0] = Sample(100.0, 0.0, {}, 60)
    assert tick() == 0  # back: written False
    kube.status = {**running, "phase": "Rescaling"}
    assert tick() is None  # not measured while not Running: no series
    metrics.forget_job("unavail-ns", "job")
