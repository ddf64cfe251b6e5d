"""The autoscaling policy on throughput curves: it climbs while steps pay, stops at the
knee, steps back when a step did not pay, holds on missing data, and respects bounds,
cooldown, budget, capacity backoff and the restart cost."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta, timezone

import pytest

from lepton_operator.api import conditions
from lepton_operator.api.conditions import (
    REASON_AUTOSCALE_DOWN,
    REASON_AUTOSCALE_UP,
    REASON_INSUFFICIENT_CAPACITY,
)
from lepton_operator.api.models import LeptonJobSpec, Observation, parse_status
from lepton_operator.scaling import policy
from lepton_operator.scaling.policy import (
    RescaleEvent,
    ScalingState,
    decide,
    fit_scaling,
)

pytestmark = pytest.mark.unit

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def spec(lo=1, hi=8, **auto) -> LeptonJobSpec:
    settings = {
        "enabled": True,
        "intervalSeconds": 30,
        "warmupSeconds": 60,
        "cooldownSeconds": 120,
        "efficiencyThreshold": 0.5,
        "maxRescalesPerHour": 6,
        **auto,
    }
    return LeptonJobSpec.model_validate({"workers": {"min": lo, "max": hi}, "autoscaling": settings})


def obs(size: int, tput: float, at: datetime) -> Observation:
    return Observation(world_size=size, throughput=tput, measured_at=at)


def amdahl(serial: float):
    return lambda n: 100.0 * n / (1 + serial * (n - 1))


def converge(
    curve,
    s: LeptonJobSpec,
    start: int = 1,
    noise: float = 0.0,
    seed: int = 0,
    steps: int = 200,
    capacity: int | None = None,
):
    """Drive `decide` like the operator does: measure after warm-up, rescale, repeat."""
    rng = random.Random(seed)
    now, size, gen_start = T0, start, T0
    seen: dict[int, Observation] = {}
    rescales: list[RescaleEvent] = []
    backoff, failed, sizes, samples = None, None, [size], []
    for _ in range(steps):
        now += timedelta(seconds=s.autoscaling.interval_seconds)
        if now >= gen_start + timedelta(seconds=s.autoscaling.warmup_seconds):
            # Like the operator: the rate over this generation after its warm-up.
            samples.append(curve(size) * (1 + rng.uniform(-noise, noise)))
            seen[size] = obs(size, sum(samples) / len(samples), now)
        state = ScalingState(size, gen_start, tuple(rescales), backoff, failed)
        d = decide(seen.values(), s, state, now)
        assert s.workers.min <= d.target <= s.workers.max, d
        if d.target == size:
            continue
        if capacity is not None and d.target > capacity:
            backoff = now + timedelta(seconds=s.autoscaling.capacity_backoff_seconds)
            failed = d.target
            continue
        rescales.append(RescaleEvent(now, 30.0, from_size=size, to_size=d.target, reason=d.reason))
        size, gen_start, samples = d.target, now + timedelta(seconds=30), []
        sizes.append(size)
    return sizes, d


def knee(curve, lo, hi, threshold):
    """The largest size whose last worker still adds threshold x per-worker throughput."""
    n = lo
    while n < hi and (curve(n + 1) - curve(n)) >= threshold * curve(n) / n:
        n += 1
    return n


@pytest.mark.parametrize("serial", [0.05, 0.1, 0.2, 0.3])
def test_amdahl_converges_to_the_knee_and_holds(serial):
    curve = amdahl(serial)
    s = spec(1, 16, efficiencyThreshold=0.5)
    sizes, last = converge(curve, s)
    expected = knee(curve, 1, 16, 0.5)
    assert abs(sizes[-1] - expected) <= 1, (sizes, expected)
    assert last.action == "hold"
    assert len(sizes) <= 6, f"too many rescales: {sizes}"


def test_linear_grows_to_max_and_holds_there():
    sizes, last = converge(lambda n: 100.0 * n, spec(1, 16))
    assert sizes == [1, 4, 16]
    assert last.reason == conditions.HOLD_AT_BOUND


def test_saturating_curve_stops_where_steps_stop_paying():
    points = {1: 100, 2: 185, 3: 260, 4: 330, 5: 350, 6: 360, 7: 365, 8: 370}
    sizes, last = converge(points.__getitem__, spec(1, 8))
    assert sizes[-1] == 4, sizes
    assert last.action == "hold"


def test_throughput_falling_past_a_point_finds_the_peak():
    points = {1: 100, 2: 195, 3: 290, 4: 370, 5: 430, 6: 480, 7: 460, 8: 440, 9: 420, 10: 400, 11: 380, 12: 330}
    sizes, last = converge(points.__getitem__, spec(1, 12, efficiencyThreshold=0.2))
    # It overshoots, steps back, then searches between: it ends next to the peak, holding.
    assert sizes[-1] in (6, 7) and points[sizes[-1]] >= 0.95 * 480, sizes
    assert last.action == "hold" and len(sizes) <= 6


@pytest.mark.parametrize("seed", range(5))
def test_noise_of_ten_percent_still_lands_near_the_knee(seed):
    curve = amdahl(0.15)
    s = spec(1, 12, efficiencyThreshold=0.5)
    sizes, _ = converge(curve, s, noise=0.10, seed=seed)
    assert abs(sizes[-1] - knee(curve, 1, 12, 0.5)) <= 2, sizes
    assert len(sizes) <= 7


def test_last_step_that_did_not_pay_steps_back_with_a_readable_reason():
    s = spec(1, 8)
    seen = [obs(2, 200.0, T0), obs(3, 238.1, T0 + timedelta(seconds=200))]
    state = ScalingState(3, T0 + timedelta(seconds=100))
    d = decide(seen, s, state, T0 + timedelta(seconds=210))
    assert (d.target, d.action, d.reason) == (2, "down", REASON_AUTOSCALE_DOWN)
    assert "2->3: +38.1 samples/s per added worker = 0.38 of per-worker throughput (100.0) < 0.50" in d.message


def test_a_size_known_not_to_pay_is_not_tried_again():
    s = spec(1, 8)
    now = T0 + timedelta(seconds=1000)
    seen = [obs(1, 100, T0), obs(2, 190, T0), obs(3, 200, T0), obs(2, 190, now)]
    d = decide(seen, s, ScalingState(2, T0), now)
    assert d.target == 2 and d.reason == conditions.HOLD_AT_KNEE
    assert "measured" in d.message


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), "stale", "other-size", "pre-warmup"])
def test_missing_or_bad_data_holds_and_never_scales_down(bad):
    s = spec(1, 8)
    now = T0 + timedelta(seconds=3600)
    gen_start = now - timedelta(seconds=600)
    # A history that, with data, would scale DOWN from 4 (the 2->4 step did not pay).
    history = [obs(2, 200, T0)]
    current = {
        None: [],
        float("nan"): [obs(4, 1, now)],
        "stale": [obs(4, 210, now - timedelta(seconds=1000))],
        "other-size": [obs(3, 210, now)],
        "pre-warmup": [obs(4, 210, gen_start + timedelta(seconds=10))],
    }
    if isinstance(bad, float):
        current_obs = [Observation.model_construct(world_size=4, throughput=bad, measured_at=now)]
    else:
        current_obs = current[bad]
    d = decide(history + current_obs, s, ScalingState(4, gen_start), now)
    assert (d.target, d.action, d.reason) == (4, "hold", conditions.HOLD_NO_DATA), d
    # ... and with good data it would have gone down: the hold is due to the data only.
    good = decide(history + [obs(4, 210, now)], s, ScalingState(4, gen_start), now)
    assert good.action == "down"


def test_warm_up_and_rescale_in_progress_hold():
    s = spec(1, 8)
    now = T0 + timedelta(seconds=30)
    d = decide([obs(1, 100, now)], s, ScalingState(1, T0), now)
    assert d.reason == conditions.HOLD_WARMUP
    d = decide([obs(1, 100, now)], s, ScalingState(1, T0 - timedelta(hours=1), rescale_in_progress=True), now)
    assert d.reason == conditions.HOLD_RESCALING


def test_min_and_max_are_respected():
    s = spec(2, 3)
    now = T0 + timedelta(seconds=600)
    d = decide([obs(3, 300, now)], s, ScalingState(3, T0), now)
    assert d.target == 3 and d.reason == conditions.HOLD_AT_BOUND
    d = decide([obs(2, 200, now)], s, ScalingState(2, T0), now)
    assert d.target == 3  # never past max, even when linear scaling suggests 8
    # The down step never goes below min, whatever was measured below it.
    d = decide([obs(1, 100, T0), obs(2, 100, now)], s, ScalingState(2, T0), now)
    assert d.target >= 2
    d = decide([obs(5, 300, now)], s, ScalingState(5, T0), now)
    assert d.target == 3 and d.reason == conditions.REASON_OUT_OF_BOUNDS


def test_cooldown_blocks_until_it_has_passed():
    s = spec(1, 8, cooldownSeconds=600, warmupSeconds=0)
    rescale = RescaleEvent(T0, 30.0)
    now = T0 + timedelta(seconds=300)
    d = decide([obs(1, 100, now)], s, ScalingState(1, T0, (rescale,)), now)
    assert d.reason == conditions.HOLD_COOLDOWN
    later = T0 + timedelta(seconds=601)
    d = decide([obs(1, 100, later)], s, ScalingState(1, T0, (rescale,)), later)
    assert d.action == "up" and d.reason == REASON_AUTOSCALE_UP


def test_hourly_budget_counts_size_changes_only():
    s = spec(1, 8, maxRescalesPerHour=2, cooldownSeconds=0, warmupSeconds=0)
    now = T0 + timedelta(hours=2)
    recent = (RescaleEvent(now - timedelta(minutes=50), 30.0), RescaleEvent(now - timedelta(minutes=20), 30.0))
    d = decide([obs(1, 100, now)], s, ScalingState(1, now - timedelta(minutes=10), recent), now)
    assert d.reason == conditions.HOLD_BUDGET
    restarts = tuple(RescaleEvent(r.time, 30.0, changed_size=False) for r in recent)
    d = decide([obs(1, 100, now)], s, ScalingState(1, now - timedelta(minutes=10), restarts), now)
    assert d.action == "up"
    old = (RescaleEvent(now - timedelta(minutes=70), 30.0), RescaleEvent(now - timedelta(minutes=65), 30.0))
    assert decide([obs(1, 100, now)], s, ScalingState(1, now - timedelta(minutes=10), old), now).action == "up"


def test_restart_cost_is_priced_in():
    s = spec(1, 8, warmupSeconds=0, cooldownSeconds=0, efficiencyThreshold=0.3)
    now = T0 + timedelta(seconds=600)
    seen = [obs(6, 600, T0), obs(7, 650, now)]  # the next worker would add ~50 samples/s
    cheap = ScalingState(7, T0, (RescaleEvent(T0, 30.0),))
    assert decide(seen, s, cheap, now).action == "up"
    # A 30-minute restart loses more samples than an hour of +50 samples/s gains.
    dear = ScalingState(7, T0, (RescaleEvent(T0, 1800.0),))
    d = decide(seen, s, dear, now)
    assert d.reason == conditions.HOLD_NOT_WORTH_RESTART and "1800 s restart" in d.message
    # Near the end of the job no restart pays off.
    ending = ScalingState(7, T0, (RescaleEvent(T0, 30.0),), remaining_seconds=60)
    assert decide(seen, s, ending, now).reason == conditions.HOLD_NOT_WORTH_RESTART


def test_capacity_backoff_blocks_the_failed_size_but_allows_a_smaller_step():
    s = spec(1, 8, warmupSeconds=0, cooldownSeconds=0)
    now = T0 + timedelta(seconds=600)
    seen = [obs(1, 100, T0), obs(2, 200, now)]
    free = decide(seen, s, ScalingState(2, T0), now)
    assert free.target == 8
    backoff = now + timedelta(seconds=300)
    d = decide(seen, s, ScalingState(2, T0, backoff_until=backoff, capacity_failed_size=8), now)
    assert d.target == 7
    d = decide(seen, s, ScalingState(2, T0, backoff_until=backoff, capacity_failed_size=3), now)
    assert d.reason == conditions.HOLD_BACKOFF and d.target == 2
    d = decide(seen, s, ScalingState(2, T0, backoff_until=backoff), now)  # failed size unknown
    assert d.reason == conditions.HOLD_BACKOFF
    after = backoff + timedelta(seconds=1)
    assert (
        decide(
            [obs(1, 100, T0), obs(2, 200, after)],
            s,
            ScalingState(2, T0, backoff_until=backoff, capacity_failed_size=3),
            after,
        ).target
        == 8
    )


def test_capacity_limited_job_stays_at_what_fits():
    curve = lambda n: 100.0 * n  # noqa: E731  wants max
    sizes, _ = converge(curve, spec(1, 6, capacityBackoffSeconds=600), capacity=3, steps=400)
    assert max(sizes) <= 3 and sizes[-1] == 3


def test_state_from_status_reads_history_backoff_and_failed_size():
    status = parse_status(
        {
            "worldSize": 3,
            "generationStartTime": "2025-01-01T00:10:00Z",
            "rescaleHistory": [
                {"from": 1, "to": 3, "reason": "ScaleUpPaysOff", "time": "2025-01-01T00:09:00Z", "downtimeSeconds": 42},
                {"from": 3, "to": 3, "reason": "WorkerRestart", "time": "2025-01-01T00:09:30Z"},
                {"from": 3, "to": 6, "reason": REASON_INSUFFICIENT_CAPACITY, "time": "2025-01-01T00:20:00Z"},
            ],
            "autoscaling": {"backoffUntil": "2025-01-01T00:30:00Z"},
        }
    )
    state = ScalingState.from_status(status)
    assert state.world_size == 3 and state.generation_start == T0 + timedelta(minutes=10)
    assert [r.changed_size for r in state.rescales] == [True, False]
    assert state.capacity_failed_size == 6
    assert policy.restart_seconds_estimate(state.rescales) == 42


def test_fit_recovers_the_serial_fraction():
    a, b = fit_scaling({n: amdahl(0.2)(n) for n in (1, 2, 4)})
    assert math.isclose(b / (a + b), 0.2, rel_tol=1e-6)
    assert fit_scaling({4: 400.0})[1] == 0.0  # one point: linear
    assert fit_scaling({1: 100.0, 2: 250.0})[1] == 0.0  # super-linear is not extrapolated
