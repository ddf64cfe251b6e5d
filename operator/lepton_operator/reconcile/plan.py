"""The reconcile pass as a pure function: observed state in, actions and status out.

`plan()` is level-based (kopf docs, "reconciliation"): it looks at the job's spec, its
stored status and the pods that exist *now*, and returns what should be created, what
deleted, the one status to write and the events to post. It keeps no memory between
calls; everything it needs to resume (the generation, a rescale under way, the restart
count) lives in the job's status, which the executor writes *before* it acts. So an
operator killed anywhere in a pass redoes the same pass on restart: names are
deterministic (a create that already happened returns AlreadyExists), deletes are
idempotent, and a restart is counted in the same status write that records the new
generation's target, never again afterwards.

A pass: the lifecycle first (`lifecycle.py`: spec validity and the admin policy of
`api/policy.py`, suspend/resume, deadline, finish, first start), then a rescale under way
(`rescale.py`), then the steady state of the running generation (`steady()` below),
which may start a rescale.
docs/rescale-protocol.md describes the protocol; docs/architecture.md how a pass is run.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional, Union

from lepton_operator.api.conditions import (
    CONDITION_ADMITTED,
    CONDITION_NAME_TAKEN,
    CONDITION_READY,
    REASON_ALL_SUCCEEDED,
    REASON_FOREIGN_POD,
    REASON_HUNG,
    REASON_NAME_TAKEN,
    REASON_NAMES_FREE,
    REASON_NODE_DRAINING,
    REASON_NODE_LOST,
    REASON_WORKER_DISRUPTED,
    REASON_WORKER_FAILED,
    REASON_WORKER_LOST,
    REASON_WORKER_RESTART,
    REASON_WORKERS_READY,
    REASON_WORKERS_STARTING,
)
from lepton_operator.api.models import FINISHED_PHASES, InvalidJob, LeptonJobSpec, LeptonJobStatus
from lepton_operator.api.policy import DEFAULT_POLICY, AdminPolicy, check_policy, job_profile
from lepton_operator.desired import JobRef, pod_generation, pod_index, selector_string, worker_pod_name
from lepton_operator.reconcile import isolation, lifecycle, placement, rescale
from lepton_operator.reconcile.conditions import condition_is_true, get_condition
from lepton_operator.reconcile.failures import classify_pod, is_terminating
from lepton_operator.reconcile.jobpass import NORMAL, WARNING, JobPass, Observed, Plan


def plan(
    job: JobRef,
    meta_generation: Optional[int],
    spec: Union[LeptonJobSpec, InvalidJob],
    status: LeptonJobStatus,
    observed: Observed,
    now: datetime,
    policy: AdminPolicy = DEFAULT_POLICY,
) -> Plan:
    """Compute one reconcile pass for a LeptonJob (pure; see the module docstring).

    `spec` is the parsed spec or the InvalidJob that parsing raised; `observed` what the
    loop saw (pods, children, nodes: `jobpass.Observed`); `policy` the admin policy (a job
    that never started and breaks it fails as InvalidSpec, creating nothing; a started one
    keeps its workers: `lifecycle.flag_policy_violation`).
    """
    if isinstance(spec, InvalidJob):
        return lifecycle.invalid_spec(job, meta_generation, spec, status, now)
    violations = check_policy(job.name, spec, policy, job.namespace)
    if violations and status.worker_generation == 0:
        return lifecycle.invalid_spec(job, meta_generation, InvalidJob(violations), status, now)
    p = JobPass(job, meta_generation, spec, status, observed, now, violations, job_profile(spec, policy))
    report_names_taken(p, observed.taken)
    result = run(p)
    if not result.delete_job:
        lifecycle.ensure_disruption_budget(p)  # after the pass: it follows the world size it decided
        isolation.ensure_network_policy(p, observed.network)
        placement.record_domains(p)  # where the generation the pass leaves runs
    return result


def run(p: JobPass) -> Plan:
    s = p.s
    s.observed_generation = p.gen_meta
    s.selector = selector_string(p.job.name)
    for name in sorted(p.foreign):
        p.plan.event(
            WARNING,
            REASON_FOREIGN_POD,
            f"pod {name} carries this job's labels but is not owned by it; it is ignored (never adopted or deleted)",
        )
    lifecycle.clear_fixed_spec(p)
    lifecycle.flag_policy_violation(p)
    if s.phase in FINISHED_PHASES:
        return lifecycle.finished(p)
    lifecycle.ensure_service_and_pvc(p)
    lifecycle.flag_immutable_change(p)

    if p.spec.suspend:
        return lifecycle.suspend(p)
    if p.observed.gated and not condition_is_true(s, CONDITION_ADMITTED):
        # Never started, or resumed after a suspension gave its GPUs back: gang admission first.
        if s.worker_generation == 0 or s.suspended_at is not None:
            return lifecycle.queued(p)
    if s.suspended_at is not None:
        lifecycle.resume(p)
    if lifecycle.deadline_exceeded(p):
        return p.plan
    force_delete_on_lost_nodes(p)
    if s.worker_generation == 0:
        return lifecycle.initial_start(p)
    if s.rescale is not None:
        result = rescale.continue_rescale(p)
        if result is not None:
            return result
    return steady(p)


def force_delete_on_lost_nodes(p: JobPass) -> list[str]:
    """Force-delete (grace 0) our pods on lost nodes, whatever their generation; return why.

    Safe because the node has not been Ready for `nodeLostSeconds`: its kubelet cannot
    act on a graceful delete, so the pod would stay Terminating for ever and block its
    name. If the node is only partitioned and the container still runs, it cannot join a
    later generation (new rendezvous id and port) and cannot overwrite checkpoints (the
    trainer fences writes by generation).
    """
    why = []
    for pod in p.ours:
        lost = p.node_lost(pod)
        if lost:
            p.plan.delete_pod(pod, 0)
            why.append(f"worker {pod['metadata']['name']}: {lost}")
    return why


def steady(p: JobPass) -> Plan:
    """One generation, no rescale under way: finish, restart, count, or start a rescale.

    What ends a generation, in order: a permanent failure (the job fails), all workers
    succeeded, the cluster taking workers away (a disruption: lost node, eviction or
    preemption, a worker deleted by someone else, a cordoned node), a retryable failure
    or a hang (a restart, which spends `maxRestarts`). A cause the cluster created wins
    over the retryable exits of the peers it left behind.
    """
    s = p.s
    g, n = s.worker_generation, s.world_size
    current = p.of_generation(g)
    # Pods of other generations (and indices beyond the world size) are leftovers.
    p.delete_all([pod for pod in p.ours if pod_generation(pod) != g or not 0 <= pod_index(pod) < n])
    forming = s.phase in (None, "Pending")
    name = lambda i: worker_pod_name(p.job.name, i)  # noqa: E731

    outcomes = {i: classify_pod(pod) for i, pod in current.items() if 0 <= i < n}
    permanent = [(i, o) for i, o in sorted(outcomes.items()) if o.outcome == "permanent"]
    if permanent:
        i, o = permanent[0]
        return lifecycle.finish(p, "Failed", REASON_WORKER_FAILED, o.describe(name(i)))
    if n > 0 and len(outcomes) == n and all(o.outcome == "succeeded" for o in outcomes.values()):
        return lifecycle.finish(p, "Succeeded", REASON_ALL_SUCCEEDED, f"all {n} worker(s) of generation {g} exited 0")

    on_lost_nodes = [p.node_lost(pod) for i, pod in sorted(current.items()) if p.node_lost(pod)]
    if on_lost_nodes:
        return rescale.restart(p, REASON_NODE_LOST, on_lost_nodes[0])
    disrupted = [(i, o) for i, o in sorted(outcomes.items()) if o.outcome == "disrupted"]
    if disrupted:
        i, o = disrupted[0]
        return rescale.restart(p, REASON_WORKER_DISRUPTED, o.describe(name(i)))
    if not forming:
        # The generation ran; a worker gone or deleted by someone else is lost.
        lost = [i for i in range(n) if i not in current or is_terminating(current[i])]
        if lost:
            why = "was deleted" if lost[0] not in current else "is being deleted by someone else"
            return rescale.restart(p, REASON_WORKER_LOST, f"worker {name(lost[0])} {why}")
        cordoned = sorted({node for pod in current.values() if (node := p.node_cordoned(pod))})
        if cordoned:
            return rescale.restart(
                p, REASON_NODE_DRAINING, f"node {cordoned[0]} is cordoned: moving the job off it with a checkpoint"
            )

    retryable = [(i, o) for i, o in sorted(outcomes.items()) if o.outcome == "retryable"]
    if retryable:
        i, o = retryable[0]
        return rescale.restart(p, REASON_WORKER_RESTART, o.describe(name(i)))
    if s.hang is not None:
        hang, s.hang = s.hang, None  # a report is acted on once
        if hang.generation == g and not forming:
            return rescale.restart(p, REASON_HUNG, hang.message or f"generation {g} made no progress")

    if forming:
        # Still forming: (re)create what is missing once its old pod is fully gone.
        p.create_missing(g, n, range(n))

    p.count_workers(g, n)
    if s.workers.ready == n:
        s.phase = "Running"
        s.message = f"generation {g}: {n} worker(s) ready"
        if p.cond(CONDITION_READY, True, REASON_WORKERS_READY, s.message):
            p.plan.event(NORMAL, REASON_WORKERS_READY, s.message)
    else:
        s.phase = "Pending" if forming else "Running"
        if forming:
            s.message = f"generation {g}: {s.workers.ready}/{n} worker(s) ready"
            p.cond(CONDITION_READY, False, REASON_WORKERS_STARTING, s.message)
            shrunk = rescale.shrink_if_unplaceable(p, current)
            if shrunk is not None:
                return shrunk

    rescale.maybe_start_rescale(p)
    return p.plan


def report_names_taken(p: JobPass, taken: frozenset[str]) -> None:
    """Condition NameTaken: True while objects the job does not own hold names of its
    children (the executor found them on a create's 409 and posted an event for each);
    False once they are gone. The pass still plans those creates: the foreign objects are
    never touched, and the job gets its own as soon as a name is free."""
    if not taken and get_condition(p.s, CONDITION_NAME_TAKEN) is None:
        return
    if taken:
        message = f"held by objects this job does not own: {', '.join(sorted(taken))}"
        p.cond(CONDITION_NAME_TAKEN, True, REASON_NAME_TAKEN, message)
    else:
        message = "no object the job does not own holds a name of its children"
        p.cond(CONDITION_NAME_TAKEN, False, REASON_NAMES_FREE, message)
