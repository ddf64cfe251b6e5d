"""--pace-curve parsing, interpolation and the pacer."""

import pytest

from lepton_trainer.pace import Pacer, interpolate, parse_pace_curve

pytestmark = pytest.mark.unit

CURVE = parse_pace_curve('{"1": 100, "2": 185, "4": 330}')


def test_parse_sorts_points():
    assert parse_pace_curve('{"4": 3, "1": 1}') == [(1.0, 1.0), (4.0, 3.0)]


@pytest.mark.parametrize("text", ["[]", "{}", '{"0": 5}', '{"1": -1}', '{"x": 1}', "nope"])
def test_parse_rejects_bad_curves(text):
    with pytest.raises(ValueError):
        parse_pace_curve(text)


@pytest.mark.parametrize("world,rate", [(1, 100), (2, 185), (3, 257.5), (4, 330), (0.5, 100), (8, 330), (1.5, 142.5)])
def test_interpolation_is_linear_and_flat_beyond_the_ends(world, rate):
    assert interpolate(CURVE, world) == pytest.approx(rate)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_pacer_caps_the_rate_and_does_not_burst_after_a_slow_step():
    clock = FakeClock()
    pacer = Pacer(100.0, clock=clock, sleep=clock.sleep)
    clock.now += 0.1  # a 10-sample step that took 0.1 s
    assert pacer.wait(10) == pytest.approx(0.0)  # 100 samples/s: no sleep needed
    clock.now += 0.01  # fast step: must wait until 0.2
    assert pacer.wait(10) == pytest.approx(0.09)
    clock.now += 0.5  # slow step: no sleep, and no credit after it
    assert pacer.wait(10) == 0.0
    clock.now += 0.0
    assert pacer.wait(10) == pytest.approx(0.1)
