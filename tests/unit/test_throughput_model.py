"""The throughput model: the fit recovers known curves from noisy samples, weighs recent and
long-window measurements more, and its uncertainty grows beyond the measured sizes."""

from __future__ import annotations

import random

import pytest

from lepton_operator.scaling.throughput import (
    MIN_RELATIVE_SIGMA,
    Measurement,
    fit_throughput,
)

pytestmark = pytest.mark.unit


def amdahl(serial: float, rate: float = 100.0):
    return lambda n: rate / (serial + (1 - serial) / n)


def peaked(n: int) -> float:
    """Communication-bound: seconds per sample 1/n + 0.02 + 0.01*n, peak at 10 workers."""
    return 100.0 / (1.0 / n + 0.02 + 0.01 * n)


def noisy(curve, sizes, noise, seed, repeats=6):
    rng = random.Random(seed)
    return [
        Measurement(n, curve(n) * (1 + rng.uniform(-noise, noise)), age_seconds=60.0 * i, window_seconds=120)
        for n in sizes
        for i in range(repeats)
    ]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "curve",
    [amdahl(0.0), amdahl(0.05), amdahl(0.2), amdahl(0.3), peaked],
    ids=["linear", "amdahl5", "amdahl20", "amdahl30", "peaked"],
)
def test_fit_recovers_known_curves_from_noisy_samples(curve, seed):
    model = fit_throughput(noisy(curve, (1, 2, 4, 8, 16), noise=0.15, seed=seed))
    for n in range(1, 17):
        assert model.predict(n) == pytest.approx(curve(n), rel=0.08), n
    # The reported noise is about the truth's: uniform +/-15% has a standard deviation of 8.7%.
    assert 0.04 < model.relative_sigma < 0.14


def test_peak_is_found_between_measured_sizes():
    model = fit_throughput(noisy(peaked, (2, 4, 8, 16), noise=0.05, seed=1))
    best = max(range(1, 33), key=model.predict)
    assert 8 <= best <= 12
    assert model.c > 0
    assert "peak near" in model.describe()


def test_one_size_measured_assumes_linear_scaling_with_wide_uncertainty():
    model = fit_throughput([Measurement(4, 400.0)])
    assert model.predict(8) == pytest.approx(800.0)
    assert model.predict(2) == pytest.approx(200.0)
    # Twice the size: a guess, +-45%; measured size: the noise floor.
    assert model.sigma(4) == pytest.approx(400.0 * MIN_RELATIVE_SIGMA)
    assert model.sigma(8) / model.predict(8) == pytest.approx(MIN_RELATIVE_SIGMA + 0.4)
    assert model.sigma(16) / model.predict(16) > model.sigma(8) / model.predict(8)


def test_uncertainty_grows_with_each_doubling_beyond_the_measured_sizes():
    model = fit_throughput(noisy(amdahl(0.1), (1, 2, 4), noise=0.05, seed=2))
    relative = [model.sigma(n) / model.predict(n) for n in (4, 8, 16, 32)]
    assert relative == sorted(relative) and relative[0] < relative[-1]
    assert model.sigma(2) / model.predict(2) == pytest.approx(model.relative_sigma)


def test_two_sizes_fit_amdahl_exactly():
    curve = amdahl(0.25)
    model = fit_throughput([Measurement(1, curve(1)), Measurement(4, curve(4))])
    assert model.c == 0
    assert model.predict(16) == pytest.approx(curve(16), rel=1e-6)


def test_recent_measurements_outweigh_old_ones_when_the_job_changed_speed():
    old = [Measurement(n, 100.0 * n, age_seconds=4 * 3600) for n in (1, 2, 4)]
    new = [Measurement(n, 50.0 * n, age_seconds=60) for n in (1, 2, 4)]
    model = fit_throughput(old + new)
    assert model.predict(4) == pytest.approx(200.0, rel=0.1)


def test_a_long_window_outweighs_a_short_one():
    short = Measurement(4, 300.0, window_seconds=10)
    long = Measurement(4, 400.0, window_seconds=600)
    assert fit_throughput([short, long]).predict(4) == pytest.approx(400.0, rel=0.05)


