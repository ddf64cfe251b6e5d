"""Faults through `plan()` (docs/reliability.md rows 18-22): clean capacity-confirmed
scale-ups, a stale pod cache, lost nodes, generations that cannot be placed, drains,
disruptions and hangs, driven over many passes of `World`."""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
from planworld import T0, World, base_spec, running_world, scale_to

from lepton_operator.api.conditions import (
    CONDITION_READY,
    CONDITION_RESCALING,
    REASON_GROWING_BACK,
    REASON_HUNG,
    REASON_NODE_DRAINING,
    REASON_NODE_LOST,
    REASON_SHRUNK_FOR_CAPACITY,
    REASON_WAITING_FOR_CAPACITY,
)
from lepton_operator.api.models import HangReport
from lepton_operator.desired import rendezvous_port
from lepton_operator.reconcile.conditions import get_condition
from lepton_operator.reconcile.nodes import NodeInfo, node_info
from lepton_operator.reconcile.plan import plan

pytestmark = pytest.mark.unit

READY = NodeInfo(ready=True)


def env(pod: dict) -> dict:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


# ---------------------------------------------------------------- clean scale-ups (row 18)


def test_ten_capacity_confirmed_scale_ups_cost_no_restart_and_never_share_a_store():
    w = running_world(base_spec(workers={"min": 1, "max": 12, "initial": 1}))
    seen_generations = [w.status.worker_generation]
    for size in range(2, 12):
        scale_to(w, size)
        w.step()  # ConfirmingCapacity: the added workers of the next generation exist
        added = [
            p
            for p in w.pods.values()
            if int(p["metadata"]["labels"]["lepton.ai/generation"]) != w.status.worker_generation
        ]
        running_port = rendezvous_port(w.parsed(), w.status.worker_generation)
        for pod in added:
            # The added workers' store is on another port than the running generation's.
            assert env(pod)["PET_RDZV_ENDPOINT"].endswith(f":{running_port + (1 if running_port % 2 == 0 else -1)}")
        w.settle(8)
        assert (w.status.world_size, w.status.phase, w.status.restarts) == (size, "Running", 0)
        seen_generations.append(w.status.worker_generation)
    assert len(set(seen_generations)) == len(seen_generations)  # every generation new
    assert seen_generations == sorted(seen_generations)


def test_an_added_worker_that_exits_before_its_generation_starts_is_replaced_not_counted():
    w = running_world()
    scale_to(w, 3)
    w.step()
    w.schedule("job-worker-2")
    w.exit("job-worker-2", 171)  # gave up waiting for the store
    p = w.step(5)
    assert w.deleted() == ["job-worker-2"] and w.status.rescale.stage == "ConfirmingCapacity"
    assert p.deletes[0].grace == 5
    w.reap()
    w.step()
    assert w.created_pods() == ["job-worker-2"]  # the same generation's worker, again
    w.settle(8)
    assert (w.status.world_size, w.status.restarts, w.status.disruptions) == (3, 0, 0)


# ------------------------------------------------------------- stale pod cache (row 19)


def test_a_stale_same_name_pod_of_an_older_generation_never_gets_the_live_pod_deleted():
    w = running_world()
    ghost = copy.deepcopy(w.pods["job-worker-1"])  # generation 1, as a lagging index keeps it
    scale_to(w, 3)
    w.settle(10)
    assert w.status.worker_generation == 2
    live_uid = w.pods["job-worker-1"]["metadata"]["uid"]
    pods = [copy.deepcopy(p) for p in w.pods.values()] + [ghost]
    for _ in range(3):  # every pass
        result = plan(w.job, 1, w.parsed(), w.status, w.observed(pods=pods), w.now)
        assert [(d.name, d.uid) for d in result.deletes] == [("job-worker-1", ghost["metadata"]["uid"])]
        assert live_uid not in {d.uid for d in result.deletes}
        assert result.status.restarts == 0 and result.creates == []


# ------------------------------------------------------------------- lost nodes (row 20)


def two_node_world(**spec) -> World:
    w = World(base_spec(workers={"min": 2, "max": 4, "initial": 4}, **spec))
    w.capacity = {"node-a": 2, "node-b": 2}
    w.nodes = {"node-a": READY, "node-b": READY}
    w.step()
    w.settle(3)
    assert w.status.phase == "Running"
    w.events.clear()
    return w


def test_a_lost_node_is_left_after_node_lost_seconds_and_the_job_shrinks_to_what_fits():
    w = two_node_world(autoscaling={"capacityTimeoutSeconds": 30, "capacityBackoffSeconds": 600, "step": 1})
    on_b = sorted(n for n, p in w.pods.items() if p["spec"]["nodeName"] == "node-b")
    w.nodes = {"node-a": READY, "node-b": NodeInfo(ready=False, not_ready_since=w.now)}
    w.step(30)
    assert w.last.deletes == [] and w.status.phase == "Running"  # not lost yet (60 s)
    w.step(31)
    forced = [d for d in w.last.deletes if d.grace == 0]
    assert sorted(d.name for d in forced) == on_b  # they could never finish a graceful delete
    assert (w.status.rescale.reason, w.status.disruptions, w.status.restarts) == (REASON_NODE_LOST, 1, 0)
    assert "node node-b has not been Ready" in w.status.message
    for _ in range(4):
        w.reap()
        w.run_all()
        w.step(1)
    # The new generation of 4 fits only 2 on node-a; after capacityTimeoutSeconds it restarts at 2.
    w.step(31)
    assert w.status.rescale.reason == REASON_SHRUNK_FOR_CAPACITY and w.status.rescale.to == 2
    assert get_condition(w.status, CONDITION_RESCALING).reason == REASON_SHRUNK_FOR_CAPACITY
    assert REASON_SHRUNK_FOR_CAPACITY in w.reasons()
    w.settle(8)
    assert (w.status.world_size, w.status.phase, w.status.restarts) == (2, "Running", 0)
    assert {p["spec"]["nodeName"] for p in w.pods.values()} == {"node-a"}
    # The node returns: after the capacity backoff the job grows back to the 4 it asks for.
    w.nodes = {"node-a": READY, "node-b": READY}
    w.step(601)
    assert w.status.rescale is not None and w.status.rescale.stage == "ConfirmingCapacity"
    assert w.status.rescale.reason == REASON_GROWING_BACK
    w.settle(10)
    assert (w.status.world_size, w.status.phase, w.status.restarts) == (4, "Running", 0)


