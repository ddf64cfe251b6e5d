"""The communication fraction: the PromQL the client builds for it, how it reads the answer,
what the autoscaler pass records (observation, status.autoscaling.commFraction), and the
printer column."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from test_prometheus_client import Stub, client

from lepton_operator.api.crd import PRINTER_COLUMNS
from lepton_operator.api.models import LeptonJobSpec, parse_status
from lepton_operator.reconcile.autoscaling import measure_comm_fraction, plan_autoscale
from lepton_operator.scaling.prometheus import MetricsError, Sample, comm_fraction_query

pytestmark = pytest.mark.unit

QUERY = (
    'sum(rate(lepton_trainer_comm_seconds_sum{namespace="team-a", job_name="llm", generation="3"}[60s]))'
    ' / sum(rate(lepton_trainer_step_seconds_sum{namespace="team-a", job_name="llm", generation="3"}[60s]))'
)


@pytest.fixture
def stub():
    s = Stub()
    try:
        yield s
    finally:
        s.close()


def test_the_query_divides_comm_by_step_seconds_pinned_to_the_job():
    assert comm_fraction_query("team-a", "llm", 60, generation=3) == QUERY
    # Hostile names stay inside their string literals.
    hostile = comm_fraction_query('a"} or vector(1) #', "j\\", 30)
    assert 'namespace="a\\"} or vector(1) #"' in hostile and 'job_name="j\\\\"' in hostile
    with pytest.raises(ValueError):
        comm_fraction_query("ns", "j", 0)
    with pytest.raises(ValueError):
        comm_fraction_query("", "j", 60)


def test_client_reads_the_fraction(stub):
    stub.vector("0.25")
    sample = client(stub.url).comm_fraction("team-a", "llm", 60, now=time.time(), generation=3)
    assert sample.value == 0.25
    assert stub.queries == [QUERY]


def test_no_split_exported_is_none_not_an_error(stub):
    stub.vector()  # empty: the trainer has no lepton_trainer_comm_seconds (synthetic, paced, another image)
    assert client(stub.url).comm_fraction("ns", "j", 60, now=time.time()) is None


@pytest.mark.parametrize("values, kind", [(("NaN",), "nan"), (("-0.1",), "malformed"), (("1.5",), "malformed")])
def test_unusable_fractions_are_typed_errors(stub, values, kind):
    stub.vector(*values)
    with pytest.raises(MetricsError) as err:
        client(stub.url).comm_fraction("ns", "j", 60, now=time.time())
    assert err.value.kind == kind


def test_measure_comm_fraction_uses_the_throughput_window_and_never_fails(stub):
    now = datetime.now(timezone.utc)
    c = client(stub.url)
    stub.vector("0.3")
    measured = Sample(100.0, now.timestamp(), {}, window_seconds=60)
    assert measure_comm_fraction(c, "team-a", "llm", measured, 3, now) == 0.3
    assert stub.queries[-1] == QUERY
    stub.vector("NaN")
    assert measure_comm_fraction(c, "team-a", "llm", measured, 3, now) is None
    asked = len(stub.queries)
    # No throughput, no fraction: nothing is asked.
    assert measure_comm_fraction(c, "team-a", "llm", None, 3, now) is None
    assert measure_comm_fraction(c, "team-a", "llm", MetricsError("empty", "x"), 3, now) is None
    assert measure_comm_fraction(None, "team-a", "llm", measured, 3, now) is None
    assert len(stub.queries) == asked


NOW = datetime(2025, 1, 1, 1, tzinfo=timezone.utc)
SPEC = LeptonJobSpec.model_validate({"workers": {"min": 1, "max": 4}, "autoscaling": {"enabled": False}})


def _status(**extra):
    base = {
        "phase": "Running",
        "worldSize": 2,
        "workerGeneration": 3,
        "generationStartTime": (NOW - timedelta(seconds=100)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return parse_status({**base, **extra})


def test_the_pass_records_the_fraction_with_the_measurement():
    plan = plan_autoscale(
        SPEC, _status(), Sample(195.0, NOW.timestamp(), {}), NOW, window_seconds=60, comm_fraction=0.123456
    )
    auto = plan.status_patch["autoscaling"]
    assert auto["commFraction"] == 0.1235
    assert auto["observations"][-1]["commFraction"] == 0.1235
    assert auto["observations"][-1]["worldSize"] == 2
    # The status the pass writes parses back.
    assert parse_status({**plan.status_patch}).autoscaling.comm_fraction == 0.1235


def test_no_fraction_leaves_no_field_and_removes_a_stale_one():
    plan = plan_autoscale(SPEC, _status(), Sample(195.0, NOW.timestamp(), {}), NOW, window_seconds=60)
    assert "commFraction" not in plan.status_patch["autoscaling"]
    assert "commFraction" not in plan.status_patch["autoscaling"]["observations"][-1]
    stale = _status(autoscaling={"commFraction": 0.2})
    plan = plan_autoscale(SPEC, stale, Sample(195.0, NOW.timestamp(), {}), NOW, window_seconds=60)
    assert plan.status_patch["autoscaling"]["commFraction"] is None
    # An error or a young generation records nothing, and keeps the last fraction.
    for measured in (MetricsError("timeout", "x"), None):
        plan = plan_autoscale(SPEC, stale, measured, NOW, comm_fraction=0.5)
        assert "commFraction" not in plan.status_patch.get("autoscaling", {})


def test_kubectl_get_wide_shows_comm():
    column = next(c for c in PRINTER_COLUMNS if c["name"].upper() == "COMM")
    assert column["jsonPath"] == ".status.autoscaling.commFraction"
    assert column["priority"] == 1 and column["type"] == "number"
