"""The job's lifecycle through `plan()`: first start, Service and PVC, suspend/resume, deadline, spec
validity and immutable fields (reconcile/lifecycle.py), driven over many passes of `World`.
"""

from __future__ import annotations

import pytest
from planworld import T0, World, base_spec, running_world, scale_to

from lepton_operator.api.conditions import (
    CONDITION_INVALID_SPEC,
    REASON_DEADLINE_EXCEEDED,
    REASON_IMMUTABLE_FIELD,
    REASON_INVALID_SPEC,
    REASON_RESUMED,
)
from lepton_operator.desired import LABEL_JOB_NAME, LABEL_MANAGED_BY
from lepton_operator.reconcile.conditions import get_condition

pytestmark = pytest.mark.unit


def test_first_pass_creates_service_and_workers_and_records_the_generation():
    w = World(base_spec())
    p = w.step()
    kinds = sorted(o["kind"] for o in p.creates)
    assert kinds == ["Pod", "Pod", "PodDisruptionBudget", "Service"]
    [budget] = [o for o in p.creates if o["kind"] == "PodDisruptionBudget"]
    assert budget["spec"]["minAvailable"] == 2  # every worker of the running generation
    assert w.created_pods() == ["job-worker-0", "job-worker-1"]
    for obj in p.creates:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    s = w.status
    assert (s.phase, s.worker_generation, s.world_size, s.replicas) == ("Pending", 1, 2, 2)
    assert s.start_time == T0 and s.generation_start_time == T0
    assert s.template_hash == w.parsed().template_hash()
    assert s.observed_generation == 1
    assert s.selector == f"{LABEL_MANAGED_BY}=lepton-operator,{LABEL_JOB_NAME}=job"
    assert p.events == []


def test_missing_service_and_pvc_are_recreated():
    spec = base_spec(checkpoint={"size": "1Gi"})
    w = running_world(spec)
    assert w.pvc and w.service
    w.service = False
    w.pvc = False
    p = w.step()
    assert sorted(o["kind"] for o in p.creates) == ["PersistentVolumeClaim", "Service"]


def test_existing_claim_creates_no_pvc():
    w = World(base_spec(checkpoint={"claimName": "shared"}))
    p = w.step()
    assert "PersistentVolumeClaim" not in [o["kind"] for o in p.creates]


def test_suspend_deletes_workers_keeps_service_and_resume_starts_a_new_generation():
    w = running_world()
    w.set_spec(suspend=True)
    p = w.step()
    assert sorted(w.deleted()) == ["job-worker-0", "job-worker-1"]
    assert all(o["kind"] != "Service" for o in p.creates)
    assert w.status.phase == "Suspended" and w.status.suspended_at == w.now
    assert get_condition(w.status, "Suspended").status == "True"
    w.reap()
    p = w.step(100)
    assert p.creates == [] and w.status.phase == "Suspended"
    w.set_spec(suspend=False)
    w.step(20)
    assert w.status.suspended_seconds == pytest.approx(120)
    assert w.status.suspended_at is None
    assert w.status.worker_generation == 2
    assert w.created_pods() == ["job-worker-0", "job-worker-1"]
    assert REASON_RESUMED in w.reasons()
    w.settle(1)
    assert w.status.phase == "Running"
    assert w.status.last_rescale.reason == REASON_RESUMED
    assert w.status.restarts == 0


def test_suspended_from_the_start_creates_no_workers():
    w = World(base_spec(suspend=True))
    p = w.step()
    # No budget yet: with no workers it would protect nothing (and cost a patch later).
    assert [o["kind"] for o in p.creates] == ["Service"]
    assert w.budget is None
    assert w.status.phase == "Suspended" and w.status.worker_generation == 0
    w.set_spec(suspend=False)
    p = w.step(5)
    assert w.created_pods() == ["job-worker-0", "job-worker-1"] and w.status.worker_generation == 1
    assert [o["spec"]["minAvailable"] for o in p.creates if o["kind"] == "PodDisruptionBudget"] == [2]
    assert not p.patches  # created at the generation's size: nothing to patch


