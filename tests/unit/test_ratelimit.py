"""The client-side rate limit (reconcile/ratelimit.py): a token bucket like client-go's.

On a fake clock: a burst passes at once, the next request waits 1/qps, and over any T
seconds no more than burst + qps * T tokens are handed out. On the real clock: many threads
at once never beat that bound either. qps 0 is no limit."""

from __future__ import annotations

import threading
import time

import pytest

from lepton_operator.reconcile.ratelimit import TokenBucket

pytestmark = pytest.mark.unit


class FakeClock:
    """A clock that only moves when someone sleeps on it (one caller at a time)."""

    def __init__(self):
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def bucket(qps: float, burst: int, clock: FakeClock) -> TokenBucket:
    return TokenBucket(qps, burst, clock=clock, sleep=clock.sleep)


def test_a_burst_passes_at_once_and_the_next_request_waits_one_over_qps():
    clock = FakeClock()
    limiter = bucket(qps=10, burst=5, clock=clock)
    assert [limiter.acquire() for _ in range(5)] == [0.0] * 5
    assert clock.slept == []
    assert limiter.acquire() == pytest.approx(0.1)
    assert clock.slept == [pytest.approx(0.1)]
    # one more right after: another 1/qps
    assert limiter.acquire() == pytest.approx(0.1)


def test_an_idle_bucket_refills_up_to_burst_and_no_more():
    clock = FakeClock()
    limiter = bucket(qps=10, burst=5, clock=clock)
    for _ in range(5):
        limiter.acquire()
    clock.now += 60  # a minute idle refills 600 tokens' worth, but the bucket holds 5
    assert [limiter.acquire() for _ in range(5)] == [0.0] * 5
    assert limiter.acquire() == pytest.approx(0.1)


def test_over_t_seconds_no_more_than_burst_plus_qps_times_t_tokens():
    clock = FakeClock()
    qps, burst = 20.0, 7
    limiter = bucket(qps=qps, burst=burst, clock=clock)
    start = clock.now
    handed_out: list[float] = []  # when each token was handed out
    while clock.now - start < 10.0:
        limiter.acquire()
        handed_out.append(clock.now - start)
    # every window [a, a + T] holds at most burst + qps * T tokens
    for i, a in enumerate(handed_out):
        for window in (0.0, 0.05, 0.5, 1.0, 3.0):
            inside = sum(1 for t in handed_out[i:] if t <= a + window + 1e-9)
            assert inside <= burst + qps * window + 1e-6, (a, window, inside)
    # and the limit is reached, not undershot: burst at once, then qps per second
    assert len(handed_out) == pytest.approx(burst + qps * 10.0, abs=1)


def test_waiting_callers_are_served_in_the_order_they_asked():
    clock = FakeClock()
    limiter = bucket(qps=4, burst=1, clock=clock)
    # reservations made at the same instant are spaced 1/qps apart, first come first served
    assert [limiter.reserve() for _ in range(4)] == [pytest.approx(w) for w in (0.0, 0.25, 0.5, 0.75)]


def test_many_threads_on_the_real_clock_never_exceed_the_bound():
    qps, burst, threads, per_thread = 20.0, 5, 8, 3  # 24 tokens: 5 at once, 19 more take 0.95 s
    limiter = TokenBucket(qps, burst)
    times: list[float] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(threads)

    def worker():
        start_gate.wait()
        for _ in range(per_thread):
            limiter.acquire()
            with lock:
                times.append(time.monotonic())

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=5)
    elapsed = time.monotonic() - t0
    assert len(times) == threads * per_thread
    times.sort()
    # the bound, measured from the bucket's birth (it started full)
    for i, t in enumerate(times):
        assert i + 1 <= burst + qps * (t - t0) + 1, f"token {i + 1} at {t - t0:.3f} s"
    assert elapsed >= (threads * per_thread - burst) / qps - 0.05
    assert elapsed < 2.0


def test_qps_zero_is_unlimited():
    clock = FakeClock()
    limiter = bucket(qps=0, burst=1, clock=clock)
    assert limiter.unlimited
    assert all(limiter.acquire() == 0.0 for _ in range(10_000))
    assert clock.slept == []


@pytest.mark.parametrize("burst", [0, -3])
def test_burst_below_one_is_refused(burst):
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(10, burst)
