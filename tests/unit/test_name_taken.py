"""A child's name held by an object the job does not own (docs/reliability.md, row 8).

A create answered 409 reads the object holding the name: ours (an earlier pass made it,
the index lags) is success, anything else is "taken". The executor posts a Warning event
NameTaken for it and remembers it for the next pass, whose condition NameTaken says so;
the foreign object is never used, patched or deleted, and the create is tried again each
pass, so the job gets its own once the name is free. An object that only carries our
labels is not ours either: the pass counts children by owner, not by label.
"""

from __future__ import annotations

import asyncio

import pytest
from kubernetes.client.rest import ApiException
from planworld import T0, World, base_spec

from lepton_operator.api.conditions import CONDITION_NAME_TAKEN, REASON_NAME_TAKEN, REASON_NAMES_FREE
from lepton_operator.api.models import parse_status
from lepton_operator.desired import JobRef
from lepton_operator.reconcile.conditions import get_condition
from lepton_operator.reconcile.config import OperatorConfig
from lepton_operator.reconcile.context import OperatorContext
from lepton_operator.reconcile.executor import apply_plan
from lepton_operator.reconcile.jobpass import Observed, Plan
from lepton_operator.reconcile.kube import Kube
from lepton_operator.reconcile.loop import run_pass
from lepton_operator.reconcile.plan import plan

pytestmark = pytest.mark.unit

UID = "uid-1"
KEY = ("ns", "job")
BODY = {"metadata": {"name": "job", "namespace": "ns", "uid": UID, "resourceVersion": "7"}}
SERVICE = "Service job-workers"


def child(kind: str, name: str = "job-workers", owner: str = UID) -> dict:
    return {"kind": kind, "metadata": {"name": name, "namespace": "ns", "ownerReferences": [{"uid": owner}]}}


# ------------------------------------------------------------------ kube.create


class RestKube(Kube):
    """Kube with its REST layer faked: every POST is answered 409, a GET returns `holder`
    (None: 404, it went away after the 409)."""

    def __init__(self, holder):
        self.holder = holder
        self.calls: list[tuple[str, str]] = []
        self._policy_version = "policy/v1"

    def request(self, method, path, body=None, query=None, content_type=None):
        self.calls.append((method, path))
        if method == "POST":
            raise ApiException(status=409, reason="Conflict")
        if self.holder is None:
            raise ApiException(status=404, reason="Not Found")
        return self.holder


@pytest.mark.parametrize(
    "holder, outcome",
    [
        (child("Service"), "exists"),  # ours: an earlier pass created it
        (child("Service", owner="another-job"), "taken"),
        ({"metadata": {"name": "job-workers", "labels": {"app": "x"}}}, "taken"),  # no owner at all
        (None, "exists"),  # gone since the 409: the next pass creates it
    ],
    ids=["ours", "another-owner", "no-owner", "gone"],
)
def test_a_409_on_create_reads_the_holder_and_tells_ours_from_foreign(holder, outcome):
    kube = RestKube(holder)
    assert kube.create(child("Service")) == outcome
    path = "/api/v1/namespaces/ns/services"
    assert kube.calls == [("POST", path), ("GET", f"{path}/job-workers")]


# ------------------------------------------------------------------ the executor


class FakeKube:
    """Creates answer `outcomes[name]` ("created" when absent); everything is recorded."""

    def __init__(self, outcomes: dict[str, str] | None = None):
        self.outcomes = outcomes or {}
        self.calls: list[tuple] = []

    def patch_job_status(self, namespace, name, resource_version, patch):
        self.calls.append(("status", patch))
        return BODY

    def create(self, obj):
        self.calls.append(("create", obj["kind"], obj["metadata"]["name"]))
        return self.outcomes.get(f"{obj['kind']} {obj['metadata']['name']}", "created")

    def post_event(self, body, type_, reason, message):
        self.calls.append(("event", type_, reason, message))


def apply(ctx: OperatorContext, creates: list[dict]) -> None:
    before = parse_status({"phase": "Pending"})
    result = Plan(status=before.model_copy(deep=True), creates=creates)
    asyncio.run(apply_plan(ctx, BODY, before, result))


