"""Simulated GPU nodes: Node objects with capacity, a Ready condition and no taints.

There is no kubelet behind them; :mod:`.kubelet` plays its part for pods bound to them,
and sends their heartbeats with :func:`renew_lease` and :func:`post_node_status`, as a
kubelet does. The node lifecycle controller watches those heartbeats: a node whose
heartbeats stop (``LocalCluster.stop_node``) goes Ready=Unknown and is tainted
``node.kubernetes.io/unreachable`` (NoSchedule, NoExecute) as in a real cluster.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.rest import ApiException

GPU_RESOURCE = "nvidia.com/gpu"
#: Where kubelets keep their node Leases (one per node, named after it).
NODE_LEASE_NAMESPACE = "kube-node-lease"
#: A kubelet's default; the node lifecycle controller uses its own grace period instead.
LEASE_DURATION_SECONDS = 40
MERGE = "application/merge-patch+json"


@dataclass
class SimulatedNode:
    """A node the scheduler can place pods on. Quantities are Kubernetes strings."""

    name: str
    cpu: str = "32"
    memory: str = "256Gi"
    pods: int = 110
    gpus: int = 8
    labels: dict[str, str] | None = None

    def capacity(self) -> dict[str, str]:
        """Capacity (= allocatable) as the API expects it: all values strings."""
        cap = {"cpu": str(self.cpu), "memory": str(self.memory), "pods": str(self.pods)}
        if self.gpus:
            cap[GPU_RESOURCE] = str(self.gpus)
        return cap


def default_nodes(count: int = 2, gpus: int = 8) -> list[SimulatedNode]:
    """``count`` nodes named ``gpu-node-0``... with ``gpus`` GPUs each."""
    return [SimulatedNode(name=f"gpu-node-{i}", gpus=gpus) for i in range(count)]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions(previous: list[dict] | None = None) -> list[dict]:
    """A healthy node's conditions with a fresh heartbeat; a condition whose status is
    unchanged since ``previous`` keeps its lastTransitionTime."""
    now = _now()
    before = {c["type"]: c for c in previous or ()}
    wanted = [("Ready", "True", "KubeletReady", "simulated kubelet is posting ready status")]
    wanted += [(t, "False", f"KubeletHasNo{t}", "simulated") for t in ("MemoryPressure", "DiskPressure", "PIDPressure")]
    conditions = []
    for ctype, status, reason, message in wanted:
        old = before.get(ctype, {})
        since = old.get("lastTransitionTime") if old.get("status") == status else None
        conditions.append(
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": since or now,
            }
        )
    return conditions


def _status(node: SimulatedNode) -> dict:
    return {
        "capacity": node.capacity(),
        "allocatable": node.capacity(),
        "conditions": _conditions(),
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": node.name},
        ],
        "nodeInfo": {
            "architecture": "amd64",
            "bootID": "",
            "containerRuntimeVersion": "simulated://1.0",
            "kernelVersion": "",
            "kubeProxyVersion": "v1.20.2",
            "kubeletVersion": "v1.20.2",
            "machineID": "",
            "operatingSystem": "linux",
            "osImage": "lepton simulated node",
            "systemUUID": "",
        },
    }


def create_node(api: client.ApiClient, node: SimulatedNode) -> None:
    """Create (or refresh) a Ready, untainted simulated node."""
    core = client.CoreV1Api(api)
    labels = {
        "kubernetes.io/hostname": node.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "lepton.ai/simulated": "true",
        **(node.labels or {}),
    }
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": labels},
        "spec": {},
        "status": _status(node),
    }
    try:
        core.create_node(body)
    except ApiException as e:
        if e.status != 409:
            raise
    merge = "application/merge-patch+json"
    # Status sent on create can be dropped; set it explicitly.
    core.patch_node_status(node.name, {"status": _status(node)}, _content_type=merge)
    # The apiserver's admission adds node.kubernetes.io/not-ready:NoSchedule at creation.
    # The node lifecycle controller removes it once it sees Ready, a pass later; removing
    # it here makes the node schedulable when create_node returns.
    core.patch_node(node.name, {"spec": {"taints": None}}, _content_type=merge)


def renew_lease(api: client.ApiClient, name: str, timeout: float = 5) -> None:
    """Renew the node's Lease in ``kube-node-lease`` (created when missing, owned by the
    Node so it goes with it), as a kubelet does."""
    coord = client.CoordinationV1Api(api)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # MicroTime
    spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_SECONDS, "renewTime": now}
    try:
        coord.patch_namespaced_lease(
            name,
            NODE_LEASE_NAMESPACE,
            {"spec": spec},
            _content_type=MERGE,
            _preload_content=False,
            _request_timeout=timeout,
        )
        return
    except ApiException as e:
        if e.status != 404:
            raise
    uid = _read_node(api, name, timeout)["metadata"]["uid"]
    owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}
    body = {"metadata": {"name": name, "ownerReferences": [owner]}, "spec": {**spec, "acquireTime": now}}
    try:
        coord.create_namespaced_lease(NODE_LEASE_NAMESPACE, body, _preload_content=False, _request_timeout=timeout)
    except ApiException as e:
        if e.status != 409:  # created meanwhile: the next renewal patches it
            raise


def post_node_status(api: client.ApiClient, name: str, timeout: float = 5) -> None:
    """Post the node's conditions as Ready with a fresh lastHeartbeatTime, as a kubelet
    does every node status update; this also turns a Ready=Unknown node Ready again."""
    node = _read_node(api, name, timeout)
    patch = {
        # conditional on what we read: a concurrent write (the node lifecycle
        # controller's) wins, and the next update starts from it
        "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
        "status": {"conditions": _conditions(node.get("status", {}).get("conditions"))},
    }
    client.CoreV1Api(api).patch_node_status(
        name, patch, _content_type=MERGE, _preload_content=False, _request_timeout=timeout
    )


def _read_node(api: client.ApiClient, name: str, timeout: float) -> dict:
    # raw JSON: deserialising a Node into models costs more CPU than the request
    resp = client.CoreV1Api(api).read_node(name, _preload_content=False, _request_timeout=timeout)
    return json.loads(resp.data)


def delete_node(api: client.ApiClient, name: str) -> None:
    """Delete a simulated node (its pods stay bound to a missing node, as in reality)."""
    try:
        client.CoreV1Api(api).delete_node(name)
    except ApiException as e:
        if e.status != 404:
            raise
