"""One autoscaler pass, pure: what it records and writes for a measurement or an error."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from lepton_operator.api.conditions import (
    CONDITION_METRICS_UNAVAILABLE,
    REASON_AUTOSCALE_UP,
)
from lepton_operator.api.models import LeptonJobSpec, parse_status
from lepton_operator.reconcile.autoscaling import measurement_window, plan_autoscale, should_run
from lepton_operator.scaling.prometheus import MetricsError, Sample

pytestmark = pytest.mark.unit

NOW = datetime(2025, 1, 1, 1, tzinfo=timezone.utc)
SPEC = LeptonJobSpec.model_validate(
    {
        "workers": {"min": 1, "max": 4},
        "autoscaling": {
            "enabled": True,
            "intervalSeconds": 5,
            "windowSeconds": 10,
            "warmupSeconds": 10,
            "cooldownSeconds": 10,
        },
    }
)


def status(**extra):
    base = {
        "phase": "Running",
        "worldSize": 2,
        "workerGeneration": 3,
        "generationStartTime": (NOW - timedelta(seconds=100)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "WorkersReady", "lastTransitionTime": "2025-01-01T00:00:00Z"}
        ],
    }
    return parse_status({**base, **extra})


def test_window_covers_the_generation_after_warm_up():
    assert measurement_window(SPEC, status(), NOW) == 90
    assert measurement_window(SPEC, status(), NOW, reporting_since=NOW - timedelta(seconds=30)) == 30
    assert measurement_window(SPEC, status(), NOW, reporting_since=NOW - timedelta(seconds=5)) is None
    young = status(generationStartTime=(NOW - timedelta(seconds=15)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert measurement_window(SPEC, young, NOW) is None
    assert should_run(SPEC, status()) and not should_run(SPEC, status(phase="Rescaling"))


def test_measurement_is_recorded_and_a_paying_step_writes_replicas():
    st = status(
        autoscaling={"observations": [{"worldSize": 1, "throughput": 100, "measuredAt": "2025-01-01T00:30:00Z"}]}
    )
    plan = plan_autoscale(SPEC, st, Sample(195.0, NOW.timestamp(), {}), NOW)
    obs = plan.status_patch["autoscaling"]["observations"]
    assert [(o["worldSize"], o["throughput"]) for o in obs] == [(1, 100.0), (2, 195.0)]
    assert plan.status_patch["throughput"] == 195.0
    assert "conditions" not in plan.status_patch  # never unavailable: nothing to write
    assert plan.replicas == 4 and plan.events[0][1] == REASON_AUTOSCALE_UP
    assert plan.status_patch["autoscaling"]["lastDecision"]["target"] == 4


def test_error_sets_metrics_unavailable_keeps_other_conditions_and_holds():
    st = status(
        autoscaling={"observations": [{"worldSize": 1, "throughput": 300, "measuredAt": "2025-01-01T00:30:00Z"}]}
    )
    plan = plan_autoscale(SPEC, st, MetricsError("connection", "refused"), NOW)
    conds = {c["type"]: c for c in plan.status_patch["conditions"]}
    assert (
        conds[CONDITION_METRICS_UNAVAILABLE]["status"] == "True"
        and "refused" in conds[CONDITION_METRICS_UNAVAILABLE]["message"]
    )
    assert conds["Ready"]["status"] == "True"
    assert plan.replicas is None and plan.decision.action == "hold"  # 1 was faster, but data is missing
    assert "observations" not in plan.status_patch.get("autoscaling", {})
    # Back: the condition flips to False.
    st2 = status(conditions=plan.status_patch["conditions"])
    plan2 = plan_autoscale(SPEC, st2, Sample(150.0, NOW.timestamp(), {}), NOW)
    conds2 = {c["type"]: c for c in plan2.status_patch["conditions"]}
    assert conds2[CONDITION_METRICS_UNAVAILABLE]["status"] == "False"
