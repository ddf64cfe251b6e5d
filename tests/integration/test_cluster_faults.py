"""Faults on the real local control plane (docs/reliability.md rows 19-21): a stale watch
cache, lost nodes, drains through the Eviction API, preemption."""

from __future__ import annotations

import signal
import time

import pytest
from jobs import FAST, create_job, job_body, patch_spec, pods, running, status, wait
from kubernetes import client
from kubernetes.client.rest import ApiException

from lepton_localcluster import LocalCluster, SimulatedNode, procs
from lepton_localcluster.crds import install_crds
from lepton_localcluster.operator_process import OperatorProcess
from lepton_localcluster.pytest_plugin import K8s
from lepton_operator.reconcile.kube import Kube

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def uids(kube, namespace, job) -> dict[str, str]:
    return {n: p["metadata"]["uid"] for n, p in pods(kube, namespace, job, include_terminating=False).items()}


# ------------------------------------------------------------------ row 19: stale pod cache


def test_a_watch_gap_never_gets_a_live_pod_deleted_nor_leaves_the_job_waiting_on_a_ghost(
    kube, k8s, local_cluster, namespace, run_operator
):
    op = run_operator(*FAST, "--relist-seconds", "10", "--settled-relist-seconds", "10")
    create_job(kube, namespace, job_body("gap"))
    wait(k8s, running(kube, namespace, "gap", 2, 1), 40, "Running", op)

    # While the operator is frozen, a worker goes, the job is scaled, and the apiserver
    # restarts: the operator's watches resume after a gap and its pod index may keep the
    # deleted generation-1 worker-1, whose name the next generation's worker reuses.
    procs.signal_group(op.pid, signal.SIGSTOP)
    try:
        k8s.core.delete_namespaced_pod("gap-worker-1", namespace, grace_period_seconds=0)
        patch_spec(kube, namespace, "gap", {"workers": {"replicas": 3}})
        local_cluster.restart_component("kube-apiserver", downtime=3)
    finally:
        procs.signal_group(op.pid, signal.SIGCONT)

    st = wait(k8s, running(kube, namespace, "gap", 3), 120, "Running at 3 after the gap", op)
    assert (st["restarts"], st["disruptions"]) == (0, 1)  # only the worker deleted by hand
    settled = uids(kube, namespace, "gap")
    assert sorted(settled) == ["gap-worker-0", "gap-worker-1", "gap-worker-2"]
    # Past a re-list period: nothing of the running generation is deleted by a stale name.
    time.sleep(15)
    st = status(kube, namespace, "gap")
    assert uids(kube, namespace, "gap") == settled
    assert (st["phase"], st["restarts"], st["disruptions"]) == ("Running", 0, 1), st
    assert op.running(), op.log_text()[-3000:]


# ------------------------------------------------------------------ row 21: drains, preemption


