"""The allocator's pass around the pure allocator (reconcile/allocation.py): capacity from
nodes and pods, priorities, the job view, the writes; and the core's gang admission gate
(a job the allocator has not admitted is Queued and creates nothing)."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

import pytest

from lepton_operator.api.conditions import (
    CONDITION_ADMITTED,
    REASON_ADMITTED,
    REASON_ALLOCATOR_GROW,
    REASON_QUEUED,
    REASON_QUEUED_BEHIND,
)
from lepton_operator.api.models import FINALIZER, LeptonJobStatus, Observation, parse_job, parse_status
from lepton_operator.desired import LABEL_JOB_NAME, LABEL_MANAGED_BY, MANAGED_BY, JobRef
from lepton_operator.reconcile.allocation import (
    allocate_soon,
    allocator_pass,
    allocator_tick,
    capacity_view,
    gpu_pod_view,
    job_of_pod,
    job_priority,
    job_state,
    job_view,
    plan_job_writes,
    pod_gpus,
    priority_values,
)
from lepton_operator.reconcile.autoscaling import progress_patch, record_observation
from lepton_operator.reconcile.conditions import set_condition
from lepton_operator.reconcile.config import OperatorConfig
from lepton_operator.reconcile.context import OperatorContext
from lepton_operator.reconcile.kube import Conflict
from lepton_operator.reconcile.loop import job_loop
from lepton_operator.scaling.allocator import Allocation
from lepton_operator.scaling.prometheus import Progress
from tests.unit.planworld import World, base_spec

pytestmark = pytest.mark.unit

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def node(name, gpus=8, ready=True, cordoned=False, labels=None, taints=None):
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"unschedulable": cordoned, **({"taints": taints} if taints else {})},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pod(namespace, gpus, node_name=None, job=None):
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB_NAME: job} if job else {}
    return {
        "metadata": {"namespace": namespace, "name": f"p-{gpus}-{job}", "labels": labels},
        "spec": {
            **({"nodeName": node_name} if node_name else {}),
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        },
    }


def spec(**overrides):
    return parse_job("job", base_spec(**overrides))


def test_pod_gpus_reads_limits_or_requests():
    assert pod_gpus(pod("ns", 4)) == 4
    requests_only = {"spec": {"containers": [{"resources": {"requests": {"nvidia.com/gpu": 2}}}, {}]}}
    assert pod_gpus(requests_only) == 2
    assert pod_gpus({"spec": {}}) == 0


def test_capacity_counts_usable_nodes_minus_gpus_of_other_pods():
    nodes = [node("a"), node("b"), node("sick", ready=False), node("cordoned", cordoned=True), node("cpu", gpus=0)]
    pods = [
        pod("other", 3, node_name="a"),  # someone else's training pod
        pod("other", 2),  # someone else's, still Pending: it will take GPUs somewhere
        pod("ns", 4, node_name="b", job="job"),  # our job's worker: held, not subtracted
        pod("other", 8, node_name="sick"),  # on a node not counted anyway
    ]
    view = capacity_view(nodes, pods, {("ns", "job"): spec()})
    assert view.capacity.total == 16 - 3 - 2
    assert view.held == {("ns", "job"): 4}
    assert view.pools == {("ns", "job"): None}


def test_a_job_restricted_by_node_selector_or_taints_gets_its_own_pool():
    nodes = [
        node("a100-1", labels={"gpu": "a100"}),
        node("a100-2", labels={"gpu": "a100"}),
        node("h100", labels={"gpu": "h100"}, taints=[{"key": "dedicated", "value": "llm", "effect": "NoSchedule"}]),
    ]
    pods = [pod("other", 2, node_name="a100-1")]
    specs = {
        ("ns", "pinned"): spec(nodeSelector={"gpu": "a100"}),
        ("ns", "any"): spec(),
        ("ns", "tolerant"): spec(tolerations=[{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]),
    }
    view = capacity_view(nodes, pods, specs)
    assert view.capacity.total == 24 - 2
    assert view.pools[("ns", "tolerant")] is None  # every node
    pinned, untainted = view.pools[("ns", "pinned")], view.pools[("ns", "any")]
    assert view.capacity.pools[pinned] == 16 - 2
    # Without the toleration the tainted node is out of reach: the same two nodes.
    assert view.capacity.pools[untainted] == 16 - 2


def test_priority_comes_from_the_spec_then_the_class_then_the_global_default():
    classes = priority_values(
        [
            {"metadata": {"name": "high"}, "value": 1000},
            {"metadata": {"name": "normal"}, "value": 10, "globalDefault": True},
        ]
    )
    assert job_priority(spec(priority=5, priorityClassName="high"), classes) == 5
    assert job_priority(spec(priorityClassName="high"), classes) == 1000
    assert job_priority(spec(priorityClassName="missing"), classes) == 0
    assert job_priority(spec(), classes) == 10
    assert job_priority(spec(), {}) == 0


QUEUED = {"phase": "Queued"}  # as a new job's first pass leaves it: the allocator waits for that


def body(created=NOW - timedelta(minutes=5)):
    return {
        "metadata": {
            "name": "job",
            "namespace": "ns",
            "generation": 3,
            "resourceVersion": "7",
            "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    }


def running_status(world_size=2, measured=True) -> LeptonJobStatus:
    start = NOW - timedelta(minutes=10)
    observations = [Observation(world_size=1, throughput=100.0, measured_at=NOW - timedelta(hours=1))]
    if measured:
        observations.append(
            Observation(
                world_size=world_size,
                throughput=190.0,
                measured_at=NOW - timedelta(seconds=30),
                window_seconds=300,
                comm_fraction=0.2,
            )
        )
    return parse_status(
        {
            "phase": "Running",
            "workerGeneration": 2,
            "worldSize": world_size,
            "generationStartTime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "remainingSamples": 5e6,
            "autoscaling": {"observations": [o.to_k8s() for o in observations]},
        }
    )


def test_job_state_carries_measurements_progress_and_whether_it_can_be_resized_now():
    sp = spec(autoscaling={"enabled": True, "step": 2, "efficiencyThreshold": 0.3})
    state = job_state(("ns", "job"), body(), sp, running_status(), 2, None, 7, NOW)
    assert (state.key, state.min, state.max, state.step, state.floor, state.priority) == ("ns/job", 1, 4, 2, 0.3, 7)
    assert state.admitted and state.current == 2 and state.held_gpus == 2 and not state.busy
    assert state.remaining_samples == 5e6
    assert [(m.world_size, m.window_seconds, m.comm_fraction) for m in state.measurements] == [
        (1, 60.0, None),
        (2, 300.0, 0.2),  # the step time's communication share: the model's split
    ]
    assert state.measurements[0].age_seconds == pytest.approx(3600)
    assert state.created == pytest.approx(-300) and state.queued_since == pytest.approx(-300)
    # Not measured since this generation started: unsettled (not resized by choice).
    unmeasured = job_state(("ns", "job"), body(), sp, running_status(measured=False), 2, None, 0, NOW)
    assert not unmeasured.settled and not unmeasured.busy
    # Never started and not admitted: queued.
    fresh = job_state(("ns", "job"), body(), sp, LeptonJobStatus(), 0, None, 0, NOW)
    assert not fresh.admitted and fresh.current == 0


def test_an_admission_writes_replicas_first_then_the_admitted_condition():
    sp = spec(autoscaling={"enabled": True}, workers={"min": 1, "max": 8, "initial": 2})
    decision = Allocation("ns/job", True, 6, REASON_ADMITTED, "admitted at 6 workers")
    writes = plan_job_writes(body(), sp, LeptonJobStatus(), decision, NOW)
    assert writes.replicas == 6 and writes.replicas_first
    admitted = next(c for c in writes.status_patch["conditions"] if c["type"] == CONDITION_ADMITTED)
    assert admitted["status"] == "True" and admitted["reason"] == REASON_ADMITTED
    assert writes.status_patch["allocation"]["target"] == 6
    assert ("Normal", REASON_ADMITTED, "admitted at 6 workers") in writes.events


def test_a_queued_job_gets_admitted_false_with_its_place_and_no_replicas():
    decision = Allocation("ns/job", False, 0, REASON_QUEUED, "its 4 workers do not fit", queue_position=3)
    writes = plan_job_writes(body(), spec(autoscaling={"enabled": True}), LeptonJobStatus(), decision, NOW)
    assert writes.replicas is None
    cond = next(c for c in writes.status_patch["conditions"] if c["type"] == CONDITION_ADMITTED)
    assert cond["status"] == "False" and cond["reason"] == REASON_QUEUED and "place 3" in cond["message"]
    assert writes.status_patch["allocation"]["queuePosition"] == 3


def test_the_same_decision_again_writes_nothing_until_the_refresh():
    sp = spec(autoscaling={"enabled": True})
    status = running_status()
    set_condition(status, CONDITION_ADMITTED, True, REASON_ADMITTED, "admitted", NOW, 1)
    decision = Allocation("ns/job", True, 2, "AllocatorHold", "holding 2 workers")
    first = plan_job_writes(body(), sp, status, decision, NOW)
    assert set(first.status_patch) == {"allocation"} and first.replicas is None
    stored = parse_status({**status.to_k8s(), "allocation": first.status_patch["allocation"]})
    assert not plan_job_writes(body(), sp, stored, decision, NOW + timedelta(seconds=60)).status_patch
    assert plan_job_writes(body(), sp, stored, decision, NOW + timedelta(minutes=6)).status_patch


def test_a_grow_of_a_running_job_writes_status_then_replicas_and_an_event():
    sp = spec(autoscaling={"enabled": True})
    status = running_status()
    set_condition(status, CONDITION_ADMITTED, True, REASON_ADMITTED, "admitted", NOW, 1)
    decision = Allocation("ns/job", True, 4, REASON_ALLOCATOR_GROW, "2->4 workers: ...")
    writes = plan_job_writes(body(), sp, status, decision, NOW)
    assert writes.replicas == 4 and not writes.replicas_first and not writes.shrink
    assert ("Normal", REASON_ALLOCATOR_GROW, "2->4 workers: ...") in writes.events
    # A fixed job is never resized, whatever the decision says.
    fixed = plan_job_writes(body(), spec(), status, decision, NOW)
    assert fixed.replicas is None


def test_the_core_queues_a_job_the_allocator_has_not_admitted():
    w = World(base_spec())
    w.gated = True
    w.step()
    assert w.status.phase == "Queued" and not w.pods
    assert "allocator" in w.status.message
    set_condition(w.status, CONDITION_ADMITTED, False, REASON_QUEUED, "place 2 in the queue", w.now, 1)
    w.step()
    assert w.status.phase == "Queued" and w.status.message == "place 2 in the queue" and not w.pods
    assert w.budget is None  # a queued job holds no disruption budget (it would protect nothing)
    set_condition(w.status, CONDITION_ADMITTED, True, REASON_ADMITTED, "admitted at 2 workers", w.now, 1)
    w.step()
    assert w.status.phase == "Pending" and len(w.pods) == 2 and w.budget == 2


def test_a_resumed_job_waits_for_a_new_admission_its_gpus_went_back_at_the_suspension():
    w = World(base_spec())
    w.gated = True
    set_condition(w.status, CONDITION_ADMITTED, True, REASON_ADMITTED, "admitted at 2 workers", w.now, 1)
    w.step()
    w.settle(2)
    assert w.status.phase == "Running"
    w.set_spec(suspend=True)
    w.step()
    w.reap()
    w.step(10)
    assert w.status.phase == "Suspended" and not w.pods
    admitted = next(c for c in w.status.conditions if c.type == CONDITION_ADMITTED)
    assert admitted.status == "False" and "suspended" in admitted.message
    w.set_spec(suspend=False)
    w.step(10)
    assert w.status.phase == "Queued" and not w.pods and w.status.worker_generation == 1
    set_condition(w.status, CONDITION_ADMITTED, True, REASON_ADMITTED, "admitted at 2 workers", w.now, 1)
    w.step(10)
    w.settle(2)
    assert w.status.phase == "Running" and w.status.worker_generation == 2 and len(w.pods) == 2
    assert w.status.suspended_seconds == pytest.approx(30)  # 20 s suspended, then 10 s waiting in the queue


def test_observations_keep_history_and_the_latest_per_size():
    obs = []
    for i in range(60):
        size = 1 if i == 0 else 2 + i % 3
        obs = record_observation(
            obs, Observation(world_size=size, throughput=float(i), measured_at=NOW + timedelta(seconds=i))
        )
    assert any(o.world_size == 1 for o in obs)  # the only measurement at 1, though old
    assert len(obs) <= 32 + 4
    assert max(o.throughput for o in obs) == 59
    assert obs == sorted(obs, key=lambda o: (o.world_size, o.measured_at))


def test_progress_patch_gives_fraction_remaining_and_eta():
    patch = progress_patch(Progress(done=2500, target=10000), throughput=100.0, now=NOW)
    assert patch == {"progress": 0.25, "remainingSamples": 7500, "estimatedCompletionTime": "2026-03-01T12:01:15Z"}
    assert progress_patch(None, 100.0, NOW) == {}
    assert "estimatedCompletionTime" not in progress_patch(Progress(done=1, target=2), None, NOW)


# ------------------------------------------------------- placement Pack (issue 14)

RACK = "example.com/rack"


def racks():
    """Two racks of two 8-GPU nodes, and a node in no rack."""
    return [node(f"{r}-{i}", labels={RACK: r}) for r in "ab" for i in range(2)] + [node("loose")]


def pack(elastic=True, **overrides):
    body = {"placement": {"topologyKey": RACK, "mode": "Pack"}, "resources": {"gpus": 4}}
    body["autoscaling"] = {"enabled": elastic}
    body.update(overrides)
    return spec(**body)


def test_a_pack_job_is_limited_to_the_gpus_its_largest_rack_has_free_in_whole_workers():
    pods = [
        pod("other", 8, node_name="a-0"),  # rack a: only a-1 is free (2 workers)
        pod("ns", 4, node_name="b-0", job="neighbour"),  # another job's worker holds half of b-0
        pod("ns", 4, node_name="b-1", job="job"),  # the job's own worker counts as room for it
    ]
    specs = {("ns", "job"): pack(), ("ns", "neighbour"): spec()}
    view = capacity_view(racks(), pods, specs)
    # rack b: 1 worker on b-0 + 2 on b-1 = 12 GPUs; the 8 free GPUs of "loose" are in no rack.
    assert view.gpu_limits == {("ns", "job"): 12}
    assert view.capacity.total == 40 - 8  # the cluster's capacity is unchanged by the limit


def test_a_pack_job_whose_gang_fits_no_single_rack_gets_no_limit():
    empty = capacity_view(racks(), [], {("ns", "wide"): pack(workers={"min": 5, "max": 8})})
    assert empty.gpu_limits == {}  # 5 x 4 GPUs > 16: it takes the fewest racks instead
    # A fixed job's gang is its size.
    fixed = {("ns", "f5"): pack(False, workers={"min": 1, "max": 8, "initial": 5})}
    assert capacity_view(racks(), [], fixed).gpu_limits == {}
    fixed = {("ns", "f3"): pack(False, workers={"min": 1, "max": 8, "initial": 3})}
    assert capacity_view(racks(), [], fixed).gpu_limits == {("ns", "f3"): 16}


def test_only_pack_jobs_with_gpus_get_a_limit_and_the_job_state_carries_it():
    specs = {
        ("ns", "spread"): spec(placement={"topologyKey": RACK, "mode": "Spread"}),
        ("ns", "cpu"): pack(resources={"gpus": 0}),
        ("ns", "plain"): spec(),
        ("ns", "pinned"): pack(nodeSelector={"rack": "none"}),  # no node fits: no rack, no limit
    }
    assert capacity_view(racks(), [], specs).gpu_limits == {}
    state = job_state(("ns", "job"), body(), pack(), running_status(), 8, None, 0, NOW, gpu_limit=12)
    assert state.gpu_limit == 12
    assert job_state(("ns", "job"), body(), pack(), running_status(), 8, None, 0, NOW).gpu_limit is None


# ----------------------------------------------------------------- the pass reads the watch caches


class ListsNothing:
    """A Kube whose list of pods fails the test (and that cannot list jobs): the pass must use the caches."""

    def __init__(self, nodes):
        self.nodes, self.written = nodes, []

    def list_pods(self, namespace, selector):
        raise AssertionError("listed the pods")

    def list_nodes(self):
        self.node_lists = getattr(self, "node_lists", 0) + 1
        return self.nodes

    def list_priority_classes(self):
        return [{"metadata": {"name": "urgent"}, "value": 100}]

    def patch_job_status(self, namespace, name, version, patch):
        self.written.append((name, version, patch))
        return {"metadata": {"resourceVersion": str(int(version) + 1)}}

    def patch_job_replicas(self, namespace, name, version, replicas):
        return {"metadata": {"resourceVersion": str(int(version) + 1)}}

    def post_event(self, body, type_, reason, message):
        pass


def _gpu_pod(name, namespace, gpus, node, job=None, phase="Running"):
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB_NAME: job} if job else {"app": "other"}
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": {"big": "x" * 1000}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": gpus}}}]},
        "status": {"phase": phase},
    }


def test_the_cache_views_keep_only_what_the_pass_reads():
    job = {**body(), "spec": {"image": "t"}, "status": {"phase": "Running"}, "extra": {"x": 1}}
    job["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    view = job_view(job)
    assert set(view) == {"metadata", "spec", "status"} and "managedFields" not in view["metadata"]
    assert view["metadata"]["resourceVersion"] == "7"
    pod = gpu_pod_view(_gpu_pod("w", "ns", "4", "n1", job="job"))
    assert pod_gpus(pod) == 4 and job_of_pod(pod) == ("ns", "job") and pod["spec"]["nodeName"] == "n1"
    assert gpu_pod_view(_gpu_pod("cpu", "ns", "0", "n1")) is None
    assert gpu_pod_view(_gpu_pod("done", "ns", "2", "n1", phase="Succeeded")) is None


def test_a_pass_on_the_watch_caches_lists_no_jobs_and_no_pods():
    import asyncio
    import logging

    node = {
        "metadata": {"name": "n1"},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": {"nvidia.com/gpu": "8"}},
    }
    ctx = OperatorContext(kube=ListsNothing([node]))
    job = {
        "metadata": {**body()["metadata"], "name": "job", "namespace": "ns", "uid": "uid-job"},
        "spec": {"image": "t", "workers": {"min": 1, "max": 4}, "resources": {"gpus": 2}},
        "status": QUEUED,
    }
    foreign = gpu_pod_view(_gpu_pod("other", "ns", "6", "n1"))  # 6 of the 8 GPUs are someone else's
    decisions = asyncio.run(allocator_pass(ctx, logging.getLogger("test"), [job_view(job)], [foreign]))
    decision = decisions["ns/job"]
    assert decision.admitted and decision.target == 1  # only 2 GPUs left: one worker
    assert ctx.kube.written and ctx.kube.written[0][1] == "7"  # written on the cached resourceVersion


def test_a_pass_reads_the_node_list_the_jobs_passes_share():
    import asyncio
    import logging

    ctx = OperatorContext(kube=ListsNothing([node("n1")]))
    assert ctx.nodes.get(ctx.kube.list_nodes)["n1"].ready  # a job's pass listed the nodes
    job = {
        "metadata": {**body()["metadata"], "uid": "uid-job"},
        "spec": {"image": "t", "workers": {"min": 1, "max": 4}, "resources": {"gpus": 2}},
        "status": QUEUED,
    }
    decisions = asyncio.run(allocator_pass(ctx, logging.getLogger("test"), [job_view(job)], []))
    assert decisions["ns/job"].admitted and ctx.kube.node_lists == 1  # its GPUs seen, no second list


def test_a_pass_decides_on_a_newer_answer_than_the_watch_cache_holds():
    """kopf's finalizer patch (or the operator's own write) answered version 8 while the
    cache still holds 7: the pass writes on 8 (on 7 it would get a Conflict)."""
    import asyncio
    import logging

    ctx = OperatorContext(kube=ListsNothing([node("n1")]))
    job = {
        "metadata": {**body()["metadata"], "uid": "uid-job"},
        "spec": {"image": "t", "workers": {"min": 1, "max": 4}, "resources": {"gpus": 2}},
        "status": QUEUED,
    }
    ctx.watch.watched(("ns", "job"), "7")
    answer = {**job, "metadata": {**job["metadata"], "resourceVersion": "8", "finalizers": ["kopf"]}}
    ctx.watch.known(("ns", "job"), "8", answer)
    asyncio.run(allocator_pass(ctx, logging.getLogger("test"), [job_view(job)], []))
    assert [version for _, version, _ in ctx.kube.written] == ["8"]
    # Once the watch delivers it, the cache is what the pass reads.
    ctx.watch.watched(("ns", "job"), "8")
    ctx.kube.written.clear()
    newer_spec = {**job, "metadata": {**job["metadata"], "resourceVersion": "9"}}
    asyncio.run(allocator_pass(ctx, logging.getLogger("test"), [job_view(newer_spec)], []))
    assert [version for _, version, _ in ctx.kube.written] == ["9"]


class StaleOnce(ListsNothing):
    """A write on a `stale` version finds the job changed (a Conflict); GETs answer `stored`.
    `on_conflict` runs first (an answer arriving meanwhile)."""

    def __init__(self, nodes, stored, stale=("7",)):
        super().__init__(nodes)
        self.stored, self.stale, self.on_conflict, self.gets, self.events = stored, stale, lambda: None, 0, []

    def patch_job_status(self, namespace, name, version, patch):
        if version in self.stale:
            from lepton_operator.reconcile.kube import Conflict

            self.on_conflict()
            raise Conflict("the object has been modified")
        return super().patch_job_status(namespace, name, version, patch)

    def get_job(self, namespace, name):
        self.gets += 1
        return self.stored

    def post_event(self, body, type_, reason, message):
        self.events.append((body["metadata"]["resourceVersion"], reason))


def _arrival(version="7", generation=3, finalizers=()):
    meta = {**body()["metadata"], "uid": "uid-job", "resourceVersion": version, "generation": generation}
    meta["finalizers"] = list(finalizers)
    return {
        "metadata": meta,
        "spec": {"image": "t", "workers": {"min": 1, "max": 4}, "resources": {"gpus": 2}},
        "status": QUEUED,
    }


def _allocate_arrival(kube, on_conflict=None) -> OperatorContext:
    import asyncio
    import logging

    ctx = OperatorContext(kube=kube)
    if on_conflict is not None:
        kube.on_conflict = lambda: on_conflict(ctx)
    ctx.allocator.wanted = False
    ctx.watch.watched(("ns", "job"), "7")
    decisions = asyncio.run(allocator_pass(ctx, logging.getLogger("test"), [job_view(_arrival())], []))
    assert decisions["ns/job"].admitted
    return ctx


def test_an_admission_that_meets_kopfs_finalizer_is_written_again_at_once_after_a_read():
    """A new job's admission raced kopf's finalizer patch: the same spec at a newer
    version, so it is written there at once (not at the next tick); the event goes once."""
    kube = StaleOnce([node("n1")], _arrival("8", finalizers=["lepton.ai/operator"]))
    ctx = _allocate_arrival(kube)
    assert kube.gets == 1 and [version for _, version, _ in kube.written] == ["8"]
    assert kube.events == [("8", "Admitted")] and not ctx.allocator.wanted


def test_an_admission_that_meets_kopfs_finalizer_uses_kopfs_answer_when_it_has_come():
    finalized = _arrival("8", finalizers=["lepton.ai/operator"])
    kube = StaleOnce([node("n1")], stored=None)  # a GET would find nothing
    # kopf's patch answer arrives while the write is in flight.
    ctx = _allocate_arrival(kube, on_conflict=lambda ctx: ctx.watch.known(("ns", "job"), "8", finalized))
    assert kube.gets == 0 and [version for _, version, _ in kube.written] == ["8"]
    assert kube.events == [("8", "Admitted")] and not ctx.allocator.wanted


def test_an_admission_that_also_meets_the_jobs_first_pass_is_written_on_the_passs_answer():
    """kopf's finalizer (8), then the job's own first pass (9) moved the version: the third
    write goes through, on the pass's answer, with no second GET."""
    passed = _arrival("9", finalizers=["lepton.ai/operator"])
    kube = StaleOnce([node("n1")], _arrival("8", finalizers=["lepton.ai/operator"]), stale=("7", "8"))

    def conflict(ctx):
        if kube.gets:  # the write on 8 lost to the pass's write
            ctx.watch.known(("ns", "job"), "9", passed)

    ctx = _allocate_arrival(kube, on_conflict=conflict)
    assert kube.gets == 1 and [version for _, version, _ in kube.written] == ["9"]
    assert kube.events == [("9", "Admitted")] and not ctx.allocator.wanted


