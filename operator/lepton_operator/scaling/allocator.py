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
5. change costs: a running job is resized only when the predicted gain over its remaining
   time pays its measured restart (and the restarts of the jobs shrunk for it), with a
   hysteresis margin so that noise never makes it flap.

Shrinks come before the grows they make room for: a grow (or an admission) is released
only when its GPUs are free now, counting the GPUs that shrinking jobs still hold.

The module docstring of each helper says the rule it implements; docs/allocator.md tells
the whole story.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from lepton_operator.scaling.throughput import Measurement


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
    """The size the user asked for (spec.workers.replicas, else initial): a fixed job's
    size, and an unmeasured elastic job's first size."""
    admitted: bool = False
    current: int = 0
    """Workers of the running generation (0: queued or not started)."""
    held_gpus: int = 0
    """GPUs requested by the job's pods now, terminating ones included."""
    busy: bool = False
    """A rescale under way or a generation not yet measured: its size is not changed now."""
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


def allocate(
    jobs: Sequence[JobState], capacity: Capacity, now: float, settings: Settings = Settings()
) -> dict[str, Allocation]:
    """One allocation for every job; see the module docstring."""
    raise NotImplementedError
