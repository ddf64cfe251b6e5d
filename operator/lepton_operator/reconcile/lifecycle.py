"""The job's lifecycle, pure: first start, spec validity, suspend/resume, deadline, finish, TTL.

Each function takes the `JobPass` of the pass and fills its status and plan. The rescale
protocol (new generations after the first) is in `rescale.py`; `plan.py` drives a pass.

Decisions taken here (docs/rescale-protocol.md explains them):

- An invalid spec on a job that never started marks it Failed/InvalidSpec and creates
  nothing, but the operator keeps watching: fixing the spec (a 1.20 apiserver cannot
  enforce the cross-field rules in the schema) clears the failure and starts the job.
- An invalid or immutable-field edit of a job that has workers never touches them: the
  running generation continues, and no new generation starts until the edit is reverted.
- A spec that breaks the admin policy (api/policy.py) fails like an invalid one before any
  worker ran; a started job's workers are kept (condition PolicyViolation) and no new
  worker is created until the spec complies again.
- `activeDeadlineSeconds` counts running time: time suspended is not counted.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from lepton_operator.api.conditions import (
    CONDITION_ADMITTED,
    CONDITION_FAILED,
    CONDITION_INVALID_SPEC,
    CONDITION_POLICY_VIOLATION,
    CONDITION_READY,
    CONDITION_RESCALING,
    CONDITION_SUCCEEDED,
    CONDITION_SUSPENDED,
    REASON_DEADLINE_EXCEEDED,
    REASON_IMMUTABLE_FIELD,
    REASON_INVALID_SPEC,
    REASON_POLICY_SATISFIED,
    REASON_POLICY_VIOLATION,
    REASON_RESUMED,
    REASON_SPEC_VALID,
    REASON_SUSPENDED,
    REASON_WORKERS_STARTING,
)
from lepton_operator.api.models import (
    FINISHED_PHASES,
    IMMUTABLE_FIELDS,
    STATUS_MESSAGE_MAX_LENGTH,
    InvalidJob,
    LeptonJobStatus,
)
from lepton_operator.desired import (
    JobRef,
    build_checkpoint_pvc,
    build_disruption_budget,
    build_service,
    disruption_budget_name,
    selector_string,
)
from lepton_operator.reconcile.conditions import condition_is_true, get_condition, set_condition
from lepton_operator.reconcile.jobpass import NORMAL, WARNING, JobPass, Plan, seconds

# --- spec validity ------------------------------------------------------------------

# An InvalidSpec message lists what the user wrote wrong, so its length is the user's to
# choose: bounded, or the status write fails with 422 and the job never shows Failed.
INVALID_SPEC_PREFIX = "invalid spec: "
KEPT_WORKERS_NOTE = " (the running workers are kept; fix the spec to allow further changes)"
EVENT_MESSAGE_MAX_LENGTH = 1024  # reconcile/kube.py cuts event messages there
PROBLEM_MAX_LENGTH = 512  # one problem may quote user input (a map key, a name)
POLICY_VIOLATION_PREFIX = "the spec breaks the admin policy: "
POLICY_KEPT_NOTE = " (the running workers are kept; no new worker starts until the spec complies)"


def summarize_problems(problems: list[str], limit: int, prefix: str = INVALID_SPEC_PREFIX) -> str:
    """`invalid spec: a; b; ...and K more` in at most `limit` (>= 600) characters.

    Each problem is cut to PROBLEM_MAX_LENGTH; those that no longer fit are counted.
    """
    parts = [p if len(p) <= PROBLEM_MAX_LENGTH else p[: PROBLEM_MAX_LENGTH - 3] + "..." for p in problems]
    text = prefix
    for i, part in enumerate(parts):
        sep = "; " if i else ""
        left = len(parts) - i - 1
        more = f"; ...and {left} more" if left else ""
        if len(text) + len(sep) + len(part) + len(more) > limit:
            # The previous round reserved room for exactly this tail.
            return f"{text}{sep}...and {len(parts) - i} more"
        text += sep + part
    return text


def invalid_spec(
    job: JobRef, meta_generation: Optional[int], error: InvalidJob, status: LeptonJobStatus, now: datetime
) -> Plan:
    """An invalid spec: Failed/InvalidSpec before any worker ran, else hold the workers."""
    s = status.model_copy(deep=True)
    plan = Plan(status=s)
    s.observed_generation = meta_generation
    s.selector = selector_string(job.name)
    # One message for status and conditions, with room for the note of the running case.
    message = summarize_problems(error.errors, STATUS_MESSAGE_MAX_LENGTH - len(KEPT_WORKERS_NOTE))
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
        s.message = message + KEPT_WORKERS_NOTE
    if changed:
        plan.event(WARNING, REASON_INVALID_SPEC, summarize_problems(error.errors, EVENT_MESSAGE_MAX_LENGTH))
    return plan


def clear_fixed_spec(p: JobPass) -> None:
    """A spec that was invalid and has been fixed: clear the condition, and lift the
    failure it caused if no worker ever ran."""
    s = p.s
    invalid = get_condition(s, CONDITION_INVALID_SPEC)
    if invalid is None or invalid.status != "True" or p.immutable_changed():
        return
    p.cond(CONDITION_INVALID_SPEC, False, REASON_SPEC_VALID, "the spec is valid")
    failed = get_condition(s, CONDITION_FAILED)
    if s.phase == "Failed" and failed is not None and failed.reason == REASON_INVALID_SPEC:
        s.phase = None
        s.completion_time = None
        s.message = "the spec was fixed"
        p.cond(CONDITION_FAILED, False, REASON_SPEC_VALID, "the spec was fixed")


def flag_policy_violation(p: JobPass) -> None:
    """A started job whose spec breaks the admin policy (the policy changed, or an edit of
    a mutable field): say so; its workers are kept and no new worker is created while it
    does (`JobPass.create_worker`, `start_generation`). Finished jobs are left as they are."""
    s = p.s
    if p.policy_violations and s.phase not in FINISHED_PHASES:
        limit = STATUS_MESSAGE_MAX_LENGTH - len(POLICY_KEPT_NOTE)
        message = summarize_problems(p.policy_violations, limit, POLICY_VIOLATION_PREFIX) + POLICY_KEPT_NOTE
        previous = get_condition(s, CONDITION_POLICY_VIOLATION)
        flipped = p.cond(CONDITION_POLICY_VIOLATION, True, REASON_POLICY_VIOLATION, message)
        if flipped or previous is None or previous.message != message:
            event = summarize_problems(p.policy_violations, EVENT_MESSAGE_MAX_LENGTH, POLICY_VIOLATION_PREFIX)
            p.plan.event(WARNING, REASON_POLICY_VIOLATION, event)
    elif condition_is_true(s, CONDITION_POLICY_VIOLATION):
        p.cond(CONDITION_POLICY_VIOLATION, False, REASON_POLICY_SATISFIED, "the spec complies with the admin policy")


def flag_immutable_change(p: JobPass) -> None:
    """An immutable field changed under running workers: say so; they keep running."""
    s = p.s
    if not (p.immutable_changed() and s.worker_generation > 0):
        return
    if p.cond(
        CONDITION_INVALID_SPEC,
        True,
        REASON_IMMUTABLE_FIELD,
        f"one of {', '.join(IMMUTABLE_FIELDS)} changed (template {s.template_hash} -> "
        f"{p.spec.template_hash()}); the running workers continue unchanged and no new "
        "generation starts until the change is reverted",
    ):
        p.plan.event(
            WARNING,
            REASON_IMMUTABLE_FIELD,
            "an immutable field changed; revert it (running workers are kept, no new generation starts)",
        )


# --- objects besides the workers ------------------------------------------------------


def ensure_service_and_pvc(p: JobPass) -> None:
    if not p.service_exists:
        p.plan.creates.append(build_service(p.job, p.spec))
    ckpt = p.spec.checkpoint
    if ckpt is not None and ckpt.size is not None and not p.pvc_exists:
        pvc = build_checkpoint_pvc(p.job, p.spec)
        if pvc is not None:
            p.plan.creates.append(pvc)


def ensure_disruption_budget(p: JobPass) -> None:
    """The job's PodDisruptionBudget protects every running worker (minAvailable = the
    world size); 0 once nothing runs (suspended, finished), so a drain is never blocked
    by a job that has no workers to move. It is created with the first generation's size:
    before that it would protect nothing and cost a patch per job."""
    s = p.s
    active = s.phase not in FINISHED_PHASES and s.phase != "Suspended"
    wanted = s.world_size if active else 0
    if p.budget is None:
        if wanted > 0:
            p.plan.creates.append(build_disruption_budget(p.job, wanted))
    elif p.budget != wanted:
        p.plan.patches.append(
            ("PodDisruptionBudget", disruption_budget_name(p.job.name), {"spec": {"minAvailable": wanted}})
        )


# --- the first generation -------------------------------------------------------------


def queued(p: JobPass) -> Plan:
    """Not admitted by the cluster allocator yet (gang admission): no pods, no GPUs held.
    The allocator's Admitted condition says why and the job's place in the queue."""
    s = p.s
    s.phase = "Queued"
    admitted = get_condition(s, CONDITION_ADMITTED)
    s.message = admitted.message if admitted is not None else "waiting for the cluster allocator to admit the job"
    return p.plan


def initial_start(p: JobPass) -> Plan:
    s = p.s
    d = p.spec.requested_workers()
    # Pods of ours without a generation in status: the status write of an earlier pass
    # was lost. They are stale (their rendezvous id may differ): stop them first.
    if p.ours:
        p.delete_all(p.ours)
        s.phase = "Pending"
        s.message = "waiting for leftover workers to stop"
        return p.plan
    p.start_generation(p.next_generation(), d)
    s.phase = "Pending"
    s.message = f"starting generation {s.worker_generation} with {d} worker(s)"
    p.cond(CONDITION_READY, False, REASON_WORKERS_STARTING, s.message)
    p.count_workers(s.worker_generation, s.world_size)
    return p.plan


# --- terminal states --------------------------------------------------------------------


def finish(p: JobPass, phase: str, reason: str, message: str) -> Plan:
    """Enter Succeeded or Failed: stop every remaining worker, record the time."""
    s = p.s
    s.phase = phase
    s.message = message
    s.completion_time = s.completion_time or p.now
    s.rescale = None
    succeeded = phase == "Succeeded"
    p.cond(CONDITION_SUCCEEDED if succeeded else CONDITION_FAILED, True, reason, message)
    p.cond(CONDITION_READY, False, reason, message)
    if get_condition(s, CONDITION_RESCALING) is not None:
        p.cond(CONDITION_RESCALING, False, reason, "the job finished")
    p.plan.event(NORMAL if succeeded else WARNING, reason, message)
    if s.world_size:
        p.count_workers(s.worker_generation, s.world_size)
    return finished(p)


def finished(p: JobPass) -> Plan:
    """Succeeded/Failed: stop workers still running; delete the job once its TTL passed.

    Workers that already exited are kept (their logs explain the outcome); the garbage
    collector removes them with the job.
    """
    p.delete_all([pod for pod in p.ours if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")])
    ttl = p.spec.ttl_seconds_after_finished
    if ttl is not None and p.s.completion_time is not None:
        remaining = ttl - seconds(p.now - p.s.completion_time)
        if remaining <= 0:
            p.plan.delete_job = True
        else:
            p.plan.requeue(remaining)
    return p.plan


def deadline_exceeded(p: JobPass) -> bool:
    """activeDeadlineSeconds counts running time: wall time minus time suspended."""
    deadline = p.spec.active_deadline_seconds
    if deadline is None or p.s.start_time is None:
        return False
    running = seconds(p.now - p.s.start_time) - p.s.suspended_seconds
    if running >= deadline:
        finish(
            p,
            "Failed",
            REASON_DEADLINE_EXCEEDED,
            f"the job ran {running:.0f}s, longer than activeDeadlineSeconds={deadline}",
        )
        return True
    p.plan.requeue(deadline - running)
    return False


# --- suspend / resume -----------------------------------------------------------------


def suspend(p: JobPass) -> Plan:
    s = p.s
    if s.suspended_at is None:
        s.suspended_at = p.now
    if s.rescale is not None:
        s.rescale = None  # the resume starts a fresh generation anyway
        if get_condition(s, CONDITION_RESCALING) is not None:
            p.cond(CONDITION_RESCALING, False, REASON_SUSPENDED, "suspended")
    p.delete_all(p.ours)
    left = len(p.ours)
    s.phase = "Suspended"
    s.message = "suspended" if not left else f"suspending: {left} worker(s) stopping"
    if p.cond(CONDITION_SUSPENDED, True, REASON_SUSPENDED, "spec.suspend is true: workers stopped, Service kept"):
        p.plan.event(NORMAL, REASON_SUSPENDED, "job suspended: stopping workers (the Service is kept)")
    p.cond(CONDITION_READY, False, REASON_SUSPENDED, "suspended")
    if p.observed.gated:
        # Its GPUs go back to the cluster: a resume waits for the allocator, as a new job does.
        p.cond(CONDITION_ADMITTED, False, REASON_SUSPENDED, "suspended: a resume waits for the cluster allocator")
    p.count_workers(s.worker_generation, s.world_size)
    s.workers.desired = 0
    return p.plan


def resume(p: JobPass) -> None:
    """Leave suspension: account the paused time; a started job gets a new generation."""
    s = p.s
    s.suspended_seconds += seconds(p.now - s.suspended_at)
    s.suspended_at = None
    p.cond(CONDITION_SUSPENDED, False, REASON_RESUMED, "resumed")
    p.plan.event(NORMAL, REASON_RESUMED, "job resumed: starting a new generation")
    if s.worker_generation > 0:
        p.stop_for_rescale(p.spec.requested_workers(), REASON_RESUMED, "resumed after suspension")
        s.phase = "Pending"
