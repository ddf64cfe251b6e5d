"""The steady state of a pass (`plan()` in reconcile/plan.py): forming generations, success,
permanent failures, foreign pods, driven over many passes of `World`.
"""

from __future__ import annotations

import pytest
from planworld import World, base_spec, running_world

from lepton_operator.api.conditions import (
    CONDITION_READY,
    REASON_ALL_SUCCEEDED,
    REASON_FOREIGN_POD,
    REASON_NAME_TAKEN,
    REASON_WORKER_FAILED,
)
from lepton_operator.api.models import parse_status
from lepton_operator.desired import LABEL_GENERATION, LABEL_JOB_NAME, LABEL_MANAGED_BY, LABEL_WORKER_INDEX
from lepton_operator.reconcile.conditions import get_condition

pytestmark = pytest.mark.unit


def test_workers_ready_makes_the_job_running_once_and_passes_are_idempotent():
    w = World(base_spec())
    w.step()
    w.run_all()
    w.step(1)
    assert w.status.phase == "Running"
    assert w.status.workers.ready == 2
    assert get_condition(w.status, CONDITION_READY).status == "True"
    assert w.reasons() == ["WorkersReady"]
    before = w.status.to_k8s()
    p = w.step(30)
    assert (p.creates, p.deletes, p.events) == ([], [], [])
    assert w.status.to_k8s() == before  # nothing to write: no status churn


def test_pending_generation_recreates_a_worker_deleted_by_hand_only_once_it_is_gone():
    w = World(base_spec())
    w.step()
    w.pods["job-worker-1"]["metadata"]["deletionTimestamp"] = "x"  # someone deletes it
    w.step()
    assert w.created_pods() == []  # worker 1's name is still taken by the terminating pod
    assert w.status.restarts == 0
    w.reap()
    w.step()
    assert "job-worker-1" in w.live()
    assert w.status.worker_generation == 1


def test_permanent_exit_fails_the_job_naming_worker_and_code():
    w = running_world()
    w.exit("job-worker-1", 1)
    p = w.step()
    s = w.status
    assert s.phase == "Failed" and s.completion_time == w.now
    assert "job-worker-1" in s.message and "code 1" in s.message
    assert get_condition(s, "Failed").reason == REASON_WORKER_FAILED
    assert w.deleted() == ["job-worker-0"]  # the one still running; the failed one keeps its logs
    assert s.restarts == 0
    p = w.step(10)
    assert p.creates == [] and p.events == []


def test_success_needs_every_worker_of_the_generation():
    w = running_world(base_spec(ttlSecondsAfterFinished=30))
    w.exit("job-worker-0", 0)
    w.step()
    assert w.status.phase == "Running"
    w.exit("job-worker-1", 0)
    p = w.step(5)
    assert w.status.phase == "Succeeded"
    assert get_condition(w.status, "Succeeded").reason == REASON_ALL_SUCCEEDED
    assert w.status.completion_time == w.now
    assert p.deletes == []  # finished pods stay for their logs
    assert not p.delete_job and p.requeue_after == pytest.approx(30)
    p = w.step(29)
    assert not p.delete_job
    p = w.step(2)
    assert p.delete_job


def test_foreign_pods_are_never_adopted_deleted_or_counted():
    w = World(base_spec())
    foreign = {
        "metadata": {
            "name": "job-worker-0",
            "labels": {
                LABEL_JOB_NAME: "job",
                LABEL_MANAGED_BY: "lepton-operator",
                LABEL_GENERATION: "1",
                LABEL_WORKER_INDEX: "0",
            },
            "ownerReferences": [{"uid": "someone-else"}],
        },
        "spec": {"nodeName": "n"},
        "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 1}}}]},
    }
    w.pods["job-worker-0"] = foreign
    w.step()
    assert w.created_pods() == ["job-worker-1"]  # worker 0's name is taken: no create
    assert REASON_NAME_TAKEN in w.reasons() and REASON_FOREIGN_POD in w.reasons()
    w.run_all()
    for _ in range(3):
        w.step(1)
        assert "job-worker-0" not in w.deleted()
    assert w.status.phase == "Pending"  # its exit code 1 did not fail our job
    assert w.status.workers.active == 1


def test_a_generation_of_no_workers_never_counts_as_succeeded():
    # A status with a generation but no world size (written by hand, or damaged): "all 0
    # workers exited 0" must not finish the job.
    w = World(base_spec())
    w.status = parse_status({"phase": "Pending", "workerGeneration": 3})
    w.step()
    assert w.status.phase != "Succeeded"
