"""What a pass needs to know about nodes: Ready since when, and cordoned or not.

`NodeInfo` is pure data read from a Node object (`node_info`); `NodeCache` (in the
operator context) lists the nodes at most every `max_age` seconds for all jobs together,
so node loss and drains are seen without a watch on every node. Without permission to
list nodes (or before the first list), a pass gets no node view and node loss is left
to Kubernetes' own eviction (the pod then fails and is classified as disrupted).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime, timezone
from typing import Callable, Mapping, Optional

log = logging.getLogger("lepton_operator.nodes")


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """One node as the rescale protocol sees it."""

    ready: bool
    not_ready_since: Optional[datetime] = None
    """When the Ready condition last left True (None while Ready)."""
    unschedulable: bool = False
    """Cordoned (`spec.unschedulable`): a drain is coming; the job moves off it."""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)
    """The node's labels (topology domains of spec.placement: reconcile/placement.py)."""


def node_info(node: dict) -> NodeInfo:
    """Read a Node (wire form). No Ready condition at all counts as not ready since always."""
    ready_cond = next((c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    unschedulable = bool((node.get("spec") or {}).get("unschedulable"))
    labels = dict((node.get("metadata") or {}).get("labels") or {})
    if ready_cond is not None and ready_cond.get("status") == "True":
        return NodeInfo(ready=True, unschedulable=unschedulable, labels=labels)
    since = parse_time(ready_cond.get("lastTransitionTime")) if ready_cond else None
    return NodeInfo(ready=False, not_ready_since=since or NEVER_READY, unschedulable=unschedulable, labels=labels)


NEVER_READY = datetime.min.replace(tzinfo=timezone.utc)


def parse_time(text: Optional[str]) -> Optional[datetime]:
    """An API timestamp (RFC 3339, `Z` or offset), or None when absent or unreadable."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


class NodeCache:
    """The cluster's nodes, listed at most every `max_age` seconds (one list for all jobs)."""

    def __init__(self, max_age: float = 5.0) -> None:
        self.max_age = max_age
        self._nodes: Optional[dict[str, NodeInfo]] = None
        self._listed_at = float("-inf")
        self._warned = False

    def get(self, list_nodes: Callable[[], list[dict]]) -> Optional[dict[str, NodeInfo]]:
        """The node view, refreshed with `list_nodes` when older than `max_age`; None when
        the nodes cannot be read."""
        now = time.monotonic()
        if now - self._listed_at >= self.max_age:
            self._listed_at = now
            try:
                self._nodes = {n["metadata"]["name"]: node_info(n) for n in list_nodes()}
            except Exception as e:  # RBAC without node reads, API trouble: degrade, say so once
                if not self._warned:
                    log.warning(f"cannot list nodes, node loss and drains are not detected: {e}")
                    self._warned = True
                self._nodes = None
        return self._nodes