def test_an_admission_whose_job_changed_its_spec_meanwhile_waits_for_the_next_tick():

    kube = StaleOnce([node("n1")], _arrival("8", generation=4))
    ctx = _allocate_arrival(kube)
    assert kube.written == [] and kube.events == [] and ctx.allocator.wanted


class SlowWrites(ListsNothing):
    """Each write takes a moment; counts how many are in flight at once."""

    def __init__(self, nodes):
        super().__init__(nodes)
        import threading

        self.lock, self.in_flight, self.most = threading.Lock(), 0, 0

    def patch_job_status(self, namespace, name, version, patch):
        import time

        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.02)
        with self.lock:
            self.in_flight -= 1
        return super().patch_job_status(namespace, name, version, patch)


def test_a_pass_writes_its_decisions_together_within_a_bound():
    import asyncio
    import logging

    from lepton_operator.reconcile.allocation import WRITE_CONCURRENCY

    ctx = OperatorContext(kube=SlowWrites([node("n1", gpus=512)]))
    jobs = [
        job_view(
            {
                "metadata": {**body()["metadata"], "name": f"job-{i}", "namespace": "ns", "uid": f"uid-{i}"},
                "spec": {"image": "t", "workers": {"min": 1, "max": 4}, "resources": {"gpus": 2}},
                "status": QUEUED,
            }
        )
        for i in range(3 * WRITE_CONCURRENCY)
    ]
    decisions = asyncio.run(allocator_pass(ctx, logging.getLogger("test"), jobs, []))
    assert all(d.admitted for d in decisions.values())
    assert len(ctx.kube.written) == len(jobs)  # every admission written
    # Not one after the other (each write waited behind every job's own requests at 1,000
    # jobs), and no more at once than the bound, so the jobs' passes still get threads.
    assert 1 < ctx.kube.most <= WRITE_CONCURRENCY


