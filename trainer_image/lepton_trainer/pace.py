"""--pace-curve: cap a job's throughput as a function of its world size.

The curve maps a world size in pods to the job's total samples/s. Between points the rate
is interpolated linearly; beyond the ends it stays flat. The local demo uses it to make a
job whose throughput stops growing at a chosen size, while it still trains for real.
"""

from __future__ import annotations

import json
import time
from itertools import pairwise


def parse_pace_curve(text: str) -> list[tuple[float, float]]:
    """Parse ``'{"1": 100, "2": 185}'`` into sorted ``[(1.0, 100.0), (2.0, 185.0)]``."""
    raw = json.loads(text)
    if not isinstance(raw, dict) or not raw:
        raise ValueError("expected a non-empty JSON object {world size: samples/s}")
    points = []
    for key, value in raw.items():
        world, rate = float(key), float(value)
        if world <= 0 or rate <= 0:
            raise ValueError(f"world size and rate must be > 0, got {key!r}: {value!r}")
        points.append((world, rate))
    return sorted(points)


def interpolate(points: list[tuple[float, float]], world: float) -> float:
    """The curve's rate at ``world``: linear between points, flat beyond the ends."""
    if world <= points[0][0]:
        return points[0][1]
    for (w0, r0), (w1, r1) in pairwise(points):
        if world <= w1:
            return r0 + (r1 - r0) * (world - w0) / (w1 - w0)
    return points[-1][1]


class Pacer:
    """Sleeps after each step so that samples/s never exceeds ``rate``.

    It keeps the earliest time the next step may end; a step that ran slow moves that
    time forward to now, so a slow step is never "made up" by a burst afterwards.
    """

    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep):
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._last_end = clock()

    def wait(self, samples: int) -> float:
        """Call at the end of a step of ``samples``; returns the seconds slept."""
        earliest = self._last_end + samples / self.rate
        now = self._clock()
        slept = 0.0
        if now < earliest:
            slept = earliest - now
            self._sleep(slept)
            now = earliest
        self._last_end = now
        return slept
