"""The autoscaling policy: a pure function from measured throughput to a worker count.

`decide(observations, spec, state, now)` looks at the throughput measured at each world
size (one `Observation` per size, the latest), the job's bounds and autoscaling settings,
and the rescale history, and returns a `ScaleDecision`: hold, or move to another size,
with a sentence that says why, numbers included.

The rules, in the order they are checked (docs/architecture.md, "Autoscaling policy (pure function)"):

1. A rescale under way, a generation still warming up, or no fresh, finite measurement
   at the current size: hold. Missing data never lowers the worker count (KEDA's
   scale-to-min at peak, kedacore/keda#3065, is the failure this avoids).
2. Scale down by one step ("the last step did not pay") when the throughput gained per
   added worker between the largest measured size below the current one and the current
   size is below `efficiency_threshold` x the per-worker throughput of that smaller size.
3. Scale up, in whole `step`s, while the last step paid off. How far: Amdahl's law
   `T(n) = n / (a + b*n)` is fitted to every measured size, and the job grows to the
   largest size whose last `step` workers are still expected to add `efficiency_threshold`
   x per-worker throughput, at most `GROWTH_FACTOR` x the current size per rescale (with
   one size measured, linear scaling is assumed, so the first step is the largest allowed).
   Measured sizes count as measured; between two measured sizes of rising throughput the
   line through them is used. A size the autoscaler stepped back from, or a size measured
   not to pay, is not tried again; when a larger size was measured slower, the search
   goes halfway (the peak may lie between). A capacity backoff caps the size below the
   one that could not be placed.
4. Every rescale is priced: it costs (mean measured downtime, or a default) x current
   throughput in lost samples, and a scale-up goes ahead only when the expected gain
   over the horizon pays for it.
5. `min`/`max`, `cooldown_seconds` since the last rescale, `max_rescales_per_hour`, and
   the capacity backoff the operator sets after a scale-up could not be placed.

No I/O, no clock: `now` is a parameter, so the simulator and the tests run the same code
as the operator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Iterable, Literal, Optional

from lepton_operator.api.conditions import (
    HOLD_AT_BOUND,
    HOLD_AT_KNEE,
    HOLD_BACKOFF,
    HOLD_BUDGET,
    HOLD_COOLDOWN,
    HOLD_NO_DATA,
    HOLD_NOT_WORTH_RESTART,
    HOLD_RESCALING,
    HOLD_WARMUP,
    REASON_AUTOSCALE_DOWN,
    REASON_AUTOSCALE_UP,
    REASON_INSUFFICIENT_CAPACITY,
    REASON_OUT_OF_BOUNDS,
)
from lepton_operator.api.models import (
    Decision,
    LeptonJobSpec,
    LeptonJobStatus,
    Observation,
)

# A rescale's downtime before any has been measured (stop, checkpoint, start, rendezvous).
DEFAULT_RESTART_SECONDS = 60.0
# How far ahead a rescale's gain is counted when the job's remaining time is unknown.
# The operator does not know how long a job will run; an hour is the time over which a
# decision is expected to matter (and the budget of rescales is per hour, too).
DEFAULT_HORIZON_SECONDS = 3600.0
# A scale-up at most multiplies the worker count by this: the fitted curve is a guess
# beyond the sizes measured.
GROWTH_FACTOR = 4
# A measurement older than this many autoscaler intervals is stale.
STALE_INTERVALS = 3
# The newest rescales used to estimate downtime.
DOWNTIME_SAMPLES = 5

Action = Literal["hold", "up", "down"]


@dataclass(frozen=True)
class RescaleEvent:
    """A past change of the worker set: when it started, and its downtime if measured."""

    time: datetime
    downtime_seconds: Optional[float] = None
    changed_size: bool = True
    from_size: Optional[int] = None
    to_size: Optional[int] = None
    reason: str = ""


@dataclass(frozen=True)
class ScalingState:
    """What the policy needs to know about the job besides its spec and observations."""

    world_size: int
    generation_start: Optional[datetime] = None
    rescales: tuple[RescaleEvent, ...] = ()
    backoff_until: Optional[datetime] = None
    capacity_failed_size: Optional[int] = None
    """The target of the scale-up that could not be placed (with `backoff_until`)."""
    rescale_in_progress: bool = False
    remaining_seconds: Optional[float] = None
    """Estimated training time left, when known; it caps the horizon over which gains count."""

    @classmethod
    def from_status(cls, status: LeptonJobStatus, remaining_seconds: Optional[float] = None) -> "ScalingState":
        """The state recorded in a LeptonJob's status by the operator core."""
        history = list(status.rescale_history)
        if status.last_rescale is not None and status.last_rescale not in history:
            history.append(status.last_rescale)
        failed = None
        auto = status.autoscaling
        if auto.backoff_until is not None:
            # The scale-up that could not be placed: the core's record of it, or else our
            # own last decision (the only scale-up the autoscaler asked for).
            failed_records = [r.to for r in history if r.reason == REASON_INSUFFICIENT_CAPACITY]
            if failed_records:
                failed = failed_records[-1]
            elif auto.last_decision is not None and auto.last_decision.target > status.world_size:
                failed = auto.last_decision.target
        return cls(
            world_size=status.world_size,
            generation_start=status.generation_start_time,
            rescales=tuple(
                RescaleEvent(
                    r.time,
                    r.downtime_seconds,
                    changed_size=r.from_ != r.to,
                    from_size=r.from_,
                    to_size=r.to,
                    reason=r.reason,
                )
                for r in history
                if r.reason != REASON_INSUFFICIENT_CAPACITY  # abandoned: nothing was restarted
            ),
            backoff_until=auto.backoff_until,
            capacity_failed_size=failed,
            rescale_in_progress=status.rescale is not None,
            remaining_seconds=remaining_seconds,
        )


