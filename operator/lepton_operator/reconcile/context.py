"""The operator's in-memory state, in one object that reaches every handler.

`OperatorContext` is built once by `lepton-operator run` and handed to kopf as the
operator-wide memo (`kopf.run(memo=ctx)`). kopf gives each resource a shallow copy of
that memo; `__copy__` returns the context itself, so every handler of every job sees the
same one (kopf's docs on memos describe this). Tests build one with a fake `Kube`.

Nothing here is the truth about a job: that is the job's status in the API. This is what
a running operator remembers to do its work well (wake-ups, deduplicated events, its own
recent creates and deletes, watch health), and all of it may be lost on a restart.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import threading
import time
from typing import Mapping, Optional

from lepton_operator import metrics
from lepton_operator.reconcile.config import OperatorConfig
from lepton_operator.reconcile.kube import Kube
from lepton_operator.reconcile.nodes import NodeCache
from lepton_operator.reconcile.podcache import PodCache

JobKey = tuple[str, str]  # (namespace, name)

EVENT_DEDUP_SECONDS = 600.0
WATCH_STALE_SECONDS = 120.0


class Triggers:
    """One asyncio.Event per job: set by watch events, awaited by the job's loop."""

    def __init__(self) -> None:
        self._events: dict[JobKey, asyncio.Event] = {}

    def get(self, key: JobKey) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    def fire(self, namespace: Optional[str], name: Optional[str]) -> None:
        # Wake only a loop that runs: the watch reports a deleted job's pods as they are
        # collected, after its loop ended and forgot it, and an entry made then would stay
        # for good. A loop that has not started yet loses nothing: its first pass runs at once.
        event = self._events.get((namespace, name)) if namespace and name else None
        if event is not None:
            event.set()

    def forget(self, key: JobKey) -> None:
        self._events.pop(key, None)


class EventRecorder:
    """Decides whether to post an event, skipping an identical one posted recently.

    Passes repeat (every trigger, every resync), and a condition that persists (a pod we
    do not own holding a worker's name) would otherwise post the same Warning each time.
    Keys start with the job's uid; every call drops those older than the window, so a
    deleted job's keys go within `window` seconds and the table holds only recent events.
    """

    def __init__(self, window: float = EVENT_DEDUP_SECONDS) -> None:
        self.window = window
        self._posted: dict[tuple, float] = {}

    def should_post(self, key: tuple) -> bool:
        now = time.monotonic()
        self._posted = {k: t for k, t in self._posted.items() if now - t < self.window}
        if key in self._posted:
            return False
        self._posted[key] = now
        return True


def newer(version: Optional[str], than: Optional[str]) -> bool:
    """Whether resourceVersion `version` is later than `than` (None: nothing known).

    etcd's resourceVersions are increasing integers, and every apiserver backed by etcd
    serves them so; they are compared as numbers. Should a server send anything else,
    two different versions count as "newer", which errs towards reading the API again.
    """
    if version is None:
        return False
    if than is None:
        return True
    if version.isdigit() and than.isdigit():
        return int(version) > int(than)
    return version != than


