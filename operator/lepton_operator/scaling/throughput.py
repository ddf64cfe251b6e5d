"""A job's throughput model, fitted to every measurement it has (pure, no I/O).

The time a job spends per sample at world size n is modelled as

    seconds per sample  s(n) = a / n  +  b  +  c * n        (a, b, c >= 0)

`a / n` is the compute shared by the workers, `b` the communication that does not shrink
as workers are added (a ring all-reduce moves about the same bytes per worker at any
size: Amdahl's serial part), and `c * n` the part that grows with the worker count
(latency terms, a congested fabric): it is what gives a communication-bound job a peak.
Throughput is X(n) = 1 / s(n). This is the seed's `T = T_c + T_d` per sample; Pollux
(OSDI'21) fits the same shape.

The fit is a non-negative weighted least squares of s(n) on every measurement, not only
the latest per size. Each measurement's weight is its rate window (a longer window is a
mean over more steps, so less noisy) times a recency decay (half-life `HALF_LIFE_SECONDS`:
old measurements fade, the model follows a job whose speed changed), divided by s^2 (the
noise is relative). A model has no more free parameters than the job has measured sizes:
one size measured gives linear scaling (the optimistic guess), two give Amdahl's law.

Predictions carry an uncertainty: the weighted relative residual of the fit (at least
`MIN_RELATIVE_SIGMA`), growing with each doubling beyond the measured sizes, much faster
when only one size has been measured (then the model is an assumption, not a fit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Iterable, Optional

# Measurements fade with this half-life: after 30 minutes a measurement counts half.
HALF_LIFE_SECONDS = 1800.0
# The relative noise assumed at least, even when the fit is exact (two sizes, two points).
MIN_RELATIVE_SIGMA = 0.05
# Added relative uncertainty per doubling beyond the measured sizes, fitted model.
EXTRAPOLATION_SIGMA = 0.15
# Added relative uncertainty per doubling beyond the one measured size (linear assumed).
SINGLE_SIZE_SIGMA = 0.4


@dataclass(frozen=True)
class Measurement:
    """The job's whole throughput (samples/s) at a world size, over a rate window."""

    world_size: int
    throughput: float
    age_seconds: float = 0.0
    window_seconds: float = 60.0


@dataclass(frozen=True)
class ThroughputModel:
    """s(n) = a/n + b + c*n seconds per sample, fitted; see the module docstring."""

    a: float
    b: float
    c: float
    sizes: tuple[int, ...]
    """Distinct world sizes measured, ascending."""
    relative_sigma: float

    def predict(self, n: int) -> float:
        """Expected throughput (samples/s) at n workers."""
        if n <= 0:
            return 0.0
        seconds = self.a / n + self.b + self.c * n
        return 1.0 / seconds if seconds > 0 else math.inf

    def sigma(self, n: int) -> float:
        """Standard deviation of the prediction at n (samples/s)."""
        lo, hi = self.sizes[0], self.sizes[-1]
        doublings = max(0.0, math.log2(n / hi)) + max(0.0, math.log2(lo / n)) if n > 0 else 0.0
        per_doubling = SINGLE_SIZE_SIGMA if len(self.sizes) == 1 else EXTRAPOLATION_SIGMA
        return self.predict(n) * (self.relative_sigma + per_doubling * doublings)

    def measured(self, n: int) -> bool:
        return n in self.sizes

    def describe(self) -> str:
        if len(self.sizes) == 1:
            return f"one size measured ({self.sizes[0]}), linear scaling assumed"
        serial = self.b / (self.a + self.b + self.c) if self.a + self.b + self.c > 0 else 0.0
        peak = f", peak near {math.sqrt(self.a / self.c):.1f} workers" if self.c > 0 and self.a > 0 else ""
        return (
            f"fitted on sizes {','.join(map(str, self.sizes))}: "
            f"serial fraction {serial:.2f}{peak}, noise {self.relative_sigma:.0%}"
        )


def _solve(matrix: list[list[float]], vector: list[float]) -> Optional[list[float]]:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(vector)
    m = [row[:] + [vector[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                for k in range(col, n + 1):
                    m[r][k] -= f * m[col][k]
    return [m[i][n] / m[i][i] for i in range(n)]


def _features(n: int) -> tuple[float, float, float]:
    return (1.0 / n, 1.0, float(n))


def fit_throughput(measurements: Iterable[Measurement]) -> Optional[ThroughputModel]:
    """The model fitted to every usable measurement; None when there is none.

    Non-negative least squares by trying every subset of the allowed terms (at most
    three terms, so seven subsets) and keeping the best fit whose coefficients are all
    non-negative: exact, and simple enough to read.
    """
    points = [
        m
        for m in measurements
        if m.world_size >= 1 and math.isfinite(m.throughput) and m.throughput > 0 and m.window_seconds > 0
    ]
    if not points:
        return None
    sizes = tuple(sorted({m.world_size for m in points}))
    # (features, seconds per sample, fit weight, plain weight) per measurement.
    rows = []
    for m in points:
        y = 1.0 / m.throughput
        plain = m.window_seconds * 0.5 ** (max(0.0, m.age_seconds) / HALF_LIFE_SECONDS)
        rows.append((_features(m.world_size), y, plain / (y * y), plain))
    # As many terms as measured sizes: a/n first (linear scaling), then b, then c*n.
    allowed = (0, 1, 2)[: min(3, len(sizes))]
    best: Optional[tuple[float, list[float]]] = None
    for k in range(1, len(allowed) + 1):
        for subset in combinations(allowed, k):
            normal = [[sum(w * f[i] * f[j] for f, _, w, _ in rows) for j in subset] for i in subset]
            rhs = [sum(w * f[i] * y for f, y, w, _ in rows) for i in subset]
            coef = _solve(normal, rhs)
            if coef is None or any(c < 0 for c in coef):
                continue
            full = [0.0, 0.0, 0.0]
            for i, c in dict(zip(subset, coef, strict=True)).items():
                full[i] = c
            sse = sum(w * (y - f[0] * full[0] - f[1] * full[1] - f[2] * full[2]) ** 2 for f, y, w, _ in rows)
            if best is None or sse < best[0] - 1e-18:
                best = (sse, full)
    if best is None or sum(best[1]) <= 0:
        # Nothing non-negative fits (cannot happen with a/n alone unless all weights vanish).
        mean = sum(m.throughput / m.world_size for m in points) / len(points)
        best = (0.0, [1.0 / mean, 0.0, 0.0])
    a, b, c = best[1]
    model = ThroughputModel(a, b, c, sizes, MIN_RELATIVE_SIGMA)
    # Relative residuals, weighted by window and recency only.
    total = sum(r[3] for r in rows)
    residual = sum(
        plain * (model.predict(m.world_size) / m.throughput - 1.0) ** 2
        for m, (_, _, _, plain) in zip(points, rows, strict=True)
    )
    dof = max(1, len(points) - len([x for x in best[1] if x > 0]))
    sigma = math.sqrt(residual / total * len(points) / dof) if total > 0 else 0.0
    return ThroughputModel(a, b, c, sizes, max(MIN_RELATIVE_SIGMA, sigma))
