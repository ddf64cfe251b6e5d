"""The rescale protocol, pure: every change of generation after the first.

A rescale (size change, worker restart, resume) is a new generation: the old one is asked
to stop (graceful delete: SIGTERM, the trainer checkpoints), the operator waits until
every old pod is *gone* (two pods of a rank never run at once), then creates the new one.
`status.rescale` records the rescale and its stage before anything is acted on:

    ConfirmingCapacity --(added workers placed)--> Stopping --(old pods gone)--> Starting --(all ready)--> done
           |  (not placed within capacityTimeoutSeconds: abandoned, backoff)
           v
         (none: the running generation is left alone)

A scale-up starts in ConfirmingCapacity (the added workers, indices n..d-1 of the next
generation, are created first and must be scheduled); a scale-down, a restart and a
resume start in Stopping. docs/rescale-protocol.md has the whole protocol.

Decisions taken here:

- A worker of the current generation that disappears or is deleted by someone else while
  the generation *runs* restarts it at the same size (WorkerLost): torchrun's world is
  fixed, a lone replacement could never join the finished rendezvous. Like an eviction it
  is a disruption (`status.disruptions`), not a failure of the job. While the generation
  is still *forming* a missing worker is simply (re)created (see `plan.steady`).
- A restart keeps the running size; a different requested size follows as a rescale.
- A restart is counted in the same status write that records the target generation, so
  an operator killed mid-pass never counts it twice.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Optional

from lepton_operator.api.conditions import (
    CONDITION_INVALID_SPEC,
    CONDITION_READY,
    CONDITION_RESCALING,
    DISRUPTION_REASONS,
    REASON_ALLOCATOR_FLOOR,
    REASON_ALLOCATOR_GROW,
    REASON_ALLOCATOR_SHRINK,
    REASON_AUTOSCALE_DOWN,
    REASON_AUTOSCALE_UP,
    REASON_GROWING_BACK,
    REASON_HUNG,
    REASON_INSUFFICIENT_CAPACITY,
    REASON_MANUAL_SCALE,
    REASON_RESCALED,
    REASON_RESCALING,
    REASON_RESTARTS_EXHAUSTED,
    REASON_SCALE_UP_ABANDONED,
    REASON_SHRUNK_FOR_CAPACITY,
    REASON_WAITING_FOR_CAPACITY,
    REASON_WORKER_RESTART,
    REASON_WORKERS_READY,
)
from lepton_operator.api.models import (
    RESCALE_HISTORY_LIMIT,
    RescaleInProgress,
    RescaleRecord,
    restart_backoff_seconds,
)
from lepton_operator.desired import pod_generation, pod_index
from lepton_operator.reconcile.conditions import condition_is_true
from lepton_operator.reconcile.failures import classify_pod, is_scheduled, is_terminating
from lepton_operator.reconcile.jobpass import NORMAL, WARNING, JobPass, Plan, seconds
from lepton_operator.reconcile.lifecycle import finish

# How long an autoscaler decision stays "the reason" for a matching size change.
AUTOSCALER_DECISION_FRESHNESS = timedelta(minutes=10)
# The allocator's decisions that change a running job's size (status.allocation.reason).
ALLOCATOR_RESIZES = frozenset({REASON_ALLOCATOR_GROW, REASON_ALLOCATOR_SHRINK, REASON_ALLOCATOR_FLOOR})


# --- starting a rescale ------------------------------------------------------------------


def restart(p: JobPass, reason: str, detail: str) -> Plan:
    """Start a new generation at the same size because workers failed or were taken away.

    A disruption (`DISRUPTION_REASONS`: eviction, preemption, node lost or drained, a
    worker deleted by someone else) is counted in `status.disruptions` and never spends
    the restart budget; anything else is the job's failure, counted in `status.restarts`.
    """
    s = p.s
    n = s.world_size
    if reason in DISRUPTION_REASONS:
        s.disruptions += 1
        s.message = f"{detail}; disruption {s.disruptions} (not a failure): stopping generation {s.worker_generation}"
    else:
        budget = p.spec.restart.max_restarts
        if s.restarts >= budget:
            return finish(p, "Failed", REASON_RESTARTS_EXHAUSTED, f"{detail}; the restart budget ({budget}) is spent")
        # Counted here, in the same status write that records the target generation: a
        # later pass sees the rescale under way and never counts this failure again.
        s.restarts += 1
        s.message = f"{detail}; restart {s.restarts}/{budget}: stopping generation {s.worker_generation}"
    p.stop_for_rescale(n, reason, detail)
    s.phase = "Pending"
    p.cond(CONDITION_READY, False, reason, s.message)
    p.plan.event(WARNING, reason, s.message)
    p.delete_all(p.ours)
    p.count_workers(s.worker_generation, n)
    return p.plan


def rescale_reason(p: JobPass, target: int) -> tuple[str, str]:
    """ManualScale, unless a fresh allocator or autoscaler decision asked for exactly this
    size, or the job grows back to its requested size after shrinking for capacity."""
    last = p.s.last_rescale
    if target > p.s.world_size and last is not None and last.reason == REASON_SHRUNK_FOR_CAPACITY:
        return REASON_GROWING_BACK, f"back to the requested {target} worker(s) after {last.reason}"
    allocation = p.s.allocation  # written before the replicas it decided
    if (
        allocation is not None
        and allocation.target == target
        and allocation.reason in ALLOCATOR_RESIZES  # not a fixed job a user scaled
        and p.now - allocation.time <= AUTOSCALER_DECISION_FRESHNESS
    ):
        return allocation.reason, allocation.message[:4096]
    decision = p.s.autoscaling.last_decision
    if decision is not None and decision.target == target and p.now - decision.time <= AUTOSCALER_DECISION_FRESHNESS:
        if re.fullmatch(r"[A-Z][A-Za-z0-9]{0,127}", decision.reason):
            return decision.reason, ""
        direction = REASON_AUTOSCALE_UP if target > p.s.world_size else REASON_AUTOSCALE_DOWN
        return direction, decision.reason[:4096]
    return REASON_MANUAL_SCALE, "spec.workers.replicas changed"


def maybe_start_rescale(p: JobPass) -> None:
    """The requested size differs from the running one: start a rescale towards it."""
    s = p.s
    n, d = s.world_size, p.spec.requested_workers()
    if d == n or condition_is_true(s, CONDITION_INVALID_SPEC) or p.policy_violations:
        return
    if d > n and s.autoscaling.backoff_until is not None and p.now < s.autoscaling.backoff_until:
        wait = seconds(s.autoscaling.backoff_until - p.now)
        s.message = (
            f"scale-up to {d} held for {wait:.0f}s: the last attempt found no capacity "
            f"(backoff until {s.autoscaling.backoff_until:%Y-%m-%dT%H:%M:%SZ})"
        )
        p.plan.requeue(wait)
        return
    reason, message = rescale_reason(p, d)
    if d > n:
        target = p.next_generation()
        s.rescale = RescaleInProgress(
            from_=n,
            to=d,
            reason=reason,
            message=message,
            stage="ConfirmingCapacity",
            started_at=p.now,
            target_generation=target,
        )
        # Capacity first: the added workers of the next generation must be placed
        # before the running generation is disturbed.
        p.create_missing(target, d, range(n, d))
        s.message = f"scaling {n} -> {d} ({reason}): waiting for the added worker(s) to be scheduled"
        p.plan.requeue(p.spec.autoscaling.capacity_timeout_seconds)
    else:
        p.stop_for_rescale(d, reason, message)
        p.delete_all(p.ours)
        s.message = f"scaling {n} -> {d} ({reason}): stopping generation {s.worker_generation}"
    s.phase = "Rescaling"
    p.cond(CONDITION_RESCALING, True, reason, s.message)
    p.plan.event(NORMAL, REASON_RESCALING, s.message)


# --- a rescale under way ----------------------------------------------------------------


def continue_rescale(p: JobPass) -> Optional[Plan]:
    """Advance the rescale under way; None when it closed and the steady-state rules
    (`plan.steady`) should look at the job now."""
    stage = p.s.rescale.stage
    if stage == "ConfirmingCapacity":
        return confirm_capacity(p)
    if stage == "Stopping":
        return stop_old_generation(p)
    return start_new_generation(p)


def abandon_scale_up(p: JobPass, added: dict[int, dict]) -> None:
    # With their grace period: a container that already started is stopped cleanly (it
    # waits on another port and rendezvous id than any later attempt, which gets a new
    # generation number).
    p.delete_all(added.values())
    p.s.rescale = None
    p.s.phase = "Running" if p.s.workers.ready == p.s.world_size else "Pending"


def confirm_capacity(p: JobPass) -> Optional[Plan]:
    """Stage ConfirmingCapacity: the added workers exist; go on once all are scheduled."""
    s, r = p.s, p.s.rescale
    g, n = s.worker_generation, s.world_size
    current = p.of_generation(g)
    added = p.of_generation(r.target_generation)
    p.delete_all([pod for pod in p.ours if pod_generation(pod) not in (g, r.target_generation)])
    p.count_workers(g, n)

    # A failure of the running generation wins over the scale-up.
    failures = [i for i, pod in current.items() if classify_pod(pod).failed]
    lost = [i for i in range(n) if i not in current or is_terminating(current[i])]
    if failures or lost or p.spec.requested_workers() != r.to or p.spec.suspend:
        abandon_scale_up(p, added)
        s.message = f"scale-up {r.from_} -> {r.to} cancelled: the running generation changed"
        p.cond(CONDITION_RESCALING, False, REASON_SCALE_UP_ABANDONED, s.message)
        return None

    wanted = range(n, r.to)
    # An added worker that exited before its generation started (it waited too long for
    # the store, say) is replaced, not counted as a restart.
    p.delete_all([pod for pod in added.values() if classify_pod(pod).outcome not in ("pending", "running")])
    p.create_missing(r.target_generation, r.to, wanted)
    placed = [i for i in wanted if i in added and usable_added_worker(added[i])]
    if len(placed) == len(wanted):
        r.stage = "Stopping"
        r.stopped_at = p.now
        p.delete_all(current.values())
        s.message = f"scaling {r.from_} -> {r.to}: capacity confirmed, stopping generation {g}"
        p.cond(CONDITION_RESCALING, True, r.reason, s.message)
        return p.plan

    waited = seconds(p.now - r.started_at)
    timeout = p.spec.autoscaling.capacity_timeout_seconds
    if waited >= timeout:
        backoff = p.spec.autoscaling.capacity_backoff_seconds
        s.autoscaling.backoff_until = p.now + timedelta(seconds=backoff)
        message = (
            f"scale-up {r.from_} -> {r.to} abandoned: {len(wanted) - len(placed)} added worker(s) "
            f"not scheduled within {timeout}s; generation {g} keeps running with {n} worker(s); "
            f"no new attempt for {backoff}s"
        )
        abandon_scale_up(p, added)
        s.message = message
        p.cond(CONDITION_RESCALING, False, REASON_INSUFFICIENT_CAPACITY, message)
        p.plan.event(WARNING, REASON_INSUFFICIENT_CAPACITY, message)
        p.plan.requeue(backoff)
        return p.plan
    s.phase = "Rescaling"
    p.plan.requeue(timeout - waited)
    return p.plan


def stop_old_generation(p: JobPass) -> Plan:
    """Stage Stopping: wait until every pod except the added workers of the target
    generation is gone, then create the new generation."""
    s, r = p.s, p.s.rescale
    keep = {
        i: pod
        for i, pod in p.of_generation(r.target_generation).items()
        if r.from_ <= i < r.to and usable_added_worker(pod)
    }
    others = [pod for pod in p.ours if pod not in keep.values()]
    p.delete_all(others)
    p.count_workers(s.worker_generation, s.world_size)
    if r.from_ != r.to:
        s.phase = "Rescaling"
    if others:
        s.message = f"{r.reason}: waiting for {len(others)} worker(s) of the old generation to stop"
        return p.plan
    if r.reason in (REASON_WORKER_RESTART, REASON_HUNG):
        # Back off before a restart's new generation, so a cause that lasts a while (a
        # port still held, a node rebooting) does not spend the whole budget at once.
        backoff = timedelta(seconds=restart_backoff_seconds(p.spec.restart, s.restarts))
        wait = seconds(r.started_at + backoff - p.now)
        if wait > 0:
            s.message = f"{r.reason}: restart {s.restarts} backs off; generation {r.target_generation} in {wait:.0f}s"
            p.plan.requeue(wait)
            return p.plan
    if r.not_before is not None and p.now < r.not_before:
        wait = seconds(r.not_before - p.now)
        s.message = f"{r.reason}: generation {r.target_generation} with {r.to} worker(s) tries again in {wait:.0f}s"
        p.plan.requeue(wait)
        return p.plan
    # The added workers of a scale-up already exist: create only the others.
    if not p.start_generation(r.target_generation, r.to, skip_indices=set(keep)):
        return p.plan
    r.stage = "Starting"
    s.message = f"{r.reason}: generation {s.worker_generation} starting with {r.to} worker(s)"
    p.count_workers(s.worker_generation, s.world_size)
    return p.plan


def start_new_generation(p: JobPass) -> Optional[Plan]:
    """Stage Starting: the new generation exists; done once all its workers are ready."""
    s, r = p.s, p.s.rescale
    g, n = s.worker_generation, s.world_size
    current = p.of_generation(g)
    p.delete_all([pod for pod in p.ours if pod_generation(pod) != g or not 0 <= pod_index(pod) < n])
    if any(classify_pod(pod).failed for i, pod in current.items() if 0 <= i < n):
        # The new generation failed while starting: close this rescale unfinished and
        # let the steady-state rules (restart or fail) handle it.
        record(p, r, downtime=None)
        s.rescale = None
        s.phase = "Pending"
        return None
    p.create_missing(g, n, range(n))
    p.count_workers(g, n)
    if s.workers.ready < n:
        s.message = f"{r.reason}: generation {g} {s.workers.ready}/{n} worker(s) ready"
        return shrink_if_unplaceable(p, current) or p.plan
    downtime = seconds(p.now - (r.stopped_at or r.started_at))
    record(p, r, downtime)
    s.rescale = None
    s.phase = "Running"
    s.message = f"generation {g}: {n} worker(s) ready after {r.reason} ({r.from_} -> {r.to}, downtime {downtime:.1f}s)"
    if r.from_ != r.to:
        p.cond(CONDITION_RESCALING, False, REASON_RESCALED, s.message)
    p.cond(CONDITION_READY, True, REASON_WORKERS_READY, s.message)
    p.plan.event(NORMAL, REASON_RESCALED, s.message)
    return p.plan


def usable_added_worker(pod: dict) -> bool:
    """An added worker (capacity confirmation) that can join its generation: placed, not
    being deleted, not exited."""
    return is_scheduled(pod) and not is_terminating(pod) and not classify_pod(pod).failed


def shrink_if_unplaceable(p: JobPass, current: dict[int, dict]) -> Optional[Plan]:
    """Bound a forming generation by `capacityTimeoutSeconds`: when its workers have not all
    been placed by then, restart at the largest size that fits (>= min, in `step`s), or
    below min stop every worker and wait `capacityBackoffSeconds` holding no GPUs.

    Returns the plan when it acted, None while the generation may still be placed.
    """
    s = p.s
    g, n = s.worker_generation, s.world_size
    timeout = p.spec.autoscaling.capacity_timeout_seconds
    started = s.generation_start_time or p.now
    placed = [pod for i, pod in current.items() if 0 <= i < n and usable_added_worker(pod)]
    if len(placed) == n:
        return None
    waited = seconds(p.now - started)
    if waited < timeout:
        p.plan.requeue(timeout - waited)
        return None
    if s.rescale is not None:
        record(p, s.rescale, downtime=None)  # the rescale that created it ends unfinished
    lo, step = p.spec.workers.min, max(1, p.spec.autoscaling.step)
    fits = len(placed)
    backoff = p.spec.autoscaling.capacity_backoff_seconds
    # No scale-up attempt until the backoff passed: capacity just proved short.
    s.autoscaling.backoff_until = p.now + timedelta(seconds=backoff)
    if fits >= lo:
        k = lo + (fits - lo) // step * step
        reason, to, not_before = REASON_SHRUNK_FOR_CAPACITY, k, None
        s.message = (
            f"generation {g}: only {fits} of {n} worker(s) placed within {timeout}s; "
            f"restarting at {k} (min {lo}, step {step})"
        )
    else:
        reason, to, not_before = REASON_WAITING_FOR_CAPACITY, n, p.now + timedelta(seconds=backoff)
        s.message = (
            f"generation {g}: only {fits} of {n} worker(s) placed within {timeout}s, fewer than min {lo}; "
            f"stopping all workers (no GPUs held) and trying again in {backoff}s"
        )
    p.stop_for_rescale(to, reason, s.message, not_before)
    s.phase = "Rescaling" if to != n else "Pending"
    p.delete_all(p.ours)
    p.cond(CONDITION_RESCALING, True, reason, s.message)
    p.cond(CONDITION_READY, False, reason, s.message)
    p.plan.event(WARNING, reason, s.message)
    return p.plan


def record(p: JobPass, r: RescaleInProgress, downtime: Optional[float]) -> None:
    """Close a rescale into `lastRescale` and the bounded `rescaleHistory`."""
    entry = RescaleRecord(
        from_=r.from_, to=r.to, reason=r.reason, message=r.message, time=r.started_at, downtime_seconds=downtime
    )
    p.s.last_rescale = entry
    p.s.rescale_history = (p.s.rescale_history + [entry])[-RESCALE_HISTORY_LIMIT:]
