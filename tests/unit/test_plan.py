"""The pure reconcile pass: every branch of `plan()`, driven over many passes.

`World` stands in for the cluster: it applies a plan the way the handler does (status
first, through its wire form; then deletes, which only mark pods terminating; then
creates, which never replace an existing name), and lets a test move pods along
(schedule, ready, exit, evict, finish terminating) and time forward.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

import pytest

from lepton_operator.api.models import (
    CONDITION_INVALID_SPEC,
    CONDITION_READY,
    CONDITION_RESCALING,
    REASON_ALL_SUCCEEDED,
    REASON_AUTOSCALE_UP,
    REASON_DEADLINE_EXCEEDED,
    REASON_IMMUTABLE_FIELD,
    REASON_INSUFFICIENT_CAPACITY,
    REASON_INVALID_SPEC,
    REASON_MANUAL_SCALE,
    REASON_RESTARTS_EXHAUSTED,
    REASON_RESUMED,
    REASON_WORKER_FAILED,
    REASON_WORKER_LOST,
    REASON_WORKER_RESTART,
    Decision,
    InvalidJob,
    LeptonJobStatus,
    parse_job,
    parse_status,
)
from lepton_operator.desired import LABEL_GENERATION, LABEL_JOB_NAME, LABEL_MANAGED_BY, LABEL_WORKER_INDEX, JobRef
from lepton_operator.reconcile.plan import REASON_FOREIGN_POD, REASON_NAME_TAKEN, get_condition, plan

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def base_spec(**overrides) -> dict:
    spec = {
        "image": "trainer:1",
        "workers": {"min": 1, "max": 4, "initial": 2},
        "resources": {"gpus": 1},
        "terminationGracePeriodSeconds": 5,
        "restart": {"maxRestarts": 2, "backoffSeconds": 0},
        "autoscaling": {"capacityTimeoutSeconds": 120, "capacityBackoffSeconds": 600},
    }
    spec.update(overrides)
    return spec


class World:
    """A tiny fake cluster for one job (see the module docstring)."""

    def __init__(self, spec: dict, name: str = "job", uid: str = "uid-1"):
        self.job = JobRef(name, "ns", uid)
        self.spec = copy.deepcopy(spec)
        self.status = LeptonJobStatus()
        self.pods: dict[str, dict] = {}
        self.service = False
        self.pvc = False
        self.now = T0
        self.events: list[tuple[str, str, str]] = []
        self.meta_generation = 1
        self.last = None

    # --- passes -----------------------------------------------------------------

    def parsed(self):
        try:
            return parse_job(self.job.name, self.spec)
        except InvalidJob as e:
            return e

    def step(self, seconds: float = 0):
        self.now += timedelta(seconds=seconds)
        p = plan(
            self.job, self.meta_generation, self.parsed(), self.status,
            [copy.deepcopy(x) for x in self.pods.values()], self.service, self.pvc, self.now,
        )
        self.status = parse_status(p.status.to_k8s())  # what the apiserver would store
        for kind, name, _grace in p.deletes:
            assert kind == "Pod"
            if name in self.pods:
                self.pods[name]["metadata"]["deletionTimestamp"] = self.now.isoformat()
        for obj in p.creates:
            if obj["kind"] == "Pod":
                if obj["metadata"]["name"] not in self.pods:  # AlreadyExists otherwise
                    pod = copy.deepcopy(obj)
                    pod["status"] = {"phase": "Pending"}
                    self.pods[obj["metadata"]["name"]] = pod
            elif obj["kind"] == "Service":
                self.service = True
            elif obj["kind"] == "PersistentVolumeClaim":
                self.pvc = True
        self.events += p.events
        self.last = p
        return p

    def settle(self, rounds: int = 6):
        """Let the simulated kubelet run: schedule and start everything, finish deletions."""
        for _ in range(rounds):
            self.reap()
            self.run_all()
            self.step()

    def set_spec(self, **changes):
        self.spec.update(changes)
        self.meta_generation += 1

    # --- the simulated kubelet ----------------------------------------------------

    def schedule(self, *names):
        for n in names or list(self.pods):
            self.pods[n].setdefault("spec", {})["nodeName"] = "node-1"

    def run_all(self):
        for pod in self.pods.values():
            if pod["status"]["phase"] == "Pending" and not pod["metadata"].get("deletionTimestamp"):
                pod.setdefault("spec", {})["nodeName"] = "node-1"
                pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}

    def exit(self, name: str, code: int):
        self.pods[name]["status"] = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [{"name": "worker", "state": {"terminated": {"exitCode": code}}}],
        }

    def evict(self, name: str):
        self.pods[name]["status"] = {"phase": "Failed", "reason": "Evicted"}

    def reap(self, *names):
        """Terminating pods finish their grace period and disappear."""
        for n in [n for n, p in self.pods.items() if p["metadata"].get("deletionTimestamp")]:
            if not names or n in names:
                del self.pods[n]

    # --- views ----------------------------------------------------------------------

    def generations(self) -> dict[str, int]:
        return {n: int(p["metadata"]["labels"][LABEL_GENERATION]) for n, p in sorted(self.pods.items())}

    def live(self) -> list[str]:
        return sorted(n for n, p in self.pods.items() if not p["metadata"].get("deletionTimestamp"))

    def created_pods(self) -> list[str]:
        return sorted(o["metadata"]["name"] for o in self.last.creates if o["kind"] == "Pod")

    def deleted(self) -> list[str]:
        return [name for _k, name, _g in self.last.deletes]

    def reasons(self) -> list[str]:
        return [reason for _t, reason, _m in self.events]


def running_world(spec=None) -> World:
    w = World(spec or base_spec())
    w.step()
    w.settle(2)
    assert w.status.phase == "Running"
    w.events.clear()
    return w


# ------------------------------------------------------------------------- creation


def test_first_pass_creates_service_and_workers_and_records_the_generation():
    w = World(base_spec())
    p = w.step()
    kinds = sorted(o["kind"] for o in p.creates)
    assert kinds == ["Pod", "Pod", "Service"]
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


# --------------------------------------------------------------------- scaling up


def scale_to(w: World, replicas: int):
    workers = dict(w.spec["workers"])
    workers["replicas"] = replicas
    w.set_spec(workers=workers)


def test_scale_up_creates_only_the_added_workers_first_and_leaves_the_running_generation():
    w = running_world()
    scale_to(w, 3)
    p = w.step()
    assert w.created_pods() == ["job-worker-2"]
    assert p.deletes == []
    r = w.status.rescale
    assert (r.stage, r.from_, r.to, r.target_generation, r.reason) == ("ConfirmingCapacity", 2, 3, 2, REASON_MANUAL_SCALE)
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
    # After the backoff a new attempt starts (the abandoned workers are long gone, so no
    # pod of the target generation exists any more).
    w.step(301)
    assert w.status.rescale.stage == "ConfirmingCapacity"
    assert w.status.rescale.target_generation == 2
    assert w.created_pods() == ["job-worker-2"]


def test_scale_up_with_capacity_stops_old_generation_waits_until_gone_then_starts_new():
    w = running_world()
    scale_to(w, 3)
    w.step()
    w.schedule("job-worker-2")
    p = w.step(5)
    assert w.status.rescale.stage == "Stopping"
    assert w.deleted() == ["job-worker-1", "job-worker-0"]  # highest index first, worker 0 last
    assert all(grace == 5 for _k, _n, grace in p.deletes)  # graceful: the trainer checkpoints
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


def test_stale_autoscaler_decision_is_not_the_reason():
    w = running_world()
    w.status.autoscaling.last_decision = Decision(target=3, reason=REASON_AUTOSCALE_UP, time=w.now - timedelta(hours=2))
    scale_to(w, 3)
    w.step()
    assert w.status.rescale.reason == REASON_MANUAL_SCALE


# ------------------------------------------------------------------- scaling down


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


# ---------------------------------------------------------------------- failures


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
    replay = plan(w.job, 1, w.parsed(), w.status, list(w.pods.values()), True, False, w.now)
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
    first = plan(w.job, 1, w.parsed(), w.status, list(w.pods.values()), True, False, w.now)
    written = parse_status(first.status.to_k8s())
    again = plan(w.job, 1, w.parsed(), written, list(w.pods.values()), True, False, w.now + timedelta(seconds=1))
    assert again.status.restarts == 1


def test_eviction_is_retryable():
    w = running_world()
    w.evict("job-worker-0")
    w.step()
    assert w.status.restarts == 1 and w.status.phase == "Pending"


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
    assert w.status.restarts == 1
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


# ---------------------------------------------------------------- foreign pods


def test_foreign_pods_are_never_adopted_deleted_or_counted():
    w = World(base_spec())
    foreign = {
        "metadata": {
            "name": "job-worker-0",
            "labels": {LABEL_JOB_NAME: "job", LABEL_MANAGED_BY: "lepton-operator", LABEL_GENERATION: "1", LABEL_WORKER_INDEX: "0"},
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


# ---------------------------------------------------------- suspend, deadline, TTL


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
    assert [o["kind"] for o in p.creates] == ["Service"]
    assert w.status.phase == "Suspended" and w.status.worker_generation == 0
    w.set_spec(suspend=False)
    w.step(5)
    assert w.created_pods() == ["job-worker-0", "job-worker-1"] and w.status.worker_generation == 1


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


# ---------------------------------------------------------------- invalid specs


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


# ------------------------------------------------------------------- conditions


def test_condition_transition_time_changes_only_when_status_flips():
    w = World(base_spec())
    w.step()
    ready = get_condition(w.status, CONDITION_READY)
    assert ready.status == "False" and ready.last_transition_time == T0
    w.step(10)
    assert get_condition(w.status, CONDITION_READY).last_transition_time == T0
    w.run_all()
    w.step(10)
    ready = get_condition(w.status, CONDITION_READY)
    assert ready.status == "True" and ready.last_transition_time == T0 + timedelta(seconds=20)
    w.step(10)
    assert get_condition(w.status, CONDITION_READY).last_transition_time == T0 + timedelta(seconds=20)
    assert ready.observed_generation == 1


# ------------------------------------------------------------ the handler's write


def test_status_patch_writes_changed_fields_only_and_never_the_autoscalers():
    from lepton_operator.reconcile.handlers import status_patch

    before = parse_status({
        "phase": "Running", "restarts": 1, "throughput": 10.0,
        "rescale": {"from": 2, "to": 3, "reason": "ManualScale", "stage": "Starting",
                    "startedAt": "2026-01-01T00:00:00Z", "targetGeneration": 2},
        "autoscaling": {"lastDecision": {"target": 3, "reason": "x", "time": "2026-01-01T00:00:00Z"}},
    })
    after = before.model_copy(deep=True)
    after.rescale = None
    after.restarts = 2
    after.throughput = 99.0  # a stale copy must not overwrite the autoscaler's value
    after.autoscaling.last_decision = None
    assert status_patch(before, after) == {"rescale": None, "restarts": 2}
    after.autoscaling.backoff_until = T0
    assert status_patch(before, after)["autoscaling"] == {"backoffUntil": "2026-01-01T12:00:00Z"}
    assert status_patch(before, before) == {}


def test_event_recorder_and_watch_health():
    from lepton_operator.reconcile import handlers

    rec = handlers.EventRecorder(window=60)
    assert rec.should_post(("uid", "Warning", "ForeignPod", "m"))
    assert not rec.should_post(("uid", "Warning", "ForeignPod", "m"))
    assert rec.should_post(("uid", "Warning", "ForeignPod", "other"))

    health = handlers.WatchHealth()
    key = ("ns", "job")
    health.watched(key, "5")
    health.compare(key, "5")
    assert health.stale() == []
    health.compare(key, "7")  # the API is ahead of what the watch delivered
    health.lagging_since[key] -= handlers.WATCH_STALE_SECONDS + 1
    assert health.stale() == ["ns/job"]
    health.watched(key, "7")
    health.compare(key, "7")
    assert health.stale() == []
