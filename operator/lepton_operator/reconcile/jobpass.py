"""What one reconcile pass works on (`JobPass`) and what it returns (`Plan`).

`JobPass` holds the inputs of one pass over one job (spec, a copy of the stored status,
the pods seen, `now`) and small helpers shared by the lifecycle (`lifecycle.py`) and the
rescale protocol (`rescale.py`); `plan.py` drives a pass. Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import NamedTuple, Optional, Sequence

from lepton_operator.api.conditions import REASON_NAME_TAKEN
from lepton_operator.api.models import LeptonJobSpec, LeptonJobStatus, RescaleInProgress
from lepton_operator.api.policy import FabricProfile
from lepton_operator.desired import (
    JobRef,
    build_worker_pod,
    owned_by,
    pod_generation,
    pod_index,
    worker_pod_name,
)
from lepton_operator.reconcile.conditions import set_condition
from lepton_operator.reconcile.failures import classify_pod, is_ready, is_terminating
from lepton_operator.reconcile.nodes import NodeInfo

NORMAL = "Normal"
WARNING = "Warning"


class Delete(NamedTuple):
    """A delete the plan asks for. `uid` is a precondition: a pod of the same name created
    since (the next generation's) is never deleted in its place."""

    kind: str
    name: str
    grace: Optional[int]
    uid: Optional[str] = None


@dataclasses.dataclass
class Plan:
    """What one reconcile pass does. The executor writes `status` first, then deletes,
    then creates and patches, then posts `events` (after the status write succeeded)."""

    status: LeptonJobStatus
    creates: list[dict] = dataclasses.field(default_factory=list)
    deletes: list[Delete] = dataclasses.field(default_factory=list)
    patches: list[tuple[str, str, dict]] = dataclasses.field(default_factory=list)
    """(kind, name, merge patch) of children that exist but differ."""
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
        """Delete this very pod (by uid); the first delete planned for it wins."""
        meta = pod["metadata"]
        if not any(d.kind == "Pod" and d.name == meta["name"] and d.uid == meta.get("uid") for d in self.deletes):
            self.deletes.append(Delete("Pod", meta["name"], grace, meta.get("uid")))


def seconds(delta: timedelta) -> float:
    """A duration in seconds, never negative."""
    return max(0.0, delta.total_seconds())


def live(pods) -> list[dict]:
    """The pods that are not being deleted."""
    return [p for p in pods if not is_terminating(p)]


@dataclasses.dataclass(frozen=True)
class Observed:
    """What a pass saw of the job's world besides the job itself (the loop gathers it)."""

    pods: list[dict] = dataclasses.field(default_factory=list)
    """Pods with the job's labels, including ones the job does not own."""
    service_exists: bool = False
    """The job owns its headless Service."""
    pvc_exists: bool = False
    """The job owns its checkpoint claim."""
    nodes: Optional[dict[str, NodeInfo]] = None
    """The node view (None when unknown: node loss and drains are not judged)."""
    budget: Optional[int] = None
    """The minAvailable of the job's PodDisruptionBudget (None: it has none)."""
    network: Optional[object] = None
    """isolation.NetworkIsolation: the setting and the policies seen (None: policies off)."""
    taken: frozenset[str] = frozenset()
    """Children ("Kind name") whose name an object the job does not own holds."""
    gated: bool = False
    """The cluster allocator admits jobs: no first generation before `Admitted=True`."""


class JobPass:
    """One pass over one job: its inputs, the status being built (`s`) and the plan."""

    def __init__(
        self,
        job: JobRef,
        meta_generation: Optional[int],
        spec: LeptonJobSpec,
        status: LeptonJobStatus,
        observed: Observed,
        now: datetime,
        policy_violations: Sequence[str] = (),
        profile: Optional[FabricProfile] = None,
    ):
        self.job = job
        self.policy_violations = list(policy_violations)  # api.policy.check_policy(): no new worker while any
        self.profile = profile  # spec.profile resolved in the admin policy (api.policy.job_profile)
        self.observed = observed
        self.nodes = observed.nodes
        self.budget = observed.budget
        self.gen_meta = meta_generation
        self.spec = spec
        self.now = now
        self.service_exists = observed.service_exists
        self.pvc_exists = observed.pvc_exists
        self.s: LeptonJobStatus = status.model_copy(deep=True)
        self.plan = Plan(status=self.s)
        self.ours: list[dict] = []
        self.foreign: dict[str, dict] = {}
        for pod in observed.pods:
            if owned_by(pod, job.uid):
                self.ours.append(pod)
            else:
                self.foreign[pod["metadata"]["name"]] = pod

    def cond(self, type_: str, value: bool, reason: str, message: str) -> bool:
        """Set a condition of the status being built; True when it flipped."""
        return set_condition(self.s, type_, value, reason, message, self.now, self.gen_meta)

    def of_generation(self, generation: int) -> dict[int, dict]:
        """Our pods of one generation, by worker index."""
        return {pod_index(p): p for p in self.ours if pod_generation(p) == generation}

    def next_generation(self) -> int:
        """Assign a generation number never used before, abandoned attempts included
        (`status.latestGeneration` records it before any pod of it exists): rendezvous ids
        stay unique and the number fences checkpoints. Its parity differs from the running
        generation's, so its rendezvous port does too (`desired.rendezvous_port`)."""
        s = self.s
        seen = [s.worker_generation, s.latest_generation] + [pod_generation(p) for p in self.ours]
        if s.rescale is not None:
            seen.append(s.rescale.target_generation)
        generation = max(seen) + 1
        if s.worker_generation and generation % 2 == s.worker_generation % 2:
            generation += 1
        s.latest_generation = generation
        return generation

    def node_lost(self, pod: dict) -> Optional[str]:
        """Why the pod's node counts as lost (not Ready for `nodeLostSeconds`, or gone), or None."""
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or self.nodes is None:
            return None
        info = self.nodes.get(node)
        if info is None:
            return f"node {node} no longer exists"
        if info.ready:
            return None
        down = seconds(self.now - info.not_ready_since)
        if down < self.spec.restart.node_lost_seconds:
            self.plan.requeue(self.spec.restart.node_lost_seconds - down)  # look again when it would be lost
            return None
        since = "ever" if info.not_ready_since.year == 1 else f"{down:.0f}s"
        limit = self.spec.restart.node_lost_seconds
        return f"node {node} has not been Ready for {since} (restart.nodeLostSeconds={limit})"

    def node_cordoned(self, pod: dict) -> Optional[str]:
        """The name of the pod's node when it is cordoned (a drain is coming), else None."""
        node = (pod.get("spec") or {}).get("nodeName")
        info = self.nodes.get(node) if node and self.nodes else None
        return node if info is not None and info.unschedulable else None

    def stop_for_rescale(self, to: int, reason: str, message: str, not_before=None) -> None:
        """Record in status a rescale that begins by stopping the running generation (a
        restart, a scale-down, a resume, a shrink), with a fresh target generation."""
        self.s.rescale = RescaleInProgress(
            from_=self.s.world_size,
            to=to,
            reason=reason,
            message=message,
            stage="Stopping",
            started_at=self.now,
            stopped_at=self.now,
            target_generation=self.next_generation(),
            not_before=not_before,
        )

    def grace(self) -> int:
        return self.spec.termination_grace_period_seconds

    def delete_all(self, pods, grace: Optional[int] = None) -> None:
        """Delete pods gracefully, highest index first: worker 0 (the rendezvous host) last."""
        for pod in sorted(live(pods), key=pod_index, reverse=True):
            self.plan.delete_pod(pod, self.grace() if grace is None else grace)

    def create_worker(self, index: int, generation: int, world_size: int) -> None:
        if self.policy_violations:
            return  # lifecycle.flag_policy_violation says why
        name = worker_pod_name(self.job.name, index)
        if name in self.foreign:
            # A pod we do not own holds the name: never adopt, never delete it.
            self.plan.event(
                WARNING,
                REASON_NAME_TAKEN,
                f"pod {name} exists and is not owned by this job; worker {index} cannot start until it is removed",
            )
            return
        self.plan.creates.append(
            build_worker_pod(self.job, self.spec, index, generation, world_size, profile=self.profile)
        )

    def create_missing(self, generation: int, world_size: int, indices) -> None:
        existing = self.of_generation(generation)
        for index in indices:
            if index not in existing:
                self.create_worker(index, generation, world_size)

    def count_workers(self, generation: int, world_size: int) -> None:
        """Fill `status.workers` from the pods of one generation."""
        pods = self.of_generation(generation)
        outcomes = [classify_pod(p) for p in pods.values()]
        w = self.s.workers
        w.desired = world_size
        w.active = len(live(pods.values()))
        w.ready = sum(1 for p in pods.values() if is_ready(p) and not is_terminating(p))
        w.succeeded = sum(1 for o in outcomes if o.outcome == "succeeded")
        w.failed = sum(1 for o in outcomes if o.failed)
        self.s.replicas = self.s.world_size

    def immutable_changed(self) -> bool:
        return self.s.template_hash is not None and self.s.template_hash != self.spec.template_hash()

    def start_generation(self, generation: int, world_size: int, skip_indices=()) -> bool:
        """Create generation `generation` with `world_size` workers and record it.

        Returns False (and creates nothing) while an immutable-field change is pending
        (the new pods would be built from a template the job was not started with) or
        while the spec breaks the admin policy.
        """
        if self.immutable_changed():
            self.s.message = "waiting for the change of an immutable field to be reverted before starting workers"
            return False
        if self.policy_violations:
            self.s.message = "waiting for the spec to comply with the admin policy before starting workers"
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
