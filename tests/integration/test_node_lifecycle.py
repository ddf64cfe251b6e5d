"""Node heartbeats, node loss and disruption on the local control plane: the simulated
kubelet renews node Leases, the real node lifecycle controller marks a node that stops
heartbeating Ready=Unknown and taints it unreachable, ``stop_node``/``start_node``
simulate losing and regaining a node, and cordon and the Eviction API behave as in a
real cluster.

These tests stop nodes, so they use clusters of their own: the session's shared
clusters are never disturbed."""

from __future__ import annotations

import textwrap
import time
import uuid

import pytest
from kubernetes import client

from lepton_localcluster import LocalCluster, SimulatedNode
from lepton_localcluster.flags import NODE_MONITOR_GRACE_SECONDS, NODE_MONITOR_PERIOD_SECONDS
from lepton_localcluster.kubelet import LEASE_RENEW_SECONDS
from lepton_localcluster.procs import pid_alive
from lepton_localcluster.pytest_plugin import K8s

pytestmark = pytest.mark.integration

UNREACHABLE = "node.kubernetes.io/unreachable"


def _cluster(binaries, **kwargs) -> LocalCluster:
    # Two nodes: with every node down the controller blames itself and removes the taints.
    nodes = [SimulatedNode("node-a", gpus=2), SimulatedNode("node-b", gpus=2)]
    return LocalCluster(binaries=binaries, nodes=nodes, **kwargs).start()


def _stop(cluster: LocalCluster) -> None:
    cluster_id = cluster.cluster_id
    cluster.stop()
    assert cluster.leftover_processes() == [], f"cluster {cluster_id} left processes behind"


@pytest.fixture(scope="module")
def lifecycle_cluster(k8s_binaries):
    """A default-mode cluster of this module's own (node-a, node-b)."""
    cluster = _cluster(k8s_binaries)
    yield cluster
    _stop(cluster)


@pytest.fixture
def lk8s(lifecycle_cluster):
    """API helpers on the module's cluster; every node is running and uncordoned after
    each test, even a failed one."""
    yield K8s(lifecycle_cluster)
    for name in lifecycle_cluster.kubelet.stopped_nodes():
        lifecycle_cluster.start_node(name)
    for node in lifecycle_cluster.nodes:
        lifecycle_cluster.uncordon(node.name)


def _namespace(k8s: K8s) -> str:
    name = f"nl-{uuid.uuid4().hex[:6]}"
    k8s.core.create_namespace({"metadata": {"name": name}})
    return name


def _pod(name, *, node=None, grace=None, command=None, labels=None):
    container = {"name": "main", "image": "busybox"}
    if command is not None:
        container["command"] = command
    spec = {"restartPolicy": "Never", "containers": [container]}
    if node is not None:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}  # scheduled, not bound by hand
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}}, "spec": spec}


def _running(k8s: K8s, ns: str, name: str, timeout: float = 30):
    return k8s.wait_for(
        lambda: (p := k8s.pod(ns, name)) and p.status.phase == "Running" and p, timeout, message=f"{name} Running"
    )


def _pod_ready(pod) -> str | None:
    return next((c.status for c in pod.status.conditions or () if c.type == "Ready"), None)


def _taints(k8s: K8s, node: str) -> set[tuple[str, str]]:
    return {(t.key, t.effect) for t in k8s.core.read_node(node).spec.taints or ()}


