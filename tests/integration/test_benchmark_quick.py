"""The control-plane benchmark's harness cannot rot: `benchmarks/control_plane.py --quick`
(K = 20 elastic LeptonJobs of 8 workers, operator only, the autoscaler and the allocator on
against the harness's stub Prometheus, short idle and churn, and `--one-job 50`: one job of
50 workers) runs end to end and writes figures that make sense, among them the audit log's
check of the operator's client-side rate limit (at its defaults, 50/s with bursts of 100).
A few minutes on 2 cores.

It starts its own local control plane (the harness owns and stops everything it starts),
so it needs the control-plane binaries like the rest of this tier, not the session's
cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "control_plane.py"),
            "--quick",
            "--one-job",
            "50",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["args"]["operator_only"] and res["args"]["elastic"] and res["args"]["ks"] == [20]

    (lat,) = res["latency"]
    assert lat["kind"] == "LeptonJob" and lat["k"] == 20
    assert lat["complete"] == 20, "every job's 8 pods created and Running"
    assert 0 < lat["created_p50"] <= lat["created_p99"] < 300
    assert lat["operator_rss_peak_create_mib"] > 0

    (idle,) = res["idle"]
    assert idle["rss_mib"] > 0 and idle["rss_peak_phase_mib"] >= idle["rss_mib"] * 0.9
    assert idle["cpu_percent"] >= 0
    assert idle["requests_per_job_per_min"] > 0
    (start,) = res["create_phase_requests"]
    assert start["per_job"] >= 8, "at least the 8 pod creates per job"
    assert start["by_kind"].get("create pods", 0) >= 20 * 8

    # The stub Prometheus was asked: the autoscaler and the allocator ran against it.
    assert res["prometheus_queries"]["total"] > 0 and res["prometheus_queries"]["jobs"] >= 1
    assert res["api"]["total_per_lifecycle"] > 0
    assert res["churn"]["cycles"] >= 1 and res["churn"]["rss_end_mib"] > 0
    assert res["machine"]["cpus"] >= 1 and res["wall_seconds"] > 0
    assert res["operator_version"]

    # One job of 50 workers: every pod created and Running, a status well under etcd's limit.
    one = res["one_job"]
    assert one["workers"] == 50 and one["pods_created"] == 50 and one["pods_running"] == 50
    assert 0 < one["created_s"] <= one["running_s"] < 300
    assert one["requests_create_by_kind"].get("create pods", 0) >= 50
    assert 0 < one["status_bytes_running"] < 1.5 * 2**20
    assert one["status_bytes_running"] < one["object_bytes_running"] < 1.5 * 2**20
    assert one["pods_left"] == 0

    # The operator's rate limit at its defaults, checked on the audit log over the whole run.
    qa = res["qps_audit"]
    assert qa["qps"] == 50 and qa["burst"] == 100 and res["args"]["api_qps"] is None
    assert qa["requests"] > 20 * 8 + 50 and qa["watches"] >= 1
    assert qa["max_per_second"] > 0 and qa["max_per_10s_rate"] > 0 and qa["overdraft"] is not None
    # The operator's own client (the limiter's) alone, then every request of its identity
    # (kopf's too): the "no second with more requests than burst allows".
    own = qa["by_client"]["OpenAPI-Generator"]
    assert own["honoured"] is True and own["max_per_second"] <= qa["burst"] + qa["qps"] + qa["bucket_slack"], qa
    assert qa["honoured"] is True, f"overdrawn by {qa['overdraft']:.1f} requests; by client: {qa['by_client']}"
    assert qa["max_per_second"] <= qa["burst"] + qa["qps"] + qa["bucket_slack"], qa
    assert qa["max_per_10s_rate"] <= qa["qps"] + (qa["burst"] + qa["bucket_slack"]) / 10, qa
