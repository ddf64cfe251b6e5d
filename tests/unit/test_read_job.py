"""A pass reads the job from kopf's live body, and from the API only when that body is
older than what the operator already knows (its own last write) or after a Conflict."""

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


def test_after_the_operators_own_write_a_lagging_live_body_is_read_again_from_the_api():
    ctx, kube = context(body("7"))
    written = kube.patch_job_status("ns", "job", "7", {"phase": "Running"})
    assert written["metadata"]["resourceVersion"] == "8"
    assert ctx.watch.behind(KEY, "7")  # the write told the watch health
    got = asyncio.run(loop.read_job(ctx, "ns", "job", body("7")))
    assert got["metadata"]["resourceVersion"] == "8" and kube.requests == ["PATCH", "GET"]
    # Once the watch delivers the write, the live body serves again.
    ctx.watch.watched(KEY, "8")
    asyncio.run(loop.read_job(ctx, "ns", "job", body("8")))
    assert kube.requests == ["PATCH", "GET"]
    # A later change by someone else (the watch is ahead of the write) is used as is.
    asyncio.run(loop.read_job(ctx, "ns", "job", body("9", replicas=4)))
    assert kube.requests == ["PATCH", "GET"]


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

    asyncio.run(loop.job_loop(ctx, JobRef("job", "ns", "u1"), {}, lambda: False, live=body("7")))
    assert seen == [False, True]
