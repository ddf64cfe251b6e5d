"""Conditions (reconcile/conditions.py): one implementation for the core and the autoscaler."""

from __future__ import annotations

from datetime import timedelta

import pytest
from planworld import T0, World, base_spec

from lepton_operator.api.conditions import CONDITION_READY, CONDITION_RESCALING
from lepton_operator.api.models import LeptonJobStatus
from lepton_operator.reconcile.conditions import conditions_patch, get_condition, set_condition

pytestmark = pytest.mark.unit


def test_set_condition_moves_the_transition_time_only_when_the_status_flips():
    s = LeptonJobStatus()
    assert set_condition(s, CONDITION_READY, False, "WorkersStarting", "0/2", T0, 1) is False  # new, False
    assert set_condition(s, CONDITION_RESCALING, True, "ManualScale", "2 -> 3", T0, 1) is True  # new, True
    later = T0 + timedelta(seconds=5)
    assert set_condition(s, CONDITION_READY, False, "WorkersStarting", "1/2", later, 2) is False
    ready = get_condition(s, CONDITION_READY)
    assert (ready.message, ready.last_transition_time, ready.observed_generation) == ("1/2", T0, 2)
    assert set_condition(s, CONDITION_READY, True, "WorkersReady", "2/2", later, 2) is True
    assert get_condition(s, CONDITION_READY).last_transition_time == later
    assert [c.type for c in s.conditions] == [CONDITION_READY, CONDITION_RESCALING]  # order kept
    set_condition(s, CONDITION_READY, True, "WorkersReady", "x" * 40000, later, 2)
    assert len(get_condition(s, CONDITION_READY).message) == 32768


def test_conditions_patch_is_none_when_nothing_changes_and_else_the_whole_list():
    s = LeptonJobStatus()
    set_condition(s, CONDITION_READY, True, "WorkersReady", "ready", T0, 1)
    assert conditions_patch(s, CONDITION_READY, True, "WorkersReady", "ready", T0, 1) is None
    patch = conditions_patch(s, CONDITION_RESCALING, True, "ManualScale", "1 -> 2", T0, 1)
    assert [c["type"] for c in patch] == [CONDITION_READY, CONDITION_RESCALING]
    assert patch[1]["status"] == "True" and patch[1]["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert len(s.conditions) == 1  # the status itself is left alone


def test_condition_transition_time_changes_only_when_status_flips_over_passes():
    w = World(base_spec())
    w.step()
    ready = get_condition(w.status, CONDITION_READY)
    assert ready.status == "False" and ready.last_transition_time == T0
    w.step(10)
    assert get_condition(w.status, CONDITION_READY).last_transition_time == T0
    w.run_all()
    w.step(10)
    ready = get_condition(w.status, CONDITION_READY)
    assert ready.status == "True" and ready.last_transition_time == T0 + timedelta(seconds=20)
    w.step(10)
    assert get_condition(w.status, CONDITION_READY).last_transition_time == T0 + timedelta(seconds=20)
    assert ready.observed_generation == 1