def test_a_pod_stuck_terminating_on_a_lost_node_is_force_deleted_so_the_rescale_goes_on():
    w = two_node_world()
    scale_to(w, 2)
    w.step()
    assert w.status.rescale.stage == "Stopping"
    w.reap(*[n for n, p in w.pods.items() if p["spec"]["nodeName"] == "node-a"])
    stuck = sorted(n for n in w.pods)  # node-b's kubelet died: its pods never finish
    w.nodes = {"node-a": READY, "node-b": NodeInfo(ready=False, not_ready_since=w.now - timedelta(seconds=61))}
    w.step(1)
    assert sorted(d.name for d in w.last.deletes if d.grace == 0) == stuck
    w.settle(6)
    assert (w.status.world_size, w.status.phase) == (2, "Running")


def test_below_min_the_job_stops_every_worker_and_waits_for_capacity():
    w = World(
        base_spec(
            workers={"min": 3, "max": 4, "initial": 4},
            autoscaling={"capacityTimeoutSeconds": 30, "capacityBackoffSeconds": 120},
        )
    )
    w.capacity = {"node-a": 2}
    w.step()
    w.run_all()
    w.step(31)
    assert w.status.rescale.reason == REASON_WAITING_FOR_CAPACITY
    assert get_condition(w.status, CONDITION_READY).reason == REASON_WAITING_FOR_CAPACITY
    assert sorted(w.deleted()) == sorted(w.pods)  # holding no GPUs while waiting
    w.reap()
    w.step(60)
    assert w.pods == {} and w.status.phase == "Pending" and "tries again" in w.status.message
    w.capacity = {"node-a": 4}
    w.step(61)
    w.settle(4)
    assert (w.status.world_size, w.status.phase, w.status.restarts) == (4, "Running", 0)


def test_node_info_reads_ready_and_cordon():
    ready = {
        "metadata": {"name": "n"},
        "spec": {"unschedulable": True},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    assert node_info(ready) == NodeInfo(ready=True, unschedulable=True)
    down = {
        "metadata": {"name": "n"},
        "status": {
            "conditions": [{"type": "Ready", "status": "Unknown", "lastTransitionTime": "2026-01-01T12:00:00Z"}]
        },
    }
    assert node_info(down) == NodeInfo(ready=False, not_ready_since=T0)
    assert node_info({"metadata": {"name": "n"}}).ready is False


# --------------------------------------------------------- drains and disruptions (row 21)


def test_the_disruption_budget_follows_the_running_world_size():
    w = running_world(base_spec(workers={"min": 1, "max": 4, "initial": 2}))
    assert w.budget == 2
    scale_to(w, 3)
    w.settle(10)
    assert (w.status.world_size, w.budget) == (3, 3)
    w.set_spec(suspend=True)
    w.settle(3)
    assert w.budget == 0


def test_a_cordoned_node_moves_the_job_with_a_graceful_stop_and_spends_no_restart():
    w = two_node_world(restart={"maxRestarts": 0, "backoffSeconds": 0})
    w.capacity = {"node-a": 2, "node-b": 2, "node-c": 2}
    w.nodes = {"node-a": READY, "node-b": NodeInfo(ready=True, unschedulable=True), "node-c": READY}
    w.step(1)
    assert w.status.rescale.reason == REASON_NODE_DRAINING
    assert all(d.grace == 5 for d in w.last.deletes)  # checkpoint-aware stop
    assert (w.status.restarts, w.status.disruptions) == (0, 1)
    w.settle(8)
    assert w.status.phase == "Running" and w.status.world_size == 4
    assert "node-b" not in {p["spec"]["nodeName"] for p in w.pods.values()}


# -------------------------------------------------------------------------- hangs (row 22)


def test_a_hang_report_restarts_its_generation_once_and_counts_a_restart():
    w = running_world()
    w.status.hang = HangReport(generation=1, detected_at=w.now, message="no samples for 1800s")
    w.step()
    assert (w.status.rescale.reason, w.status.restarts, w.status.hang) == (REASON_HUNG, 1, None)
    assert REASON_HUNG in w.reasons() and "no samples" in w.status.message
    w.settle(6)
    assert w.status.worker_generation == 2 and w.status.phase == "Running"
    # A report about an older generation is dropped, not acted on.
    w.status.hang = HangReport(generation=1, detected_at=w.now)
    w.step()
    assert w.status.hang is None and w.status.rescale is None and w.status.restarts == 1