def test_a_queued_jobs_place_alone_is_written_again_only_at_the_refresh():
    sp = spec(autoscaling={"enabled": True})
    third = Allocation("ns/job", False, 0, REASON_QUEUED, "its 4 workers do not fit", queue_position=3)
    first = plan_job_writes(body(), sp, LeptonJobStatus(), third, NOW)
    stored = parse_status(first.status_patch)
    second = Allocation("ns/job", False, 0, REASON_QUEUED, "its 4 workers do not fit", queue_position=2)
    # A minute later the job moved up one place: nothing is written for that alone.
    assert not plan_job_writes(body(), sp, stored, second, NOW + timedelta(seconds=60)).status_patch
    # At the refresh the place is written again, in the record and the condition.
    later = plan_job_writes(body(), sp, stored, second, NOW + timedelta(minutes=6)).status_patch
    assert later["allocation"]["queuePosition"] == 2
    assert "place 2" in next(c for c in later["conditions"] if c["type"] == CONDITION_ADMITTED)["message"]
    # A different reason is news at once.
    behind = Allocation("ns/job", False, 0, REASON_QUEUED_BEHIND, "ns/old has waited longer", queue_position=2)
    now = plan_job_writes(body(), sp, stored, behind, NOW + timedelta(seconds=60)).status_patch
    assert now["allocation"]["reason"] == REASON_QUEUED_BEHIND


