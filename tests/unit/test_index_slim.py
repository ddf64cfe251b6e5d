"""The pod index keeps only what plan() reads (podcache.trim_pod): on a trimmed pod, plan()
must decide exactly what it decides on the whole body the API sends.

Each test drives a `World` (planworld.py) through a job's life; at every pass plan() runs
twice, once on the pods as the API would return them (every field a kubelet and the
apiserver fill in, see `full_body`) and once on those bodies trimmed, and the two plans
must be equal (status, creates, deletes, patches, events, requeue)."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
from planworld import World, base_spec, scale_to

from lepton_operator.reconcile.jobpass import Observed
from lepton_operator.reconcile.plan import plan
from lepton_operator.reconcile.podcache import trim_pod

pytestmark = pytest.mark.unit

STAMP = "2026-01-01T12:00:00Z"


def full_body(pod: dict) -> dict:
    """A World pod as the API would return it: the fields plan() never reads filled in."""
    body = copy.deepcopy(pod)
    meta = body["metadata"]
    meta.setdefault("namespace", "ns")
    meta.update(
        resourceVersion="123",
        creationTimestamp=STAMP,
        generateName="",
        annotations={"kubectl.kubernetes.io/last-applied": "{}" * 50},
        managedFields=[{"manager": "lepton-operator", "operation": "Update", "fieldsV1": {"f:spec": {}}}],
    )
    for ref in meta.get("ownerReferences") or []:
        ref.update(blockOwnerDeletion=True, controller=True)
    spec = body.setdefault("spec", {})
    spec.update(schedulerName="default-scheduler", tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])
    status = body.setdefault("status", {})
    status.update(hostIP="10.0.0.1", podIP="10.244.0.2", qosClass="Guaranteed", startTime=STAMP)
    if status.get("reason"):
        status["message"] = "The node was low on resource: memory. " * 5
    conds = status.setdefault("conditions", [])
    for c in conds:
        c.update(lastProbeTime=None, lastTransitionTime=STAMP, reason=c.get("reason", "Because"), message="m")
    have = {c["type"] for c in conds}
    for t in ("Initialized", "PodScheduled", "ContainersReady", "Ready"):
        if t not in have:
            conds.append({"type": t, "status": "False", "lastTransitionTime": STAMP, "reason": "NotYet"})
    statuses = status.setdefault("containerStatuses", [])
    if not statuses:
        statuses.append({"name": "worker", "state": {"running": {"startedAt": STAMP}}})
    for cs in statuses:
        cs.update(image="trainer:1", imageID="docker://sha256:abc", containerID="docker://1", restartCount=0)
        cs.setdefault("lastState", {"waiting": {"reason": "ContainerCreating"}})
        cs.setdefault("ready", status.get("phase") == "Running")
    return body


def assert_same_plan(w: World, **changes) -> None:
    """plan() on whole bodies and on trimmed ones decides the same; then the world moves on."""
    pods = [full_body(p) for p in w.pods.values()]
    now = w.now
    base = Observed(pods=[], service_exists=w.service, pvc_exists=w.pvc, nodes=w.nodes, budget=w.budget, gated=w.gated)
    base = dataclasses.replace(base, **changes)
    full = plan(
        w.job,
        w.meta_generation,
        w.parsed(),
        w.status,
        dataclasses.replace(base, pods=copy.deepcopy(pods)),
        now,
        w.policy,
    )
    slim = plan(
        w.job,
        w.meta_generation,
        w.parsed(),
        w.status,
        dataclasses.replace(base, pods=[trim_pod(p) for p in pods]),
        now,
        w.policy,
    )
    assert slim.status.to_k8s() == full.status.to_k8s()
    assert slim.creates == full.creates
    assert slim.deletes == full.deletes
    assert slim.patches == full.patches
    assert slim.events == full.events
    assert slim.requeue_after == full.requeue_after


def drive(w: World, seconds: float = 0) -> None:
    assert_same_plan(w)
    w.step(seconds)


def test_start_run_and_finish():
    w = World(base_spec())
    drive(w)
    for _ in range(3):
        w.reap()
        w.run_all()
        drive(w)
    assert w.status.phase == "Running"
    for name in list(w.pods):
        w.exit(name, 0)
    drive(w)
    drive(w, 1)


@pytest.mark.parametrize("code", [1, 137])
def test_worker_exits_with_a_code(code):
    w = World(base_spec())
    for _ in range(4):
        w.reap()
        w.run_all()
        drive(w)
    first = sorted(w.pods)[0]
    w.exit(first, code)
    # A last state from an earlier container in another pod: the exit code must survive trim.
    second = sorted(w.pods)[1]
    w.pods[second].setdefault("status", {})["containerStatuses"] = [
        {"name": "worker", "state": {"running": {}}, "lastState": {"terminated": {"exitCode": 2}}}
    ]
    for _ in range(4):
        drive(w, 1)
        w.reap()
        w.run_all()


def test_eviction_and_disruption_condition():
    w = World(base_spec())
    for _ in range(4):
        w.reap()
        w.run_all()
        drive(w)
    names = sorted(w.pods)
    w.evict(names[0])
    w.pods[names[1]]["status"] = {
        "phase": "Failed",
        "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
    }
    for _ in range(4):
        drive(w, 1)
        w.reap()
        w.run_all()


def test_terminating_and_unscheduled_pods_and_a_rescale():
    w = World(base_spec())
    w.capacity = {"node-1": 2}
    for _ in range(4):
        w.reap()
        w.run_all()
        drive(w)
    scale_to(w, 4)  # two more than fit: added workers stay Pending, unbound
    for _ in range(6):
        drive(w, 30)
        w.run_all()
    w.capacity = None
    for _ in range(6):
        drive(w, 200)
        w.reap()
        w.run_all()


def test_trim_keeps_only_what_plan_reads():
    body = full_body(
        {
            "metadata": {
                "name": "job-worker-0",
                "uid": "u1",
                "labels": {"lepton.ai/generation": "3"},
                "ownerReferences": [{"uid": "uid-1", "kind": "LeptonJob", "name": "job"}],
            },
            "spec": {"nodeName": "node-1"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        }
    )
    t = trim_pod(body)
    assert t["metadata"]["ownerReferences"] == [{"uid": "uid-1"}]
    assert t["status"] == {"phase": "Running", "reason": None, "conditions": [{"type": "Ready", "status": "True"}]}
    assert "containerStatuses" not in t["status"]  # running containers carry no exit code
    assert t["spec"] == {"nodeName": "node-1"}
    # Strings thousands of pods share are interned: one copy in the process.
    other = trim_pod(copy.deepcopy(body))
    assert other["spec"]["nodeName"] is t["spec"]["nodeName"]
    assert sys.getsizeof(t["metadata"]["labels"]) < 1000
