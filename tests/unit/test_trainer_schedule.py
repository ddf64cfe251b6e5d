"""LR schedule: a pure function of the global step."""

from itertools import pairwise

import pytest

from lepton_trainer.schedule import lr_at

pytestmark = pytest.mark.unit


def test_warmup_then_cosine_to_the_floor():
    lrs = [lr_at(s, 1.0, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in pairwise(lrs[9:]))  # non-increasing after warm-up
    assert lr_at(100, 1.0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 100, 10, 0.1) == pytest.approx(0.1)  # flat past the end


def test_no_warmup():
    assert lr_at(0, 2.0, 10, 0) == pytest.approx(2.0)


def test_schedule_depends_only_on_the_step():
    # nothing about ranks or world size goes in: a resumed run continues the same curve
    assert lr_at(37, 3e-3, 200, 20) == lr_at(37, 3e-3, 200, 20)
