"""A discrete-event simulator of many training jobs sharing a cluster's GPUs.

`simulate_trace(trace, policy, seed)` plays a trace of job arrivals on a cluster of
`capacity_gpus` GPUs under one of three policies and returns the average and p95 job
completion time (JCT, completion minus arrival), the makespan, the GPU utilisation and
the rescales:

- `allocator`: the operator's cluster allocator (`scaling.allocator.allocate`), called
  every `interval_seconds` and on every arrival and completion, with every job's state
  built the way the operator builds it (noisy measurements, remaining samples, measured
  restart cost, busy while restarting, settled once measured since its generation began,
  `requested` = `spec.workers.replicas`, where the operator writes the allocator's
  target, else `initial`). Its answer is applied at once:
  shrinks first (they free their GPUs immediately here), then grows and admissions.
- `per-job`: each job under the single-job autoscaling policy (`scaling.policy.decide`,
  as in `simulate --curve`) at every interval, with first-come capacity: queued jobs
  start at `initial` in arrival order when they fit (strictly first come, first served:
  a job that does not fit holds back the ones behind it); a scale-up that does not fit
  in the free GPUs fails and backs off, as in the single-job simulator.
- `static`: what a user has without the product: every job runs at `initial` from
  admission to the end; queued jobs are admitted in (priority, arrival) order whenever
  their `initial` workers fit, and a later job that fits starts while an earlier waits.

Every start and every size change costs the job `restart_seconds` of zero throughput
while its GPUs stay allocated (a size change of a running job is a rescale; its first
start is not). Each job's true throughput is its `throughput` curve, interpolated like
`simulate --curve` does (`interpolate_throughput`, behind `Curve.throughput`: linear
between sizes, flat past the largest); the policies see only measurements of it, taken like the operator and the
single-job simulator take them: at every interval, once the generation is past its
warm-up, a sample with uniform +/- `noise`; once a rate window has passed, the mean of
the generation's samples is a measurement (`window_seconds`: the seconds it covers).
The allocator gets every measurement, one per interval per generation: the
`MAX_MEASUREMENTS` most recent and the latest at every other size, as the operator's
status keeps them; the restart cost it is told is the operator's default until the
job's first rescale is over, then the trace's. After every policy step the simulator
checks that the GPUs allocated do not exceed the capacity (`CapacityExceeded`, a
RuntimeError).

The result (`simulate --trace` prints it as JSON): `avg_jct_seconds`,
`p95_jct_seconds` (JCT: completion minus arrival), `makespan_seconds` (first arrival to
last completion), `gpu_utilization` (GPU-seconds allocated, restarts included, over
capacity x makespan), `rescales`, and `jobs`: name -> `arrival_seconds`,
`start_seconds`, `completion_seconds`, `jct_seconds`, `rescales`, `capacity_failures`
(per-job's scale-ups that did not fit) and `trajectory` ([time, workers] at every
change).

A trace file is JSON:

    {"capacity_gpus": 32,
     "interval_seconds": 30,                     optional: the allocator's interval
     "jobs": [{"name": "a", "arrival_seconds": 0, "gpus_per_worker": 2,
               "min": 1, "max": 16, "initial": 2, "priority": 0,
               "total_samples": 5000000, "restart_seconds": 30, "noise": 0.05,
               "throughput": {"1": 100, "2": 185, "4": 330, "8": 420},
               "step": 1,                        optional (default 1)
               "efficiency_threshold": 0.1,      optional floor (default: the spec's)
               "elastic": true,                  optional; false: fixed at `initial`
               "autoscaling": {...}}]}           optional spec.autoscaling overrides

`priority` (higher first), `noise` (0) and `initial` (`min`) may be left out;
`description` is allowed anywhere and ignored. A bad trace raises `TraceError` (a
ValueError with a one-line message).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional, Sequence

from pydantic import ValidationError

from lepton_operator.api.models import LeptonJobSpec, Observation
from lepton_operator.scaling.allocator import Allocation, Capacity, JobState, Settings, allocate
from lepton_operator.scaling.policy import DEFAULT_RESTART_SECONDS, RescaleEvent, ScalingState, decide
from lepton_operator.scaling.throughput import Measurement

# The simulated clock's zero, where a policy wants datetimes.
EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)
POLICIES = ("allocator", "per-job", "static")
# Measurements a job keeps for the allocator (one per interval per generation): this many
# of the most recent, and the latest at every world size (the operator's OBSERVATION_HISTORY).
MAX_MEASUREMENTS = 32
# The allocator may leave an idle cluster's queue waiting this many steps before the
# simulator calls it stuck.
STALL_STEPS = 20
DEFAULT_INTERVAL_SECONDS = 30.0
# Seconds after which a job's ETA counts as reached (float rounding of the progress sums).
EPSILON_SECONDS = 1e-6

AllocateFn = Callable[[Sequence[JobState], Capacity, float, Settings], dict[str, Allocation]]


def interpolate_throughput(points: dict[int, float], n: int) -> float:
    """True throughput at world size n from a curve: linear between the given sizes, flat
    past the largest, linear from zero below the smallest."""
    xs = sorted(points)
    if n <= xs[0]:
        return points[xs[0]] * n / xs[0]
    if n >= xs[-1]:
        return points[xs[-1]]
    for a, b in itertools.pairwise(xs):
        if a <= n <= b:
            return points[a] + (points[b] - points[a]) * (n - a) / (b - a)
    raise AssertionError("unreachable")


class TraceError(ValueError):
    """The trace is invalid; the message is one line that says where and why."""


class CapacityExceeded(RuntimeError):
    """A policy allocated more GPUs than the cluster has."""


# ------------------------------------------------------------------------- the trace

_JOB_FIELDS = {
    "name",
    "arrival_seconds",
    "gpus_per_worker",
    "min",
    "max",
    "initial",
    "priority",
    "total_samples",
    "restart_seconds",
    "noise",
    "throughput",
    "step",
    "efficiency_threshold",
    "elastic",
    "autoscaling",
    "description",
}
_TRACE_FIELDS = {"capacity_gpus", "interval_seconds", "jobs", "name", "description"}
_MISSING = object()


def _number(data: dict, key: str, where: str, *, integer: bool = False, positive: bool = False, default=_MISSING):
    """data[key] as a finite, non-negative number (an int when `integer`)."""
    if key not in data:
        if default is _MISSING:
            raise TraceError(f"{where}: missing field {key!r}")
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TraceError(f"{where}: {key} must be a number, got {value!r}")
    if integer and value != int(value):
        raise TraceError(f"{where}: {key} must be a whole number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise TraceError(f"{where}: {key} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class TraceJob:
    """One job of a trace, validated."""

    name: str
    arrival_seconds: float
    gpus_per_worker: int
    min: int
    max: int
    initial: int
    total_samples: float
    restart_seconds: float
    throughput: dict[int, float]
    priority: int = 0
    noise: float = 0.0
    step: Optional[int] = None
    """Given explicitly (else autoscaling.step, else 1)."""
    efficiency_threshold: Optional[float] = None
    elastic: bool = True
    autoscaling: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, index: int, capacity_gpus: int) -> "TraceJob":
        if not isinstance(data, dict):
            raise TraceError(f"jobs[{index}]: must be an object, got {type(data).__name__}")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise TraceError(f"jobs[{index}]: missing field 'name' (a non-empty string)")
        where = f"job {name!r}"
        unknown = sorted(set(data) - _JOB_FIELDS)
        if unknown:
            raise TraceError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_JOB_FIELDS))})")
        lo = _number(data, "min", where, integer=True, positive=True)
        hi = _number(data, "max", where, integer=True, positive=True)
        if lo > hi:
            raise TraceError(f"{where}: min ({lo}) > max ({hi})")
        initial = _number(data, "initial", where, integer=True, positive=True, default=lo)
        if not lo <= initial <= hi:
            raise TraceError(f"{where}: initial ({initial}) is outside [min, max] = [{lo}, {hi}]")
        gpw = _number(data, "gpus_per_worker", where, integer=True, positive=True)
        if gpw * lo > capacity_gpus:
            raise TraceError(
                f"{where}: gpus_per_worker x min = {gpw} x {lo} = {gpw * lo} GPUs > capacity_gpus ({capacity_gpus})"
            )
        if gpw * initial > capacity_gpus:
            raise TraceError(
                f"{where}: gpus_per_worker x initial = {gpw} x {initial} = {gpw * initial} GPUs "
                f"> capacity_gpus ({capacity_gpus})"
            )
        points = data.get("throughput", _MISSING)
        if points is _MISSING:
            raise TraceError(f"{where}: missing field 'throughput'")
        if not isinstance(points, dict) or not points:
            raise TraceError(f"{where}: throughput must be a non-empty object of world size -> samples/s")
        curve: dict[int, float] = {}
        for k in points:
            if not (isinstance(k, str) and k.isdigit() and int(k) >= 1):
                raise TraceError(f"{where}: throughput key {k!r} is not a world size (a positive whole number)")
            curve[int(k)] = _number(points, k, f"{where}: throughput", positive=True)
        noise = _number(data, "noise", where, default=0.0)
        if noise >= 1:
            raise TraceError(f"{where}: noise must be below 1 (a fraction), got {noise!r}")
        eff = _number(data, "efficiency_threshold", where, default=None)
        if eff is not None and eff > 1:
            raise TraceError(f"{where}: efficiency_threshold must be in [0, 1], got {eff!r}")
        elastic = data.get("elastic", True)
        if not isinstance(elastic, bool):
            raise TraceError(f"{where}: elastic must be true or false, got {elastic!r}")
        auto = data.get("autoscaling", {})
        if not isinstance(auto, dict):
            raise TraceError(f"{where}: autoscaling must be an object of spec.autoscaling fields")
        if "intervalSeconds" in auto or "enabled" in auto:
            raise TraceError(
                f"{where}: autoscaling.intervalSeconds/enabled are not per job here "
                "(use the trace's interval_seconds and the job's elastic)"
            )
        job = cls(
            name=name,
            arrival_seconds=_number(data, "arrival_seconds", where),
            gpus_per_worker=gpw,
            min=lo,
            max=hi,
            initial=initial,
            total_samples=_number(data, "total_samples", where, positive=True),
            restart_seconds=_number(data, "restart_seconds", where),
            throughput=curve,
            priority=_number(data, "priority", where, integer=True, default=0),
            noise=noise,
            step=_number(data, "step", where, integer=True, positive=True, default=None),
            efficiency_threshold=eff,
            elastic=elastic,
            autoscaling=dict(auto),
        )
        job.spec(DEFAULT_INTERVAL_SECONDS)  # the overrides must make a valid spec
        return job

    def spec(self, interval_seconds: float) -> LeptonJobSpec:
        """The LeptonJob spec of this job (what the per-job policy and the floor read)."""
        auto = {**self.autoscaling, "enabled": self.elastic, "intervalSeconds": int(round(interval_seconds))}
        if self.step is not None:
            auto["step"] = self.step
        if self.efficiency_threshold is not None:
            auto["efficiencyThreshold"] = self.efficiency_threshold
        try:
            return LeptonJobSpec.model_validate(
                {"workers": {"min": self.min, "max": self.max, "initial": self.initial}, "autoscaling": auto}
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise TraceError(f"job {self.name!r}: {loc}: {err['msg']}") from None

    def true_throughput(self, n: int) -> float:
        """The hidden truth at n workers (the policies see only noisy measurements of it)."""
        return interpolate_throughput(self.throughput, n)


@dataclass(frozen=True)
class Trace:
    """A cluster and the jobs that arrive on it."""

    capacity_gpus: int
    jobs: tuple[TraceJob, ...]
    interval_seconds: float = DEFAULT_INTERVAL_SECONDS
    name: str = ""

    @classmethod
    def from_dict(cls, data: Any, name: str = "") -> "Trace":
        if not isinstance(data, dict):
            raise TraceError("the trace must be a JSON object with capacity_gpus and jobs")
        unknown = sorted(set(data) - _TRACE_FIELDS)
        if unknown:
            raise TraceError(f"unknown trace field {unknown[0]!r} (known: {', '.join(sorted(_TRACE_FIELDS))})")
        capacity = _number(data, "capacity_gpus", "trace", integer=True, positive=True)
        interval = _number(data, "interval_seconds", "trace", positive=True, default=DEFAULT_INTERVAL_SECONDS)
        if not 5 <= interval <= 3600:
            raise TraceError(
                f"trace: interval_seconds must be in [5, 3600] (spec.autoscaling.intervalSeconds), got {interval:g}"
            )
        jobs = data.get("jobs")
        if not isinstance(jobs, list) or not jobs:
            raise TraceError("trace: jobs must be a non-empty list")
        parsed = tuple(TraceJob.from_dict(j, i, capacity) for i, j in enumerate(jobs))
        seen: set[str] = set()
        for job in parsed:
            if job.name in seen:
                raise TraceError(f"job {job.name!r}: the name appears twice")
            seen.add(job.name)
        return cls(capacity, parsed, interval, name or str(data.get("name", "")))

    @classmethod
    def load(cls, path: str) -> "Trace":
        """Read and validate a trace file; every problem is a one-line `TraceError` naming the file."""
        try:
            with open(path) as f:
                data = json.load(f)
            return cls.from_dict(data, name=path.rsplit("/", 1)[-1].removesuffix(".json"))
        except OSError as exc:
            raise TraceError(f"{path}: {exc.strerror or exc}") from None
        except ValueError as exc:  # TraceError, JSONDecodeError
            raise TraceError(f"{path}: {exc}") from None


def best_fixed_seconds(job: TraceJob, capacity_gpus: int) -> tuple[int, float]:
    """The best fixed size of a job alone on the cluster in hindsight, and its completion time."""
    top = max(job.min, min(job.max, capacity_gpus // job.gpus_per_worker))
    best = min(range(job.min, top + 1), key=lambda n: job.total_samples / job.true_throughput(n))
    return best, job.restart_seconds + job.total_samples / job.true_throughput(best)


# ------------------------------------------------------------------------ simulation


class _Run:
    """A job's simulated life: its size, generation, progress and what was measured."""

    def __init__(self, job: TraceJob, index: int, seed: int, interval: float):
        self.job = job
        self.index = index
        # spec.workers.replicas: the operator writes the allocator's target there (0: `initial`).
        self.replicas = 0
        self.spec = job.spec(interval)
        self.auto = self.spec.autoscaling
        self.floor = self.auto.efficiency_threshold
        self._rates: dict[int, float] = {}
        # Seeded by job name, so that a job's noise does not depend on the others or the policy.
        self.rng = random.Random(f"{seed}/{job.name}")
        self.arrived = False
        self.started_at: Optional[float] = None
        self.completed_at: Optional[float] = None
        self.size = 0  # 0: not running
        self.generation = 0
        self.gen_start = 0.0
        self.gen_samples: list[float] = []
        self.gen_measured = False
        # [generation, world size, throughput, measured at, window seconds]
        self.measurements: list[tuple[int, int, float, float, float]] = []
        self.done = 0.0
        self.rescales = 0
        self.restart_observed_at: Optional[float] = None
        self.trajectory: list[list[float]] = []
        # The per-job policy's memory (as the operator's status keeps it).
        self.observations: dict[int, Observation] = {}
        self.events: list[RescaleEvent] = []
        self.backoff_until: Optional[float] = None
        self.failed_size: Optional[int] = None
        self.capacity_failures = 0

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def gpus(self) -> int:
        return self.size * self.job.gpus_per_worker

    @property
    def waiting(self) -> bool:
        return self.arrived and self.completed_at is None and self.size == 0

    def rate(self) -> float:
        if self.size not in self._rates:
            self._rates[self.size] = self.job.true_throughput(self.size) if self.size > 0 else 0.0
        return self._rates[self.size]

    def eta(self, now: float) -> float:
        """When the job finishes if nothing changes."""
        rate = self.rate()
        if rate <= 0:
            return math.inf
        return max(now, self.gen_start) + max(0.0, self.job.total_samples - self.done) / rate

    def advance(self, t0: float, t1: float) -> None:
        run_from = max(t0, self.gen_start)
        if self.size > 0 and t1 > run_from:
            self.done = min(self.job.total_samples, self.done + self.rate() * (t1 - run_from))

    def new_generation(self, size: int, now: float) -> None:
        self.size = size
        self.generation += 1
        self.gen_start = now + self.job.restart_seconds
        self.gen_samples = []
        self.gen_measured = False
        self.trajectory.append([round(now, 1), size])

    def measure(self, now: float, interval: float, per_job: bool) -> None:
        """The operator's measurement at an interval tick: after warm-up, the mean over the generation."""
        warm_end = self.gen_start + self.auto.warmup_seconds
        if now - interval >= warm_end:
            self.gen_samples.append(self.rate() * (1 + self.rng.uniform(-self.job.noise, self.job.noise)))
        if not self.gen_samples or now - warm_end < self.auto.window_seconds:
            return
        mean = sum(self.gen_samples) / len(self.gen_samples)
        self.gen_measured = True
        self.measurements.append((self.generation, self.size, mean, now, len(self.gen_samples) * interval))
        if len(self.measurements) > MAX_MEASUREMENTS:
            self._bound_measurements()
        if per_job:
            self.observations[self.size] = Observation(
                world_size=self.size, throughput=mean, measured_at=EPOCH + timedelta(seconds=now)
            )

    def _bound_measurements(self) -> None:
        # As the operator's status keeps them (`reconcile.autoscaling.record_observation`): the
        # most recent ones and the latest at every world size, so that a long generation never
        # pushes out the other sizes measured.
        latest = {m[1]: i for i, m in enumerate(self.measurements)}
        cut = len(self.measurements) - MAX_MEASUREMENTS
        self.measurements = [m for i, m in enumerate(self.measurements) if i >= cut or latest[m[1]] == i]

    def restart_estimate(self, now: float) -> float:
        """The restart cost the operator knows: measured after the first rescale, else its default."""
        if self.restart_observed_at is not None and now >= self.restart_observed_at:
            return self.job.restart_seconds
        return DEFAULT_RESTART_SECONDS

    def job_state(self, now: float) -> JobState:
        job = self.job
        return JobState(
            key=job.name,
            min=job.min,
            max=job.max,
            step=self.auto.step,
            gpus_per_worker=job.gpus_per_worker,
            priority=job.priority,
            created=job.arrival_seconds,
            elastic=job.elastic,
            requested=self.replicas or job.initial,
            initial=job.initial,
            admitted=self.size > 0,
            current=self.size,
            held_gpus=self.gpus,
            # As the operator: busy while the rescale (or start) is under way, settled once the
            # generation has been measured at its size (after warm-up and a rate window).
            busy=self.size > 0 and now < self.gen_start,
            settled=self.gen_measured,
            measurements=tuple(
                Measurement(world_size=n, throughput=x, age_seconds=now - at, window_seconds=w)
                for _, n, x, at, w in self.measurements
            ),
            remaining_samples=max(0.0, job.total_samples - self.done),
            restart_seconds=self.restart_estimate(now),
            floor=self.floor,
            queued_since=job.arrival_seconds,
        )