def test_a_taken_name_is_an_event_and_is_remembered_for_the_next_pass_until_a_create_succeeds():
    kube = FakeKube({SERVICE: "taken", "PodDisruptionBudget job-workers": "exists"})
    ctx = OperatorContext(kube=kube, config=OperatorConfig())
    apply(ctx, [child("Service"), child("PodDisruptionBudget")])
    assert ctx.taken[KEY] == {SERVICE}  # the budget of the same name is ours: success
    events = [c for c in kube.calls if c[0] == "event"]
    assert len(events) == 1
    _, type_, reason, message = events[0]
    assert (type_, reason) == ("Warning", REASON_NAME_TAKEN)
    assert message.startswith(f"{SERVICE} exists and is not owned by this job")

    kube.outcomes.clear()  # the owner of the name removed it
    apply(ctx, [child("Service")])
    assert KEY not in ctx.taken
    ctx.forget(KEY)


# ------------------------------------------------------------------ the pass


def pass_of(w: World, status, service_exists: bool, taken: frozenset[str]) -> Plan:
    return plan(w.job, 1, w.parsed(), status, Observed(service_exists=service_exists, taken=taken), T0)


def test_the_condition_follows_the_names_taken_and_the_create_is_tried_again():
    w = World(base_spec())
    first = pass_of(w, w.status, False, frozenset())
    assert get_condition(first.status, CONDITION_NAME_TAKEN) is None  # never taken: no condition

    taken = pass_of(w, first.status, False, frozenset({SERVICE, "PodDisruptionBudget job-workers"}))
    condition = get_condition(taken.status, CONDITION_NAME_TAKEN)
    assert (condition.status, condition.reason) == ("True", REASON_NAME_TAKEN)
    assert "PodDisruptionBudget job-workers, Service job-workers" in condition.message
    assert [o["kind"] for o in taken.creates if o["kind"] != "Pod"][:1] == ["Service"]  # tried again
    assert not taken.deletes and not taken.patches  # the holder is never touched

    freed = pass_of(w, taken.status, True, frozenset())
    condition = get_condition(freed.status, CONDITION_NAME_TAKEN)
    assert (condition.status, condition.reason) == ("False", REASON_NAMES_FREE)


# ------------------------------------------------------------------ children counted by owner


class PassKube(FakeKube):
    """What one pass of a new job reads: the job, no pods, no nodes."""

    def get_job(self, namespace, name):
        return {**BODY, "spec": base_spec(checkpoint={"size": "1Gi"})}

    def list_pods(self, namespace, selector):
        return []

    def list_nodes(self):
        return []

    def patch(self, namespace, kind, name, change):
        self.calls.append(("patch", kind, name, change))


def test_children_that_only_carry_our_labels_are_created_again_never_used_or_patched():
    """A Service, claim and budget with our labels but another owner, as kopf's indexes
    hold them: the pass creates the job's own (whose 409 then reports the name taken).
    Per-job mode, so that the first pass starts a generation (the budget comes with it)."""
    kube = PassKube()
    ctx = OperatorContext(kube=kube, config=OperatorConfig(allocator=False))
    foreign = ("someone-else",)
    indexes = {
        "pods_by_job": {},
        "services_by_job": {KEY: [("job-workers", foreign)]},
        "claims_by_job": {KEY: [("job-checkpoints", foreign)]},
        "budgets_by_job": {KEY: [(0, foreign)]},
    }
    asyncio.run(run_pass(ctx, JobRef("job", "ns", UID), indexes))
    created = {c[1] for c in kube.calls if c[0] == "create"}
    assert {"Service", "PersistentVolumeClaim", "PodDisruptionBudget"} <= created
    assert not [c for c in kube.calls if c[0] == "patch"]  # the foreign budget is not patched

    # The same entries owned by the job: nothing of the kind is created again.
    ctx.forget(KEY)
    kube.calls.clear()
    ours = (UID,)
    indexes["services_by_job"] = {KEY: [("job-workers", ours)]}
    indexes["claims_by_job"] = {KEY: [("job-checkpoints", ours)]}
    indexes["budgets_by_job"] = {KEY: [(2, ours)]}
    asyncio.run(run_pass(ctx, JobRef("job", "ns", UID), indexes))
    created = {c[1] for c in kube.calls if c[0] == "create"}
    assert not created & {"Service", "PersistentVolumeClaim", "PodDisruptionBudget"}
    ctx.forget(KEY)