class NewJobKube(ListsNothing):
    """A new job as its first pass reads it: kopf's finalizer on, no status yet. A status
    write on any other version than the stored one is a Conflict; answers are reported to
    `job_seen` (the watch health), as `Kube` does."""

    def __init__(self, nodes):
        super().__init__(nodes)
        meta = {**body()["metadata"], "uid": "uid-new", "resourceVersion": "8", "finalizers": [FINALIZER]}
        spec = {"image": "t", "workers": {"min": 1, "max": 4}, "resources": {"gpus": 2}}
        self.stored = {"metadata": meta, "spec": spec}
        self.conflicts = 0

    def get_job(self, namespace, name):
        return copy.deepcopy(self.stored)

    def list_pods(self, namespace, selector):
        return []

    def patch_job_status(self, namespace, name, version, patch):
        meta = self.stored["metadata"]
        if version != meta["resourceVersion"]:
            self.conflicts += 1
            raise Conflict("the object has been modified")
        self.written.append((name, version, patch))
        status = self.stored.setdefault("status", {})
        status.update({k: v for k, v in patch.items() if k != "allocation"})
        meta["resourceVersion"] = str(int(version) + 1)
        self.job_seen((namespace, name), meta["resourceVersion"], copy.deepcopy(self.stored))
        return copy.deepcopy(self.stored)

    def create(self, obj):
        return "created"


