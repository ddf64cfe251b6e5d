"""Simulated GPU nodes: Node objects with capacity, a Ready condition and no taints.

There is no kubelet behind them; :mod:`.kubelet` plays its part for pods bound to them.
The node lifecycle controller is disabled in the controller-manager, so nothing marks
them NotReady or evicts their pods, and no node Lease needs renewing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.rest import ApiException

GPU_RESOURCE = "nvidia.com/gpu"


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


def _status(node: SimulatedNode) -> dict:
    now = _now()
    conditions = [
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "simulated kubelet is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
    ]
    for ctype in ("MemoryPressure", "DiskPressure", "PIDPressure"):
        conditions.append(
            {
                "type": ctype,
                "status": "False",
                "reason": f"KubeletHasNo{ctype}",
                "message": "simulated",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        )
    return {
        "capacity": node.capacity(),
        "allocatable": node.capacity(),
        "conditions": conditions,
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
    # The apiserver's admission adds node.kubernetes.io/not-ready:NoSchedule at creation;
    # the (disabled) node lifecycle controller would remove it once Ready.
    core.patch_node(node.name, {"spec": {"taints": None}}, _content_type=merge)


def delete_node(api: client.ApiClient, name: str) -> None:
    """Delete a simulated node (its pods stay bound to a missing node, as in reality)."""
    try:
        client.CoreV1Api(api).delete_node(name)
    except ApiException as e:
        if e.status != 404:
            raise
