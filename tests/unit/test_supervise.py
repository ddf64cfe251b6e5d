"""reconcile/supervise.py: kopf's reactor is started again after it dies of a lost API,
with a growing backoff; a clean stop ends it, and a bug is not retried."""

import pytest

from lepton_operator.reconcile.supervise import (
    Backoff,
    api_errors,
    run_until_stopped,
    tolerate_unserved_resources,
    unserved_reason,
    wait_until_served,
)

pytestmark = pytest.mark.unit


class Lost(Exception):
    pass


class Script:
    """A fake reactor: each start() takes `durations[i]` seconds of a fake clock, then
    raises `outcomes[i]` (None: a clean stop)."""

    def __init__(self, outcomes, durations=None):
        self.outcomes = list(outcomes)
        self.durations = list(durations or [0.0] * len(self.outcomes))
        self.now = 0.0
        self.starts = 0
        self.slept: list[float] = []

    def start(self):
        self.now += self.durations[self.starts]
        outcome = self.outcomes[self.starts]
        self.starts += 1
        if outcome is not None:
            raise outcome

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds

    def clock(self):
        return self.now


def test_a_reactor_that_keeps_losing_the_api_is_started_again_with_a_doubling_backoff_up_to_the_cap():
    script = Script([Lost("404")] * 7 + [None])
    restarts = []
    run_until_stopped(script.start, (Lost,), restarts.append, Backoff(first=1, cap=30), script.sleep, script.clock)
    assert script.starts == 8
    assert script.slept == [1, 2, 4, 8, 16, 30, 30]
    assert [str(e) for e in restarts] == ["404"] * 7


def test_a_run_that_lasted_long_starts_the_backoff_again():
    script = Script([Lost("a"), Lost("b"), Lost("c"), None], durations=[0, 0, 120, 0])
    run_until_stopped(
        script.start, (Lost,), backoff=Backoff(first=1, healthy_after=60), sleep=script.sleep, clock=script.clock
    )
    assert script.slept == [1, 2, 1]


def test_a_clean_stop_returns_at_once():
    script = Script([None])
    run_until_stopped(script.start, (Lost,), sleep=script.sleep, clock=script.clock)
    assert (script.starts, script.slept) == (1, [])


def test_any_other_exception_is_a_bug_and_is_not_retried():
    script = Script([ZeroDivisionError("bug"), None])
    with pytest.raises(ZeroDivisionError):
        run_until_stopped(script.start, (Lost,), sleep=script.sleep, clock=script.clock)
    assert (script.starts, script.slept) == (1, [])


def test_kopfs_errors_for_a_404_and_a_broken_watch_count_as_a_lost_api():
    from kopf._cogs.clients.errors import APINotFoundError, APIServerError
    from kopf._cogs.clients.watching import WatchingError

    recoverable = api_errors()
    for error in (APINotFoundError, APIServerError, WatchingError):
        assert issubclass(error, recoverable), error
    assert not issubclass(RuntimeError, recoverable)


# ----------------------------------------------------------------- a resource not served


def test_a_404_on_a_watch_ends_that_stream_after_a_pause_instead_of_the_reactor(monkeypatch):
    import asyncio

    from kopf._cogs.clients import watching
    from kopf._cogs.clients.errors import APINotFoundError

    calls = []

    async def flaky(*, resource, namespace, **kwargs):
        calls.append(namespace)
        yield {"type": None, "object": {"n": 1}}
        raise APINotFoundError({"message": "404 page not found"}, status=404, headers={})

    monkeypatch.setattr(watching, "continuous_watch", flaky)
    tolerate_unserved_resources(retry_seconds=0.01)
    tolerate_unserved_resources(retry_seconds=0.01)  # a second call wraps once
    wrapped = watching.continuous_watch
    assert wrapped is not flaky and wrapped.lepton_tolerant

    class Resource:
        plural = "leptonjobs"

    async def drain():
        return [e async for e in wrapped(resource=Resource(), namespace="ns", settings=None)]

    assert asyncio.run(drain()) == [{"type": None, "object": {"n": 1}}]  # ended, not raised
    assert calls == ["ns"]


