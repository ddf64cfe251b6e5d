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
