"""The node list the jobs' passes and the allocator share (reconcile/nodes.py NodeCache):
one list per `max_age` for every caller, only the fields the operator reads, and an
unreadable list degrading the passes (no node view) while the allocator sees the error."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lepton_operator.reconcile.nodes import NodeCache, NodeInfo, node_view

pytestmark = pytest.mark.unit


def real_node(name: str, ready: bool = True) -> dict:
    """A node as the API returns it, with the bulk a real one carries."""
    return {
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"example.com/rack": "a"},
            "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}] * 20,
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"unschedulable": True, "taints": [{"key": "gpu", "effect": "NoSchedule"}], "podCIDR": "10.0.0.0/24"},
        "status": {
            "allocatable": {"nvidia.com/gpu": "8"},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "images": [{"names": [f"registry/image-{i}:tag"], "sizeBytes": 10**9} for i in range(50)],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
        },
    }


class CountingLists:
    """A node list that takes a moment and counts its calls (from several threads)."""

    def __init__(self, nodes: list[dict], delay: float = 0.05, error: Exception | None = None):
        self.nodes, self.delay, self.error = nodes, delay, error
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> list[dict]:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.nodes


def test_the_view_keeps_what_the_operator_reads_and_drops_the_bulk():
    view = node_view(real_node("gpu-1"))
    assert view == {
        "metadata": {"name": "gpu-1", "labels": {"example.com/rack": "a"}},
        "spec": {"unschedulable": True, "taints": [{"key": "gpu", "effect": "NoSchedule"}]},
        "status": {
            "allocatable": {"nvidia.com/gpu": "8"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    assert node_view({"metadata": {"name": "bare"}}) == {
        "metadata": {"name": "bare", "labels": {}},
        "spec": {},
        "status": {},
    }


def test_callers_at_once_share_one_list_and_later_ones_the_cached_view():
    cache = NodeCache(max_age=60)
    lists = CountingLists([real_node("a"), real_node("b", ready=False)])
    with ThreadPoolExecutor(8) as pool:  # passes starting together, and the allocator
        views = list(pool.map(lambda _: cache.get(lists), range(8)))
        listed = list(pool.map(lambda _: cache.listed(lists), range(4)))
    assert lists.calls == 1
    assert all(v == views[0] for v in views) and views[0]["a"] == NodeInfo(ready=True, unschedulable=True)
    assert views[0]["b"].ready is False
    assert all(names == ["a", "b"] for names in ([n["metadata"]["name"] for n in nodes] for nodes in listed))


def test_a_view_older_than_max_age_is_listed_again():
    cache = NodeCache(max_age=0.1)
    lists = CountingLists([real_node("a")], delay=0)
    cache.get(lists)
    cache.get(lists)
    assert lists.calls == 1
    time.sleep(0.15)
    lists.nodes = [real_node("a", ready=False)]
    assert cache.get(lists)["a"].ready is False and lists.calls == 2


def test_while_one_caller_refreshes_the_others_go_on_with_the_answer_before():
    """No API thread waits on a refresh once there is an answer: at 1,000 jobs the passes
    would otherwise all stop behind one slow list every `max_age`."""
    cache = NodeCache(max_age=0.05)
    cache.get(CountingLists([real_node("a")], delay=0))
    time.sleep(0.06)
    release = threading.Event()

    def slow_list():
        release.wait(5)
        return [real_node("a", ready=False)]

    with ThreadPoolExecutor(1) as pool:
        refreshing = pool.submit(cache.get, slow_list)
        time.sleep(0.05)  # the refresh is under way
        began = time.monotonic()
        assert cache.get(slow_list)["a"].ready  # the answer before the refresh, at once
        assert time.monotonic() - began < 0.5
        release.set()
        assert refreshing.result()["a"].ready is False
    assert cache.get(slow_list)["a"].ready is False


def test_an_unreadable_list_gives_passes_no_view_and_the_allocator_the_error(caplog):
    cache = NodeCache(max_age=60)
    failing = CountingLists([], delay=0, error=PermissionError("nodes is forbidden"))
    assert cache.get(failing) is None and cache.get(failing) is None
    with pytest.raises(PermissionError, match="forbidden"):
        cache.listed(failing)
    assert failing.calls == 1  # the error is cached as the answer is, until max_age
    assert sum("cannot list nodes" in r.message for r in caplog.records) == 1  # said once