def test_unusable_measurements_are_ignored():
    assert fit_throughput([]) is None
    assert fit_throughput([Measurement(2, float("nan")), Measurement(2, 0.0), Measurement(2, -5.0)]) is None
    model = fit_throughput([Measurement(2, float("inf")), Measurement(2, 100.0)])
    assert model.predict(2) == pytest.approx(100.0)


# ----- communication measured (issue 14) -------------------------------------------------

# Seconds per sample at n workers: compute A/n, communication B + C*n (a ring all-reduce:
# bandwidth part about constant, latency part linear), so a peak near sqrt(A/C) = 5.
A, B, C = 1.0, 0.05, 0.04


def comm_curve(n: int) -> float:
    return 100.0 / (A / n + B + C * n)


def comm_fraction(n: int) -> float:
    return (B + C * n) / (A / n + B + C * n)


def _measured(sizes, split=True, noise=0.0, seed=0, repeats=1):
    rng = random.Random(seed)
    return [
        Measurement(
            n,
            comm_curve(n) * (1 + rng.uniform(-noise, noise)),
            age_seconds=60.0 * i,
            window_seconds=120,
            comm_fraction=comm_fraction(n) * (1 + rng.uniform(-noise, noise)) if split else None,
        )
        for n in sizes
        for i in range(repeats)
    ]


def test_with_communication_measured_two_sizes_predict_unmeasured_ones():
    model = fit_throughput(_measured((1, 2)))
    for n in (4, 8):
        assert model.predict(n) == pytest.approx(comm_curve(n), rel=0.10), n
    assert model.c > 0 and model.comm_sizes == (1, 2)
    assert "communication measured at 1,2" in model.describe()
    # The peak is where the truth has it, though no measured size is past it.
    assert max(range(1, 17), key=model.predict) == 5


def test_without_the_split_the_same_two_sizes_do_not_and_need_a_third():
    two = fit_throughput(_measured((1, 2), split=False))
    assert two.c == 0  # Amdahl's law: two sizes, two terms
    for n in (4, 8):
        assert abs(two.predict(n) / comm_curve(n) - 1) > 0.10, n
    # Throughput alone needs one more measured size for the same prediction.
    three = fit_throughput(_measured((1, 2, 4), split=False))
    assert three.predict(8) == pytest.approx(comm_curve(8), rel=0.10)


def test_the_split_fit_holds_with_noise():
    model = fit_throughput(_measured((1, 2), noise=0.05, seed=3, repeats=6))
    for n in (4, 8):
        assert model.predict(n) == pytest.approx(comm_curve(n), rel=0.10), n


def test_one_size_with_the_split_takes_communication_as_constant():
    model = fit_throughput(_measured((2,)))
    assert model.c == 0
    assert model.predict(2) == pytest.approx(comm_curve(2))
    # Compute shared by more workers, communication as at 2: below linear scaling.
    assert comm_curve(2) < model.predict(4) < 2 * comm_curve(2)


def test_a_size_without_communication_constrains_compute_only():
    """One pod of one rank runs no collective (fraction 0); from 2 on a bandwidth-bound ring."""

    def truth(n):
        return 100.0 / (A / n + (0.1 if n > 1 else 0.0))

    data = [Measurement(1, truth(1), comm_fraction=0.0), Measurement(2, truth(2), comm_fraction=0.1 / (A / 2 + 0.1))]
    model = fit_throughput(data)
    assert model.comm_from == 2
    for n in (1, 2, 4, 8):
        assert model.predict(n) == pytest.approx(truth(n), rel=1e-6), n


def test_mixed_and_unusable_fractions():
    # Measurements from before the trainer exported the split still count, as totals.
    data = _measured((1, 2)) + [Measurement(4, comm_curve(4))]
    model = fit_throughput(data)
    assert model.predict(8) == pytest.approx(comm_curve(8), rel=0.05)
    # A fraction outside [0, 1) or not finite is no split: the plain fit.
    for bad in (float("nan"), -0.1, 1.0, 2.0):
        plain = fit_throughput([Measurement(n, comm_curve(n), comm_fraction=bad) for n in (1, 2)])
        assert plain.comm_sizes == () and plain.c == 0
