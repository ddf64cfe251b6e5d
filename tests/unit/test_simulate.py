"""The single-job simulator (`simulate --curve`): the oracle, baselines, restart costs and capacity; the targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lepton_operator.scaling.simulate import Curve, oracle, simulate

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CURVES = ROOT / "benchmarks" / "curves"
ISSUE_CURVE = {
    "throughput": {"1": 100, "2": 185, "4": 330, "8": 420},
    "noise": 0.05,
    "restart_seconds": 30,
    "min": 1,
    "max": 8,
    "total_samples": 5000000,
    "capacity": 8,
}


def test_interpolation_and_oracle():
    c = Curve.from_dict(ISSUE_CURVE)
    assert c.throughput(3) == pytest.approx(257.5)
    assert c.throughput(16) == 420  # flat past the last point
    size, seconds = oracle(c)
    assert size == 8 and seconds == pytest.approx(30 + 5_000_000 / 420)


def test_fixed_size_completes_exactly_at_its_cost():
    c = Curve.from_dict({**ISSUE_CURVE, "noise": 0})
    r = simulate(c, "fixed:4")
    assert r["rescales"] == 0 and r["trajectory"] == [[0.0, 4]]
    assert r["completion_seconds"] == pytest.approx(30 + 5_000_000 / 330, abs=0.2)


def test_lepton_policy_output_contract_and_deterministic_seed():
    c = Curve.from_dict(ISSUE_CURVE)
    a, b = simulate(c, "lepton", seed=3), simulate(c, "lepton", seed=3)
    assert a == b
    for key in ("completion_seconds", "oracle_completion_seconds", "ratio_to_oracle", "rescales", "trajectory"):
        assert key in a
    assert a["ratio_to_oracle"] == pytest.approx(a["completion_seconds"] / a["oracle_completion_seconds"], 1e-3)
    sizes = [s for _, s in a["trajectory"]]
    assert all(1 <= s <= 8 for s in sizes) and a["rescales"] == len(sizes) - 1


def test_capacity_caps_the_job_without_restarts():
    c = Curve.from_dict({**ISSUE_CURVE, "throughput": {"1": 100, "8": 800}, "capacity": 3})
    r = simulate(c, "lepton")
    assert max(s for _, s in r["trajectory"]) <= 3 and r["final_size"] == 3
    assert r["capacity_failures"] >= 1
    assert r["oracle_size"] == 3


def test_restart_cost_is_charged():
    cheap = simulate(Curve.from_dict({**ISSUE_CURVE, "restart_seconds": 10, "noise": 0}), "hpa")
    dear = simulate(Curve.from_dict({**ISSUE_CURVE, "restart_seconds": 300, "noise": 0}), "hpa")
    assert dear["completion_seconds"] - cheap["completion_seconds"] >= 290 * (1 + dear["rescales"]) - 300


def test_benchmark_suite_meets_the_target():
    """Within 10% of the oracle on every curve, better than the HPA-style rule on average."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import autoscale
    finally:
        sys.path.pop(0)
    rows = autoscale.run(seeds=3)
    assert len(rows) >= 8
    assert max(r["worst_ratio"] for r in rows) <= 1.10, autoscale.table(rows)
    assert sum(r["ratio"] for r in rows) < sum(r["hpa_ratio"] for r in rows)


def test_default_policy_is_the_allocator_with_the_same_result_keys():
    c = Curve.from_dict(ISSUE_CURVE)
    a, lep = simulate(c, seed=1), simulate(c, "lepton", seed=1)
    assert a["policy"] == "allocator"
    assert set(a) == set(lep)
    sizes = [s for _, s in a["trajectory"]]
    assert a["trajectory"][0][0] == 0.0 and all(1 <= s <= 8 for s in sizes) and a["rescales"] == len(sizes) - 1
    assert a["ratio_to_oracle"] == pytest.approx(a["completion_seconds"] / a["oracle_completion_seconds"], 1e-3)
    assert a == simulate(c, "allocator", seed=1)


def test_policy_aliases():
    c = Curve.from_dict(ISSUE_CURVE)
    per_job, lep = simulate(c, "per-job", seed=2), simulate(c, "lepton", seed=2)
    assert {**per_job, "policy": "lepton"} == lep
    static = simulate(Curve.from_dict({**ISSUE_CURVE, "initial": 2}), "static")
    assert static["policy"] == "static" and static["trajectory"] == [[0.0, 2]] and static["rescales"] == 0


def test_allocator_restart_cost_and_capacity_on_a_curve():
    c = Curve.from_dict({**ISSUE_CURVE, "throughput": {"1": 100, "8": 800}, "capacity": 3, "noise": 0})
    r = simulate(c)
    assert max(s for _, s in r["trajectory"]) <= 3 and r["final_size"] == 3 and r["oracle_size"] == 3
    # Every start and rescale costs its 30 s: never faster than the oracle's one start.
    assert r["completion_seconds"] >= r["oracle_completion_seconds"] + 30 * r["rescales"] - 0.2


def test_allocator_within_10_percent_of_the_best_fixed_size_on_long_jobs():
    """`simulate --curve` at the default settings (its default policy, the spec's autoscaling
    defaults, the allocator's): every curve of benchmarks/curves/ and every seed."""
    worst = {}
    for path in sorted(CURVES.glob("*.json")):
        curve = Curve.load(str(path))
        for seed in range(3):
            r = simulate(curve, seed=seed)
            worst[curve.name] = max(worst.get(curve.name, 0.0), r["ratio_to_oracle"])
    assert len(worst) >= 8
    assert max(worst.values()) <= 1.10, worst


def test_cli_prints_json(tmp_path):
    path = tmp_path / "curve.json"
    path.write_text(json.dumps(ISSUE_CURVE))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lepton_operator.scaling.simulate",
            "--curve",
            str(path),
            "--policy",
            "hpa",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["policy"] == "hpa" and result["completion_seconds"] > 0
    bad = subprocess.run(
        [sys.executable, "-m", "lepton_operator.scaling.simulate", "--curve", str(path), "--policy", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown policy" in bad.stderr
    default = subprocess.run(
        [sys.executable, "-m", "lepton_operator.cli", "simulate", "--curve", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(default.stdout)["policy"] == "allocator"
