"""A pass reads the job from kopf's live body; when that body is older than what the
operator already knows (its own last write, or kopf's finalizer patch) it takes the API's
newer answer, and reads the API only when none was kept or after a Conflict."""

from __future__ import annotations

import asyncio

import pytest

from lepton_operator.reconcile import loop
from lepton_operator.reconcile.context import OperatorContext
from lepton_operator.reconcile.kube import Conflict, Kube

pytestmark = pytest.mark.unit

KEY = ("ns", "job")


def body(version: str, replicas: int = 2) -> dict:
    return {
        "metadata": {"namespace": "ns", "name": "job", "uid": "u1", "resourceVersion": version},
        "spec": {"workers": {"replicas": replicas}},
    }


class StoredJob(Kube):
    """A real `Kube` whose requests reach a stored job instead of an apiserver: its get and
    patch methods (and their report to the watch health) run as written."""

    def __init__(self, stored: dict):
        super().__init__(api_client=None)
        self.stored = stored
        self.requests: list[str] = []

    def request(self, method, path, body=None, query=None, content_type=None):
        self.requests.append(method)
        if method == "PATCH":
            version = str(int(self.stored["metadata"]["resourceVersion"]) + 1)
            self.stored = {**self.stored, "metadata": {**self.stored["metadata"], "resourceVersion": version}}
        return self.stored


def context(stored: dict) -> tuple[OperatorContext, StoredJob]:
    kube = StoredJob(stored)
    ctx = OperatorContext(kube=kube)
    ctx.watch.watched(KEY, stored["metadata"]["resourceVersion"])  # the watch delivered it
    return ctx, kube


def test_a_current_live_body_is_read_without_a_request_and_copied():
    ctx, kube = context(body("7"))
    live = body("7")
    got = asyncio.run(loop.read_job(ctx, "ns", "job", live))
    assert got == live and kube.requests == []
    got["spec"]["workers"]["replicas"] = 5  # the pass may change its copy
    assert live["spec"]["workers"]["replicas"] == 2


def test_after_the_operators_own_write_a_lagging_live_body_gives_way_to_the_writes_answer():
    ctx, kube = context(body("7"))
    written = kube.patch_job_status("ns", "job", "7", {"phase": "Running"})
    assert written["metadata"]["resourceVersion"] == "8"
    assert ctx.watch.behind(KEY, "7")  # the write told the watch health
    written["status"] = {"changed": "by the caller"}  # what the watch health kept is its own
    got = asyncio.run(loop.read_job(ctx, "ns", "job", body("7")))
    assert got["metadata"]["resourceVersion"] == "8" and "status" not in got
    assert kube.requests == ["PATCH"]  # no GET: the write's answer is the newest version
    got["spec"]["workers"]["replicas"] = 5  # the pass may change its copy
    assert ctx.watch.newest(KEY)["spec"]["workers"]["replicas"] == 2
    # Once the watch delivers the write, the answer is dropped and the live body serves.
    ctx.watch.watched(KEY, "8")
    assert ctx.watch.newest(KEY) is None
    asyncio.run(loop.read_job(ctx, "ns", "job", body("8")))
    assert kube.requests == ["PATCH"]
    # A later change by someone else (the watch is ahead of the write) is used as is.
    got = asyncio.run(loop.read_job(ctx, "ns", "job", body("9", replicas=4)))
    assert got["spec"]["workers"]["replicas"] == 4 and kube.requests == ["PATCH"]


def test_a_lagging_live_body_is_read_from_the_api_when_no_answer_was_kept():
    ctx, kube = context(body("7"))
    ctx.watch.known(KEY, "8")  # a version reported without its body
    got = asyncio.run(loop.read_job(ctx, "ns", "job", body("7")))
    assert kube.requests == ["GET"] and got["metadata"]["resourceVersion"] == "7"  # what the stub holds


