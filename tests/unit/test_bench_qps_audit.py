"""The control-plane benchmark's QPS check (`benchmarks/control_plane.py`): the sliding-window
maxima and the token-bucket replay over the audit log's request times, and the `--one-job`
bound. Pure functions of float timestamps; no cluster."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_control_plane", ROOT / "benchmarks" / "control_plane.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def even(rate: float, seconds: float, start: float = 0.0) -> list[float]:
    """`rate` requests per second, evenly spaced, for `seconds`."""
    return [start + i / rate for i in range(round(rate * seconds))]


def test_window_maxima(bench):
    assert bench.max_in_window([], 1.0) == 0
    assert bench.max_in_window([5.0], 1.0) == 1
    # Half-open windows: t and t + 1 are not in the same 1-s window.
    assert bench.max_in_window([0.0, 1.0, 2.0], 1.0) == 1
    assert bench.max_in_window([0.0, 0.5, 0.999, 1.0], 1.0) == 3
    # Order does not matter; the densest second is found wherever it is.
    times = even(10, 30) + [12.0 + i / 1000 for i in range(40)]
    assert bench.max_in_window(list(reversed(times)), 1.0) == 50
    assert bench.max_in_window(even(50, 20), 1.0) == 50
    assert bench.max_in_window(even(50, 20), 10.0) == 500


def test_a_burst_beyond_the_bucket_is_overdrawn(bench):
    burst = [i * 0.1 / 150 for i in range(150)]  # 150 requests in 0.1 s
    overdraft = bench.bucket_overdraft(burst, qps=50, burst=100)
    # 101 tokens (burst + 1 of slack) and ~5 refilled in 0.1 s for 150 requests.
    assert 40 < overdraft < 46
    audit = bench.rate_limit_figures(burst, qps=50, burst=100)
    assert audit["honoured"] is False and audit["max_per_second"] == 150


def test_even_traffic_at_the_rate_is_honoured(bench):
    times = even(50, 20)
    assert bench.bucket_overdraft(times, qps=50, burst=100) == 0
    audit = bench.rate_limit_figures(times, qps=50, burst=100)
    assert audit == {
        "requests": 1000,
        "max_per_second": 50,
        "max_per_10s_rate": 50.0,
        "overdraft": 0.0,
        "honoured": True,
    }


def test_a_full_burst_then_the_rate_is_honoured_and_more_is_not(bench):
    """What the operator's bucket allows: burst at once, then qps; one request more per
    second, sustained, empties the bucket and overdraws it."""
    allowed = [0.0] * 100 + even(50, 20, start=0.02)
    assert bench.bucket_overdraft(allowed, qps=50, burst=100) == 0
    assert bench.max_in_window(allowed, 1.0) <= 150
    too_fast = [0.0] * 100 + even(55, 20, start=0.02)
    assert bench.bucket_overdraft(too_fast, qps=50, burst=100) > 50
    # The slack is one request: the burst plus 1 passes, plus 2 does not.
    assert bench.bucket_overdraft([0.0] * 101, qps=50, burst=100) == 0
    assert bench.bucket_overdraft([0.0] * 102, qps=50, burst=100) == pytest.approx(1.0)
    assert bench.bucket_overdraft([0.0] * 102, qps=50, burst=100, slack=0) == pytest.approx(2.0)


def test_no_limit_reports_figures_without_a_verdict(bench):
    audit = bench.rate_limit_figures(even(200, 3), qps=0, burst=100)
    assert audit["honoured"] is None and audit["overdraft"] is None
    assert audit["max_per_second"] == 200 and audit["requests"] == 600
    with pytest.raises(ValueError):
        bench.bucket_overdraft([0.0], qps=0, burst=100)


def test_qps_audit_counts_watches_apart_and_splits_clients(bench):
    events = [(t, "create", "OpenAPI-Generator") for t in even(40, 10)]
    events += [(t, "patch", "kopf") for t in even(5, 10)]
    events += [(0.0, "watch", "kopf")] * 3 + [(0.0, "list", "kopf")]
    res = bench.qps_audit(events, qps=50, burst=100)
    assert res["watches"] == 3
    assert res["requests"] == 400 + 50 + 1
    assert res["honoured"] is True and res["overdraft"] == 0
    assert res["bound_per_second"] == 150 and res["bound_per_10s_rate"] == 60
    assert res["by_client"]["OpenAPI-Generator"]["requests"] == 400
    assert res["by_client"]["kopf"]["requests"] == 51
    json.dumps(res)  # goes into the results JSON as it is

    unlimited = bench.qps_audit(events, qps=0, burst=100)
    assert unlimited["honoured"] is None and unlimited["bound_per_second"] is None


def test_operator_request_log_reads_only_the_operators_completed_requests(bench, tmp_path):
    user = bench.OPERATOR_USER

    def event(verb, username, stage="ResponseComplete", agent="OpenAPI-Generator/37.0.2/python", at="00.5"):
        return json.dumps(
            {
                "stage": stage,
                "verb": verb,
                "user": {"username": username},
                "userAgent": agent,
                "requestReceivedTimestamp": f"2024-01-01T00:00:{at}00000Z",
            }
        )

    log = tmp_path / "audit.log"
    log.write_text(
        "\n".join(
            [
                event("create", user),
                event("watch", user, agent="kopf/1.45.2"),
                event("create", "admin"),
                event("get", user, stage="RequestReceived"),
                "not json " + user,
                event("get", user, at="01.5"),
            ]
        )
        + "\n"
    )
    got = bench.operator_request_log(log)
    assert [(verb, c) for _, verb, c in got] == [
        ("create", "OpenAPI-Generator"),
        ("watch", "kopf"),
        ("get", "OpenAPI-Generator"),
    ]
    assert got[2][0] - got[0][0] == pytest.approx(1.0)
    assert bench.operator_request_log(tmp_path / "missing.log") == []


def test_one_job_is_bounded_by_the_schema(bench, monkeypatch, capsys):
    from lepton_operator.api.models import MAX_WORKERS

    assert bench.one_job_size(str(MAX_WORKERS)) == MAX_WORKERS
    assert bench.one_job_size("0") == 0
    monkeypatch.setattr(sys, "argv", ["control_plane.py"])
    with pytest.raises(SystemExit):
        bench.main(["--one-job", str(MAX_WORKERS + 1)])
    assert "at most 1000" in capsys.readouterr().err


def test_operator_env_takes_name_value_pairs_for_the_operator_alone(bench, monkeypatch, capsys):
    assert bench.env_assignment("MALLOC_MMAP_THRESHOLD_=131072") == ("MALLOC_MMAP_THRESHOLD_", "131072")
    assert bench.env_assignment("LD_PRELOAD=/a=b.so") == ("LD_PRELOAD", "/a=b.so")
    assert bench.env_assignment("EMPTY=") == ("EMPTY", "")
    monkeypatch.setattr(sys, "argv", ["control_plane.py"])
    for bad in ("NOVALUE", "=1", "A B=1"):
        with pytest.raises(SystemExit):
            bench.main(["--operator-env", bad])
        assert "NAME=VALUE" in capsys.readouterr().err


def test_profile_growth_excerpt(bench):
    text = "\n".join(
        [
            "lepton-operator memory profile, pid 1",
            "RSS 90.0 MiB",
            "",
            "## top 40 lines by growth since the previous dump",
            "KiB now | KiB growth | blocks growth | where | code",
            "    120.0 |     +64.0 |     +10 | kopf/_core/x.py:10 | a = {} | b",
            "     10.0 |      +1.0 |      +1 | lepton_operator/y.py:5 | b = []",
            "",
            "## top 40 lines by growth since the first dump",
            "     99.0 |     +99.0 |     +99 | z.py:1 | c",
        ]
    )
    assert bench.profile_growth(text) == [
        "120.0 | +64.0 | +10 | kopf/_core/x.py:10",
        "10.0 | +1.0 | +1 | lepton_operator/y.py:5",
    ]
    assert bench.profile_growth("no growth here") == []
    assert bench.profile_label(20) == "K = 20" and bench.profile_label("churn-mid") == "churn-mid"


def test_the_replay_forgives_50_ms_of_send_to_receive_jitter_and_no_more(bench):
    assert bench.jitter_slack(50) == 2.5 and bench.jitter_slack(10) == 1.0
    # A full burst, then the rate: three requests that left on time but reached the
    # apiserver 30 ms late land together with the next ones.
    times = [0.0] * 100 + [1.0 + i / 50 for i in range(100)]
    late = [t + 0.03 if 50 <= i < 53 else t for i, t in enumerate(times[100:])]
    assert bench.qps_audit([(t, "get", "c") for t in times[:100] + late], qps=50, burst=100)["honoured"] is True
    # Twice the rate for 3 s is not jitter: the full bucket is spent within 2 s.
    fast = [0.0] * 100 + [1.0 + i / 100 for i in range(300)]
    assert bench.qps_audit([(t, "get", "c") for t in fast], qps=50, burst=100)["honoured"] is False
