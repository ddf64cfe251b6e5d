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

**Communication measured.** When the trainer exports the split of its step time
(`Measurement.comm_fraction`: the fraction of the step spent waiting on communication,
see trainer_image/README.md), each measurement gives two equations instead of one:

    compute(n) = (1 - f) s(n) = a / n + b_p           (the work the workers share)
    comm(n)    =      f  s(n) = b_c + c * n           (the all-reduce)

and `b = b_p + b_c`. The communication term follows a ring all-reduce of M bytes over n
workers, `2 (n-1)/n * M / bandwidth + 2 (n-1) * latency`: the bandwidth part is almost
constant in n (between 1x and 2x M/bandwidth from n = 2 on: `b_c`), the latency part
grows linearly (`c * n`). So two measured sizes with the split determine all four terms
(compute from two points, communication from two points), where throughput alone needs a
third size to tell the `c * n` that makes a peak from the constant; with one size, the
compute scales linearly and the communication is taken as constant (bandwidth-bound).
A measurement with `f == 0` is a size without communication (one pod of one rank: no
collective at all): it constrains the compute only, and sizes below the smallest one that
communicates are predicted without the communication terms (`comm_from`). A fit with no
split at all is the plain one above, unchanged.

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
    comm_fraction: Optional[float] = None
    """Fraction of the step time spent on (exposed) communication, in [0, 1); None: not measured."""

    def split(self) -> Optional[float]:
        """The communication fraction when usable (finite, in [0, 1)), else None."""
        f = self.comm_fraction
        if f is None or not math.isfinite(f) or f < 0 or f >= 1:
            return None
        return f


@dataclass(frozen=True)
class ThroughputModel:
    """s(n) = a/n + b + c*n seconds per sample, fitted; see the module docstring."""

    a: float
    b: float
    c: float
    sizes: tuple[int, ...]
    """Distinct world sizes measured, ascending."""
    relative_sigma: float
    comm_b: float = 0.0
    """The part of `b` that is communication (`b_c`; 0 unless fitted with the split)."""
    comm_from: int = 1
    """Smallest size that communicates: below it `b_c` and `c * n` are left out."""
    comm_sizes: tuple[int, ...] = ()
    """Distinct sizes whose communication was measured (with a fraction above 0)."""

    def predict(self, n: int) -> float:
        """Expected throughput (samples/s) at n workers."""
        if n <= 0:
            return 0.0
        if n < self.comm_from:
            seconds = self.a / n + self.b - self.comm_b
        else:
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
        comm = f", communication measured at {','.join(map(str, self.comm_sizes))}" if self.comm_sizes else ""
        return (
            f"fitted on sizes {','.join(map(str, self.sizes))}{comm}: "
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


# The terms of the fit: a/n, b_p, b_c, c*n (b = b_p + b_c; see the module docstring).
_A, _BP, _BC, _C = range(4)


def _total(n: int) -> tuple[float, ...]:
    return (1.0 / n, 1.0, 1.0, float(n))


def _compute(n: int) -> tuple[float, ...]:
    return (1.0 / n, 1.0, 0.0, 0.0)


def _comm(n: int) -> tuple[float, ...]:
    return (0.0, 0.0, 1.0, float(n))


def fit_throughput(measurements: Iterable[Measurement]) -> Optional[ThroughputModel]:
    """The model fitted to every usable measurement; None when there is none.

    Non-negative least squares by trying every subset of the allowed terms (at most
    four terms with the communication split, three without, so at most fifteen subsets)
    and keeping the best fit whose coefficients are all non-negative: exact, and simple
    enough to read.
    """
    points = [
        m
        for m in measurements
        if m.world_size >= 1 and math.isfinite(m.throughput) and m.throughput > 0 and m.window_seconds > 0
    ]
    if not points:
        return None
    sizes = tuple(sorted({m.world_size for m in points}))
    comm_sizes = tuple(sorted({m.world_size for m in points if (m.split() or 0.0) > 0}))
    silent = {m.world_size for m in points if m.split() == 0.0} - set(comm_sizes)
    # Equations (features, seconds per sample, fit weight): one per measurement, or two
    # with the split (compute and communication); `plain` (window and recency) per measurement.
    rows = []
    plains = []
    for m in points:
        y = 1.0 / m.throughput
        plain = m.window_seconds * 0.5 ** (max(0.0, m.age_seconds) / HALF_LIFE_SECONDS)
        plains.append(plain)
        weight = plain / (y * y)  # errors relative to the whole step, for every equation
        f = m.split()
        if f is None:
            rows.append((_total(m.world_size), y, weight))
        elif f == 0.0:
            rows.append((_compute(m.world_size), y, weight))
        else:
            rows.append((_compute(m.world_size), (1.0 - f) * y, weight))
            rows.append((_comm(m.world_size), f * y, weight))
    if len(comm_sizes) == 0 and not silent:
        # No split: as many terms as measured sizes, a/n first (linear scaling), then b, then c*n.
        allowed = (_A, _BP, _C)[: min(3, len(sizes))]
    else:
        allowed = [_A]
        if len(sizes) >= 2:
            allowed.append(_BP)
        if comm_sizes:
            allowed.append(_BC)
        if len(comm_sizes) >= 2 or len(sizes) >= 3:
            allowed.append(_C)
    best: Optional[tuple[float, list[float]]] = None
    for k in range(1, len(allowed) + 1):
        for subset in combinations(allowed, k):
            normal = [[sum(w * f[i] * f[j] for f, _, w in rows) for j in subset] for i in subset]
            rhs = [sum(w * f[i] * y for f, y, w in rows) for i in subset]
            coef = _solve(normal, rhs)
            if coef is None or any(c < 0 for c in coef):
                continue
            full = [0.0, 0.0, 0.0, 0.0]
            for i, c in dict(zip(subset, coef, strict=True)).items():
                full[i] = c
            sse = sum(w * (y - sum(fi * ci for fi, ci in zip(f, full, strict=True))) ** 2 for f, y, w in rows)
            if best is None or sse < best[0] - 1e-18:
                best = (sse, full)
    if best is None or sum(best[1]) <= 0:
        # Nothing non-negative fits (cannot happen with a/n alone unless all weights vanish).
        mean = sum(m.throughput / m.world_size for m in points) / len(points)
        best = (0.0, [1.0 / mean, 0.0, 0.0, 0.0])
    a, bp, bc, c = best[1]
    b = bp + bc
    comm_from = min(comm_sizes) if comm_sizes and silent and max(silent) < min(comm_sizes) else 1
    extra = {"comm_b": bc, "comm_from": comm_from, "comm_sizes": comm_sizes}
    model = ThroughputModel(a, b, c, sizes, MIN_RELATIVE_SIGMA, **extra)
    # Relative residuals of the whole step, weighted by window and recency only.
    total = sum(plains)
    residual = sum(
        plain * (model.predict(m.world_size) / m.throughput - 1.0) ** 2 for m, plain in zip(points, plains, strict=True)
    )
    dof = max(1, len(points) - len([x for x in best[1] if x > 0]))
    sigma = math.sqrt(residual / total * len(points) / dof) if total > 0 else 0.0
    return ThroughputModel(a, b, c, sizes, max(MIN_RELATIVE_SIGMA, sigma), **extra)
