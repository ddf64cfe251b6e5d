"""The cluster GPU allocator: one allocation of GPUs across every LeptonJob (pure, no I/O).

`allocate(jobs, capacity, now, settings)` takes every managed job (`JobState`: bounds,
priority, size now, GPUs its pods hold now, measurements, remaining work, restart cost)
and the cluster's GPU capacity, and returns an `Allocation` per job: admitted or queued
(with its place in the queue), the target worker count, and why, with numbers.

What it optimises: the predicted average completion time of the admitted jobs. Each
spare worker goes where it raises a job's completion rate (throughput / remaining
samples) the most per GPU, subject to, in this order of precedence:

1. gang admission: a queued job is admitted, in (priority, creation time) order, only when
   its `min` workers fit, possibly after shrinking admitted elastic jobs of no higher
   priority toward (never below) their `min`; until then it holds no GPUs;
2. priority: a higher-priority job's useful steps are served before a lower one's;
3. `min`, `max`, `step` and the capacity (of the whole cluster, and of the node pool a
   job's nodeSelector/tolerations restrict it to);
4. `efficiencyThreshold`, the user's floor on an added worker's marginal efficiency;
5. change costs: a running job is resized only when the completion rate it gains, over its
   remaining time, beats what it and the jobs shrunk for it lose (their completion rates
   while they restart, and while they are smaller), with a hysteresis margin so that noise
   never makes it flap. Ranking and change test weigh the same objective; for a job
   growing alone the test is "it finishes sooner by more than its restart takes".

Shrinks come before the grows they make room for: a grow (or an admission) is released
only when its GPUs are free now, counting the GPUs that shrinking jobs still hold.

The module docstring of each helper says the rule it implements; docs/allocator.md tells
the whole story.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from lepton_operator.api.conditions import (
    REASON_ADMITTED,
    REASON_ALLOCATOR_FIXED,
    REASON_ALLOCATOR_FLOOR,
    REASON_ALLOCATOR_GROW,
    REASON_ALLOCATOR_HOLD,
    REASON_ALLOCATOR_SHRINK,
    REASON_ALLOCATOR_WAITING,
    REASON_NO_MATCHING_NODES,
    REASON_QUEUED,
    REASON_QUEUED_BEHIND,
    REASON_WAITING_FOR_SHRINK,
)
from lepton_operator.scaling.throughput import Measurement, fit_throughput


@dataclass(frozen=True)
class JobState:
    """What the allocator knows about one LeptonJob."""

    key: str
    """namespace/name (or the trace's job name in the simulator)."""
    min: int
    max: int
    step: int = 1
    gpus_per_worker: int = 1
    priority: int = 0
    created: float = 0.0
    """Creation time, seconds on the same clock as `now` (queue order)."""
    elastic: bool = True
    """autoscaling.enabled; a fixed job is admitted at `requested` and never resized."""
    requested: int = 1
    """The size asked for now (spec.workers.replicas, which the allocator writes, else
    initial): a fixed job's size, and an unmeasured elastic job's first size."""
    initial: int = 1
    """The size its user chose (spec.workers.initial, else min). Workers beyond it are
    lent from idle GPUs: a job of the same priority that waits gets them back."""
    admitted: bool = False
    current: int = 0
    """Workers of the running generation (0: queued or not started)."""
    held_gpus: int = 0
    """GPUs requested by the job's pods now, terminating ones included."""
    busy: bool = False
    """A rescale under way (or the job not running): its size is not changed now."""
    settled: bool = True
    """Its current size has been measured since its generation started. An unsettled job
    is not resized by choice (its model may be out of date), only shrunk to admit a job."""
    measurements: tuple[Measurement, ...] = ()
    remaining_samples: Optional[float] = None
    """Samples left to train (None: unknown, treated as long-running)."""
    restart_seconds: float = 60.0
    """Measured downtime of a rescale (or the default before one is measured)."""
    floor: float = 0.0
    """efficiencyThreshold: least marginal efficiency of an added worker."""
    queued_since: Optional[float] = None
    pool: Optional[str] = None
    """The node pool its nodeSelector/tolerations restrict it to (None: any node)."""
    gpu_limit: Optional[int] = None
    """Most GPUs it may grow to (a Pack job: what its largest topology domain has free;
    None: no limit). Never shrinks it below its size now."""


@dataclass(frozen=True)
class Capacity:
    """GPUs the allocator may hand out: in all, and per restricted node pool."""

    total: int
    pools: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    """The allocator's knobs (operator flags; the simulator uses the defaults)."""

    hysteresis: float = 0.1
    """A change must beat its cost by this fraction, and the predicted relative gain must exceed it."""
    horizon_seconds: float = 3600.0
    """How far ahead a gain counts when the job's remaining time is unknown."""
    starvation_seconds: float = 600.0
    """After waiting this long, a queued job reserves: no later job of its priority or
    lower is admitted before it."""
    growth_factor: int = 4
    """A job grows at most to this multiple of its largest measured size per decision."""


@dataclass(frozen=True)
class Allocation:
    """The allocator's answer for one job."""

    key: str
    admitted: bool
    target: int
    """Worker count to run (0 while queued)."""
    reason: str
    """CamelCase reason (conditions, events)."""
    message: str
    queue_position: Optional[int] = None
    """1-based place in the queue while not admitted."""
    predicted_throughput: Optional[float] = None
    """Samples/s expected at `target`."""
    marginal_gain: Optional[float] = None
    """Samples/s the last step of workers at `target` adds (per the model)."""
    why_not_more: str = ""
    why_not_less: str = ""


# A job that does not report its remaining work is treated as running this long more.
LONG_RUNNING_SECONDS = 7 * 24 * 3600.0


@dataclass
class _Step:
    """A job's next step in the greedy: to `to` workers, worth `value` per GPU."""

    job: JobState
    to: int
    value: float
    likely: bool
    """The gain is likely: the prediction's lower bound still beats the current size."""


def _gpu_limit(job: JobState) -> Optional[int]:
    """The GPUs a job may grow to: its limit, but never below what its size now takes."""
    if job.gpu_limit is None:
        return None
    return max(job.gpu_limit, job.current * job.gpus_per_worker)


def queue_order(job: JobState) -> tuple:
    """Admission order: higher priority first, then older first."""
    return (-job.priority, job.created, job.key)


def allocate(
    jobs: Sequence[JobState], capacity: Capacity, now: float, settings: Settings = Settings()
) -> dict[str, Allocation]:
    """One allocation for every job; see the module docstring."""
    return _Pass(jobs, capacity, now, settings).run()


class _Pass:
    """One allocator pass. Steps, in order: admit (gang), ideal sizes (greedy), then the
    changes that pay (shrinks first, grows only into GPUs free now)."""

    def __init__(self, jobs: Sequence[JobState], capacity: Capacity, now: float, settings: Settings):
        self.jobs = sorted(jobs, key=queue_order)
        self.by_key = {j.key: j for j in self.jobs}
        self.capacity = capacity
        self.now = now
        self.settings = settings
        self.models = {j.key: fit_throughput(j.measurements) for j in self.jobs}
        self.why_not_more: dict[str, str] = {}
        self.why_not_less: dict[str, str] = {}
        self.reasons: dict[str, tuple[str, str]] = {}

    # ------------------------------------------------------------------ capacity

    def _fits(self, gpus: dict[str, int]) -> bool:
        """Do these GPUs per job fit the cluster and every node pool?"""
        if sum(gpus.values()) > self.capacity.total:
            return False
        used: dict[str, int] = {}
        for key, n in gpus.items():
            pool = self.by_key[key].pool
            if pool is not None:
                used[pool] = used.get(pool, 0) + n
        return all(n <= self.capacity.pools.get(pool, 0) for pool, n in used.items())

    def _gpus(self, sizes: dict[str, int]) -> dict[str, int]:
        return {k: n * self.by_key[k].gpus_per_worker for k, n in sizes.items()}

    def _fits_now(self, sizes: dict[str, int]) -> bool:
        """Would these sizes fit while every job still holds the GPUs its pods hold now?"""
        gpus = self._gpus(sizes)
        return self._fits({k: max(g, self.by_key[k].held_gpus) for k, g in gpus.items()})

    # ------------------------------------------------------------------ model

    def _throughput(self, job: JobState, n: int) -> Optional[float]:
        model = self.models[job.key]
        return model.predict(n) if model is not None else None

    def _work_left(self, job: JobState) -> Optional[float]:
        """Samples left to train; for a job that does not report it, what it would train
        in LONG_RUNNING_SECONDS at its size now (None: nothing measured)."""
        if job.remaining_samples is not None:
            return max(0.0, job.remaining_samples)
        x = self._throughput(job, max(job.current, job.min))
        return x * LONG_RUNNING_SECONDS if x else None

    def _rate(self, job: JobState, n: int) -> float:
        """Completion rate at n workers: the share of the job's remaining work done per
        second (1 / its predicted remaining time). The allocator maximises their sum."""
        x, left = self._throughput(job, n), self._work_left(job)
        return x / left if x and left else 0.0

    def _lasts(self, job: JobState, n: int) -> float:
        """How long a change to n workers counts: until the job ends (its GPUs then go
        elsewhere), or the settings' horizon when its remaining work is unknown."""
        x = self._throughput(job, n)
        if job.remaining_samples is None or not x:
            return self.settings.horizon_seconds
        return max(0.0, job.remaining_samples) / x

    def _next_step(self, job: JobState, n: int) -> tuple[Optional[_Step], str]:
        """The job's next step up from n workers, or None and why not."""
        to = n + job.step
        if to > job.max:
            return None, f"at max = {job.max}"
        limit = _gpu_limit(job)
        if limit is not None and to * job.gpus_per_worker > limit:
            return None, (
                f"placement Pack: {to} workers x {job.gpus_per_worker} GPUs would not fit one topology domain "
                f"(the largest has room for {limit} GPUs of it)"
            )
        model = self.models[job.key]
        if model is None:
            # Unmeasured: the size its user asked for is the best guess there is; it goes
            # first, then the job is measured there.
            first = max(job.min, min(job.requested, job.max))
            if to <= first:
                return _Step(job, to, math.inf, likely=True), ""
            return None, "no throughput measured yet: it runs at its requested size first"
        ceiling = self.settings.growth_factor * model.sizes[-1]
        if to > ceiling:
            return None, (
                f"grows at most {self.settings.growth_factor}x its largest measured size "
                f"({model.sizes[-1]}) per decision"
            )
        x, x_to = model.predict(n), model.predict(to)
        gain = x_to - x
        if gain <= 0:
            return None, f"{n}->{to} workers: the model predicts no gain ({x:.1f} -> {x_to:.1f} samples/s)"
        efficiency = (gain / job.step) / (x / n)
        if efficiency < job.floor:
            return None, (
                f"{n}->{to} workers: marginal efficiency {efficiency:.2f} < efficiencyThreshold {job.floor:.2f}"
            )
        if job.remaining_samples is not None and job.remaining_samples <= 0:
            return None, "no work left"
        value = (self._rate(job, to) - self._rate(job, n)) / (job.step * max(1, job.gpus_per_worker))  # CPU: per worker
        # Inside the measured sizes the fit is trusted; beyond them the gain must clear the
        # prediction's uncertainty to count as likely (otherwise it is exploration).
        likely = to <= model.sizes[-1] or x_to - model.sigma(to) > x
        return _Step(job, to, value, likely), ""

    # ------------------------------------------------------------------ the pass

    def run(self) -> dict[str, Allocation]:
        floors, queued = self._admit()
        ideal = self._ideal(floors)
        final = self._changes(floors, ideal)
        return self._answers(floors, queued, ideal, final)

    def _floor_size(self, job: JobState, waiting: Optional[JobState] = None) -> int:
        """Workers an admitted job keeps when `waiting` needs room (None: nobody needs it).

        An elastic job gives back, to a job of higher priority, everything above its min;
        to a job of the same priority, the workers it got beyond its user's `initial`
        (lent from idle GPUs), and down to its min only once that job has waited
        `starvation_seconds`."""
        if not job.elastic:
            return max(job.requested, job.min)
        if job.busy or job.current == 0:
            return max(job.requested, job.current, job.min)
        if waiting is None or job.priority > waiting.priority:
            return job.current
        if job.priority < waiting.priority or self._starving(waiting):
            return job.min
        return max(job.min, min(job.current, job.initial))

    def _starving(self, job: JobState) -> bool:
        waited = self.now - (job.queued_since if job.queued_since is not None else job.created)
        return waited >= self.settings.starvation_seconds

    def _admit(self) -> tuple[dict[str, int], dict[str, tuple[int, str, str]]]:
        """Gang admission. Returns the floor size of every admitted job (old and newly
        admitted) and, for each queued job, (place in queue, reason, message)."""
        admitted = [j for j in self.jobs if j.admitted]
        floors = {j.key: self._floor_size(j, None) for j in admitted}
        queued: dict[str, tuple[int, str, str]] = {}
        blocking: Optional[JobState] = None
        for job in self.jobs:
            if job.admitted:
                continue
            need = max(job.min, min(job.requested, job.max)) if not job.elastic else job.min
            place = len(queued) + 1
            if blocking is not None and job.priority <= blocking.priority:
                queued[job.key] = (
                    place,
                    REASON_QUEUED_BEHIND,
                    f"{blocking.key} has waited longer than {self.settings.starvation_seconds:.0f} s; "
                    "no job of its priority or lower is admitted before it",
                )
                continue
            squeezed = {
                k: self._floor_size(self.by_key[k], job) if self.by_key[k].admitted else n for k, n in floors.items()
            }
            if self._fits(self._gpus({**squeezed, job.key: need})):
                floors[job.key] = need
                continue
            if not self._fits(self._gpus({job.key: need})):
                pool = f" on the nodes its nodeSelector/tolerations allow ({job.pool})" if job.pool else ""
                queued[job.key] = (
                    place,
                    REASON_NO_MATCHING_NODES,
                    f"its {need} workers x {job.gpus_per_worker} GPUs exceed the GPUs of the cluster{pool}",
                )
                continue
            queued[job.key] = (
                place,
                REASON_QUEUED,
                f"its {need} workers x {job.gpus_per_worker} GPUs do not fit, even with the elastic jobs "
                "of its priority back at their initial size (lower priority: at their min)",
            )
            if self._starving(job) and blocking is None:
                blocking = job
        return floors, queued

    def _ideal(self, floors: dict[str, int]) -> dict[str, int]:
        """The sizes the admitted jobs would have with no change costs: from their floors
        (elastic jobs not busy from their min), spare steps go greedily to the highest
        priority, then the most completion rate gained per GPU. Steps whose gain is
        likely come first; steps whose gain is only a guess (exploration) get the GPUs
        that would otherwise idle."""
        sizes: dict[str, int] = {}
        growing: list[JobState] = []
        for key, floor in floors.items():
            job = self.by_key[key]
            if job.elastic and not job.busy and job.current > 0:
                sizes[key] = job.min
                growing.append(job)
            elif job.elastic and not job.admitted:
                sizes[key] = job.min  # newly admitted: its requested size is explored below
                growing.append(job)
            else:
                sizes[key] = floor
                self.why_not_more[key] = (
                    "autoscaling is disabled: it runs at its requested size"
                    if not job.elastic
                    else "a rescale is under way or its size is not measured yet"
                )
        for likely_only in (True, False):
            heap: list[tuple] = []
            for job in growing:
                self._push(heap, job, sizes[job.key], likely_only)
            while heap:
                _, _, step = heapq.heappop(heap)
                trial = {**sizes, step.job.key: step.to}
                if not self._fits(self._gpus(trial)):
                    self.why_not_more[step.job.key] = (
                        "no free GPUs: the rest went to jobs of higher priority or that gain more per GPU"
                    )
                    continue
                sizes = trial
                self._push(heap, step.job, step.to, likely_only)
        return sizes

    def _push(self, heap: list, job: JobState, n: int, likely_only: bool) -> None:
        step, why = self._next_step(job, n)
        if step is None:
            self.why_not_more[job.key] = why
            return
        if likely_only and not step.likely:
            self.why_not_more[job.key] = (
                f"{n}->{step.to} workers: the gain is a guess (beyond the sizes measured); tried only with idle GPUs"
            )
            return
        heapq.heappush(heap, ((-job.priority, -step.value), job.key, step))

    def _changes(self, floors: dict[str, int], ideal: dict[str, int]) -> dict[str, int]:
        """From the sizes now toward the ideal, only where it pays: floor shrinks, shrinks
        to make room, then grows (each must pay its own restart and its donors')."""
        final: dict[str, int] = {}
        movable: list[JobState] = []
        for key in floors:
            job = self.by_key[key]
            if not job.admitted:
                final[key] = ideal[key]
            elif not job.elastic or job.busy or job.current == 0:
                final[key] = floors[key]
            else:
                final[key] = max(job.min, min(job.max, job.current))
                movable.append(job)
        settled = [j for j in movable if j.settled and self.models[j.key] is not None]
        for job in settled:
            self._shrink_below_floor(job, ideal, final)
        self._make_room(movable, ideal, final)
        growers = [j for j in settled if ideal[j.key] > final[j.key]]
        growers.sort(key=lambda j: (-j.priority, self._rate(j, final[j.key]) - self._rate(j, ideal[j.key])))
        for job in growers:
            self._grow(job, settled, ideal, final)
        return final

    def _shrink_below_floor(self, job: JobState, ideal: dict[str, int], final: dict[str, int]) -> None:
        """The user's floor: workers whose predicted marginal efficiency is below
        efficiencyThreshold (by the hysteresis margin) are given back."""
        n, to = final[job.key], ideal[job.key]
        model = self.models[job.key]
        if to >= n or model is None:
            return
        x, x_to = model.predict(n), model.predict(to)
        efficiency = ((x - x_to) / (n - to)) / (x_to / to) if x_to > 0 else 0.0
        if efficiency < job.floor * (1 - self.settings.hysteresis) or x_to >= x * (1 + self.settings.hysteresis):
            final[job.key] = to
            self.reasons[job.key] = (
                REASON_ALLOCATOR_FLOOR,
                f"{to}->{n} workers add {efficiency:.2f} of per-worker throughput "
                f"(efficiencyThreshold {job.floor:.2f}; predicted {x_to:.1f} samples/s at {to}, {x:.1f} at {n})",
            )

    def _donors(self, movable: list[JobState], ideal: dict[str, int], final: dict[str, int], priority: int):
        """Jobs holding more than their ideal, cheapest to shrink first."""
        donors = [d for d in movable if final[d.key] > ideal[d.key] and d.priority <= priority]
        donors.sort(key=lambda d: (d.priority, self._rate(d, final[d.key]) - self._rate(d, ideal[d.key])))
        return donors

    def _make_room(self, movable: list[JobState], ideal: dict[str, int], final: dict[str, int]) -> None:
        """Admissions (and a cluster that lost GPUs) need room: shrink jobs above their
        ideal, lowest priority and cheapest first, then, if still needed, toward min."""
        if self._fits(self._gpus(final)):
            return
        for donor in self._donors(movable, ideal, final, priority=max((j.priority for j in self.jobs), default=0)):
            final[donor.key] = ideal[donor.key]
            self.reasons[donor.key] = (
                REASON_ALLOCATOR_SHRINK,
                f"{donor.current}->{ideal[donor.key]} workers: room for admitted jobs",
            )
            if self._fits(self._gpus(final)):
                return
        for job in sorted(movable, key=lambda j: (j.priority, j.created)):
            while final[job.key] - job.step >= job.min and not self._fits(self._gpus(final)):
                final[job.key] -= job.step
                self.reasons[job.key] = (
                    REASON_ALLOCATOR_SHRINK,
                    f"{job.current}->{final[job.key]} workers: the cluster has fewer GPUs than its jobs hold",
                )

    def _grow(self, job: JobState, movable: list[JobState], ideal: dict[str, int], final: dict[str, int]) -> None:
        """Grow toward the ideal when it pays; shrink donors first when GPUs are needed;
        release the grow only when its GPUs are free now."""
        n = final[job.key]
        donors = self._donors([d for d in movable if d is not job], ideal, final, job.priority)
        for to in range(ideal[job.key], n, -job.step):
            used: list[JobState] = []
            trial = {**final, job.key: to}
            for donor in donors:
                if self._fits(self._gpus(trial)):
                    break
                trial[donor.key] = ideal[donor.key]
                used.append(donor)
            if self._fits(self._gpus(trial)):
                break
        else:
            self.why_not_more[job.key] = "no GPUs to grow into, even from jobs above their ideal size"
            return
        model = self.models[job.key]
        x, x_to = model.predict(n), model.predict(to)
        # Completion rate (the allocator's objective) gained, over the time the job would
        # still run at its size now: for a job alone that is exactly the seconds it finishes
        # sooner. A donor loses until this job ends (then it can grow back) or it ends itself.
        # Priority comes first: what a donor of lower priority loses does not weigh.
        peers = [d for d in used if d.priority == job.priority]
        lasts = self._lasts(job, n)
        gained = lasts * (self._rate(job, to) - self._rate(job, n)) - sum(
            min(lasts, self._lasts(d, final[d.key])) * (self._rate(d, final[d.key]) - self._rate(d, ideal[d.key]))
            for d in peers
        )
        # A restart stops a job's progress: the grower's once, a donor's twice (shrink, grow back).
        cost = self._rate(job, to) * job.restart_seconds + sum(
            (self._rate(d, ideal[d.key]) + self._rate(d, final[d.key])) * d.restart_seconds for d in peers
        )
        rate_to = self._rate(job, to)
        if rate_to <= 0:
            self.why_not_more[job.key] = "no work left"
            return
        # Told in the grower's seconds (its completion time, when it grows alone).
        saved, paid = gained / rate_to, cost / rate_to
        relative = x_to / x - 1 if x > 0 else math.inf
        likely = x_to - model.sigma(to) > x
        if gained - cost <= self.settings.hysteresis * cost or relative <= self.settings.hysteresis:
            self.why_not_more[job.key] = (
                f"{n}->{to} workers: predicted {x:.1f} -> {x_to:.1f} samples/s (+{relative:.0%}) saves "
                f"{saved:.0f} s of completion time, not enough to pay {paid:.0f} s of restarts "
                f"with a {self.settings.hysteresis:.0%} margin"
            )
            return
        if used and not likely:
            self.why_not_more[job.key] = (
                f"{n}->{to} workers: the gain is a guess; other jobs are not shrunk for a guess"
            )
            return
        for donor in used:
            final[donor.key] = ideal[donor.key]
            self.reasons[donor.key] = (
                REASON_ALLOCATOR_SHRINK,
                f"{donor.current}->{ideal[donor.key]} workers: its GPUs finish {job.key} sooner",
            )
        if not self._fits_now({**final, job.key: to}):
            self.reasons[job.key] = (
                REASON_ALLOCATOR_WAITING,
                f"{n}->{to} workers once the jobs shrinking for it have freed their GPUs",
            )
            return
        final[job.key] = to
        self.reasons[job.key] = (
            REASON_ALLOCATOR_GROW,
            f"{n}->{to} workers: predicted {x:.1f} -> {x_to:.1f} samples/s (+{relative:.0%}), "
            f"completes {saved - paid:.0f} s sooner net of {paid:.0f} s of restarts",
        )

    # ------------------------------------------------------------------ answers

    def _answers(
        self,
        floors: dict[str, int],
        queued: dict[str, tuple[int, str, str]],
        ideal: dict[str, int],
        final: dict[str, int],
    ) -> dict[str, Allocation]:
        out: dict[str, Allocation] = {}
        # A newly admitted job starts only once its GPUs are free now (no Pending pods).
        for key in list(final):
            job = self.by_key[key]
            if job.admitted:
                continue
            others = {k: n for k, n in final.items() if k != key}
            if not self._fits_now({**others, key: final[key]}):
                del final[key]
                queued[key] = (
                    len(queued) + 1,
                    REASON_WAITING_FOR_SHRINK,
                    "admitted once the jobs shrinking for it have freed their GPUs",
                )
        for job in self.jobs:
            key = job.key
            if key in queued:
                place, reason, message = queued[key]
                out[key] = Allocation(key, False, 0, reason, message, queue_position=place)
                continue
            target = final[key]
            x = self._throughput(job, target)
            lower = self._throughput(job, target - job.step) if target - job.step >= 1 else 0.0
            gain = x - lower if x is not None and lower is not None else None
            if key in self.reasons:
                reason, message = self.reasons[key]
            elif not job.elastic:
                reason, message = REASON_ALLOCATOR_FIXED, f"{target} workers: autoscaling is disabled"
            elif not job.admitted:
                reason, message = REASON_ADMITTED, f"admitted at {target} workers (its min is {job.min})"
            else:
                reason, message = REASON_ALLOCATOR_HOLD, f"holding {target} workers"
            if target <= job.min:
                why_less = f"at min = {job.min}"
            elif ideal.get(key, target) < target:
                why_less = "above its ideal size, but no job needs its GPUs more than the restart would cost"
            else:
                why_less = "every step of its workers adds at least its floor and no job gains more from them"
            if x is not None:
                message += f"; predicted {x:.1f} samples/s"
            out[key] = Allocation(
                key,
                True,
                target,
                reason,
                message,
                predicted_throughput=x,
                marginal_gain=gain,
                why_not_more=self.why_not_more.get(key, ""),
                why_not_less=why_less,
            )
        return out
