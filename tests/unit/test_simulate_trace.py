"""The multi-job simulator (`simulate --trace`): contract, baselines, capacity, restart costs, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lepton_operator import cli
from lepton_operator.api.models import AutoscalingSpec
from lepton_operator.scaling.allocator import Allocation, allocate
from lepton_operator.scaling.tracesim import CapacityExceeded, Trace, TraceError, simulate_trace

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LINEAR = {"1": 100, "2": 200, "4": 400, "8": 800}
ISSUE_JOB = {
    "name": "a",
    "arrival_seconds": 0,
    "gpus_per_worker": 2,
    "min": 1,
    "max": 16,
    "initial": 2,
    "priority": 0,
    "total_samples": 5000000,
    "restart_seconds": 30,
    "noise": 0.05,
    "throughput": {"1": 100, "2": 185, "4": 330, "8": 420},
}


def job(name: str, **fields) -> dict:
    return {**ISSUE_JOB, "name": name, "noise": 0, "throughput": LINEAR, **fields}


def trace(jobs: list[dict], capacity: int = 32, **fields) -> Trace:
    return Trace.from_dict({"capacity_gpus": capacity, "jobs": jobs, **fields}, name="t")


def small_mixed() -> Trace:
    """Four elastic jobs with moderate static sizes on 16 GPUs, arriving over 20 minutes."""
    amdahl = {str(n): round(100 * n / (1 + 0.1 * (n - 1)), 1) for n in range(1, 17)}
    return trace(
        [
            job("a", gpus_per_worker=1, initial=2, total_samples=3_000_000, noise=0.05),
            job("b", arrival_seconds=300, gpus_per_worker=2, initial=2, total_samples=2_000_000, noise=0.05),
            job("c", arrival_seconds=600, gpus_per_worker=1, initial=3, throughput=amdahl, total_samples=1_500_000),
            job("d", arrival_seconds=1200, gpus_per_worker=2, initial=2, total_samples=1_000_000, noise=0.05),
        ],
        capacity=16,
    )


def gpus_over_time(result: dict, tr: Trace) -> list[tuple[float, int]]:
    """(time, GPUs allocated) after the changes at each time, rebuilt from the jobs' trajectories."""
    gpw = {j.name: j.gpus_per_worker for j in tr.jobs}
    changes: dict[float, list[tuple[str, int]]] = {}
    for name, j in result["jobs"].items():
        for t, size in j["trajectory"]:
            changes.setdefault(t, []).append((name, size))
        changes.setdefault(j["completion_seconds"], []).append((name, 0))
    sizes: dict[str, int] = {}
    out = []
    for t in sorted(changes):
        sizes.update(changes[t])
        out.append((t, sum(gpw[n] * s for n, s in sizes.items())))
    return out


def test_json_contract():
    tr = trace([ISSUE_JOB, {**ISSUE_JOB, "name": "b", "arrival_seconds": 100}])
    for policy in ("static", "per-job", "allocator"):
        r = simulate_trace(tr, policy, seed=1)
        for key in ("avg_jct_seconds", "p95_jct_seconds", "makespan_seconds", "gpu_utilization", "rescales", "jobs"):
            assert key in r, (policy, key)
        assert set(r["jobs"]) == {"a", "b"}
        for j in r["jobs"].values():
            for key in ("arrival_seconds", "start_seconds", "completion_seconds", "jct_seconds", "rescales"):
                assert key in j, (policy, key)
            assert j["jct_seconds"] == pytest.approx(j["completion_seconds"] - j["arrival_seconds"], abs=0.2)
            assert j["start_seconds"] >= j["arrival_seconds"]
        jcts = [j["jct_seconds"] for j in r["jobs"].values()]
        assert r["avg_jct_seconds"] == pytest.approx(sum(jcts) / 2, abs=0.2)
        assert min(jcts) <= r["p95_jct_seconds"] <= max(jcts)
        assert r["rescales"] == sum(j["rescales"] for j in r["jobs"].values())
        assert 0 < r["gpu_utilization"] <= 1


def test_static_runs_initial_from_admission_and_charges_the_start():
    r = simulate_trace(trace([job("a", initial=2)]), "static")
    a = r["jobs"]["a"]
    assert a["trajectory"] == [[0.0, 2]] and a["rescales"] == 0
    assert a["completion_seconds"] == pytest.approx(30 + 5_000_000 / 200, abs=0.2)
    # 4 of 32 GPUs for the whole makespan
    assert r["gpu_utilization"] == pytest.approx(4 / 32, abs=1e-3)


def test_static_admits_in_priority_then_arrival_order_with_backfill():
    tr = trace(
        [
            job("big", gpus_per_worker=2, initial=3, total_samples=300_000),  # 6 of 8 GPUs until t=30+1000
            job("early", arrival_seconds=10, gpus_per_worker=2, initial=2),  # 4 GPUs: waits
            job("urgent", arrival_seconds=20, gpus_per_worker=2, initial=2, priority=5),  # 4 GPUs: waits
            job("small", arrival_seconds=30, gpus_per_worker=1, initial=2, total_samples=1_000_000),  # 2 fit now
        ],
        capacity=8,
    )
    r = simulate_trace(tr, "static")["jobs"]
    assert r["small"]["start_seconds"] == 30  # backfills while earlier jobs wait
    big_done = r["big"]["completion_seconds"]
    assert big_done == pytest.approx(30 + 300_000 / 300, abs=0.2)
    # The priority-5 job goes first when the big job leaves; the earlier arrival waits for room.
    assert r["urgent"]["start_seconds"] == pytest.approx(big_done, abs=0.1)
    assert r["small"]["completion_seconds"] < r["urgent"]["completion_seconds"]
    assert r["early"]["start_seconds"] == pytest.approx(r["small"]["completion_seconds"], abs=0.1)


def test_per_job_is_first_come_first_served():
    fixed = {"elastic": False}
    tr = trace(
        [
            job("a", gpus_per_worker=2, initial=2, total_samples=200_000, **fixed),  # 4 of 8 GPUs
            job("b", arrival_seconds=10, gpus_per_worker=2, initial=4, **fixed),  # 8 GPUs: waits for a
            job("c", arrival_seconds=20, gpus_per_worker=1, initial=2, **fixed),  # fits now, but b came first
        ],
        capacity=8,
    )
    per_job = simulate_trace(tr, "per-job")["jobs"]
    a_done = per_job["a"]["completion_seconds"]
    assert per_job["b"]["start_seconds"] == pytest.approx(a_done, abs=0.1)
    assert per_job["c"]["start_seconds"] >= per_job["b"]["completion_seconds"] - 0.1
    static = simulate_trace(tr, "static")["jobs"]
    assert static["c"]["start_seconds"] == 20  # the static baseline backfills


def test_per_job_scale_up_that_does_not_fit_backs_off():
    tr = trace(
        [
            job("a", gpus_per_worker=1, initial=2, max=8, total_samples=10_000_000),
            job("b", gpus_per_worker=1, initial=2, max=2),
        ],
        capacity=4,
    )
    r = simulate_trace(tr, "per-job")
    a = r["jobs"]["a"]
    assert a["capacity_failures"] >= 1
    assert [s for _, s in a["trajectory"]][:1] == [2]
    # It grows once b has finished and left its GPUs.
    assert max(s for t, s in a["trajectory"] if t < r["jobs"]["b"]["completion_seconds"]) == 2
    assert max(s for _, s in a["trajectory"]) > 2


@pytest.mark.parametrize("policy", ["static", "per-job", "allocator"])
def test_capacity_is_never_exceeded(policy):
    tr = small_mixed()
    r = simulate_trace(tr, policy, seed=2)
    assert max(g for _, g in gpus_over_time(r, tr)) <= tr.capacity_gpus


def test_capacity_check_fires_on_a_policy_that_over_allocates():
    def greedy(jobs, capacity, now, settings):
        return {j.key: Allocation(j.key, True, j.max, "Greedy", "every job at its max") for j in jobs}

    tr = trace([job("a", max=8), job("b", max=8, arrival_seconds=60)], capacity=16)
    with pytest.raises(CapacityExceeded, match="GPUs allocated at t=60.0 s > capacity 16"):
        simulate_trace(tr, "allocator", allocate_fn=greedy)
    assert issubclass(CapacityExceeded, RuntimeError)


def scripted(schedule: list[tuple[float, int]]):
    """An allocator that runs the one job at the size the schedule gives for `now`."""

    def fn(jobs, capacity, now, settings):
        size = [n for t, n in schedule if now >= t][-1]
        return {j.key: Allocation(j.key, True, size, "Scripted", "") for j in jobs}

    return fn


def test_restart_cost_is_charged_on_the_start_and_every_resize():
    tr = trace([job("a", max=8, restart_seconds=50, total_samples=500_000)], capacity=32)
    r = simulate_trace(tr, "allocator", allocate_fn=scripted([(0, 2), (600, 4), (1200, 2)]))["jobs"]["a"]
    # 2 workers from 50 to 600 (110000 samples), 4 from 650 to 1200 (220000), 2 from 1250 (170000 left).
    assert r["trajectory"] == [[0.0, 2], [600.0, 4], [1200.0, 2]]
    assert r["rescales"] == 2
    assert r["completion_seconds"] == pytest.approx(1250 + 170_000 / 200, abs=0.1)
    r = simulate_trace(tr, "allocator", allocate_fn=scripted([(0, 2)]))["jobs"]["a"]
    assert r["rescales"] == 0 and r["completion_seconds"] == pytest.approx(50 + 500_000 / 200, abs=0.1)


def test_the_allocator_sees_jobs_as_the_operator_does():
    seen = []

    def spy(jobs, capacity, now, settings):
        seen.append((now, {j.key: j for j in jobs}))
        return scripted([(0, 2), (600, 4)])(jobs, capacity, now, settings)

    tr = trace([job("a", max=8, restart_seconds=50, noise=0.05, total_samples=1_000_000, efficiency_threshold=0.3)])
    simulate_trace(tr, "allocator", seed=1, allocate_fn=spy)
    states = dict(seen)
    first = states[0.0]["a"]
    assert not first.admitted and first.current == 0 and first.requested == 2 and first.queued_since == 0
    assert first.remaining_samples == 1_000_000 and first.floor == 0.3 and first.gpus_per_worker == 2
    # Start cost 50 s (busy), warm-up 60 s, then a 60 s window: the first measurement at t=180.
    assert states[30.0]["a"].busy and not states[30.0]["a"].settled
    b = states[150.0]["a"]
    assert not b.busy and not b.settled and not b.measurements
    a = states[180.0]["a"]
    assert not a.busy and a.settled and a.current == 2 and a.held_gpus == 4 and a.admitted
    (m,) = a.measurements
    assert m.world_size == 2 and m.window_seconds == 60 and m.age_seconds == 0
    assert 190 <= m.throughput <= 210
    assert a.remaining_samples == pytest.approx(1_000_000 - 200 * 130)
    later = states[570.0]["a"].measurements
    # One per interval, each the mean over the generation so far (samples from t=150 on).
    assert len(later) == 14 and later[0].age_seconds == 390 and later[-1].window_seconds == 450
    assert states[570.0]["a"].restart_seconds == 60  # the operator's default before it measured one
    assert states[630.0]["a"].busy and states[630.0]["a"].restart_seconds == 60  # restarting until 650
    a = states[660.0]["a"]
    assert not a.busy and not a.settled and a.current == 4 and a.restart_seconds == 50
    assert a.requested == 4  # spec.workers.replicas, where the operator writes the allocator's target
    assert len(a.measurements) == 15  # the old generation's stay
    assert max(len(s["a"].measurements) for _, s in seen if "a" in s) <= 33


def test_measurements_keep_other_sizes_when_a_generation_is_long():
    seen = []

    def spy(jobs, capacity, now, settings):
        seen.append({j.key: j for j in jobs})
        return scripted([(0, 2), (600, 4)])(jobs, capacity, now, settings)

    tr = trace([job("a", max=8, total_samples=3_000_000)])
    simulate_trace(tr, "allocator", allocate_fn=spy)
    last = seen[-1]["a"].measurements
    # The 32 most recent (all at 4 workers) and the latest at 2, as the operator keeps them.
    assert len(last) == 33
    assert [m.world_size for m in last].count(2) == 1 and last[0].window_seconds == 510  # from t=120 to 600


def test_the_allocator_beats_static_on_a_small_trace():
    tr = small_mixed()
    static = simulate_trace(tr, "static")["avg_jct_seconds"]
    for seed in range(3):
        assert simulate_trace(tr, "allocator", seed=seed)["avg_jct_seconds"] < static


def test_deterministic_for_a_seed():
    tr = small_mixed()
    for policy in ("per-job", "allocator"):
        assert simulate_trace(tr, policy, seed=4) == simulate_trace(tr, policy, seed=4)


def test_real_allocator_is_the_default():
    tr = trace([job("a")])
    assert simulate_trace(tr, "allocator") == simulate_trace(tr, "allocator", allocate_fn=allocate)


def test_trace_defaults_and_options():
    tr = trace([{k: v for k, v in ISSUE_JOB.items() if k not in ("priority", "noise", "initial")}])
    (j,) = tr.jobs
    assert (j.priority, j.noise, j.initial, j.elastic, tr.interval_seconds) == (0, 0.0, 1, True, 30)
    spec = j.spec(tr.interval_seconds)
    assert spec.autoscaling.efficiency_threshold == AutoscalingSpec().efficiency_threshold
    assert spec.autoscaling.step == 1
    tr = trace([{**ISSUE_JOB, "step": 2, "autoscaling": {"warmupSeconds": 90}}], interval_seconds=60)
    spec = tr.jobs[0].spec(tr.interval_seconds)
    assert (spec.autoscaling.step, spec.autoscaling.warmup_seconds, spec.autoscaling.interval_seconds) == (2, 90, 60)
    fixed = trace([{**ISSUE_JOB, "elastic": False}])
    for policy in ("per-job", "allocator"):
        r = simulate_trace(fixed, policy)["jobs"]["a"]
        assert r["trajectory"] == [[0.0, 2]], policy


BAD = [
    ({"jobs": [ISSUE_JOB]}, "missing field 'capacity_gpus'"),
    ({"capacity_gpus": 32, "jobs": [{k: v for k, v in ISSUE_JOB.items() if k != "total_samples"}]}, "'total_samples'"),
    ({"capacity_gpus": 32, "jobs": [{**ISSUE_JOB, "min": 4, "max": 2, "initial": 2}]}, "min (4) > max (2)"),
    ({"capacity_gpus": 4, "jobs": [{**ISSUE_JOB, "min": 3, "initial": 3}]}, "gpus_per_worker x min = 2 x 3 = 6 GPUs"),
    ({"capacity_gpus": 32, "jobs": [{**ISSUE_JOB, "arrival_seconds": -5}]}, "arrival_seconds must be non-negative"),
    ({"capacity_gpus": 32, "jobs": [{**ISSUE_JOB, "restart_seconds": -1}]}, "restart_seconds must be non-negative"),
    ({"capacity_gpus": 32, "jobs": [{**ISSUE_JOB, "throughput": {"2": -3}}]}, "throughput: 2 must be positive"),
    ({"capacity_gpus": 32, "jobs": [{**ISSUE_JOB, "priorty": 1}]}, "unknown field 'priorty'"),
    ({"capacity_gpus": 32, "jobs": [ISSUE_JOB, ISSUE_JOB]}, "appears twice"),
    ({"capacity_gpus": 32, "jobs": [{**ISSUE_JOB, "autoscaling": {"cooldownSeconds": -1}}]}, "cooldownSeconds"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m for _, m in BAD])
def test_bad_trace_exits_2_with_one_clear_line(tmp_path, capsys, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert cli.main(["simulate", "--trace", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"simulate: {path}: ") and message in err, err


def test_unknown_policy_missing_file_and_bad_json_exit_2(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"capacity_gpus": 32, "jobs": [ISSUE_JOB]}))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    for args, message in [
        (["--trace", str(good), "--policy", "hpa"], "unknown policy 'hpa': use allocator, per-job, static"),
        (["--trace", str(tmp_path / "nope.json")], "No such file"),
        (["--trace", str(broken)], "broken.json: Expecting property name"),
    ]:
        assert cli.main(["simulate", *args]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and message in err, err


def test_cli_reports_a_policy_that_breaks_the_capacity_in_one_line(tmp_path, capsys, monkeypatch):
    def greedy(jobs, capacity, now, settings):
        return {j.key: Allocation(j.key, True, j.max, "Greedy", "") for j in jobs}

    monkeypatch.setattr("lepton_operator.scaling.tracesim.allocate", greedy)
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"capacity_gpus": 32, "jobs": [ISSUE_JOB, {**ISSUE_JOB, "name": "b"}]}))
    assert cli.main(["simulate", "--trace", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "64 GPUs allocated at t=0.0 s > capacity 32" in err, err


def test_cli_trace_prints_json(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"capacity_gpus": 32, "jobs": [ISSUE_JOB, {**ISSUE_JOB, "name": "b"}]}))
    out = subprocess.run(
        [sys.executable, "-m", "lepton_operator.cli", "simulate", "--trace", str(path), "--policy", "static"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["policy"] == "static" and set(result["jobs"]) == {"a", "b"}


def test_benchmark_traces_are_the_generators_output():
    """benchmarks/traces/*.json are what `benchmarks/allocator.py --write-traces` writes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import allocator as bench
    finally:
        sys.path.pop(0)
    assert len(bench.GENERATORS) >= 6
    for name, (gen, _) in bench.GENERATORS.items():
        stored = json.loads((ROOT / "benchmarks" / "traces" / f"{name}.json").read_text())
        assert stored == json.loads(json.dumps(gen())), name
        Trace.from_dict(stored)  # valid
    forty = Trace.load(str(ROOT / "benchmarks" / "traces" / "poisson-mixed-40.json"))
    assert len(forty.jobs) == 40
    assert {j.gpus_per_worker for j in forty.jobs} == {1, 2, 4, 8}


def test_trace_error_is_a_value_error():
    assert issubclass(TraceError, ValueError)
    with pytest.raises(TraceError, match="jobs must be a non-empty list"):
        Trace.from_dict({"capacity_gpus": 8, "jobs": []})
    tr = trace([job("a")])
    with pytest.raises(TraceError, match="unknown policy"):
        simulate_trace(tr, "fifo")