# ------------------------------------------------------------------- heartbeats
@pytest.mark.timeout(60)
def test_nodes_heartbeat_through_leases_and_status(lifecycle_cluster, lk8s):
    # the first renewal creates each Lease, owned by its Node so that it goes with it
    leases = {
        n.name: lk8s.wait_for(lambda n=n: lk8s.coordination.read_namespaced_lease(n.name, "kube-node-lease"), 10)
        for n in lifecycle_cluster.nodes
    }
    for name, lease in leases.items():
        assert lease.spec.holder_identity == name and lease.spec.lease_duration_seconds == 40
        assert lease.metadata.owner_references[0].kind == "Node"
    time.sleep(LEASE_RENEW_SECONDS + 1)
    for name, lease in leases.items():
        renewed = lk8s.coordination.read_namespaced_lease(name, "kube-node-lease").spec.renew_time
        assert renewed > lease.spec.renew_time, f"lease of {name} not renewed"
    # the node status is posted too (every 10 s): lastHeartbeatTime moves, the transition stays
    before = lifecycle_cluster.node_ready_condition("node-a")
    after = lk8s.wait_for(
        lambda: (
            (c := lifecycle_cluster.node_ready_condition("node-a")).last_heartbeat_time > before.last_heartbeat_time
            and c
        ),
        25,
        message="a newer Ready heartbeat",
    )
    assert after.status == "True" and after.last_transition_time == before.last_transition_time


# -------------------------------------------------------------------- node loss
@pytest.mark.timeout(120)
def test_lost_node_goes_unknown_and_unreachable_then_recovers(lifecycle_cluster, lk8s):
    ns = _namespace(lk8s)
    lk8s.core.create_namespaced_pod(ns, _pod("stays", node="node-b"))
    lk8s.core.create_namespaced_pod(ns, _pod("graceful", node="node-b", grace=1))
    _running(lk8s, ns, "stays")
    _running(lk8s, ns, "graceful")

    lifecycle_cluster.stop_node("node-b")
    stopped = time.monotonic()
    cond = lk8s.wait_for(
        lambda: (c := lifecycle_cluster.node_ready_condition("node-b")).status != "True" and c,
        NODE_MONITOR_GRACE_SECONDS + 2 * NODE_MONITOR_PERIOD_SECONDS + 6,
        message="node-b to leave Ready",
    )
    took = time.monotonic() - stopped
    assert cond.status == "Unknown" and cond.reason == "NodeStatusUnknown"
    # the grace period, counted from the last renewal before the stop, is what decides
    assert took >= NODE_MONITOR_GRACE_SECONDS - LEASE_RENEW_SECONDS - 1, f"Unknown after only {took:.1f} s"
    lk8s.wait_for(
        lambda: {(UNREACHABLE, "NoSchedule"), (UNREACHABLE, "NoExecute")} <= _taints(lk8s, "node-b"),
        3 * NODE_MONITOR_PERIOD_SECONDS + 5,
        message="unreachable taints on node-b",
    )
    assert lifecycle_cluster.node_ready_condition("node-a").status == "True"
    # the node controller marks its pods not ready; nobody on the node says otherwise
    lk8s.wait_for(lambda: _pod_ready(lk8s.pod(ns, "stays")) == "False", 10, message="stays not ready")
    assert lk8s.pod(ns, "stays").status.phase == "Running"

    # a graceful delete needs the (dead) kubelet: the pod stays Terminating
    lk8s.core.delete_namespaced_pod("graceful", ns)
    time.sleep(4)  # twice the grace period and the simulated kubelet's cap
    pod = lk8s.pod(ns, "graceful")
    assert pod is not None and pod.metadata.deletion_timestamp
    # a force delete (grace 0) removes it from the API at once
    lk8s.core.delete_namespaced_pod("graceful", ns, grace_period_seconds=0)
    lk8s.wait_for(lambda: lk8s.pod(ns, "graceful") is None, 5, message="graceful force-deleted")

    # the scheduler keeps new pods off the unreachable node
    lk8s.core.create_namespaced_pod(ns, _pod("fresh"))
    assert _running(lk8s, ns, "fresh").spec.node_name == "node-a"

    lifecycle_cluster.start_node("node-b")
    assert lifecycle_cluster.node_ready_condition("node-b").status == "True"  # posted before returning
    lk8s.wait_for(lambda: not _taints(lk8s, "node-b"), 3 * NODE_MONITOR_PERIOD_SECONDS + 5, message="taints removed")
    # the kubelet reconciled its pod, and the node takes new pods again
    lk8s.wait_for(lambda: _pod_ready(lk8s.pod(ns, "stays")) == "True", 10, message="stays ready again")
    lk8s.core.create_namespaced_pod(ns, _pod("after", node="node-b"))
    _running(lk8s, ns, "after")
    lk8s.core.delete_namespace(ns)