@dataclass(frozen=True)
class ScaleDecision:
    """The policy's answer: a target world size, a CamelCase reason and a readable message."""

    target: int
    action: Action
    reason: str
    message: str
    numbers: dict = field(default_factory=dict, compare=False)

    def to_model(self, now: datetime) -> Decision:
        """The form recorded in `status.autoscaling.lastDecision`."""
        return Decision(target=self.target, reason=f"{self.reason}: {self.message}", time=now)


def _hold(size: int, reason: str, message: str, **numbers) -> ScaleDecision:
    return ScaleDecision(size, "hold", reason, message, numbers)


def usable_observations(observations: Iterable[Observation]) -> dict[int, Observation]:
    """Latest finite observation per world size (NaN, Inf and negatives are dropped)."""
    latest: dict[int, Observation] = {}
    for obs in observations:
        if not math.isfinite(obs.throughput) or obs.throughput < 0:
            continue
        old = latest.get(obs.world_size)
        if old is None or obs.measured_at >= old.measured_at:
            latest[obs.world_size] = obs
    return latest


def restart_seconds_estimate(rescales: Iterable[RescaleEvent]) -> float:
    """Mean measured downtime of the latest rescales, or the default before any is measured."""
    measured = [r.downtime_seconds for r in sorted(rescales, key=lambda r: r.time) if r.downtime_seconds is not None]
    measured = measured[-DOWNTIME_SAMPLES:]
    return sum(measured) / len(measured) if measured else DEFAULT_RESTART_SECONDS


