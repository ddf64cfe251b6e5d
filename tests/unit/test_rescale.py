"""The rescale protocol through `plan()`: capacity-confirmed scale-up, scale-down, restarts and
their budget and backoff, lost workers, old generations (reconcile/rescale.py), driven
over many passes of `World`.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
from planworld import base_spec, running_world, scale_to

from lepton_operator.api.conditions import (
    CONDITION_RESCALING,
    REASON_ALLOCATOR_GROW,
    REASON_AUTOSCALE_UP,
    REASON_INSUFFICIENT_CAPACITY,
    REASON_MANUAL_SCALE,
    REASON_RESTARTS_EXHAUSTED,
    REASON_WORKER_DISRUPTED,
    REASON_WORKER_LOST,
    REASON_WORKER_RESTART,
)
from lepton_operator.api.models import (
    AllocationStatus,
    Decision,
    parse_status,
)
from lepton_operator.desired import LABEL_GENERATION, LABEL_WORKER_INDEX
from lepton_operator.reconcile.conditions import get_condition
from lepton_operator.reconcile.plan import plan

pytestmark = pytest.mark.unit


def test_scale_up_creates_only_the_added_workers_first_and_leaves_the_running_generation():
    w = running_world()
    scale_to(w, 3)
    p = w.step()
    assert w.created_pods() == ["job-worker-2"]
    assert p.deletes == []
    r = w.status.rescale
    assert (r.stage, r.from_, r.to, r.target_generation, r.reason) == (
        "ConfirmingCapacity",
        2,
        3,
        2,
        REASON_MANUAL_SCALE,
    )
    assert w.generations() == {"job-worker-0": 1, "job-worker-1": 1, "job-worker-2": 2}
    assert w.status.phase == "Rescaling"
    assert get_condition(w.status, CONDITION_RESCALING).status == "True"
    assert p.requeue_after == pytest.approx(120)


def test_scale_up_abandoned_when_added_workers_are_not_scheduled_and_backoff_is_honoured():
    w = running_world()
    scale_to(w, 3)
    w.step()
    p = w.step(119)
    assert p.deletes == [] and w.status.rescale is not None
    p = w.step(2)  # past capacityTimeoutSeconds
    assert w.deleted() == ["job-worker-2"]
    assert p.deletes[0].grace == 5  # gracefully: a started container is stopped cleanly
    assert w.status.rescale is None
    assert w.status.worker_generation == 1 and w.status.world_size == 2
    assert w.status.autoscaling.backoff_until == w.now + timedelta(seconds=600)
    cond = get_condition(w.status, CONDITION_RESCALING)
    assert (cond.status, cond.reason) == ("False", REASON_INSUFFICIENT_CAPACITY)
    assert REASON_INSUFFICIENT_CAPACITY in w.reasons()
    # The old generation was never touched.
    assert w.live() == ["job-worker-0", "job-worker-1"]
    w.reap()
    # spec.workers.replicas still asks for 3, but the backoff holds.
    p = w.step(300)
    assert p.creates == [] and w.status.rescale is None
    assert p.requeue_after == pytest.approx(300)
    assert "held" in w.status.message
    # After the backoff a new attempt starts with a generation number never used before,
    # although the abandoned workers of generation 2 are long gone (same rendezvous id
    # otherwise); 3 has the running generation's parity (its rendezvous port), so 4.
    w.step(301)
    assert w.status.rescale.stage == "ConfirmingCapacity"
    assert w.status.rescale.target_generation == 4 and w.status.latest_generation == 4
    assert w.created_pods() == ["job-worker-2"]
    assert set(w.generations().values()) == {1, 4}


def test_scale_up_with_capacity_stops_old_generation_waits_until_gone_then_starts_new():
    w = running_world()
    scale_to(w, 3)
    w.step()
    w.schedule("job-worker-2")
    p = w.step(5)
    assert w.status.rescale.stage == "Stopping"
    assert w.deleted() == ["job-worker-1", "job-worker-0"]  # highest index first, worker 0 last
    assert all(d.grace == 5 for d in p.deletes)  # graceful: the trainer checkpoints
    # Old pods still terminating: nothing of generation 2 at their indices yet.
    p = w.step(3)
    assert w.created_pods() == []
    w.reap("job-worker-1")
    p = w.step(1)
    assert w.created_pods() == []  # worker 0 of generation 1 still terminating
    w.reap()
    p = w.step(1)
    assert w.created_pods() == ["job-worker-0", "job-worker-1"]
    assert (w.status.worker_generation, w.status.world_size, w.status.rescale.stage) == (2, 3, "Starting")
    assert set(w.generations().values()) == {2}
    w.run_all()
    w.step(4)
    s = w.status
    assert s.phase == "Running" and s.rescale is None
    rec = s.last_rescale
    assert (rec.from_, rec.to, rec.reason) == (2, 3, REASON_MANUAL_SCALE)
    assert rec.downtime_seconds == pytest.approx(9)  # from the stop request to all ready
    assert s.rescale_history == [rec]
    assert get_condition(s, CONDITION_RESCALING).status == "False"
    assert s.replicas == 3


def test_autoscaler_decision_names_the_rescale_reason():
    w = running_world()
    w.status.autoscaling.last_decision = Decision(target=3, reason=REASON_AUTOSCALE_UP, time=w.now)
    scale_to(w, 3)
    w.step()
    assert w.status.rescale.reason == REASON_AUTOSCALE_UP


def test_the_allocators_decision_names_the_rescale_reason():
    w = running_world()
    w.status.allocation = AllocationStatus(
        target=3, reason=REASON_ALLOCATOR_GROW, message="2->3 workers: predicted 80.0 -> 118.0 samples/s", time=w.now
    )
    scale_to(w, 3)
    w.step()
    assert (w.status.rescale.reason, w.status.rescale.message) == (
        REASON_ALLOCATOR_GROW,
        "2->3 workers: predicted 80.0 -> 118.0 samples/s",
    )


def test_stale_autoscaler_decision_is_not_the_reason():
    w = running_world()
    w.status.autoscaling.last_decision = Decision(target=3, reason=REASON_AUTOSCALE_UP, time=w.now - timedelta(hours=2))
    scale_to(w, 3)
    w.step()
    assert w.status.rescale.reason == REASON_MANUAL_SCALE


def test_scale_down_stops_the_generation_then_starts_a_smaller_one():
    w = running_world(base_spec(workers={"min": 1, "max": 4, "initial": 3}))
    scale_to(w, 2)
    w.step()
    assert w.deleted() == ["job-worker-2", "job-worker-1", "job-worker-0"]
    assert w.status.rescale.stage == "Stopping"
    w.step(2)
    assert w.created_pods() == []
    w.reap()
    w.step(1)
    assert w.created_pods() == ["job-worker-0", "job-worker-1"]
    w.settle(1)
    assert (w.status.world_size, w.status.worker_generation, w.status.phase) == (2, 2, "Running")
    assert (w.status.last_rescale.from_, w.status.last_rescale.to) == (3, 2)


def test_requested_size_is_clamped_to_min_max():
    w = running_world()
    scale_to(w, 99)
    w.step()
    assert w.status.rescale.to == 4


def test_retryable_exit_starts_a_new_generation_and_counts_the_restart_exactly_once():
    w = running_world()
    w.exit("job-worker-1", 137)
    w.step()
    assert w.status.restarts == 1
    assert w.status.rescale.reason == REASON_WORKER_RESTART
    assert w.status.rescale.target_generation == 2
    assert sorted(w.deleted()) == ["job-worker-0", "job-worker-1"]
    assert REASON_WORKER_RESTART in w.reasons()
    assert "code 137" in w.status.message
    # Passes before the old pods are gone (and a replay of the same pass) count nothing.
    replay = plan(w.job, 1, w.parsed(), w.status, w.observed(), w.now)
    assert replay.status.restarts == 1
    w.step(1)
    w.step(1)
    assert w.status.restarts == 1
    assert w.created_pods() == []
    w.reap()
    w.step(1)
    assert w.status.worker_generation == 2 and w.created_pods() == ["job-worker-0", "job-worker-1"]
    w.settle(2)
    assert w.status.restarts == 1
    assert w.status.phase == "Running"
    assert w.status.last_rescale.reason == REASON_WORKER_RESTART
    assert (w.status.last_rescale.from_, w.status.last_rescale.to) == (2, 2)


def test_restarts_back_off_exponentially_before_the_new_generation():
    w = running_world(base_spec(restart={"maxRestarts": 3, "backoffSeconds": 10}))
    w.exit("job-worker-1", 137)
    w.step()
    w.reap()
    p = w.step(1)  # old generation gone after 1 s: 9 s of the first backoff left
    assert w.created_pods() == [] and p.requeue_after == pytest.approx(9)
    assert "backs off" in w.status.message and w.status.worker_generation == 1
    w.step(9)
    assert w.status.worker_generation == 2 and w.created_pods() == ["job-worker-0", "job-worker-1"]
    w.settle(2)
    w.exit("job-worker-0", 137)  # the second restart waits twice as long
    w.step()
    w.reap()
    assert w.step(19).creates == [] and w.status.restarts == 2
    w.step(1)
    assert w.status.worker_generation == 3


def test_a_replayed_failure_pass_does_not_double_count():
    """Operator killed after the status write: the next pass starts from the written status."""
    w = running_world()
    w.exit("job-worker-1", 137)
    first = plan(w.job, 1, w.parsed(), w.status, w.observed(), w.now)
    written = parse_status(first.status.to_k8s())
    again = plan(w.job, 1, w.parsed(), written, w.observed(), w.now + timedelta(seconds=1))
    assert again.status.restarts == 1


def test_eviction_is_a_disruption_that_spends_no_restart():
    w = running_world(base_spec(restart={"maxRestarts": 0, "backoffSeconds": 60}))
    w.evict("job-worker-0")
    w.exit("job-worker-1", 171)  # its peer then fails the rendezvous: the eviction is the cause
    w.step()
    assert (w.status.restarts, w.status.disruptions, w.status.phase) == (0, 1, "Pending")
    assert w.status.rescale.reason == REASON_WORKER_DISRUPTED
    w.reap()
    w.step()  # no restart backoff for a disruption
    assert w.status.worker_generation == 2 and w.created_pods() == ["job-worker-0", "job-worker-1"]


def test_spent_restart_budget_fails_the_job():
    w = running_world(base_spec(restart={"maxRestarts": 1, "backoffSeconds": 0}))
    w.exit("job-worker-0", 143)
    w.step()
    w.reap()
    w.settle(2)
    assert w.status.restarts == 1 and w.status.phase == "Running"
    w.exit("job-worker-1", 137)
    w.step()
    assert w.status.phase == "Failed"
    assert get_condition(w.status, "Failed").reason == REASON_RESTARTS_EXHAUSTED
    assert w.status.restarts == 1


def test_worker_lost_in_a_running_generation_starts_a_new_generation():
    w = running_world()
    del w.pods["job-worker-1"]  # deleted by hand and already gone
    w.step()
    assert w.status.rescale.reason == REASON_WORKER_LOST
    assert (w.status.restarts, w.status.disruptions) == (0, 1)
    w.reap()
    w.step()
    assert w.status.worker_generation == 2


def test_terminating_pod_blocks_its_replacement():
    w = running_world()
    w.pods["job-worker-0"]["metadata"]["deletionTimestamp"] = "x"  # e.g. held by a finalizer
    w.step()
    assert w.status.rescale.reason == REASON_WORKER_LOST
    w.reap("job-worker-1")
    for _ in range(3):
        w.step(10)
        assert w.created_pods() == []
    w.reap()
    w.step()
    assert w.created_pods() == ["job-worker-0", "job-worker-1"]


def test_old_generation_pods_are_deleted():
    w = running_world()
    stale = copy.deepcopy(w.pods["job-worker-1"])
    stale["metadata"]["name"] = "job-worker-3"
    stale["metadata"]["labels"][LABEL_WORKER_INDEX] = "3"
    stale["metadata"]["labels"][LABEL_GENERATION] = "0"
    w.pods["job-worker-3"] = stale
    w.step()
    assert w.deleted() == ["job-worker-3"]
    assert w.status.restarts == 0


def test_a_user_scaling_a_fixed_job_is_a_manual_scale_whatever_the_allocator_recorded():
    w = running_world()
    w.status.allocation = AllocationStatus(
        target=3, reason="FixedSize", message="3 workers: autoscaling is disabled", time=w.now
    )
    scale_to(w, 3)
    w.step()
    assert w.status.rescale.reason == REASON_MANUAL_SCALE
