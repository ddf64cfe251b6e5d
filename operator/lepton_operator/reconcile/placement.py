"""status.placement: the topology domains the current generation occupies (pure).

The scheduler places the workers (desired/placement.py states `spec.placement` as pod
affinity and spread); a pass reads back where the generation's Running workers are, as the
values of `spec.placement.topologyKey` on their nodes (the node view, `nodes.NodeInfo`).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

from lepton_operator.api.models import LeptonJobSpec, PlacementStatus
from lepton_operator.desired import pod_generation
from lepton_operator.reconcile.failures import is_terminating
from lepton_operator.reconcile.jobpass import JobPass
from lepton_operator.reconcile.nodes import NodeInfo


def placement_status(
    spec: LeptonJobSpec, generation: int, pods: Iterable[dict], nodes: Mapping[str, NodeInfo]
) -> Optional[PlacementStatus]:
    """The domains (sorted, each once) of the nodes that run the generation's Running,
    not terminating workers; None when the spec names no topologyKey. A node without the
    label, or not in the node view, is in no domain."""
    placement = spec.placement
    if placement is None or placement.topology_key is None:
        return None
    key = placement.topology_key
    domains = set()
    for pod in pods:
        if generation < 1 or pod_generation(pod) != generation or is_terminating(pod):
            continue
        if (pod.get("status") or {}).get("phase") != "Running":
            continue
        node = nodes.get((pod.get("spec") or {}).get("nodeName") or "")
        value = node.labels.get(key) if node is not None else None
        if value:
            domains.add(value)
    return PlacementStatus(topology_key=key, domains=sorted(domains))


def record_domains(p: JobPass) -> None:
    """Set status.placement for the generation the pass leaves running. Without a node
    view the domains cannot be read: the status keeps what it says (unless the spec no
    longer asks for a placement)."""
    spec = p.spec
    if spec.placement is None or spec.placement.topology_key is None:
        p.s.placement = None
    elif p.nodes is not None:
        p.s.placement = placement_status(spec, p.s.worker_generation, p.ours, p.nodes)