def test_kopfs_own_patch_of_a_job_counts_as_a_known_version(monkeypatch):
    """kopf adds its finalizer as it first sees a job; a pass started on the body from
    before that patch decides on the patch's answer instead (no Conflict, no GET)."""
    from kopf._cogs.clients import api

    from lepton_operator.reconcile import supervise

    patched = {**body("8"), "kind": "LeptonJob"}
    patched["metadata"] = {**patched["metadata"], "finalizers": ["kopf.zalando.org/KopfFinalizerMarker"]}

    lease = {"kind": "Lease", "metadata": {"namespace": "ns", "name": "job", "resourceVersion": "9"}}

    async def kopf_patch(url, **_):
        return patched if "/leptonjobs/" in url else lease

    monkeypatch.setattr(api, "patch", kopf_patch)
    ctx, kube = context(body("7"))
    supervise.report_kopf_job_patches(kube.saw_job)
    answer = asyncio.run(api.patch(url="/apis/lepton.ai/v1alpha1/namespaces/ns/leptonjobs/job", payload={}))
    assert answer is patched
    asyncio.run(api.patch(url="/apis/coordination.k8s.io/v1/namespaces/ns/leases/job", payload={}))  # ignored
    got = asyncio.run(loop.read_job(ctx, "ns", "job", body("7")))
    assert got["metadata"]["resourceVersion"] == "8" and got["metadata"]["finalizers"]
    assert kube.requests == []


def test_fresh_or_no_live_body_reads_the_api():
    ctx, kube = context(body("7"))
    asyncio.run(loop.read_job(ctx, "ns", "job", body("7"), fresh=True))
    asyncio.run(loop.read_job(ctx, "ns", "job", None))
    assert kube.requests == ["GET", "GET"]


def test_a_pass_that_lost_a_race_is_redone_on_a_fresh_read(monkeypatch):
    seen: list[bool] = []

    async def fake_pass(ctx, job, indexes, logger, live, fresh):
        seen.append(fresh)
        if len(seen) == 1:
            raise Conflict("the job changed")
        return loop.GONE

    monkeypatch.setattr(loop, "run_pass", fake_pass)
    ctx, _ = context(body("7"))
    from lepton_operator.desired import JobRef

    live = body("7")
    live["metadata"]["finalizers"] = ["lepton.ai/operator"]
    asyncio.run(loop.job_loop(ctx, JobRef("job", "ns", "u1"), {}, lambda: False, live=live))
    assert seen == [False, True]


def _first_pass_sees(monkeypatch, live: dict, finalize_after: float | None) -> tuple[list, float]:
    """Run a job loop on `live`; kopf's finalizer arrives after `finalize_after` s (its watch
    event: the live body changes and the trigger fires). What the first pass saw, and when."""
    import time

    seen: list = []

    async def fake_pass(ctx, job, indexes, logger, live, fresh):
        seen.append(list(live["metadata"].get("finalizers") or []))
        return loop.GONE

    monkeypatch.setattr(loop, "run_pass", fake_pass)
    ctx, _ = context(body("7"))
    from lepton_operator.desired import JobRef

    async def main():
        async def kopf_finalizes():
            await asyncio.sleep(finalize_after)
            live["metadata"]["finalizers"] = ["lepton.ai/operator"]
            ctx.triggers.fire("ns", "job")

        if finalize_after is not None:
            asyncio.get_running_loop().create_task(kopf_finalizes())
        began = time.monotonic()
        await loop.job_loop(ctx, JobRef("job", "ns", "u1"), {}, lambda: False, live=live)
        return time.monotonic() - began

    took = asyncio.run(main())
    return seen, took


def test_a_new_jobs_first_pass_waits_for_kopfs_finalizer(monkeypatch):
    seen, took = _first_pass_sees(monkeypatch, body("7"), finalize_after=0.1)
    assert seen == [["lepton.ai/operator"]] and 0.1 <= took < loop.FINALIZER_WAIT_SECONDS


def test_a_job_with_the_finalizer_or_being_deleted_is_passed_at_once_and_a_missing_one_in_time(monkeypatch):
    finalized = body("7")
    finalized["metadata"]["finalizers"] = ["lepton.ai/operator"]
    assert _first_pass_sees(monkeypatch, finalized, finalize_after=None)[1] < 0.05
    going = body("7")
    going["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    assert _first_pass_sees(monkeypatch, going, finalize_after=None)[1] < 0.05
    monkeypatch.setattr(loop, "FINALIZER_WAIT_SECONDS", 0.2)
    seen, took = _first_pass_sees(monkeypatch, body("7"), finalize_after=None)  # never comes
    assert seen == [[]] and 0.2 <= took < 1.0