def test_a_new_job_is_allocated_right_after_its_first_pass_on_the_status_that_pass_wrote():
    """The allocator leaves a job the core has not passed yet alone; the job's first pass
    asks for an allocation, which its loop runs at once, on the pass's answer: no Conflict
    between the pass, the allocator and kopf's finalizer."""
    import asyncio
    import logging

    log = logging.getLogger("test")
    kube = NewJobKube([node("n1")])
    ctx = OperatorContext(kube=kube, config=OperatorConfig(resync_seconds=0.05))
    key, cached = ("ns", "job"), job_view(kube.stored)  # what the watch delivered: version 8
    ctx.watch.watched(key, "8")
    # A timer's tick as the job arrives (a departure had asked for a pass): nothing to decide
    # on the new job, and the next pass may not start within the second.
    asyncio.run(allocator_tick(ctx, log, [cached], []))
    assert ctx.allocator.started == 1 and not kube.written

    phases_seen = []

    async def allocate():
        phases_seen.append(kube.stored["status"]["phase"])
        await allocate_soon(ctx, log, lambda: ([cached], []))  # the watch cache still at version 8

    indexes = {"pods_by_job": {}, "services_by_job": {}, "claims_by_job": {}, "budgets_by_job": {}}
    job = JobRef(name="job", namespace="ns", uid="uid-new")
    asyncio.run(asyncio.wait_for(job_loop(ctx, job, indexes, lambda: bool(phases_seen), log, allocate=allocate), 10))
    assert phases_seen == ["Queued"] and ctx.allocator.started == 2  # after the pass wrote its status
    assert not ctx.allocator.asked_by  # asked once: the job's later passes do not run the allocator
    assert [version for _, version, _ in kube.written] == ["8", "9"] and kube.conflicts == 0
    admitted = kube.written[1][2]["conditions"]
    assert any(c["type"] == CONDITION_ADMITTED and c["status"] == "True" for c in admitted)
