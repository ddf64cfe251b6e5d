"""A client-side rate limit for the operator's own API calls: a token bucket like client-go's
`flowcontrol.NewTokenBucketRateLimiter(qps, burst)` (kube-controller-manager's
`--kube-api-qps` / `--kube-api-burst`).

The bucket holds at most `burst` tokens and gains `qps` per second; each request takes one.
`acquire()` reserves the next token under a lock and sleeps, outside the lock, until the
moment that token exists (the reservation scheme of Go's `golang.org/x/time/rate`, on which
client-go's limiter is built): callers are served in the order they asked, nobody spins,
and over any T seconds no more than `burst + qps * T` tokens are handed out.

Pure: no Kubernetes import; the clock and the sleep are injectable, so tests run on a fake
clock.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable


class TokenBucket:
    """Thread-safe token bucket: capacity `burst`, refilled at `qps` tokens per second.

    `qps` <= 0 (or infinite) disables the limit: `acquire()` returns at once.
    """

    def __init__(
        self,
        qps: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if math.isnan(qps):
            raise ValueError("qps must be a number")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.qps = float(qps)
        self.burst = int(burst)
        self.unlimited = qps <= 0 or math.isinf(qps)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)  # may go negative: tokens already promised to waiting callers
        self._last = clock()

    def reserve(self) -> float:
        """Take the next token now or in the future; returns the seconds until it is free
        (0 when it is free now). The caller must wait that long before using it."""
        if self.unlimited:
            return 0.0
        with self._lock:
            now = self._clock()
            if now > self._last:  # a clock that steps back refills nothing
                self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
                self._last = now
            self._tokens -= 1.0
            if self._tokens >= 0:
                return 0.0
            return -self._tokens / self.qps

    def acquire(self) -> float:
        """Block until a token is free, then take it; returns the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait
