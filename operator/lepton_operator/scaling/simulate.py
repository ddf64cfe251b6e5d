"""A discrete-time simulator of one training job under an autoscaling policy, and the CLI.

`simulate(curve, policy)` runs one job to completion. The default policy, `allocator`,
is the cluster allocator the operator runs (`scaling.allocator`), played on the one-job
trace of the curve by the multi-job simulator (`scaling.tracesim`). `per-job` (alias
`lepton`) runs the per-job policy `decide()` at every autoscaler interval on noisy
throughput measurements taken the way the operator takes them (averaged over the part
of the current generation after its warm-up, reported once a rate window has passed).
Every policy is charged `restart_seconds` of zero throughput for the start and for every
rescale, and the job stops when `total_samples` are trained. Baselines: the best fixed
size in hindsight (the oracle), any fixed size (`fixed:N`; `static` is `initial`), and an
HPA-style rule that keeps per-worker throughput near a target.

`lepton-operator simulate --trace FILE` runs many jobs on one cluster instead
(`scaling.tracesim` describes the trace file and the result).

A curve file is JSON:

    {"throughput": {"1": 100, "2": 185, "4": 330, "8": 420},   samples/s by world size
     "noise": 0.05,            uniform +/- fraction on every measurement
     "restart_seconds": 30,    downtime of the start and of every rescale
     "min": 1, "max": 8, "initial": 1, "capacity": 8,   capacity: most workers that fit
     "total_samples": 5000000,
     "autoscaling": {"intervalSeconds": 30, ...}}      optional spec.autoscaling overrides

Throughput between given sizes is interpolated linearly; beyond the largest given size it
stays flat, below the smallest it scales linearly from zero.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Optional

from lepton_operator.api.models import LeptonJobSpec, Observation
from lepton_operator.scaling.policy import RescaleEvent, ScalingState, decide
from lepton_operator.scaling.tracesim import (
    DEFAULT_INTERVAL_SECONDS,
    EPOCH,
    POLICIES,
    Trace,
    TraceError,
    interpolate_throughput,
    simulate_trace,
)

# HPA-style baseline: keep per-worker throughput at this fraction of a single worker's
# (the way an HPA keeps CPU utilisation at a target), with the HPA's 10% tolerance and
# 5-minute scale-down stabilisation window.
HPA_TARGET_FRACTION = 0.7
HPA_TOLERANCE = 0.1
HPA_DOWNSCALE_STABILISATION_SECONDS = 300


@dataclass
class Curve:
    """A job to simulate: its throughput curve, bounds, restart cost and size."""

    points: dict[int, float]
    total_samples: float
    restart_seconds: float = 30.0
    noise: float = 0.0
    min: int = 1
    max: int = 8
    initial: Optional[int] = None
    capacity: Optional[int] = None
    autoscaling: dict = field(default_factory=dict)
    name: str = ""

    @classmethod
    def from_dict(cls, data: dict, name: str = "") -> "Curve":
        points = {int(k): float(v) for k, v in data["throughput"].items()}
        if not points or any(v < 0 or not math.isfinite(v) for v in points.values()):
            raise ValueError("throughput needs at least one finite, non-negative point")
        return cls(
            points=points,
            total_samples=float(data["total_samples"]),
            restart_seconds=float(data.get("restart_seconds", 30)),
            noise=float(data.get("noise", 0.0)),
            min=int(data.get("min", 1)),
            max=int(data.get("max", max(points))),
            initial=data.get("initial"),
            capacity=data.get("capacity"),
            autoscaling=dict(data.get("autoscaling", {})),
            name=name or data.get("name", ""),
        )

    @classmethod
    def load(cls, path: str) -> "Curve":
        with open(path) as f:
            return cls.from_dict(json.load(f), name=path.rsplit("/", 1)[-1].removesuffix(".json"))

    def throughput(self, n: int) -> float:
        """True throughput at world size n (linear interpolation, flat past the last point)."""
        return interpolate_throughput(self.points, n)

    @property
    def placeable_max(self) -> int:
        return min(self.max, self.capacity) if self.capacity is not None else self.max

    def spec(self, settings: Optional[dict] = None) -> LeptonJobSpec:
        """The LeptonJob spec the simulated job would have (autoscaling on)."""
        auto = {"enabled": True, **self.autoscaling, **(settings or {})}
        workers = {"min": self.min, "max": self.max}
        if self.initial is not None:
            workers["initial"] = int(self.initial)
        return LeptonJobSpec.model_validate({"workers": workers, "autoscaling": auto})


def oracle(curve: Curve) -> tuple[int, float]:
    """The best fixed size in hindsight and its completion time (start cost included)."""
    best = min(
        range(curve.min, curve.placeable_max + 1),
        key=lambda n: curve.restart_seconds + curve.total_samples / max(curve.throughput(n), 1e-12),
    )
    return best, curve.restart_seconds + curve.total_samples / max(curve.throughput(best), 1e-12)


# A policy here: (observations, spec, state, now, measured) -> (target size, reason).
PolicyFn = Callable[[list[Observation], LeptonJobSpec, ScalingState, datetime, Optional[float]], int]


def lepton_policy(observations, spec, state, now, measured) -> tuple[int, str]:
    d = decide(observations, spec, state, now)
    return d.target, d.reason


def fixed_policy(size: int) -> PolicyFn:
    return lambda observations, spec, state, now, measured: (state.world_size, "Fixed")


def hpa_policy(curve: Curve) -> PolicyFn:
    """An HPA on a per-pod throughput metric: desired = ceil(n * per_pod / target)."""
    target = HPA_TARGET_FRACTION * curve.throughput(curve.min) / curve.min
    recommendations: list[tuple[datetime, int]] = []

    def policy(observations, spec, state, now, measured) -> tuple[int, str]:
        n = state.world_size
        if measured is None:  # no metric: the HPA keeps the current size
            return n, "NoMetric"
        ratio = (measured / n) / target
        desired = n if abs(ratio - 1) <= HPA_TOLERANCE else math.ceil(n * ratio)
        desired = max(spec.workers.min, min(spec.workers.max, desired))
        recommendations.append((now, desired))
        window = now - timedelta(seconds=HPA_DOWNSCALE_STABILISATION_SECONDS)
        recommendations[:] = [(t, d) for t, d in recommendations if t >= window]
        if desired < n:  # scale down only to the highest recommendation of the window
            desired = min(n, max(d for _, d in recommendations))
        return desired, "HPA"

    return policy


CURVE_POLICIES = "allocator (default), per-job (alias lepton), static, hpa, or fixed:N"


def simulate(
    curve: Curve,
    policy: str = "allocator",
    seed: int = 0,
    settings: Optional[dict] = None,
    max_seconds: float = 30 * 24 * 3600,
) -> dict:
    """Run the job to completion under `policy` (see `CURVE_POLICIES`); return the result."""
    if policy == "allocator":
        return simulate_allocator(curve, seed, settings, max_seconds)
    spec = curve.spec(settings)
    auto = spec.autoscaling
    rng = random.Random(seed)
    if policy in ("lepton", "per-job"):
        fn = lepton_policy
        size = spec.initial_workers
    elif policy == "static":  # what a user has without autoscaling: `initial` to the end
        size = spec.initial_workers
        fn = fixed_policy(size)
    elif policy == "hpa":
        fn = hpa_policy(curve)
        size = spec.initial_workers
    elif policy.startswith("fixed:"):
        size = int(policy.split(":", 1)[1])
        fn = fixed_policy(size)
    else:
        raise ValueError(f"unknown policy {policy!r}: use {CURVE_POLICIES}")
    size = min(size, curve.placeable_max)

    interval = float(auto.interval_seconds)
    t = 0.0
    gen_start = curve.restart_seconds  # the first generation starts after the start cost
    done = 0.0
    rescales: list[RescaleEvent] = []
    observations: dict[int, Observation] = {}
    gen_samples: list[float] = []
    backoff_until: Optional[float] = None
    failed_size: Optional[int] = None
    capacity_failures = 0
    trajectory = [[0.0, size]]
    finish = None

    while finish is None:
        if t > max_seconds:
            raise RuntimeError(f"job did not finish in {max_seconds} s of simulated time")
        t_next = t + interval
        rate = curve.throughput(size)
        run_from = max(t, gen_start)
        if t_next > run_from and rate > 0:
            if done + rate * (t_next - run_from) >= curve.total_samples:
                finish = run_from + (curve.total_samples - done) / rate
                break
            done += rate * (t_next - run_from)
        t = t_next
        now = EPOCH + timedelta(seconds=t)

        # Measure like the operator: after warm-up, averaged over this generation.
        warm_end = gen_start + auto.warmup_seconds
        measured = None
        if t - interval >= warm_end:
            gen_samples.append(rate * (1 + rng.uniform(-curve.noise, curve.noise)))
        if gen_samples and t - warm_end >= auto.window_seconds:
            measured = sum(gen_samples) / len(gen_samples)
            observations[size] = Observation(world_size=size, throughput=measured, measured_at=now)

        state = ScalingState(
            world_size=size,
            generation_start=EPOCH + timedelta(seconds=gen_start),
            rescales=tuple(rescales),
            backoff_until=EPOCH + timedelta(seconds=backoff_until) if backoff_until is not None else None,
            capacity_failed_size=failed_size,
        )
        target, reason = fn(list(observations.values()), spec, state, now, measured)
        if target == size:
            continue
        if target > curve.placeable_max:
            # The operator waits for the added workers to be scheduled, gives up after the
            # capacity timeout, leaves the running generation alone, and backs off.
            capacity_failures += 1
            failed_size = target
            backoff_until = t + auto.capacity_timeout_seconds + auto.capacity_backoff_seconds
            continue
        rescales.append(RescaleEvent(now, curve.restart_seconds, from_size=size, to_size=target, reason=reason))
        size = target
        gen_start = t + curve.restart_seconds
        gen_samples = []
        trajectory.append([t, size])

    best, best_seconds = oracle(curve)
    return {
        "curve": curve.name,
        "policy": policy,
        "seed": seed,
        "completion_seconds": round(finish, 1),
        "oracle_completion_seconds": round(best_seconds, 1),
        "oracle_size": best,
        "ratio_to_oracle": round(finish / best_seconds, 4),
        "rescales": len(rescales),
        "capacity_failures": capacity_failures,
        "final_size": size,
        "trajectory": trajectory,
    }


def curve_trace(curve: Curve, settings: Optional[dict] = None) -> Trace:
    """The one-job trace of a curve: one GPU per worker, `capacity` (else `max`) GPUs."""
    auto = {**curve.autoscaling, **(settings or {})}
    interval = float(auto.pop("intervalSeconds", DEFAULT_INTERVAL_SECONDS))
    auto.pop("enabled", None)
    job = {
        "name": curve.name or "job",
        "arrival_seconds": 0,
        "gpus_per_worker": 1,
        "min": curve.min,
        "max": curve.max,
        "initial": int(curve.initial) if curve.initial is not None else curve.min,
        "total_samples": curve.total_samples,
        "restart_seconds": curve.restart_seconds,
        "noise": curve.noise,
        "throughput": {str(k): v for k, v in curve.points.items()},
        "autoscaling": auto,
    }
    capacity = int(curve.capacity) if curve.capacity is not None else curve.max
    return Trace.from_dict({"capacity_gpus": capacity, "interval_seconds": interval, "jobs": [job]}, curve.name)


def simulate_allocator(
    curve: Curve, seed: int = 0, settings: Optional[dict] = None, max_seconds: float = 30 * 24 * 3600
) -> dict:
    """The cluster allocator on the curve's one-job trace, reported like `simulate()`."""
    trace = curve_trace(curve, settings)
    result = simulate_trace(trace, "allocator", seed, max_seconds=max_seconds)
    (job,) = result["jobs"].values()
    best, best_seconds = oracle(curve)
    sizes = [size for _, size in job["trajectory"]]
    return {
        "curve": curve.name,
        "policy": "allocator",
        "seed": seed,
        "completion_seconds": job["completion_seconds"],
        "oracle_completion_seconds": round(best_seconds, 1),
        "oracle_size": best,
        "ratio_to_oracle": round(job["completion_seconds"] / best_seconds, 4),
        "rescales": job["rescales"],
        "capacity_failures": 0,  # the allocator never asks for GPUs that are not free
        "final_size": sizes[-1],
        "trajectory": job["trajectory"],
    }


def add_parser(subparsers) -> None:
    """Register `lepton-operator simulate (--curve FILE | --trace FILE) [--policy P] [--seed S]`."""
    parser = subparsers.add_parser(
        "simulate",
        help="simulate autoscaling on a throughput curve, or a cluster's jobs on a trace (JSON result)",
        description=(
            "--curve: run one job's autoscaling on a throughput curve and compare with the best fixed size. "
            "--trace: run a cluster's jobs under the allocator, the per-job policy or static sizes."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--curve", help="curve JSON file (see lepton_operator.scaling.simulate)")
    source.add_argument("--trace", help="trace JSON file (see lepton_operator.scaling.tracesim)")
    parser.add_argument(
        "--policy",
        default="allocator",
        help=f"--curve: {CURVE_POLICIES}; --trace: allocator (default), per-job or static",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the measurement noise")
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    """Handler of `lepton-operator simulate`: print the simulation result as JSON (exit 2 on bad
    input, 1 when the policy over-allocated or left the cluster idle with jobs waiting)."""
    if args.trace is not None:
        try:
            if args.policy not in POLICIES:
                raise TraceError(f"unknown policy {args.policy!r}: use {', '.join(POLICIES)}")
            trace = Trace.load(args.trace)
        except TraceError as exc:
            print(f"simulate: {exc}", file=sys.stderr)
            return 2
        try:
            result = simulate_trace(trace, args.policy, args.seed)
        except RuntimeError as exc:  # the policy broke the rules (CapacityExceeded) or never started a job
            print(f"simulate: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(result))
        return 0
    try:
        result = simulate(Curve.load(args.curve), policy=args.policy, seed=args.seed)
    except (OSError, ValueError, KeyError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Standalone entry point (`python -m lepton_operator.scaling.simulate ...`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="lepton-operator")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