class _Simulation:
    def __init__(
        self,
        trace: Trace,
        policy: str,
        seed: int,
        allocate_fn: Optional[AllocateFn],
        settings: Settings,
        max_seconds: float,
    ):
        if policy not in POLICIES:
            raise TraceError(f"unknown policy {policy!r}: use {', '.join(POLICIES)}")
        self.trace = trace
        self.policy = policy
        self.seed = seed
        self.allocate = allocate_fn or allocate
        self.settings = settings
        self.max_seconds = max_seconds
        self.interval = trace.interval_seconds
        self.capacity = trace.capacity_gpus
        self.runs = [_Run(job, i, seed, self.interval) for i, job in enumerate(trace.jobs)]
        self.gpu_seconds = 0.0
        self.idle_steps = 0

    # ------------------------------------------------------------------ mechanics

    def free_gpus(self) -> int:
        return self.capacity - sum(r.gpus for r in self.runs)

    def check_capacity(self, now: float) -> None:
        held = sum(r.gpus for r in self.runs)
        if held > self.capacity:
            detail = ", ".join(f"{r.name}={r.gpus}" for r in self.runs if r.gpus)
            raise CapacityExceeded(
                f"{self.policy}: {held} GPUs allocated at t={now:.1f} s > capacity {self.capacity} ({detail})"
            )

    def start(self, run: _Run, size: int, now: float) -> None:
        if run.started_at is None:
            run.started_at = now
        run.new_generation(size, now)

    def resize(self, run: _Run, size: int, now: float, reason: str) -> None:
        """A size change of a running job (0: stopped, back to the queue); it costs a restart."""
        if size == run.size:
            return
        run.events.append(
            RescaleEvent(
                EPOCH + timedelta(seconds=now), run.job.restart_seconds, from_size=run.size, to_size=size, reason=reason
            )
        )
        run.rescales += 1
        if size == 0:
            run.size = 0
            run.trajectory.append([round(now, 1), 0])
            return
        if run.restart_observed_at is None:
            run.restart_observed_at = now + run.job.restart_seconds
        run.new_generation(size, now)

    # ------------------------------------------------------------------- policies

    def step(self, now: float, tick: bool, events: bool) -> None:
        if self.policy == "static":
            if events:
                self.admit_backfill(now)
        elif self.policy == "per-job":
            self.step_per_job(now, tick)
        else:
            self.step_allocator(now)
        self.check_capacity(now)

    def admit_backfill(self, now: float) -> None:
        """Static: in (priority, arrival) order, every waiting job whose `initial` fits starts."""
        free = self.free_gpus()
        for run in sorted(
            (r for r in self.runs if r.waiting), key=lambda r: (-r.job.priority, r.job.arrival_seconds, r.index)
        ):
            need = run.job.initial * run.job.gpus_per_worker
            if need <= free:
                self.start(run, run.job.initial, now)
                free -= need

    def admit_fcfs(self, now: float) -> None:
        """Per-job: waiting jobs start at `initial` in arrival order while the first one fits."""
        free = self.free_gpus()
        for run in sorted((r for r in self.runs if r.waiting), key=lambda r: (r.job.arrival_seconds, r.index)):
            need = run.job.initial * run.job.gpus_per_worker
            if need > free:
                return
            self.start(run, run.job.initial, now)
            free -= need

    def step_per_job(self, now: float, tick: bool) -> None:
        self.admit_fcfs(now)
        if not tick:
            return
        when = EPOCH + timedelta(seconds=now)
        for run in self.runs:
            if run.size == 0 or not run.job.elastic:
                continue
            state = ScalingState(
                world_size=run.size,
                generation_start=EPOCH + timedelta(seconds=run.gen_start),
                rescales=tuple(run.events),
                backoff_until=EPOCH + timedelta(seconds=run.backoff_until) if run.backoff_until is not None else None,
                capacity_failed_size=run.failed_size,
            )
            decision = decide(list(run.observations.values()), run.spec, state, when)
            target = decision.target
            if target == run.size:
                continue
            if target > run.size and (target - run.size) * run.job.gpus_per_worker > self.free_gpus():
                # As in the single-job simulator: the added workers are not scheduled, the
                # scale-up is abandoned after the capacity timeout, and the job backs off.
                run.capacity_failures += 1
                run.failed_size = target
                run.backoff_until = now + run.auto.capacity_timeout_seconds + run.auto.capacity_backoff_seconds
                continue
            self.resize(run, target, now, decision.reason)
        self.admit_fcfs(now)

    def step_allocator(self, now: float) -> None:
        runs = [r for r in self.runs if r.arrived and r.completed_at is None]
        if not runs:
            return
        answer = self.allocate([r.job_state(now) for r in runs], Capacity(total=self.capacity), now, self.settings)
        grows: list[tuple[_Run, int, str]] = []
        for run in runs:
            alloc = answer.get(run.name)
            if alloc is None:
                continue
            target = alloc.target if alloc.admitted else 0
            if target:
                run.replicas = target  # what the operator's allocation pass writes
            if target and not run.job.min <= target <= run.job.max:
                raise RuntimeError(
                    f"allocator: job {run.name!r} target {target} is outside [min, max] = "
                    f"[{run.job.min}, {run.job.max}] ({alloc.reason}: {alloc.message})"
                )
            if run.size and target < run.size:
                self.resize(run, target, now, alloc.reason)  # shrinks free their GPUs at once
            elif target > run.size:
                grows.append((run, target, alloc.reason))
        for run, target, reason in grows:
            if run.size == 0:
                self.start(run, target, now)
            else:
                self.resize(run, target, now, reason)

    # ----------------------------------------------------------------------- loop

    def run(self) -> dict:
        arrivals = sorted(self.runs, key=lambda r: (r.job.arrival_seconds, r.index))
        next_arrival = 0
        tick = 1
        t = 0.0
        unfinished = len(self.runs)
        while unfinished:
            running = [r for r in self.runs if r.size > 0]
            t_arrival = arrivals[next_arrival].job.arrival_seconds if next_arrival < len(arrivals) else math.inf
            t_tick = tick * self.interval
            t_eta = min((r.eta(t) for r in running), default=math.inf)
            t_next = max(t, min(t_arrival, t_tick, t_eta))
            if t_next > self.max_seconds:
                waiting = [r.name for r in self.runs if r.waiting]
                raise RuntimeError(
                    f"{self.policy}: jobs unfinished after {self.max_seconds:.0f} s of simulated time "
                    f"(waiting: {', '.join(waiting) or 'none'})"
                )
            for r in running:
                r.advance(t, t_next)
            self.gpu_seconds += sum(r.gpus for r in running) * (t_next - t)
            t = t_next
            events = False
            for r in running:
                if r.eta(t) <= t + EPSILON_SECONDS:
                    r.done = r.job.total_samples
                    r.completed_at = t
                    r.size = 0
                    unfinished -= 1
                    events = True
            while next_arrival < len(arrivals) and arrivals[next_arrival].job.arrival_seconds <= t:
                arrivals[next_arrival].arrived = True
                next_arrival += 1
                events = True
            at_tick = t_tick <= t
            if at_tick:
                tick += 1
                for r in self.runs:
                    if r.size > 0:
                        r.measure(t, self.interval, per_job=self.policy == "per-job")
            if unfinished and (events or at_tick):
                self.step(t, at_tick, events)
                self.check_stall(t, next_arrival < len(arrivals))
        return self.result()

    def check_stall(self, now: float, more_arrivals: bool) -> None:
        if any(r.size > 0 for r in self.runs) or more_arrivals:
            self.idle_steps = 0
            return
        self.idle_steps += 1
        if self.idle_steps > STALL_STEPS:
            waiting = ", ".join(r.name for r in self.runs if r.waiting)
            raise RuntimeError(f"{self.policy}: the cluster is idle at t={now:.0f} s and {waiting} never start")

    def result(self) -> dict:
        jcts = sorted(r.completed_at - r.job.arrival_seconds for r in self.runs)
        first = min(r.job.arrival_seconds for r in self.runs)
        makespan = max(r.completed_at for r in self.runs) - first
        return {
            "trace": self.trace.name,
            "policy": self.policy,
            "seed": self.seed,
            "capacity_gpus": self.capacity,
            "avg_jct_seconds": round(sum(jcts) / len(jcts), 1),
            "p95_jct_seconds": round(percentile(jcts, 0.95), 1),
            "makespan_seconds": round(makespan, 1),
            "gpu_utilization": round(self.gpu_seconds / (self.capacity * makespan), 4) if makespan > 0 else 0.0,
            "rescales": sum(r.rescales for r in self.runs),
            "jobs": {
                r.name: {
                    "arrival_seconds": r.job.arrival_seconds,
                    "start_seconds": round(r.started_at, 1),
                    "completion_seconds": round(r.completed_at, 1),
                    "jct_seconds": round(r.completed_at - r.job.arrival_seconds, 1),
                    "rescales": r.rescales,
                    "capacity_failures": r.capacity_failures,
                    "trajectory": r.trajectory,
                }
                for r in self.runs
            },
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile of values, linearly interpolated between the closest ranks."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def simulate_trace(
    trace: Trace,
    policy: str = "allocator",
    seed: int = 0,
    *,
    allocate_fn: Optional[AllocateFn] = None,
    settings: Optional[Settings] = None,
    max_seconds: float = 365 * 24 * 3600,
) -> dict:
    """Play `trace` under `policy` (allocator, per-job or static) to the last completion; the JSON result.

    `allocate_fn` replaces `allocate` (tests inject a bad allocator); `settings` are the
    allocator's knobs (default: its defaults, as the operator runs it).
    """
    return _Simulation(trace, policy, seed, allocate_fn, settings or Settings(), max_seconds).run()
