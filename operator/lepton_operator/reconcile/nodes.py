"""What a pass needs to know about nodes: Ready since when, and cordoned or not.

`NodeInfo` is pure data read from a Node object (`node_info`); `NodeCache` (in the
operator context) lists the nodes at most every `max_age` seconds for all jobs and the
allocator together, so node loss and drains are seen without a watch on every node. Without permission to
list nodes (or before the first list), a pass gets no node view and node loss is left
to Kubernetes' own eviction (the pod then fails and is classified as disrupted).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
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


def node_view(node: dict) -> dict:
    """What the operator reads of a Node (name and labels, cordon and taints, allocatable
    and conditions): the rest of a real node (images, addresses, managed fields) is most
    of its size and is not kept."""
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    return {
        "metadata": {"name": meta.get("name"), "labels": meta.get("labels") or {}},
        "spec": {k: spec[k] for k in ("unschedulable", "taints") if k in spec},
        "status": {k: status[k] for k in ("allocatable", "conditions") if k in status},
    }


class NodeCache:
    """The cluster's nodes, listed at most every `max_age` seconds for every job's pass
    and the allocator together. One caller lists at a time: callers with no answer yet
    wait for the first list (passes that start together send one list, not one each);
    later, while one caller refreshes, the others go on with the answer before it, so no
    API thread waits on the list."""

    def __init__(self, max_age: float = 5.0) -> None:
        self.max_age = max_age
        # (nodes as node_view, NodeInfo by name or None, the list's error): one object, so
        # a caller never reads half of a refresh.
        self._answer: Optional[tuple[list[dict], Optional[dict[str, NodeInfo]], Optional[Exception]]] = None
        self._listed_at = float("-inf")
        self._warned = False
        self._refreshing = threading.Lock()

    def _due(self) -> bool:
        return time.monotonic() - self._listed_at >= self.max_age

    def _read(
        self, list_nodes: Callable[[], list[dict]]
    ) -> tuple[list[dict], Optional[dict[str, NodeInfo]], Optional[Exception]]:
        if self._due() and self._refreshing.acquire(blocking=self._answer is None):
            try:
                if self._due():  # not refreshed by another caller meanwhile
                    try:
                        listed = [node_view(n) for n in list_nodes()]
                        self._answer = (listed, {n["metadata"]["name"]: node_info(n) for n in listed}, None)
                    except Exception as e:
                        self._answer = ([], None, e)
                    self._listed_at = time.monotonic()
            finally:
                self._refreshing.release()
        assert self._answer is not None  # the first caller lists while the others wait
        return self._answer

    def listed(self, list_nodes: Callable[[], list[dict]]) -> list[dict]:
        """The nodes (`node_view`), listed with `list_nodes` when older than `max_age`;
        raises what that list raised, until the next one."""
        listed, _, error = self._read(list_nodes)
        if error is not None:
            raise error
        return listed

    def get(self, list_nodes: Callable[[], list[dict]]) -> Optional[dict[str, NodeInfo]]:
        """The node view of a pass, refreshed as `listed` is; None when the nodes cannot
        be read."""
        _, nodes, error = self._read(list_nodes)
        if error is not None and not self._warned:  # RBAC without node reads, API trouble: say so once
            log.warning(f"cannot list nodes, node loss and drains are not detected: {error}")
            self._warned = True
        return nodes