def test_deadline_fails_the_job_and_deletes_workers():
    w = running_world(base_spec(activeDeadlineSeconds=60))
    p = w.step(50)
    assert w.status.phase == "Running" and p.requeue_after == pytest.approx(10)
    w.step(11)
    assert w.status.phase == "Failed"
    assert get_condition(w.status, "Failed").reason == REASON_DEADLINE_EXCEEDED
    assert sorted(w.deleted()) == ["job-worker-0", "job-worker-1"]


def test_deadline_is_paused_while_suspended():
    w = running_world(base_spec(activeDeadlineSeconds=60))
    w.step(30)
    w.set_spec(suspend=True)
    w.step()
    w.reap()
    w.step(1000)  # far past the deadline in wall time
    assert w.status.phase == "Suspended"
    w.set_spec(suspend=False)
    w.step()
    w.settle(1)
    w.step(25)
    assert w.status.phase == "Running"
    w.step(10)
    assert w.status.phase == "Failed"


def test_invalid_spec_fails_with_every_error_creates_nothing_and_warns_once():
    spec = base_spec(workers={"min": 3, "max": 2}, env=[{"name": "PET_NNODES", "value": "9"}])
    w = World(spec)
    p = w.step()
    assert p.creates == [] and p.deletes == []
    assert w.status.phase == "Failed"
    cond = get_condition(w.status, CONDITION_INVALID_SPEC)
    assert cond.status == "True" and cond.reason == REASON_INVALID_SPEC
    assert "min (3)" in cond.message and "PET_NNODES" in cond.message
    assert get_condition(w.status, "Failed").reason == REASON_INVALID_SPEC
    assert [(t, r) for t, r, _ in p.events] == [("Warning", REASON_INVALID_SPEC)]
    p = w.step(30)
    assert p.events == [] and p.creates == []


def test_fixing_an_invalid_spec_starts_the_job():
    w = World(base_spec(workers={"min": 3, "max": 2}))
    w.step()
    w.set_spec(workers={"min": 1, "max": 2})
    w.step(5)
    assert w.status.phase == "Pending" and w.status.worker_generation == 1
    assert w.status.completion_time is None
    assert get_condition(w.status, CONDITION_INVALID_SPEC).status == "False"


@pytest.mark.parametrize(
    "name",
    ["a" * 53, "Bad_Name", "1job", "job\n"],
)
def test_bad_names_are_invalid(name):
    w = World(base_spec(), name=name)
    p = w.step()
    assert p.creates == [] and w.status.phase == "Failed"


def test_immutable_field_change_keeps_running_workers_and_starts_nothing_new():
    w = running_world()
    w.set_spec(image="trainer:2")
    p = w.step()
    assert (p.creates, p.deletes) == ([], [])
    cond = get_condition(w.status, CONDITION_INVALID_SPEC)
    assert (cond.status, cond.reason) == ("True", REASON_IMMUTABLE_FIELD)
    assert REASON_IMMUTABLE_FIELD in w.reasons()
    assert w.status.phase == "Running"
    # A scale request waits too.
    scale_to(w, 3)
    p = w.step(5)
    assert p.creates == [] and w.status.rescale is None
    # A failure still stops the generation, but no new one starts with the changed template.
    w.exit("job-worker-1", 137)
    w.step()
    w.reap()
    p = w.step()
    assert w.created_pods() == []
    assert "immutable" in w.status.message
    w.set_spec(image="trainer:1")  # revert
    w.step()
    assert w.created_pods() == ["job-worker-0", "job-worker-1"]
    assert get_condition(w.status, CONDITION_INVALID_SPEC).status == "False"


def test_invalid_edit_of_a_running_job_keeps_its_workers():
    w = running_world()
    w.set_spec(workers={"min": 3, "max": 2})
    p = w.step()
    assert (p.creates, p.deletes) == ([], [])
    assert w.status.phase == "Running"
    assert get_condition(w.status, CONDITION_INVALID_SPEC).status == "True"
