"""Applying a plan (reconcile/executor.py) against a fake `Kube`: the order of writes, and
what happens on a Conflict, a transient failure and a permanent refusal."""

from __future__ import annotations

import asyncio

import pytest
from planworld import T0

from lepton_operator.api.conditions import REASON_API_REQUEST_REFUSED
from lepton_operator.api.models import parse_status
from lepton_operator.reconcile.config import OperatorConfig
from lepton_operator.reconcile.context import OperatorContext
from lepton_operator.reconcile.executor import apply_plan, status_patch
from lepton_operator.reconcile.jobpass import Delete, Plan
from lepton_operator.reconcile.kube import Conflict, PermanentApiError, TransientApiError

pytestmark = pytest.mark.unit

BODY = {"metadata": {"name": "job", "namespace": "ns", "uid": "uid-1", "resourceVersion": "7"}}


class FakeKube:
    """Records every call in order; `fail` maps a call name (and object name) to an error."""

    def __init__(self, fail: dict | None = None):
        self.calls: list[tuple] = []
        self.fail = fail or {}
        self.gone: set[str] = set()  # deletes that find their pod gone (404, or 409 on the uid)

    def _maybe_fail(self, *key):
        for k in (key, key[:1]):
            if k in self.fail:
                raise self.fail[k]

    def patch_job_status(self, namespace, name, resource_version, patch):
        self.calls.append(("status", resource_version, patch))
        self._maybe_fail("status")
        return {**BODY, "metadata": {**BODY["metadata"], "resourceVersion": "8"}}

    def delete(self, namespace, kind, name, grace, uid=None):
        self.calls.append(("delete", name, grace))
        self._maybe_fail("delete", name)
        return name not in self.gone

    def create(self, obj):
        self.calls.append(("create", obj["metadata"]["name"]))
        self._maybe_fail("create", obj["metadata"]["name"])
        return "created"

    def post_event(self, body, type_, reason, message):
        self.calls.append(("event", reason, body["metadata"]["resourceVersion"]))

    def delete_job(self, namespace, name, uid):
        self.calls.append(("delete_job", uid))


def pod(name: str) -> dict:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "ns"}}


def a_plan() -> tuple:
    before = parse_status({"phase": "Running", "workerGeneration": 1, "worldSize": 2})
    after = before.model_copy(deep=True)
    after.phase = "Rescaling"
    plan = Plan(status=after)
    plan.deletes = [Delete("Pod", "job-worker-1", 30, "u1"), Delete("Pod", "job-worker-0", 30, "u0")]
    plan.creates = [pod("job-worker-2")]
    plan.event("Normal", "Rescaling", "scaling 2 -> 3")
    return before, plan


def apply(kube: FakeKube, before, plan, resync: float = 30.0):
    ctx = OperatorContext(kube=kube, config=OperatorConfig(resync_seconds=resync))
    return ctx, asyncio.run(apply_plan(ctx, BODY, before, plan))


def test_status_first_then_deletes_highest_index_first_then_creates_then_events():
    kube = FakeKube()
    before, plan = a_plan()
    ctx, applied = apply(kube, before, plan)
    assert [c[0] for c in kube.calls] == ["status", "delete", "delete", "create", "event"]
    assert kube.calls[0] == ("status", "7", {"phase": "Rescaling"})  # precondition: the version read
    assert [c[1] for c in kube.calls if c[0] == "delete"] == ["job-worker-1", "job-worker-0"]
    assert kube.calls[-1] == ("event", "Rescaling", "8")  # about the job as written
    assert applied.requeue_after is None and not applied.job_deleted
    # The operator remembers its own writes until its index shows them.
    overlaid = ctx.expected.overlay(("ns", "job"), [], T0.isoformat())
    assert [p["metadata"]["name"] for p in overlaid] == ["job-worker-2"]


def test_a_conflict_on_the_status_write_does_nothing_else():
    kube = FakeKube(fail={("status",): Conflict("changed", 409)})
    before, plan = a_plan()
    with pytest.raises(Conflict):
        apply(kube, before, plan)
    assert [c[0] for c in kube.calls] == ["status"]


def test_a_transient_failure_after_the_status_write_still_posts_its_events_then_retries():
    kube = FakeKube(fail={("delete", "job-worker-1"): TransientApiError("503", 503)})
    before, plan = a_plan()
    with pytest.raises(TransientApiError):
        apply(kube, before, plan)
    kinds = [c[0] for c in kube.calls]
    # The other delete and the create were still tried, and the event went out.
    assert kinds == ["status", "delete", "delete", "create", "event"]


def test_a_permanent_refusal_becomes_a_warning_event_and_a_resync():
    kube = FakeKube(fail={("create", "job-worker-2"): PermanentApiError("pods is forbidden", 403)})
    before, plan = a_plan()
    plan.requeue(120)
    _ctx, applied = apply(kube, before, plan, resync=30)
    reasons = [c[1] for c in kube.calls if c[0] == "event"]
    assert reasons == ["Rescaling", REASON_API_REQUEST_REFUSED]
    assert applied.requeue_after == 30


def test_no_status_write_when_nothing_changed_and_repeated_events_are_not_reposted():
    kube = FakeKube()
    before = parse_status({"phase": "Running"})
    plan = Plan(status=before.model_copy(deep=True))
    plan.event("Warning", "ForeignPod", "pod x is not ours")
    ctx = OperatorContext(kube=kube)
    asyncio.run(apply_plan(ctx, BODY, before, plan))
    asyncio.run(apply_plan(ctx, BODY, before, plan))
    assert kube.calls == [("event", "ForeignPod", "7")]


def test_ttl_deletes_the_job_after_its_events():
    kube = FakeKube()
    before = parse_status({"phase": "Succeeded"})
    plan = Plan(status=before.model_copy(deep=True), delete_job=True)
    _ctx, applied = apply(kube, before, plan)
    assert kube.calls == [("delete_job", "uid-1")] and applied.job_deleted


def test_status_patch_writes_changed_fields_only_and_never_the_autoscalers():
    before = parse_status(
        {
            "phase": "Running",
            "restarts": 1,
            "throughput": 10.0,
            "rescale": {
                "from": 2,
                "to": 3,
                "reason": "ManualScale",
                "stage": "Starting",
                "startedAt": "2026-01-01T00:00:00Z",
                "targetGeneration": 2,
            },
            "autoscaling": {"lastDecision": {"target": 3, "reason": "x", "time": "2026-01-01T00:00:00Z"}},
        }
    )
    after = before.model_copy(deep=True)
    after.rescale = None
    after.restarts = 2
    after.throughput = 99.0  # a stale copy must not overwrite the autoscaler's value
    after.autoscaling.last_decision = None
    assert status_patch(before, after) == {"rescale": None, "restarts": 2}
    after.autoscaling.backoff_until = T0
    assert status_patch(before, after)["autoscaling"] == {"backoffUntil": "2026-01-01T12:00:00Z"}
    assert status_patch(before, before) == {}


def test_a_delete_that_finds_its_pod_gone_makes_the_next_pass_relist_the_pods():
    kube = FakeKube()
    kube.gone.add("job-worker-0")  # the index still showed it: a ghost
    before, plan = a_plan()
    ctx = OperatorContext(kube=kube)
    ctx.pods.listed(("ns", "job"), [], [])
    assert not ctx.pods.relist_due(("ns", "job"))
    asyncio.run(apply_plan(ctx, BODY, before, plan))
    assert ctx.pods.relist_due(("ns", "job"))
