"""Local Kubernetes control plane for tests and the demo.

A real etcd, kube-apiserver, kube-scheduler and kube-controller-manager (Kubernetes
1.20.2) on loopback, simulated GPU nodes, a simulated kubelet (default or process mode)
and a tiny volume provisioner; or, with ``LocalCluster(api_only=True)``, etcd and
kube-apiserver alone. See :mod:`.controlplane`, :mod:`.kubelet` (process mode and DNS
details), :mod:`.binaries` (where the binaries come from), :mod:`.flags` (command lines
by version) and :mod:`.operator_process` (the operator as a subprocess).
"""

from .binaries import (
    BinariesUnavailable,
    SchedulerUnavailable,
    cache_dir,
    ensure_binaries,
    find_binaries,
    import_binaries,
    require_binaries,
)
from .controlplane import ClusterStartError, LocalCluster
from .kubelet import SimulatedKubelet
from .nodes import GPU_RESOURCE, SimulatedNode, default_nodes
from .operator_process import OperatorProcess
from .procs import marked_processes
from .storage import SimulatedProvisioner

__all__ = [
    "BinariesUnavailable",
    "ClusterStartError",
    "GPU_RESOURCE",
    "LocalCluster",
    "OperatorProcess",
    "SchedulerUnavailable",
    "SimulatedKubelet",
    "SimulatedNode",
    "SimulatedProvisioner",
    "cache_dir",
    "default_nodes",
    "ensure_binaries",
    "find_binaries",
    "import_binaries",
    "marked_processes",
    "require_binaries",
]