def decide(
    observations: Iterable[Observation],
    spec: LeptonJobSpec,
    state: ScalingState,
    now: datetime,
) -> ScaleDecision:
    """Decide the job's next world size from measured throughput; see the module docstring."""
    auto = spec.autoscaling
    lo, hi = spec.workers.min, spec.workers.max
    cur = state.world_size

    if state.rescale_in_progress:
        return _hold(cur, HOLD_RESCALING, f"a rescale of the job is under way; holding {cur}")
    if cur < lo or cur > hi:
        # Bounds changed under a running job: the operator core clamps the requested size.
        target = max(lo, min(hi, cur))
        return ScaleDecision(
            target,
            "up" if target > cur else "down",
            REASON_OUT_OF_BOUNDS,
            f"{cur} is outside [min, max] = [{lo}, {hi}]; moving to {target}",
        )

    warm_from = state.generation_start + timedelta(seconds=auto.warmup_seconds) if state.generation_start else None
    if warm_from is not None and now < warm_from:
        left = (warm_from - now).total_seconds()
        return _hold(
            cur,
            HOLD_WARMUP,
            f"generation at {cur} workers is warming up ({left:.0f} s of "
            f"{auto.warmup_seconds} s warm-up left); holding {cur}",
        )

    seen = usable_observations(observations)
    current = seen.get(cur)
    max_age = STALE_INTERVALS * auto.interval_seconds
    if current is None:
        return _hold(
            cur,
            HOLD_NO_DATA,
            f"no throughput measured at {cur} workers; holding {cur} (missing data never scales down)",
        )
    age = (now - current.measured_at).total_seconds()
    if age > max_age or (warm_from is not None and current.measured_at < warm_from):
        return _hold(
            cur,
            HOLD_NO_DATA,
            f"throughput at {cur} workers is stale (measured {age:.0f} s ago, "
            f"before this generation warmed up or more than {max_age} s ago); holding {cur}",
        )

    t_cur = current.throughput
    per_worker_cur = t_cur / cur
    restart_s = restart_seconds_estimate(state.rescales)
    horizon = DEFAULT_HORIZON_SECONDS
    if state.remaining_seconds is not None:
        horizon = max(0.0, min(horizon, state.remaining_seconds))
    restart_cost = restart_s * t_cur  # samples lost while the job restarts

    # The last step: from the largest measured size below the current one.
    lower = max((n for n in seen if n < cur and n >= lo), default=None)
    last_eff = None
    if lower is not None:
        t_low = seen[lower].throughput
        per_worker_low = t_low / lower
        gain_per_worker = (t_cur - t_low) / (cur - lower)
        last_eff = gain_per_worker / per_worker_low if per_worker_low > 0 else 0.0
        step_text = (
            f"{lower}->{cur}: {gain_per_worker:+.1f} samples/s per added worker = {last_eff:.2f} of "
            f"per-worker throughput ({per_worker_low:.1f})"
        )
        if last_eff < auto.efficiency_threshold:
            blocked = _guards(state, auto, now, scale_up=False)
            if blocked:
                return blocked
            return ScaleDecision(
                lower,
                "down",
                REASON_AUTOSCALE_DOWN,
                f"{step_text} < {auto.efficiency_threshold:.2f}: the last step did not pay; {cur}->{lower}",
                dict(efficiency=last_eff, throughput=t_cur, lower_throughput=t_low),
            )

    if cur >= hi:
        return _hold(cur, HOLD_AT_BOUND, f"at max = {hi} workers ({t_cur:.1f} samples/s); holding {cur}")

    a, b = fit_scaling({n: o.throughput for n, o in seen.items()})
    model = lambda n: n / (a + b * n)  # noqa: E731  (Amdahl's law, fitted)

    def predict(n: int) -> float:
        """Measured if seen; between two measured sizes, the line through them (a lower
        bound on a concave curve); otherwise the fitted curve anchored at the current size."""
        if n in seen:
            return seen[n].throughput
        below = max((m for m in seen if m < n), default=None)
        above = min((m for m in seen if m > n), default=None)
        if below is not None and above is not None:
            t_b, t_a = seen[below].throughput, seen[above].throughput
            if t_a > t_b:
                return t_b + (t_a - t_b) * (n - below) / (above - below)
        return t_cur * model(n) / model(cur)

    # Grow by whole steps, at most doubling per rescale, while the fitted curve says the
    # last `step` workers still pay; stop before a size measured not to pay.
    ceiling = min(hi, max(cur + auto.step, GROWTH_FACTOR * cur))
    worse_above = [m for m in seen if m > cur and seen[m].throughput <= t_cur]
    if worse_above:
        # A larger size measured slower: the peak, if any, lies between; search halfway.
        ceiling = min(ceiling, (cur + min(worse_above)) // 2)
    stepped_back = [
        r.from_size
        for r in state.rescales
        if r.reason == REASON_AUTOSCALE_DOWN and r.from_size is not None and r.from_size > cur
    ]
    if stepped_back:
        # A size the autoscaler left because it did not pay is not tried again: noise in a
        # re-measured smaller size must not make the job flap.
        ceiling = min(ceiling, min(stepped_back) - 1)
    in_backoff = state.backoff_until is not None and now < state.backoff_until
    if in_backoff and state.capacity_failed_size is not None:
        # Not that size again before the backoff ends; a smaller step may still fit.
        ceiling = min(ceiling, state.capacity_failed_size - 1)
    target = cur
    for n in range(cur + auto.step, ceiling + 1, auto.step):
        prev = n - auto.step
        t_prev, t_n = predict(prev), predict(n)
        eff = ((t_n - t_prev) / auto.step) / (t_prev / prev) if t_prev > 0 else 0.0
        if eff < auto.efficiency_threshold:
            break
        if n in seen and ((t_n - t_cur) / (n - cur)) / per_worker_cur < auto.efficiency_threshold:
            break  # measured before: a size known not to pay is not tried again
        target = n
    fitted = (
        (f"fitted n/(a+b*n) on sizes {','.join(map(str, sorted(seen)))} (serial fraction {b / (a + b):.2f})")
        if len(seen) > 1
        else (f"one size measured, assuming linear scaling from {per_worker_cur:.1f} samples/s per worker")
    )
    if target == cur and in_backoff and ceiling < cur + auto.step:
        left = (state.backoff_until - now).total_seconds()
        return _hold(
            cur,
            HOLD_BACKOFF,
            f"the scale-up to {state.capacity_failed_size} could not be placed "
            f"(insufficient capacity); no new attempt for {left:.0f} s; holding {cur}",
        )
    if target == cur:
        nxt = min(hi, cur + auto.step)
        t_next = predict(nxt)
        eff = ((t_next - t_cur) / (nxt - cur)) / per_worker_cur if per_worker_cur > 0 else 0.0
        how = "measured" if nxt in seen else "expected"
        return _hold(
            cur,
            HOLD_AT_KNEE,
            f"{cur}->{nxt}: {how} {t_cur:.1f} -> {t_next:.1f} samples/s = {eff:.2f} "
            f"of per-worker throughput per added worker < {auto.efficiency_threshold:.2f} ({fitted}); "
            f"holding {cur}",
            efficiency=eff,
        )

    expected_gain = predict(target) - t_cur
    blocked = _guards(state, auto, now, scale_up=True)
    if blocked:
        return blocked
    # Samples gained over the horizon after the restart, against samples lost by restarting.
    benefit = expected_gain * max(0.0, horizon - restart_s)
    if benefit <= restart_cost:
        return _hold(
            cur,
            HOLD_NOT_WORTH_RESTART,
            f"{cur}->{target} would gain ~{expected_gain:.1f} samples/s, {benefit:.0f} samples over "
            f"{horizon:.0f} s, less than a {restart_s:.0f} s restart costs ({restart_cost:.0f} samples); "
            f"holding {cur}",
            expected_gain=expected_gain,
            restart_cost=restart_cost,
        )
    last = f"{step_text} >= {auto.efficiency_threshold:.2f}; " if last_eff is not None else ""
    return ScaleDecision(
        target,
        "up",
        REASON_AUTOSCALE_UP,
        f"{last}{fitted}: expected {t_cur:.1f} -> {t_cur + expected_gain:.1f} samples/s at "
        f"{target}, +{expected_gain:.1f} samples/s pays the {restart_s:.0f} s restart "
        f"({benefit:.0f} > {restart_cost:.0f} samples over {horizon:.0f} s); {cur}->{target}",
        dict(expected_gain=expected_gain, restart_cost=restart_cost, throughput=t_cur),
    )


def fit_scaling(points: dict[int, float]) -> tuple[float, float]:
    """Fit Amdahl's law, T(n) = n / (a + b*n), to throughput by world size; return (a, b).

    n/T(n) is linear in n, so this is a least-squares line through (n, n/T). `b` is kept
    >= 0 (no super-linear scaling is extrapolated); with one point (or a fit that makes
    no sense) the answer is linear scaling at the mean per-worker throughput.
    """
    pts = [(n, n / t) for n, t in points.items() if t > 0]
    if not pts:
        return 1.0, 0.0
    mean_y = sum(y for _, y in pts) / len(pts)
    if len(pts) < 2:
        return mean_y, 0.0
    mean_n = sum(n for n, _ in pts) / len(pts)
    var = sum((n - mean_n) ** 2 for n, _ in pts)
    b = max(0.0, sum((n - mean_n) * (y - mean_y) for n, y in pts) / var)
    a = mean_y - b * mean_n
    if a <= 0:
        return mean_y, 0.0
    return a, b


def _guards(state: ScalingState, auto, now: datetime, scale_up: bool) -> Optional[ScaleDecision]:
    """Cooldown, hourly budget and capacity backoff: a hold decision, or None to go ahead."""
    cur = state.world_size
    if (
        scale_up
        and state.backoff_until is not None
        and now < state.backoff_until
        and state.capacity_failed_size is None
    ):
        left = (state.backoff_until - now).total_seconds()
        return _hold(
            cur,
            HOLD_BACKOFF,
            f"the last scale-up could not be placed (insufficient capacity); "
            f"no new attempt for {left:.0f} s; holding {cur}",
        )
    times = [r.time for r in state.rescales]
    if times:
        since = (now - max(times)).total_seconds()
        if since < auto.cooldown_seconds:
            return _hold(
                cur,
                HOLD_COOLDOWN,
                f"last rescale {since:.0f} s ago, cooldown is {auto.cooldown_seconds} s; holding {cur}",
            )
    hour_ago = now - timedelta(hours=1)
    recent = [r for r in state.rescales if r.changed_size and r.time > hour_ago]
    if len(recent) >= auto.max_rescales_per_hour:
        return _hold(
            cur,
            HOLD_BUDGET,
            f"{len(recent)} rescales in the last hour, budget is {auto.max_rescales_per_hour}; holding {cur}",
        )
    return None
