"""A tiny fake cluster for the pure reconcile pass (`plan()`), shared by the plan tests.

`World` applies a plan the way the executor does (status first, through its wire form;
then deletes, which only mark pods terminating; then creates, which never replace an
existing name), and lets a test move pods along (schedule, ready, exit, evict, finish
terminating) and time forward.
"""

from __future__ import annotations

import copy
import dataclasses
from datetime import datetime, timedelta, timezone

from lepton_operator.api.models import InvalidJob, LeptonJobStatus, parse_job, parse_status
from lepton_operator.api.policy import DEFAULT_POLICY
from lepton_operator.desired import LABEL_GENERATION, JobRef
from lepton_operator.reconcile.jobpass import Observed
from lepton_operator.reconcile.plan import plan

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def base_spec(**overrides) -> dict:
    spec = {
        "image": "trainer:1",
        "workers": {"min": 1, "max": 4, "initial": 2},
        "resources": {"gpus": 1},
        "terminationGracePeriodSeconds": 5,
        "restart": {"maxRestarts": 2, "backoffSeconds": 0},
        "autoscaling": {"capacityTimeoutSeconds": 120, "capacityBackoffSeconds": 600},
    }
    spec.update(overrides)
    return spec


class World:
    """A tiny fake cluster for one job (see the module docstring)."""

    def __init__(self, spec: dict, name: str = "job", uid: str = "uid-1"):
        self.job = JobRef(name, "ns", uid)
        self.spec = copy.deepcopy(spec)
        self.status = LeptonJobStatus()
        self.pods: dict[str, dict] = {}
        self.service = False
        self.pvc = False
        self.now = T0
        self.events: list[tuple[str, str, str]] = []
        self.meta_generation = 1
        self.last = None
        self.uids = 0
        self.nodes = None  # the node view plan() gets (None: unknown)
        self.capacity: dict[str, int] | None = None  # worker slots per node (None: unlimited)
        self.budget: int | None = None  # the PodDisruptionBudget's minAvailable
        self.policy = DEFAULT_POLICY  # the admin policy the operator was started with
        self.gated = False  # the cluster allocator admits jobs (Admitted condition)

    # --- passes -----------------------------------------------------------------

    def parsed(self):
        try:
            return parse_job(self.job.name, self.spec)
        except InvalidJob as e:
            return e

    def observed(self, **changes) -> Observed:
        """What the operator would see of this world now (pods copied: plan() must not
        change the world), with `changes` to some fields."""
        seen = Observed(
            pods=[copy.deepcopy(x) for x in self.pods.values()],
            service_exists=self.service,
            pvc_exists=self.pvc,
            nodes=self.nodes,
            budget=self.budget,
            gated=self.gated,
        )
        return dataclasses.replace(seen, **changes)

    def step(self, seconds: float = 0):
        self.now += timedelta(seconds=seconds)
        p = plan(self.job, self.meta_generation, self.parsed(), self.status, self.observed(), self.now, self.policy)
        self.status = parse_status(p.status.to_k8s())  # what the apiserver would store
        for delete in p.deletes:
            assert delete.kind == "Pod"
            pod = self.pods.get(delete.name)
            if pod is None or pod["metadata"]["uid"] != delete.uid:  # the uid precondition
                continue
            if delete.grace == 0:
                del self.pods[delete.name]  # force delete: gone from the API at once
            else:
                pod["metadata"]["deletionTimestamp"] = self.now.isoformat()
        for obj in p.creates:
            if obj["kind"] == "Pod":
                if obj["metadata"]["name"] not in self.pods:  # AlreadyExists otherwise
                    pod = copy.deepcopy(obj)
                    self.uids += 1
                    pod["metadata"]["uid"] = f"{obj['metadata']['name']}-u{self.uids}"
                    pod["status"] = {"phase": "Pending"}
                    self.pods[obj["metadata"]["name"]] = pod
            elif obj["kind"] == "Service":
                self.service = True
            elif obj["kind"] == "PersistentVolumeClaim":
                self.pvc = True
            elif obj["kind"] == "PodDisruptionBudget" and self.budget is None:
                self.budget = obj["spec"]["minAvailable"]
        for kind, _name, patch in p.patches:
            assert kind == "PodDisruptionBudget"
            self.budget = patch["spec"]["minAvailable"]
        self.events += p.events
        self.last = p
        return p

    def settle(self, rounds: int = 6):
        """Let the simulated kubelet run: schedule and start everything, finish deletions."""
        for _ in range(rounds):
            self.reap()
            self.run_all()
            self.step()

    def set_spec(self, **changes):
        self.spec.update(changes)
        self.meta_generation += 1

    # --- the simulated kubelet ----------------------------------------------------

    def schedule(self, *names, node: str = "node-1"):
        for n in names or list(self.pods):
            self.pods[n].setdefault("spec", {})["nodeName"] = node

    def place(self, pod: dict) -> bool:
        """The scheduler: any node without `capacity`, else a Ready, uncordoned node with a
        free slot (lowest name first). True when the pod is (now) bound."""
        spec = pod.setdefault("spec", {})
        if spec.get("nodeName"):
            return True
        if self.capacity is None:
            spec["nodeName"] = "node-1"
            return True
        used: dict[str, int] = {}
        for other in self.pods.values():
            node = (other.get("spec") or {}).get("nodeName")
            if node and other["status"].get("phase") in ("Pending", "Running"):
                used[node] = used.get(node, 0) + 1
        for node, slots in sorted(self.capacity.items()):
            info = (self.nodes or {}).get(node)
            if info is not None and (not info.ready or info.unschedulable):
                continue
            if used.get(node, 0) < slots:
                spec["nodeName"] = node
                return True
        return False

    def run_all(self):
        """Bind what fits and start it (pods that fit nowhere stay Pending, unbound)."""
        for pod in self.pods.values():
            if pod["status"]["phase"] == "Pending" and not pod["metadata"].get("deletionTimestamp"):
                if self.place(pod):
                    pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}

    def exit(self, name: str, code: int):
        self.pods[name]["status"] = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [{"name": "worker", "state": {"terminated": {"exitCode": code}}}],
        }

    def evict(self, name: str):
        self.pods[name]["status"] = {"phase": "Failed", "reason": "Evicted"}

    def reap(self, *names):
        """Terminating pods finish their grace period and disappear."""
        for n in [n for n, p in self.pods.items() if p["metadata"].get("deletionTimestamp")]:
            if not names or n in names:
                del self.pods[n]

    # --- views ----------------------------------------------------------------------

    def generations(self) -> dict[str, int]:
        return {n: int(p["metadata"]["labels"][LABEL_GENERATION]) for n, p in sorted(self.pods.items())}

    def live(self) -> list[str]:
        return sorted(n for n, p in self.pods.items() if not p["metadata"].get("deletionTimestamp"))

    def created_pods(self) -> list[str]:
        return sorted(o["metadata"]["name"] for o in self.last.creates if o["kind"] == "Pod")

    def deleted(self) -> list[str]:
        return [d.name for d in self.last.deletes]

    def reasons(self) -> list[str]:
        return [reason for _t, reason, _m in self.events]


def running_world(spec=None) -> World:
    w = World(spec or base_spec())
    w.step()
    w.settle(2)
    assert w.status.phase == "Running"
    w.events.clear()
    return w


def scale_to(w: World, replicas: int):
    workers = dict(w.spec["workers"])
    workers["replicas"] = replicas
    w.set_spec(workers=workers)