class WatchHealth:
    """Which job bodies kopf's watch has delivered, against what the API has told us.

    The job's watch handler records each resourceVersion delivered (`watched`); every job
    the operator reads or writes through `Kube` reports the version the API answered with
    (`known`: wired in `OperatorContext`), and so does each patch kopf makes itself (its
    finalizer, `supervise.report_kopf_job_patches`). A pass reads the job from kopf's live
    body unless the watch is `behind` a version the operator already knows (its own last
    write, usually); it then decides on the API's answer at that version (`newest`), kept
    until the watch delivers it, and GETs the job only when none was kept. A known version
    the watch has not delivered for longer than `stale_after` seconds (well past the
    watch's server timeout, after which kopf reconnects) means events are not arriving: the
    liveness probe fails, and Kubernetes restarts the operator (docs/reliability.md, row 7).
    """

    def __init__(self, stale_after: float = WATCH_STALE_SECONDS) -> None:
        self.stale_after = stale_after
        self.seen: dict[JobKey, str] = {}
        self.ahead: dict[JobKey, tuple[str, float, Optional[dict]]] = {}
        """Job -> (the newest version the API answered that the watch has not delivered,
        since when the watch has lagged, the API's body at that version if it was given)."""
        self._lock = threading.Lock()  # `known` runs in the API threads, `watched` in the event loop

    def watched(self, key: JobKey, resource_version: Optional[str]) -> None:
        if not resource_version:
            return
        with self._lock:
            self.seen[key] = resource_version
            pending = self.ahead.get(key)
            if pending is not None and not newer(pending[0], resource_version):
                del self.ahead[key]

    def known(self, key: JobKey, resource_version: Optional[str], body: Optional[Mapping] = None) -> None:
        """The API answered with this version of the job (a read or a write), and `body`."""
        with self._lock:
            if key not in self.seen or not newer(resource_version, self.seen[key]):
                return  # a job the watch has not shown (or has forgotten), or delivered already
            pending = self.ahead.get(key)
            if pending is not None and not newer(resource_version, pending[0]):
                return
            since = time.monotonic() if pending is None else pending[1]  # still lagging since then
            # A copy: the caller may change its answer. Dropped when the watch catches up.
            self.ahead[key] = (resource_version, since, copy.deepcopy(dict(body)) if body else None)

    def behind(self, key: JobKey, resource_version: Optional[str]) -> bool:
        """Whether a body at `resource_version` is older than a version the API answered."""
        pending = self.ahead.get(key)
        return pending is not None and newer(pending[0], resource_version)

    def newest(self, key: JobKey) -> Optional[dict]:
        """The API's body of the job at the version the watch is behind, if one was given
        (None also once the watch has delivered it). Read-only: copy it to change it."""
        pending = self.ahead.get(key)
        return pending[2] if pending is not None else None

    def forget(self, key: JobKey) -> None:
        with self._lock:
            self.seen.pop(key, None)
            self.ahead.pop(key, None)

    def stale(self) -> list[str]:
        now = time.monotonic()
        with self._lock:  # the API threads add entries meanwhile
            lagging = list(self.ahead.items())
        return [f"{ns}/{name}" for (ns, name), (_, t, _) in lagging if now - t > self.stale_after]


class Expectations:
    """Pods this operator created or deleted that its index has not shown yet.

    The index follows a watch, so for a moment after a create it lacks the new pod and
    after a delete it still shows the old one without a deletionTimestamp. A pass in that
    moment would create or delete again (409s and 404s, or a 409 on a name just freed).
    Like Kubernetes' own controllers, remember what was done and overlay it on the index
    until the watch catches up, or `ttl` passes (the API, not memory, is the truth).
    """

    def __init__(self, ttl: float = 15.0):
        self.ttl = ttl
        self._created: dict[JobKey, dict[str, tuple[float, dict]]] = {}
        self._deleted: dict[JobKey, dict[str, float]] = {}

    def created(self, key: JobKey, pod: dict) -> None:
        self._created.setdefault(key, {})[pod["metadata"]["name"]] = (time.monotonic(), pod)

    def deleted(self, key: JobKey, uid: str) -> None:
        self._deleted.setdefault(key, {})[uid] = time.monotonic()

    def overlay(self, key: JobKey, pods: list[dict], now_text: str) -> list[dict]:
        """`pods` from the index, with expected creations added and deletions marked.

        Deletions are remembered by uid: a new pod that reuses a deleted pod's name (the
        next generation's worker) is never taken for the one being deleted.
        """
        fresh = time.monotonic() - self.ttl
        names = {p["metadata"]["name"] for p in pods}
        by_uid = {p["metadata"].get("uid"): p for p in pods}
        created = {n: v for n, v in self._created.get(key, {}).items() if v[0] > fresh and n not in names}
        deleted = {
            u: t
            for u, t in self._deleted.get(key, {}).items()
            if t > fresh and u in by_uid and not by_uid[u]["metadata"].get("deletionTimestamp")
        }
        self._created[key], self._deleted[key] = created, deleted
        out = []
        for pod in pods:
            if pod["metadata"].get("uid") in deleted:
                pod = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": now_text}}
            out.append(pod)
        for _, body in created.values():
            out.append({**body, "status": {"phase": "Pending"}})
        return out

    def forget(self, key: JobKey) -> None:
        self._created.pop(key, None)
        self._deleted.pop(key, None)


