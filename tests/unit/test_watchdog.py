"""The hang watchdog's judgement (reconcile/watchdog.py), pure: when a job can be judged,
and that only a measured zero is a hang (missing or failing metrics never are)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from lepton_operator.api.models import HangReport, LeptonJobSpec, parse_status
from lepton_operator.reconcile.watchdog import judge, watch_window
from lepton_operator.scaling.prometheus import MetricsError, Sample, progress_query

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
SPEC = LeptonJobSpec.model_validate({"restart": {"hangSeconds": 600}, "autoscaling": {"warmupSeconds": 60}})


def status(age_seconds: float, **extra):
    started = (NOW - timedelta(seconds=age_seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return parse_status(
        {"phase": "Running", "workerGeneration": 3, "worldSize": 2, "generationStartTime": started, **extra}
    )


def test_a_generation_is_judged_only_after_warm_up_plus_hang_seconds():
    assert watch_window(SPEC, status(659), NOW) is None
    assert watch_window(SPEC, status(660), NOW) == 600
    assert watch_window(SPEC, status(5000, phase="Pending"), NOW) is None
    rescaling = {
        "rescale": {
            "from": 2,
            "to": 3,
            "reason": "ManualScale",
            "stage": "Stopping",
            "startedAt": "2026-01-01T11:00:00Z",
            "targetGeneration": 4,
        }
    }
    assert watch_window(SPEC, status(5000, **rescaling), NOW) is None
    pending = {"hang": {"generation": 3, "detectedAt": "2026-01-01T11:00:00Z"}}
    assert watch_window(SPEC, status(5000, **pending), NOW) is None  # the core has not acted yet
    off = LeptonJobSpec.model_validate({"restart": {"hangSeconds": 0}})
    assert watch_window(off, status(5000), NOW) is None


def test_only_a_measured_zero_is_a_hang():
    st = status(5000)
    report = judge(st, 600, Sample(value=0.0, timestamp=NOW.timestamp(), labels={}), NOW)
    assert isinstance(report, HangReport) and report.generation == 3
    assert "no samples in the last 600s" in report.message
    assert judge(st, 600, Sample(value=12.0, timestamp=NOW.timestamp(), labels={}), NOW) is None
    for kind in ("empty", "stale", "connection", "nan"):
        assert judge(st, 600, MetricsError(kind, "x"), NOW) is None


def test_progress_query_pins_the_generation_and_namespace():
    q = progress_query("team-a", "job", 600, 3)
    assert q == (
        'sum(increase(lepton_trainer_samples_total{namespace="team-a", job_name="job", generation="3"}[600s]))'
    )
