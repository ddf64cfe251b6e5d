"""The reconcile pass as a pure function: observed state in, actions and status out.

`plan()` is level-based (kopf docs, "reconciliation"): it looks at the job's spec, its
stored status and the pods that exist *now*, and returns what should be created, what
deleted, the one status to write and the events to post. It keeps no memory between
calls; everything it needs to resume (the generation, a rescale under way, the restart
count) lives in the job's status, which the handler writes *before* it acts. So an
operator killed anywhere in a pass redoes the same pass on restart: names are
deterministic (a create that already happened returns AlreadyExists), deletes are
idempotent, and a restart is counted in the same status write that records the new
generation's target, never again afterwards.

The protocol (ARCHITECTURE.md, "The rescale protocol: fixed-size generations"):

- generation `g` runs `n` workers with a fixed torchrun world size `n`;
- a rescale (size change, worker restart, resume) is a new generation `g'`: the old one
  is asked to stop (graceful delete: SIGTERM, the trainer checkpoints), the operator waits
  until every old pod is *gone* (a terminating pod still blocks its replacement: two pods
  of a rank never run at once), then creates `g'`;
- a scale-up first creates the added workers (indices n..d-1) of `g'` and waits until the
  scheduler has placed them (they block in the rendezvous of `g'`); if that does not
  happen within `capacity_timeout_seconds` the attempt is abandoned, the running
  generation is left alone and scale-ups back off for `capacity_backoff_seconds`.

Decisions taken here, documented because the brief leaves them open:

- A worker of the current generation that disappears (deleted by hand) or is being
  deleted by someone else while the generation *runs* starts a new generation at the same
  size (reason WorkerLost), counted against maxRestarts like an eviction: torchrun's
  world is fixed, a lone replacement could never join the finished rendezvous. While the
  generation is still *forming* (phase Pending, or a rescale's Starting stage) a missing
  worker is simply (re)created: the rendezvous has not completed yet.
- An invalid spec on a job that never started marks it Failed/InvalidSpec and creates
  nothing, but the operator keeps watching: fixing the spec (1.20 cannot enforce the
  cross-field rules in the schema) clears the failure and starts the job. An invalid or
  immutable-field edit of a job that has workers never touches them: the running
  generation continues, and no new generation starts until the edit is reverted.
- A restart keeps the running size; a different requested size follows as a rescale.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta
from typing import Optional, Union

from lepton_operator.api.models import (
    CONDITION_FAILED,
    CONDITION_INVALID_SPEC,
    CONDITION_READY,
    CONDITION_RESCALING,
    CONDITION_SUCCEEDED,
    CONDITION_SUSPENDED,
    FINISHED_PHASES,
    IMMUTABLE_FIELDS,
    REASON_ALL_SUCCEEDED,
    REASON_AUTOSCALE_DOWN,
    REASON_AUTOSCALE_UP,
    REASON_DEADLINE_EXCEEDED,
    REASON_IMMUTABLE_FIELD,
    REASON_INSUFFICIENT_CAPACITY,
    REASON_INVALID_SPEC,
    REASON_MANUAL_SCALE,
    REASON_RESTARTS_EXHAUSTED,
    REASON_RESUMED,
    REASON_SUSPENDED,
    REASON_WORKER_FAILED,
    REASON_WORKER_LOST,
    REASON_WORKER_RESTART,
    REASON_WORKERS_READY,
    REASON_WORKERS_STARTING,
    RESCALE_HISTORY_LIMIT,
    Condition,
    InvalidJob,
    LeptonJobSpec,
    LeptonJobStatus,
    RescaleInProgress,
    RescaleRecord,
    restart_backoff_seconds,
)
from lepton_operator.desired import (
    LABEL_GENERATION,
    LABEL_WORKER_INDEX,
    JobRef,
    build_checkpoint_pvc,
    build_service,
    build_worker_pod,
    checkpoint_pvc_name,
    worker_pod_name,
    worker_selector,
)
from lepton_operator.reconcile.failures import PodOutcome, classify_pod, is_ready, is_scheduled, is_terminating

NORMAL = "Normal"
WARNING = "Warning"

# Reasons of this module's own events and conditions (the API's REASON_* cover the rest).
REASON_FOREIGN_POD = "ForeignPod"
REASON_NAME_TAKEN = "NameTaken"
REASON_RESCALING = "Rescaling"
REASON_RESCALED = "Rescaled"
REASON_STOPPING = "StoppingGeneration"
REASON_NOT_RESCALING = "NoRescale"
REASON_SCALE_UP_ABANDONED = "ScaleUpAbandoned"
REASON_SPEC_VALID = "SpecValid"
REASON_RESUMING = REASON_RESUMED

# How long an autoscaler decision stays "the reason" for a matching size change.
AUTOSCALER_DECISION_FRESHNESS = timedelta(minutes=10)


@dataclasses.dataclass
class Plan:
    """What one reconcile pass does. The handler writes `status` first, then deletes,
    then creates, then posts `events` (after the status write succeeded)."""

    status: LeptonJobStatus
    creates: list[dict] = dataclasses.field(default_factory=list)
    deletes: list[tuple[str, str, Optional[int]]] = dataclasses.field(default_factory=list)
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    requeue_after: Optional[float] = None
    delete_job: bool = False

    def requeue(self, seconds: float) -> None:
        """Ask for another pass after `seconds` at the latest (earliest request wins)."""
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def delete_pod(self, pod: dict, grace: Optional[int]) -> None:
        name = pod["metadata"]["name"]
        if not any(kind == "Pod" and n == name for kind, n, _ in self.deletes):
            self.deletes.append(("Pod", name, grace))


# ---------------------------------------------------------------------- helpers


def set_condition(
    status: LeptonJobStatus,
    type_: str,
    value: bool,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: Optional[int],
) -> bool:
    """Set a condition; `lastTransitionTime` moves only when its status flips.

    Returns True when the status flipped (or the condition is new and True), which is
    when an event about it is worth posting.
    """
    wanted = "True" if value else "False"
    for i, cond in enumerate(status.conditions):
        if cond.type == type_:
            flipped = cond.status != wanted
            status.conditions[i] = Condition(
                type=type_,
                status=wanted,
                reason=reason,
                message=message[:32768],
                last_transition_time=now if flipped else cond.last_transition_time,
                observed_generation=observed_generation,
            )
            return flipped
    status.conditions.append(
        Condition(
            type=type_,
            status=wanted,
            reason=reason,
            message=message[:32768],
            last_transition_time=now,
            observed_generation=observed_generation,
        )
    )
    return value


def get_condition(status: LeptonJobStatus, type_: str) -> Optional[Condition]:
    return next((c for c in status.conditions if c.type == type_), None)


def condition_is_true(status: LeptonJobStatus, type_: str) -> bool:
    cond = get_condition(status, type_)
    return cond is not None and cond.status == "True"


def selector_string(job_name: str) -> str:
    """The label selector of the job's workers, as the scale subresource reports it."""
    return ",".join(f"{k}={v}" for k, v in sorted(worker_selector(job_name).items()))