@pytest.mark.timeout(60)
def test_power_loss_reports_lost_containers_after_restart(lifecycle_cluster, lk8s):
    ns = _namespace(lk8s)
    lk8s.core.create_namespaced_pod(ns, _pod("victim", node="node-b"))
    _running(lk8s, ns, "victim")
    lifecycle_cluster.stop_node("node-b", processes="kill")
    time.sleep(1)
    assert lk8s.pod(ns, "victim").status.phase == "Running"  # nobody is left to say otherwise
    lifecycle_cluster.start_node("node-b")
    pod = lk8s.wait_for(
        lambda: (p := lk8s.pod(ns, "victim")).status.phase == "Failed" and p, 10, message="victim Failed"
    )
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (137, "NodeRestarted")
    lk8s.core.delete_namespace(ns)


# ---------------------------------------------------------- cordon and eviction
@pytest.mark.timeout(60)
def test_cordon_and_uncordon(lifecycle_cluster, lk8s):
    ns = _namespace(lk8s)
    lifecycle_cluster.cordon("node-a")
    assert lk8s.core.read_node("node-a").spec.unschedulable
    # as in a real cluster, the node lifecycle controller taints a cordoned node
    lk8s.wait_for(
        lambda: ("node.kubernetes.io/unschedulable", "NoSchedule") in _taints(lk8s, "node-a"), 10, message="taint"
    )
    lk8s.core.create_namespaced_pod(ns, _pod("waits", node="node-a"))
    lk8s.wait_for(lambda: lk8s.events(ns, "waits", "FailedScheduling"), 20, message="FailedScheduling")
    assert lk8s.pod(ns, "waits").status.phase == "Pending"
    lifecycle_cluster.uncordon("node-a")
    assert not lk8s.core.read_node("node-a").spec.unschedulable
    assert _running(lk8s, ns, "waits").spec.node_name == "node-a"
    lk8s.core.delete_namespace(ns)


def _pdb_version(k8s: K8s) -> str:
    groups = client.ApisApi(k8s.api_client).get_api_versions().groups
    versions = {v.version for g in groups if g.name == "policy" for v in g.versions}
    return "v1" if "v1" in versions else "v1beta1"  # v1beta1 on 1.20, v1 from 1.21


@pytest.mark.timeout(60)
def test_eviction_honours_a_pod_disruption_budget(lifecycle_cluster, lk8s):
    ns = _namespace(lk8s)
    for i in range(2):
        lk8s.core.create_namespaced_pod(ns, _pod(f"guarded-{i}", grace=1, labels={"app": "guarded"}))
    lk8s.core.create_namespaced_pod(ns, _pod("free", grace=1))
    for name in ("guarded-0", "guarded-1", "free"):
        _running(lk8s, ns, name)
    version = _pdb_version(lk8s)
    pdb = {
        "apiVersion": f"policy/{version}",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "guard"},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "guarded"}}},
    }
    lk8s.custom.create_namespaced_custom_object("policy", version, ns, "poddisruptionbudgets", pdb)

    def budget(allowed):
        def check():
            obj = lk8s.custom.get_namespaced_custom_object("policy", version, ns, "poddisruptionbudgets", "guard")
            status = obj.get("status") or {}
            seen = status.get("observedGeneration", 0) >= obj["metadata"]["generation"]
            return seen and status.get("currentHealthy") == 2 and status.get("disruptionsAllowed") == allowed

        lk8s.wait_for(check, 20, message=f"the disruption controller to allow {allowed}")

    budget(0)  # the disruption controller has counted both pods healthy
    assert lifecycle_cluster.evict(ns, "guarded-0") == 429
    assert not lk8s.pod(ns, "guarded-0").metadata.deletion_timestamp
    assert lifecycle_cluster.evict(ns, "free") in (200, 201)  # no budget covers it
    lk8s.wait_for(lambda: lk8s.pod(ns, "free") is None, 15, message="free evicted")

    lk8s.custom.patch_namespaced_custom_object(
        "policy", version, ns, "poddisruptionbudgets", "guard", {"spec": {"minAvailable": 1}}
    )
    budget(1)
    assert lifecycle_cluster.evict(ns, "guarded-0") in (200, 201)
    lk8s.wait_for(lambda: lk8s.pod(ns, "guarded-0") is None, 15, message="guarded-0 evicted")
    assert lk8s.pod(ns, "guarded-1").status.phase == "Running"
    lk8s.core.delete_namespace(ns)


