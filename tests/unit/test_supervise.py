"""reconcile/supervise.py: kopf's reactor is started again after it dies of a lost API,
with a growing backoff; a clean stop ends it, and a bug is not retried."""

import pytest

from lepton_operator.reconcile.supervise import Backoff, api_errors, run_until_stopped

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
