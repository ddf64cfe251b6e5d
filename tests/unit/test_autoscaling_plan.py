"""One autoscaler pass, pure: what it records and writes for a measurement or an error."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from test_prometheus_client import Stub, client

from lepton_operator.api.conditions import (
    CONDITION_METRICS_UNAVAILABLE,
    REASON_AUTOSCALE_UP,
)
from lepton_operator.api.models import LeptonJobSpec, parse_status
from lepton_operator.reconcile.autoscaling import measure, measurement_window, plan_autoscale, should_run
from lepton_operator.scaling.prometheus import MetricsError, Sample, world_size_query

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


def test_after_a_prometheus_outage_the_window_starts_when_it_answers_again():
    """Prometheus missed scrapes while it was down; a window reaching over that gap
    under-reports (rate() extrapolates only half a scrape interval over it), so the first
    measurement after an outage covers only the time since Prometheus answered again."""
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=100)
    st = status(generationStartTime=start.strftime("%Y-%m-%dT%H:%M:%SZ"))  # warm 10 s later
    stub = Stub()
    try:
        prom, since = client(stub.url), {}

        def at(seconds, up=True):
            now = start + timedelta(seconds=seconds)
            stub.answer(world_size_query("ns", "j", 3), "2", ts=now.timestamp())
            stub.vector("100", ts=now.timestamp())
            if not up:
                stub.replies, stub.reply = {}, (503, b"down")
            return measure(prom, "ns", "j", SPEC, st, now, since)

        assert at(20) is None  # both workers report from 20 s: no window yet
        assert at(40).window_seconds == 20
        assert isinstance(at(60, up=False), MetricsError)
        assert at(70) is None  # answers again: measuring starts over, not over the gap
        assert at(75) is None
        assert at(80).window_seconds == 10
        assert stub.queries[-1].endswith("[10s]))")
    finally:
        stub.close()


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
    # Still back at the next pass: nothing more to say (the message would only repeat a number).
    st3 = status(conditions=plan2.status_patch["conditions"])
    assert "conditions" not in plan_autoscale(SPEC, st3, Sample(151.0, NOW.timestamp(), {}), NOW).status_patch


# ------------------------------------------------- a steady job costs few status writes

RECORDED_AT = NOW - timedelta(seconds=60)


def steady(throughput=200.0, at=RECORDED_AT, progress=0.5, comm=None):
    """A job at 2 workers whose last measurement (at `at`) found `throughput`."""
    obs = {"worldSize": 2, "throughput": throughput, "measuredAt": at.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if comm is not None:
        obs["commFraction"] = comm
    return status(autoscaling={"observations": [obs]}, throughput=throughput, progress=progress)


def written(st, value, refresh=300.0, progress=None, comm=None):
    plan = plan_autoscale(
        SPEC,
        st,
        Sample(value, NOW.timestamp(), {}),
        NOW,
        progress=progress,
        decide_size=False,
        comm_fraction=comm,
        refresh=refresh,
    )
    return plan.status_patch


def test_a_steady_measurement_is_not_written_again_until_the_refresh():
    assert written(steady(), 201.0) == {}  # within 2 %, recorded 60 s ago, refresh 300 s
    assert written(steady(at=NOW - timedelta(seconds=300)), 201.0)["throughput"] == 201.0  # refresh due
    moved = written(steady(), 206.0)  # 3 % faster: news
    assert moved["throughput"] == 206.0 and len(moved["autoscaling"]["observations"]) == 2
    assert written(steady(comm=0.30), 200.0, comm=0.35)["autoscaling"]["commFraction"] == 0.35
    assert written(steady(comm=0.30), 200.0, comm=0.31) == {}
    assert "observations" in written(steady(), 200.0, comm=0.31)["autoscaling"]  # a split newly exported


def test_a_new_generation_or_size_is_always_recorded():
    # The last observation at this size predates this generation's warm-up end.
    old = steady(at=NOW - timedelta(seconds=95))  # the generation started 100 s ago, 10 s warm-up
    assert written(old, 200.0)["throughput"] == 200.0
    other_size = status(
        autoscaling={"observations": [{"worldSize": 1, "throughput": 100, "measuredAt": "2025-01-01T00:59:00Z"}]}
    )
    assert written(other_size, 100.0)["throughput"] == 100.0


def test_progress_alone_is_written_when_it_moved_a_percentage_point():
    from lepton_operator.scaling.prometheus import Progress

    assert written(steady(progress=0.5), 200.0, progress=Progress(505, 1000)) == {}
    patch = written(steady(progress=0.5), 200.0, progress=Progress(510, 1000))
    assert patch["progress"] == 0.51 and patch["remainingSamples"] == 490.0 and "observations" not in patch
    # With a recorded measurement the progress goes along, however little it moved.
    patch = written(steady(progress=0.5), 210.0, progress=Progress(501, 1000))
    assert patch["progress"] == 0.501 and patch["throughput"] == 210.0


def test_the_refresh_stays_within_the_per_job_policys_staleness():
    from lepton_operator.reconcile.autoscaling import ALLOCATOR_REFRESH_SECONDS, refresh_seconds
    from lepton_operator.scaling.policy import STALE_INTERVALS

    assert refresh_seconds(30, decide_size=True) < STALE_INTERVALS * 30
    assert refresh_seconds(30, decide_size=False) == ALLOCATOR_REFRESH_SECONDS
    # The per-job policy still decides on a measurement the refresh kept: it is not stale.
    st = steady(at=NOW - timedelta(seconds=refresh_seconds(5, True) - 1))
    plan = plan_autoscale(
        SPEC, st, Sample(200.0, NOW.timestamp(), {}), NOW, decide_size=True, refresh=refresh_seconds(5, True)
    )
    assert "observations" not in plan.status_patch.get("autoscaling", {})
    assert "stale" not in plan.decision.message