# ----------------------------------------------------------------- process mode
SLEEPER = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    print("pid", os.getpid(), flush=True)
    while True:
        time.sleep(0.1)
""")


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.timeout(120)
def test_process_mode_node_loss_keeps_freezes_or_kills_processes(k8s_binaries):
    cluster = _cluster(k8s_binaries, kubelet_mode="process")
    try:
        k8s = K8s(cluster)
        ns = _namespace(k8s)
        for name in ("forced", "terminating", "survivor"):
            k8s.core.create_namespaced_pod(ns, _pod(name, node="node-b", grace=30, command=["python", "-c", SLEEPER]))

        def pid(name):
            log = cluster.pod_log_path(ns, name)
            line = k8s.wait_for(lambda: log.exists() and log.read_text().strip(), 20, message=f"{name} started")
            return int(line.split()[1])

        pids = {name: pid(name) for name in ("forced", "terminating", "survivor")}

        # "keep", a partition: the processes run on, nothing is reported or finished
        cluster.stop_node("node-b")
        k8s.core.delete_namespaced_pod("terminating", ns)
        k8s.core.delete_namespaced_pod("forced", ns, grace_period_seconds=0)
        time.sleep(2)
        assert k8s.pod(ns, "forced") is None and k8s.pod(ns, "terminating").metadata.deletion_timestamp
        assert all(pid_alive(p) for p in pids.values()), "a partitioned node's containers keep running"
        cluster.start_node("node-b")
        # the kubelet is back: the force-deleted pod's process goes, the pending deletion
        # is carried out (SIGTERM: the process exits at once), the survivor runs on
        k8s.wait_for(lambda: not pid_alive(pids["forced"]), 10, message="the orphan process killed")
        k8s.wait_for(lambda: k8s.pod(ns, "terminating") is None, 10, message="the deletion completed")
        assert not pid_alive(pids["terminating"])
        assert pid_alive(pids["survivor"]) and _running(k8s, ns, "survivor")

        # "freeze", a hung machine: SIGSTOP, and SIGCONT when it is back
        cluster.stop_node("node-b", processes="freeze")
        k8s.wait_for(lambda: _state(pids["survivor"]) == "T", 5, message="the process stopped")
        cluster.start_node("node-b")
        k8s.wait_for(lambda: _state(pids["survivor"]) != "T", 5, message="the process continued")
        assert _pod_ready(k8s.pod(ns, "survivor")) == "True"

        # "kill", power loss: the process dies now, the pod fails when the node is back
        cluster.stop_node("node-b", processes="kill")
        k8s.wait_for(lambda: not pid_alive(pids["survivor"]), 5, message="the process killed")
        assert k8s.pod(ns, "survivor").status.phase == "Running"
        cluster.start_node("node-b")
        pod = k8s.wait_for(
            lambda: (p := k8s.pod(ns, "survivor")).status.phase == "Failed" and p, 10, message="survivor Failed"
        )
        term = pod.status.container_statuses[0].state.terminated
        assert (term.exit_code, term.reason) == (137, "NodeRestarted")
    finally:
        _stop(cluster)