def evict(kube, namespace: str, pod: str) -> int:
    """POST an Eviction (what `kubectl drain` does); the HTTP status (429: a PDB refused)."""
    version = kube.policy_version()
    body = {"apiVersion": version, "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
    try:
        kube.request("POST", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", body=body)
        return 201
    except ApiException as e:
        return e.status


def set_unschedulable(k8s, node: str, value: bool) -> None:
    k8s.core.patch_node(node, {"spec": {"unschedulable": value}})


def test_a_drain_waits_for_the_operator_to_move_the_job_and_spends_no_restart(
    kube, k8s, local_cluster, namespace, run_operator
):
    op = run_operator(*FAST)
    # 5 GPUs a worker: the two workers sit on different 8-GPU nodes.
    spec = {"workers": {"min": 1, "max": 2, "initial": 2}, "resources": {"gpus": 5}}
    create_job(kube, namespace, job_body("drained", autoscaling={"capacityTimeoutSeconds": 10}, **spec))
    wait(k8s, running(kube, namespace, "drained", 2, 1), 40, "Running", op)
    node = pods(kube, namespace, "drained")["drained-worker-1"]["spec"]["nodeName"]
    other = next(n.metadata.name for n in k8s.core.list_node().items if n.metadata.name != node)
    # 2 x 5 GPUs do not fit on the one 8-GPU node left: the job moves there at 1 worker.
    set_unschedulable(k8s, node, True)
    try:
        # The PodDisruptionBudget (minAvailable 2) refuses the eviction while both run.
        assert evict(kube, namespace, "drained-worker-1") == 429
        st = wait(
            k8s,
            lambda: (s := status(kube, namespace, "drained")).get("disruptions") == 1 and s,
            30,
            "the operator moving the job off the cordoned node",
            op,
        )
        # Once the operator moved the job, the drain's eviction goes through (or the pod is gone).
        wait(k8s, lambda: evict(kube, namespace, "drained-worker-1") in (200, 201, 404), 60, "eviction allowed", op)
        st = wait(k8s, running(kube, namespace, "drained", 1), 90, "Running again, off the cordoned node", op)
        assert (st["restarts"], st["disruptions"]) == (0, 1)
        assert [r["reason"] for r in st["rescaleHistory"]] == ["NodeDraining", "ShrunkForCapacity"]
        assert {p["spec"]["nodeName"] for p in pods(kube, namespace, "drained", False).values()} == {other}
    finally:
        set_unschedulable(k8s, node, False)


def test_preemption_by_a_higher_priority_pod_is_a_disruption(kube, k8s, local_cluster, namespace, run_operator):
    op = run_operator(*FAST)
    create_job(
        kube,
        namespace,
        job_body(
            "preempted",
            resources={"gpus": 8},
            workers={"min": 1, "max": 2, "initial": 2},
            autoscaling={"capacityTimeoutSeconds": 10, "capacityBackoffSeconds": 600},
        ),
    )
    wait(k8s, running(kube, namespace, "preempted", 2, 1), 60, "Running on both nodes", op)
    priority = f"urgent-{namespace}"
    scheduling = client.SchedulingV1Api(k8s.api_client)
    scheduling.create_priority_class({"metadata": {"name": priority}, "value": 1000000})
    try:
        k8s.core.create_namespaced_pod(
            namespace,
            {
                "metadata": {"name": "urgent"},
                "spec": {
                    "priorityClassName": priority,
                    "containers": [{"name": "c", "image": "busy", "resources": {"limits": {"nvidia.com/gpu": "8"}}}],
                },
            },
        )
        # The scheduler deletes one worker for it; the job restarts on what is left and
        # shrinks to 1 worker when the second cannot be placed. No restart is spent.
        st = wait(
            k8s,
            lambda: (
                (s := status(kube, namespace, "preempted")).get("phase") == "Running"
                and s.get("worldSize") == 1
                and s.get("workers", {}).get("ready") == 1
                and s
            ),
            120,
            "running at 1 worker after the preemption",
            op,
        )
        assert (st["restarts"], st["disruptions"]) == (0, 1)
        reasons = [r["reason"] for r in st["rescaleHistory"]]
        assert reasons[-1] == "ShrunkForCapacity" and "WorkerLost" in reasons
    finally:
        scheduling.delete_priority_class(priority)


# ------------------------------------------------------------------ row 20: a lost node


@pytest.fixture
def two_node_cluster(k8s_binaries):
    """A cluster of this test's own (node-a, node-b, 2 GPUs each): it loses a node."""
    cluster = LocalCluster(
        binaries=k8s_binaries, nodes=[SimulatedNode("node-a", gpus=2), SimulatedNode("node-b", gpus=2)]
    ).start()
    yield cluster
    cluster.stop()


def test_a_lost_node_is_left_the_job_shrinks_to_what_fits_and_grows_back(two_node_cluster, tmp_path):
    cluster = two_node_cluster
    api = cluster.api_client()
    install_crds(api)
    kube, k8s = Kube(api), K8s(cluster)
    namespace = "lost"
    k8s.core.create_namespace({"metadata": {"name": namespace}})
    op = OperatorProcess(cluster, namespace, list(FAST), None, tmp_path / "operator.log")
    try:
        spec = {
            "workers": {"min": 2, "max": 4, "initial": 4},
            "restart": {"maxRestarts": 0, "nodeLostSeconds": 10},
            "autoscaling": {"capacityTimeoutSeconds": 10, "capacityBackoffSeconds": 30},
        }
        create_job(kube, namespace, job_body("wide", **spec))
        wait(k8s, running(kube, namespace, "wide", 4, 1), 60, "Running on both nodes", op)
        assert {p["spec"]["nodeName"] for p in pods(kube, namespace, "wide").values()} == {"node-a", "node-b"}

        cluster.stop_node("node-b")
        k8s.wait_for(lambda: cluster.node_ready_condition("node-b").status == "Unknown", 60, message="node-b Unknown")
        down = time.monotonic()
        st = wait(k8s, running(kube, namespace, "wide", 2), 90, "Running at 2 on node-a", op)
        took = time.monotonic() - down
        # nodeLostSeconds, one pass, then capacityTimeoutSeconds for the generation that cannot be placed.
        assert took < 10 + 5 + 10 + 20, took
        assert [r["reason"] for r in st["rescaleHistory"]] == ["NodeLost", "ShrunkForCapacity"]
        assert (st["restarts"], st["disruptions"]) == (0, 1)
        assert {p["spec"]["nodeName"] for p in pods(kube, namespace, "wide", False).values()} == {"node-a"}

        cluster.start_node("node-b")
        # After the capacity backoff a capacity-confirmed scale-up brings it back to 4.
        st = wait(k8s, running(kube, namespace, "wide", 4), 120, "Running at 4 again", op)
        assert (st["restarts"], st["disruptions"]) == (0, 1)
        assert st["rescaleHistory"][-1]["reason"] == "GrowingBack" and st["rescaleHistory"][-1]["to"] == 4
    finally:
        op.stop()