def _label_int(pod: dict, key: str) -> int:
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(key, ""))
    except ValueError:
        return -1


def pod_generation(pod: dict) -> int:
    return _label_int(pod, LABEL_GENERATION)


def pod_index(pod: dict) -> int:
    return _label_int(pod, LABEL_WORKER_INDEX)


def owned_by(obj: dict, uid: str) -> bool:
    """True when one of the object's ownerReferences points at the job's uid."""
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _seconds(delta: timedelta) -> float:
    return max(0.0, delta.total_seconds())


# ----------------------------------------------------------------------- planner


class _Pass:
    """One pass over one job. Methods read `self.*` and fill `self.plan`."""

    def __init__(self, job, meta_generation, spec, status, pods, service_exists, pvc_exists, now):
        self.job: JobRef = job
        self.gen_meta: Optional[int] = meta_generation
        self.spec: LeptonJobSpec = spec
        self.now: datetime = now
        self.service_exists = service_exists
        self.pvc_exists = pvc_exists
        self.s: LeptonJobStatus = status.model_copy(deep=True)
        self.plan = Plan(status=self.s)
        self.ours: list[dict] = []
        self.foreign: dict[str, dict] = {}
        for pod in pods:
            if owned_by(pod, job.uid):
                self.ours.append(pod)
            else:
                self.foreign[pod["metadata"]["name"]] = pod

    # --- small utilities --------------------------------------------------------

    def cond(self, type_: str, value: bool, reason: str, message: str) -> bool:
        return set_condition(self.s, type_, value, reason, message, self.now, self.gen_meta)

    def live(self, pods) -> list[dict]:
        return [p for p in pods if not is_terminating(p)]

    def of_generation(self, generation: int) -> dict[int, dict]:
        return {pod_index(p): p for p in self.ours if pod_generation(p) == generation}

    def next_generation(self) -> int:
        """A generation number no pod or record has used: rendezvous ids stay unique."""
        seen = [self.s.worker_generation] + [pod_generation(p) for p in self.ours]
        if self.s.rescale is not None:
            seen.append(self.s.rescale.target_generation)
        return max(seen) + 1

    def grace(self) -> int:
        return self.spec.termination_grace_period_seconds

    def delete_all(self, pods, grace: Optional[int] = None) -> None:
        """Delete pods gracefully, highest index first: worker 0 (the rendezvous host) last."""
        for pod in sorted(self.live(pods), key=pod_index, reverse=True):
            self.plan.delete_pod(pod, self.grace() if grace is None else grace)

    def create_worker(self, index: int, generation: int, world_size: int) -> None:
        name = worker_pod_name(self.job.name, index)
        if name in self.foreign:
            # A pod we do not own holds the name: never adopt, never delete it.
            self.plan.event(
                WARNING,
                REASON_NAME_TAKEN,
                f"pod {name} exists and is not owned by this job; worker {index} cannot start until it is removed",
            )
            return
        self.plan.creates.append(build_worker_pod(self.job, self.spec, index, generation, world_size))

    def create_missing(self, generation: int, world_size: int, indices) -> None:
        existing = self.of_generation(generation)
        for index in indices:
            if index not in existing:
                self.create_worker(index, generation, world_size)

    def count_workers(self, generation: int, world_size: int) -> None:
        pods = self.of_generation(generation)
        outcomes = [classify_pod(p) for p in pods.values()]
        w = self.s.workers
        w.desired = world_size
        w.active = len(self.live(pods.values()))
        w.ready = sum(1 for p in pods.values() if is_ready(p) and not is_terminating(p))
        w.succeeded = sum(1 for o in outcomes if o.outcome == "succeeded")
        w.failed = sum(1 for o in outcomes if o.failed)
        self.s.replicas = self.s.world_size

    def immutable_changed(self) -> bool:
        return self.s.template_hash is not None and self.s.template_hash != self.spec.template_hash()

    def start_generation(self, generation: int, world_size: int, skip_indices=()) -> bool:
        """Create generation `generation` with `world_size` workers and record it.

        Returns False (and creates nothing) while an immutable-field change is pending:
        the new pods would be built from a template the job was not started with.
        """
        if self.immutable_changed():
            self.s.message = "waiting for the change of an immutable field to be reverted before starting workers"
            return False
        for index in range(world_size):
            if index not in skip_indices:
                self.create_worker(index, generation, world_size)
        self.s.worker_generation = generation
        self.s.world_size = world_size
        self.s.generation_start_time = self.now
        self.s.template_hash = self.spec.template_hash()
        if self.s.start_time is None:
            self.s.start_time = self.now
        return True

    # --- the pass ---------------------------------------------------------------

    def run(self) -> Plan:
        s = self.s
        s.observed_generation = self.gen_meta
        s.selector = selector_string(self.job.name)
        for name in sorted(self.foreign):
            self.plan.event(
                WARNING,
                REASON_FOREIGN_POD,
                f"pod {name} carries this job's labels but is not owned by it; it is ignored (never adopted or deleted)",
            )

        # A spec that was invalid and has been fixed: clear the condition, and lift the
        # failure it caused if no worker ever ran.
        invalid = get_condition(s, CONDITION_INVALID_SPEC)
        if invalid is not None and invalid.status == "True" and not self.immutable_changed():
            self.cond(CONDITION_INVALID_SPEC, False, REASON_SPEC_VALID, "the spec is valid")
            failed = get_condition(s, CONDITION_FAILED)
            if s.phase == "Failed" and failed is not None and failed.reason == REASON_INVALID_SPEC:
                s.phase = None
                s.completion_time = None
                s.message = "the spec was fixed"
                self.cond(CONDITION_FAILED, False, REASON_SPEC_VALID, "the spec was fixed")

        if s.phase in FINISHED_PHASES:
            return self.finished()
        self.ensure_service_and_pvc()

        if self.immutable_changed() and (s.worker_generation > 0):
            if self.cond(
                CONDITION_INVALID_SPEC,
                True,
                REASON_IMMUTABLE_FIELD,
                f"one of {', '.join(IMMUTABLE_FIELDS)} changed (template {s.template_hash} -> "
                f"{self.spec.template_hash()}); the running workers continue unchanged and no new "
                "generation starts until the change is reverted",
            ):
                self.plan.event(
                    WARNING,
                    REASON_IMMUTABLE_FIELD,
                    "an immutable field changed; revert it (running workers are kept, no new generation starts)",
                )

        if self.spec.suspend:
            return self.suspend()
        if s.suspended_at is not None:
            self.resume()

        if self.deadline_exceeded():
            return self.plan

        if s.worker_generation == 0:
            return self.initial_start()
        if s.rescale is not None:
            return self.continue_rescale()
        return self.steady()

    def ensure_service_and_pvc(self) -> None:
        if not self.service_exists:
            self.plan.creates.append(build_service(self.job, self.spec))
        ckpt = self.spec.checkpoint
        if ckpt is not None and ckpt.size is not None and not self.pvc_exists:
            pvc = build_checkpoint_pvc(self.job, self.spec)
            if pvc is not None:
                self.plan.creates.append(pvc)

    # --- terminal states ----------------------------------------------------------

    def finish(self, phase: str, reason: str, message: str) -> Plan:
        """Enter Succeeded or Failed: stop every remaining worker, record the time."""
        s = self.s
        s.phase = phase
        s.message = message
        s.completion_time = s.completion_time or self.now
        s.rescale = None
        succeeded = phase == "Succeeded"
        self.cond(CONDITION_SUCCEEDED if succeeded else CONDITION_FAILED, True, reason, message)
        self.cond(CONDITION_READY, False, reason, message)
        if get_condition(s, CONDITION_RESCALING) is not None:
            self.cond(CONDITION_RESCALING, False, reason, "the job finished")
        self.plan.event(NORMAL if succeeded else WARNING, reason, message)
        if s.world_size:
            self.count_workers(s.worker_generation, s.world_size)
        return self.finished()

    def finished(self) -> Plan:
        """Succeeded/Failed: stop workers still running; delete the job once its TTL passed.

        Workers that already exited are kept (their logs explain the outcome); the
        garbage collector removes them with the job.
        """
        self.delete_all([p for p in self.ours if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")])
        ttl = self.spec.ttl_seconds_after_finished
        if ttl is not None and self.s.completion_time is not None:
            remaining = ttl - _seconds(self.now - self.s.completion_time)
            if remaining <= 0:
                self.plan.delete_job = True
            else:
                self.plan.requeue(remaining)
        return self.plan

    def deadline_exceeded(self) -> bool:
        """activeDeadlineSeconds counts running time: wall time minus time suspended."""
        deadline = self.spec.active_deadline_seconds
        if deadline is None or self.s.start_time is None:
            return False
        running = _seconds(self.now - self.s.start_time) - self.s.suspended_seconds
        if running >= deadline:
            self.finish(
                "Failed",
                REASON_DEADLINE_EXCEEDED,
                f"the job ran {running:.0f}s, longer than activeDeadlineSeconds={deadline}",
            )
            return True
        self.plan.requeue(deadline - running)
        return False

    # --- suspend / resume -----------------------------------------------------------

    def suspend(self) -> Plan:
        s = self.s
        if s.suspended_at is None:
            s.suspended_at = self.now
        if s.rescale is not None:
            s.rescale = None  # the resume starts a fresh generation anyway
            if get_condition(s, CONDITION_RESCALING) is not None:
                self.cond(CONDITION_RESCALING, False, REASON_SUSPENDED, "suspended")
        self.delete_all(self.ours)
        left = len(self.ours)
        s.phase = "Suspended"
        s.message = "suspended" if not left else f"suspending: {left} worker(s) stopping"
        if self.cond(CONDITION_SUSPENDED, True, REASON_SUSPENDED, "spec.suspend is true: workers stopped, Service kept"):
            self.plan.event(NORMAL, REASON_SUSPENDED, "job suspended: stopping workers (the Service is kept)")
        self.cond(CONDITION_READY, False, REASON_SUSPENDED, "suspended")
        self.count_workers(s.worker_generation, s.world_size)
        s.workers.desired = 0
        return self.plan

    def resume(self) -> None:
        """Leave suspension: account the paused time; a started job gets a new generation."""
        s = self.s
        s.suspended_seconds += _seconds(self.now - s.suspended_at)
        s.suspended_at = None
        self.cond(CONDITION_SUSPENDED, False, REASON_RESUMED, "resumed")
        self.plan.event(NORMAL, REASON_RESUMED, "job resumed: starting a new generation")
        if s.worker_generation > 0:
            s.rescale = RescaleInProgress(
                from_=s.world_size,
                to=self.spec.requested_workers(),
                reason=REASON_RESUMED,
                message="resumed after suspension",
                stage="Stopping",
                started_at=self.now,
                stopped_at=self.now,
                target_generation=self.next_generation(),
            )
            s.phase = "Pending"

    # --- the first generation -------------------------------------------------------

    def initial_start(self) -> Plan:
        s = self.s
        d = self.spec.requested_workers()
        # Pods of ours without a generation in status: the status write of an earlier pass
        # was lost. They are stale (their rendezvous id may differ): stop them first.
        if self.ours:
            self.delete_all(self.ours)
            s.phase = "Pending"
            s.message = "waiting for leftover workers to stop"
            return self.plan
        self.start_generation(self.next_generation(), d)
        s.phase = "Pending"
        s.message = f"starting generation {s.worker_generation} with {d} worker(s)"
        self.cond(CONDITION_READY, False, REASON_WORKERS_STARTING, s.message)
        self.count_workers(s.worker_generation, s.world_size)
        return self.plan

    # --- steady state: one generation, no rescale under way ---------------------------

    def steady(self) -> Plan:
        s = self.s
        g, n = s.worker_generation, s.world_size
        current = self.of_generation(g)
        # Pods of other generations (and indices beyond the world size) are leftovers.
        self.delete_all([p for p in self.ours if pod_generation(p) != g or not 0 <= pod_index(p) < n])

        outcomes = {i: classify_pod(p) for i, p in current.items() if 0 <= i < n}
        permanent = [(i, o) for i, o in sorted(outcomes.items()) if o.outcome == "permanent"]
        if permanent:
            i, o = permanent[0]
            return self.finish("Failed", REASON_WORKER_FAILED, o.describe(worker_pod_name(self.job.name, i)))
        if len(outcomes) == n and all(o.outcome == "succeeded" for o in outcomes.values()):
            return self.finish("Succeeded", REASON_ALL_SUCCEEDED, f"all {n} worker(s) of generation {g} exited 0")

        retryable = [(i, o) for i, o in sorted(outcomes.items()) if o.outcome == "retryable"]
        if retryable:
            i, o = retryable[0]
            return self.restart(REASON_WORKER_RESTART, o.describe(worker_pod_name(self.job.name, i)))

        forming = s.phase in (None, "Pending")
        if not forming:
            # The generation ran; a worker gone or deleted by someone else is lost.
            lost = [i for i in range(n) if i not in current or is_terminating(current[i])]
            if lost:
                name = worker_pod_name(self.job.name, lost[0])
                why = "was deleted" if lost[0] not in current else "is being deleted by someone else"
                return self.restart(REASON_WORKER_LOST, f"worker {name} {why}")
        else:
            # Still forming: (re)create what is missing once its old pod is fully gone.
            self.create_missing(g, n, range(n))

        self.count_workers(g, n)
        if s.workers.ready == n:
            s.phase = "Running"
            s.message = f"generation {g}: {n} worker(s) ready"
            if self.cond(CONDITION_READY, True, REASON_WORKERS_READY, s.message):
                self.plan.event(NORMAL, REASON_WORKERS_READY, s.message)
        else:
            s.phase = "Pending" if forming else "Running"
            if forming:
                s.message = f"generation {g}: {s.workers.ready}/{n} worker(s) ready"
                self.cond(CONDITION_READY, False, REASON_WORKERS_STARTING, s.message)

        self.maybe_start_rescale()
        return self.plan

    def restart(self, reason: str, detail: str) -> Plan:
        """A worker failed (retryably) or was lost: new generation at the same size."""
        s = self.s
        budget = self.spec.restart.max_restarts
        if s.restarts >= budget:
            return self.finish(
                "Failed", REASON_RESTARTS_EXHAUSTED, f"{detail}; the restart budget ({budget}) is spent"
            )
        # Counted here, in the same status write that records the target generation: a
        # later pass sees the rescale under way and never counts this failure again.
        s.restarts += 1
        n = s.world_size
        s.rescale = RescaleInProgress(
            from_=n,
            to=n,
            reason=reason,
            message=detail,
            stage="Stopping",
            started_at=self.now,
            stopped_at=self.now,
            target_generation=self.next_generation(),
        )
        s.phase = "Pending"
        s.message = f"{detail}; restart {s.restarts}/{budget}: stopping generation {s.worker_generation}"
        self.cond(CONDITION_READY, False, reason, s.message)
        self.plan.event(WARNING, reason, s.message)
        self.delete_all(self.ours)
        self.count_workers(s.worker_generation, n)
        return self.plan

    def rescale_reason(self, target: int) -> tuple[str, str]:
        """ManualScale, unless a fresh autoscaler decision asked for exactly this size."""
        decision = self.s.autoscaling.last_decision
        if decision is not None and decision.target == target and self.now - decision.time <= AUTOSCALER_DECISION_FRESHNESS:
            if re.fullmatch(r"[A-Z][A-Za-z0-9]{0,127}", decision.reason):
                return decision.reason, ""
            direction = REASON_AUTOSCALE_UP if target > self.s.world_size else REASON_AUTOSCALE_DOWN
            return direction, decision.reason[:4096]
        return REASON_MANUAL_SCALE, "spec.workers.replicas changed"

    def maybe_start_rescale(self) -> None:
        s = self.s
        n, d = s.world_size, self.spec.requested_workers()
        if d == n or condition_is_true(s, CONDITION_INVALID_SPEC):
            return
        if d > n and s.autoscaling.backoff_until is not None and self.now < s.autoscaling.backoff_until:
            wait = _seconds(s.autoscaling.backoff_until - self.now)
            s.message = (
                f"scale-up to {d} held for {wait:.0f}s: the last attempt found no capacity "
                f"(backoff until {s.autoscaling.backoff_until:%Y-%m-%dT%H:%M:%SZ})"
            )
            self.plan.requeue(wait)
            return
        reason, message = self.rescale_reason(d)
        target = self.next_generation()
        if d > n:
            s.rescale = RescaleInProgress(
                from_=n, to=d, reason=reason, message=message, stage="ConfirmingCapacity",
                started_at=self.now, target_generation=target,
            )
            # Capacity first: the added workers of the next generation must be placed
            # before the running generation is disturbed.
            self.create_missing(target, d, range(n, d))
            s.message = f"scaling {n} -> {d} ({reason}): waiting for the added worker(s) to be scheduled"
            self.plan.requeue(self.spec.autoscaling.capacity_timeout_seconds)
        else:
            s.rescale = RescaleInProgress(
                from_=n, to=d, reason=reason, message=message, stage="Stopping",
                started_at=self.now, stopped_at=self.now, target_generation=target,
            )
            self.delete_all(self.ours)
            s.message = f"scaling {n} -> {d} ({reason}): stopping generation {s.worker_generation}"
        s.phase = "Rescaling"
        self.cond(CONDITION_RESCALING, True, reason, s.message)
        self.plan.event(NORMAL, REASON_RESCALING, s.message)

    # --- a rescale under way -------------------------------------------------------------

    def continue_rescale(self) -> Plan:
        r = self.s.rescale
        if r.stage == "ConfirmingCapacity":
            return self.confirm_capacity()
        if r.stage == "Stopping":
            return self.stop_old_generation()
        return self.start_new_generation()

    def abandon_scale_up(self, added: dict[int, dict]) -> None:
        self.delete_all(added.values(), grace=0)  # they never joined a running world
        self.s.rescale = None
        self.s.phase = "Running" if self.s.workers.ready == self.s.world_size else "Pending"

    def confirm_capacity(self) -> Plan:
        s, r = self.s, self.s.rescale
        g, n = s.worker_generation, s.world_size
        current = self.of_generation(g)
        added = self.of_generation(r.target_generation)
        self.delete_all([p for p in self.ours if pod_generation(p) not in (g, r.target_generation)])
        self.count_workers(g, n)

        # A failure of the running generation wins over the scale-up.
        outcomes = [(i, classify_pod(p)) for i, p in sorted(current.items())]
        failures = [(i, o) for i, o in outcomes if o.failed]
        lost = [i for i in range(n) if i not in current or is_terminating(current[i])]
        d = self.spec.requested_workers()
        if failures or lost or d != r.to or self.spec.suspend:
            self.abandon_scale_up(added)
            s.message = f"scale-up {r.from_} -> {r.to} cancelled: the running generation changed"
            self.cond(CONDITION_RESCALING, False, REASON_SCALE_UP_ABANDONED, s.message)
            return self.steady()

        wanted = range(n, r.to)
        self.create_missing(r.target_generation, r.to, wanted)
        placed = [i for i in wanted if i in added and is_scheduled(added[i]) and not is_terminating(added[i])]
        if len(placed) == len(wanted):
            r.stage = "Stopping"
            r.stopped_at = self.now
            self.delete_all(current.values())
            s.message = f"scaling {r.from_} -> {r.to}: capacity confirmed, stopping generation {g}"
            self.cond(CONDITION_RESCALING, True, r.reason, s.message)
            return self.plan

        waited = _seconds(self.now - r.started_at)
        timeout = self.spec.autoscaling.capacity_timeout_seconds
        if waited >= timeout:
            backoff = self.spec.autoscaling.capacity_backoff_seconds
            s.autoscaling.backoff_until = self.now + timedelta(seconds=backoff)
            message = (
                f"scale-up {r.from_} -> {r.to} abandoned: {len(wanted) - len(placed)} added worker(s) "
                f"not scheduled within {timeout}s; generation {g} keeps running with {n} worker(s); "
                f"no new attempt for {backoff}s"
            )
            self.abandon_scale_up(added)
            s.message = message
            self.cond(CONDITION_RESCALING, False, REASON_INSUFFICIENT_CAPACITY, message)
            self.plan.event(WARNING, REASON_INSUFFICIENT_CAPACITY, message)
            self.plan.requeue(backoff)
            return self.plan
        s.phase = "Rescaling"
        self.plan.requeue(timeout - waited)
        return self.plan

    def stop_old_generation(self) -> Plan:
        """Wait until every pod except the added workers of the target generation is gone."""
        s, r = self.s, self.s.rescale
        keep = {
            i: p for i, p in self.of_generation(r.target_generation).items() if r.from_ <= i < r.to and not is_terminating(p)
        }
        others = [p for p in self.ours if p not in keep.values()]
        self.delete_all(others)
        self.count_workers(s.worker_generation, s.world_size)
        if r.from_ != r.to:
            s.phase = "Rescaling"
        if others:
            s.message = f"{r.reason}: waiting for {len(others)} worker(s) of the old generation to stop"
            return self.plan
        if r.reason in (REASON_WORKER_RESTART, REASON_WORKER_LOST):
            # Back off before a restart's new generation, so a cause that lasts a while (a
            # port still held, a node rebooting) does not spend the whole budget at once.
            backoff = timedelta(seconds=restart_backoff_seconds(self.spec.restart, s.restarts))
            wait = _seconds(r.started_at + backoff - self.now)
            if wait > 0:
                s.message = f"{r.reason}: restart {s.restarts} backs off; generation {r.target_generation} in {wait:.0f}s"
                self.plan.requeue(wait)
                return self.plan
        # The added workers of a scale-up already exist: create only the others.
        if not self.start_generation(r.target_generation, r.to, skip_indices=set(keep)):
            return self.plan
        r.stage = "Starting"
        s.message = f"{r.reason}: generation {s.worker_generation} starting with {r.to} worker(s)"
        self.count_workers(s.worker_generation, s.world_size)
        return self.plan

    def start_new_generation(self) -> Plan:
        """Stage Starting: the new generation exists; done once all its workers are ready."""
        s, r = self.s, self.s.rescale
        g, n = s.worker_generation, s.world_size
        current = self.of_generation(g)
        self.delete_all([p for p in self.ours if pod_generation(p) != g or not 0 <= pod_index(p) < n])
        outcomes = {i: classify_pod(p) for i, p in current.items() if 0 <= i < n}
        if any(o.failed for o in outcomes.values()):
            # The new generation failed while starting: close this rescale unfinished and
            # let the steady-state rules (restart or fail) handle it.
            self.record(r, downtime=None)
            s.rescale = None
            s.phase = "Pending"
            return self.steady()
        self.create_missing(g, n, range(n))
        self.count_workers(g, n)
        if s.workers.ready < n:
            s.message = f"{r.reason}: generation {g} {s.workers.ready}/{n} worker(s) ready"
            return self.plan
        downtime = _seconds(self.now - (r.stopped_at or r.started_at))
        self.record(r, downtime)
        s.rescale = None
        s.phase = "Running"
        s.message = f"generation {g}: {n} worker(s) ready after {r.reason} ({r.from_} -> {r.to}, downtime {downtime:.1f}s)"
        if r.from_ != r.to:
            self.cond(CONDITION_RESCALING, False, REASON_RESCALED, s.message)
        self.cond(CONDITION_READY, True, REASON_WORKERS_READY, s.message)
        self.plan.event(NORMAL, REASON_RESCALED, s.message)
        return self.plan

    def record(self, r: RescaleInProgress, downtime: Optional[float]) -> None:
        record = RescaleRecord(
            from_=r.from_, to=r.to, reason=r.reason, message=r.message, time=r.started_at, downtime_seconds=downtime
        )
        self.s.last_rescale = record
        self.s.rescale_history = (self.s.rescale_history + [record])[-RESCALE_HISTORY_LIMIT:]


def _invalid(job: JobRef, meta_generation, error: InvalidJob, status: LeptonJobStatus, now: datetime) -> Plan:
    """An invalid spec: Failed/InvalidSpec before any worker ran, else hold the workers."""
    s = status.model_copy(deep=True)
    plan = Plan(status=s)
    s.observed_generation = meta_generation
    s.selector = selector_string(job.name)
    message = "invalid spec: " + "; ".join(error.errors)
    flipped = set_condition(s, CONDITION_INVALID_SPEC, True, REASON_INVALID_SPEC, message, now, meta_generation)
    previous = get_condition(status, CONDITION_INVALID_SPEC)
    changed = flipped or previous is None or previous.message != message
    if s.worker_generation == 0 and s.phase not in FINISHED_PHASES:
        s.phase = "Failed"
        s.message = message
        s.completion_time = s.completion_time or now
        set_condition(s, CONDITION_FAILED, True, REASON_INVALID_SPEC, message, now, meta_generation)
        set_condition(s, CONDITION_READY, False, REASON_INVALID_SPEC, message, now, meta_generation)
    elif s.phase not in FINISHED_PHASES:
        s.message = message + " (the running workers are kept; fix the spec to allow further changes)"
    if changed:
        plan.event(WARNING, REASON_INVALID_SPEC, message)
    return plan


def plan(
    job: JobRef,
    meta_generation: Optional[int],
    spec: Union[LeptonJobSpec, InvalidJob],
    status: LeptonJobStatus,
    pods: list[dict],
    service_exists: bool,
    pvc_exists: bool,
    now: datetime,
) -> Plan:
    """Compute one reconcile pass for a LeptonJob (pure; see the module docstring).

    `pods` are all pods carrying the job's labels (the handler's index), including ones
    the job does not own; `spec` is the parsed spec or the InvalidJob that parsing raised.
    """
    if isinstance(spec, InvalidJob):
        return _invalid(job, meta_generation, spec, status, now)
    return _Pass(job, meta_generation, spec, status, pods, service_exists, pvc_exists, now).run()


__all__ = [
    "Plan",
    "plan",
    "set_condition",
    "get_condition",
    "selector_string",
    "owned_by",
    "pod_generation",
    "pod_index",
    "PodOutcome",
    "checkpoint_pvc_name",
]