@dataclasses.dataclass
class AutoscalerMemory:
    """What the autoscaler and the hang watchdog remember about one job between timer ticks."""

    last_run: Optional[float] = None
    """time.monotonic() of the last pass that measured (None: measure at the next tick)."""
    reporting_since: dict[int, object] = dataclasses.field(default_factory=dict)
    """generation -> when every worker of it was first seen reporting (a datetime)."""
    hang_checked: Optional[float] = None
    """time.monotonic() of the hang watchdog's last look (None: look at the next tick)."""


@dataclasses.dataclass
class AllocatorMemory:
    """The cluster allocator's state between ticks (reconcile/allocation.py)."""

    last_run: float = float("-inf")
    """time.monotonic() of the last pass."""
    wanted: bool = True
    """A job arrived or finished: run at the next tick."""
    running: bool = False
    started: int = 0
    """Passes started so far (`allocate_soon` waits for one that starts after its call)."""
    asked_by: set = dataclasses.field(default_factory=set)
    """Jobs whose last pass asked for a pass (queued, finished, suspended): their loops run
    one at once (`allocate_soon`)."""
    priority_classes_readable: bool = True
    """False once listing PriorityClasses was refused (RBAC): not asked again."""
    priority_classes: dict = dataclasses.field(default_factory=dict)
    """name -> value, as last listed (at most every minute)."""
    priority_classes_at: float = float("-inf")
    warned_namespaced: bool = False


@dataclasses.dataclass
class OperatorContext:
    """Everything the handlers share: API access, settings and in-memory state."""

    kube: Kube
    config: OperatorConfig = dataclasses.field(default_factory=OperatorConfig)
    triggers: Triggers = dataclasses.field(default_factory=Triggers)
    events: EventRecorder = dataclasses.field(default_factory=EventRecorder)
    watch: WatchHealth = dataclasses.field(default_factory=WatchHealth)
    expected: Expectations = dataclasses.field(default_factory=Expectations)
    pods: PodCache = dataclasses.field(default_factory=PodCache)
    nodes: NodeCache = dataclasses.field(default_factory=NodeCache)
    autoscaler: dict[JobKey, AutoscalerMemory] = dataclasses.field(default_factory=dict)
    allocator: AllocatorMemory = dataclasses.field(default_factory=AllocatorMemory)
    taken: dict[JobKey, frozenset[str]] = dataclasses.field(default_factory=dict)
    """Children ("Kind name") whose create at the job's last pass found the name held by an
    object the job does not own (executor); the next pass reports them (NameTaken)."""

    def __post_init__(self) -> None:
        self.pods.relist_seconds = self.config.relist_seconds
        self.pods.settled_relist_seconds = self.config.settled_relist_seconds
        if self.kube is not None:
            self.kube.job_seen = self.watch.known  # every job read or write tells the watch health

    def __copy__(self) -> OperatorContext:
        # kopf copies the operator-wide memo for each resource: share this one instead.
        return self

    def autoscaler_memory(self, key: JobKey) -> AutoscalerMemory:
        return self.autoscaler.setdefault(key, AutoscalerMemory())

    def forget(self, key: JobKey) -> None:
        """Drop what is remembered about a job whose loop ended (the event recorder's
        entries expire by themselves)."""
        # Every way out of the loop (deleted, being deleted, uid changed, stopped) ends here:
        # the job is no longer one this operator reconciles, so its phase stops counting.
        metrics.forget_job(*key)
        self.triggers.forget(key)
        self.watch.forget(key)
        self.expected.forget(key)
        self.pods.forget(key)
        self.autoscaler.pop(key, None)
        self.taken.pop(key, None)
        self.allocator.asked_by.discard(key)

    def stale_watches(self) -> list[str]:
        """Jobs whose job watch or pod index stopped following the API (liveness)."""
        return sorted(set(self.watch.stale()) | set(self.pods.stale()))