def test_any_other_error_on_a_watch_still_propagates(monkeypatch):
    import asyncio

    from kopf._cogs.clients import watching

    async def broken(**kwargs):
        raise ZeroDivisionError("bug")
        yield

    monkeypatch.setattr(watching, "continuous_watch", broken)
    tolerate_unserved_resources(retry_seconds=0.01)
    with pytest.raises(ZeroDivisionError):
        asyncio.run(watching.continuous_watch(resource=None, namespace=None).__anext__())


def test_the_start_waits_until_the_resource_is_served_with_a_growing_backoff():
    answers = iter(["HTTP 404", "HTTP 404", "connection refused", None])
    slept: list[float] = []
    waits = wait_until_served(lambda: next(answers), "leptonjobs", Backoff(first=1, cap=30), slept.append)
    assert waits == 3 and slept == [1, 2, 4]
    assert wait_until_served(lambda: None, "leptonjobs", sleep=slept.append) == 0 and len(slept) == 3


class FakeKube:
    def __init__(self, outcome):
        self.outcome = outcome

    def served_resources(self, group_version):
        assert group_version == "lepton.ai/v1alpha1"
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_unserved_reason_names_what_is_missing():
    from lepton_operator.reconcile.kube import TransientApiError

    assert unserved_reason(FakeKube(["leptonjobs"])) is None
    assert unserved_reason(FakeKube([])) == "lepton.ai/v1alpha1 has no leptonjobs"
    assert "refused" in unserved_reason(FakeKube(TransientApiError("discover lepton.ai/v1alpha1: refused")))


def test_kopfs_own_requests_take_tokens_from_the_operators_limiter(monkeypatch):
    import asyncio
    import time

    from kopf._cogs.clients import api

    from lepton_operator.reconcile.ratelimit import TokenBucket
    from lepton_operator.reconcile.supervise import limit_kopf_requests

    sent: list[float] = []

    async def kopf_request(method, url, **kwargs):  # stands for kopf's authenticated request
        sent.append(time.monotonic())
        return f"{method} {url}"

    monkeypatch.setattr(api, "request", kopf_request)
    limiter = TokenBucket(qps=20, burst=2)
    limit_kopf_requests(limiter)
    limit_kopf_requests(limiter)  # twice wraps once

    async def five():
        return await asyncio.gather(*(api.request("get", f"/x/{i}", settings=None, logger=None) for i in range(5)))

    began = time.monotonic()
    assert asyncio.run(five()) == [f"get /x/{i}" for i in range(5)]
    # 2 at once (the burst), then one every 1/20 s: the fifth ~0.15 s after the first.
    assert sent[1] - began < 0.05 and sent[4] - began >= 0.14
    assert api.request.lepton_original is kopf_request
    # kopf's helpers (get, patch, post, delete, stream) look `request` up when called, so
    # the wrapper sees every one of them.
    for helper in (api.get, api.post, api.patch, api.delete, api.stream):
        assert "request" in helper.__code__.co_names, helper.__name__


def test_kopfs_routine_success_lines_are_dropped_and_everything_else_kept():
    import logging

    from lepton_operator.reconcile.cli import without_routine_successes

    def record(level, msg):
        return logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)

    assert not without_routine_successes(record(logging.INFO, "Timer 'tick' succeeded."))
    assert not without_routine_successes(record(logging.INFO, "Handler 'child_changed' succeeded."))
    assert without_routine_successes(record(logging.INFO, "created Pod job-worker-0"))
    assert without_routine_successes(record(logging.ERROR, "Timer 'tick' failed with an exception. Will retry."))
    assert without_routine_successes(record(logging.WARNING, "Handler 'tick' succeeded."))
