"""The pods a pass sees: kopf's index, checked against a fresh list now and then.

kopf's index follows a watch. After a watch gap (410 Gone, an apiserver restart, a
partition) it can keep pods that were deleted meanwhile ("ghosts"): a ghost of an old
generation shares its name with a live pod of the next one. Deletes carry a uid
precondition, so a ghost can never get the live pod deleted; and so that no pass waits
for ever on a ghost, each job's pods are re-listed from the API every `relist_seconds`
(every `settled_relist_seconds` while the job runs with nothing in motion, waits in the
allocator's queue or has finished: at a thousand jobs a list per job per minute would be
a third of the default request budget) and whenever a delete found its pod already gone.
A pass after a re-list uses the listed pods; later passes use the index without the
ghosts that list exposed.

The re-list is also the pod watch's health check: when index and API disagree for longer
than `stale_after` seconds (pods the index lacks, ghosts it keeps), events are not
arriving and the liveness probe fails (docs/reliability.md, rows 7 and 19).
"""

from __future__ import annotations

import logging
import sys
import time

from lepton_operator.api.models import FINISHED_PHASES
from lepton_operator.reconcile.failures import DISRUPTION_CONDITIONS

JobKey = tuple[str, str]
# The pod conditions plan() reads (failures.is_ready, failures._disrupted); only when True.
CONDITIONS_READ = frozenset({"Ready", *DISRUPTION_CONDITIONS})

log = logging.getLogger("lepton_operator.reconcile")


def _i(text):
    """`sys.intern` for the strings thousands of pods share (label keys and values,
    namespaces, node names, phases); None stays None."""
    return sys.intern(text) if isinstance(text, str) else text


def _exit_state(state) -> dict:
    """A container state cut to what failures.py reads: `{"terminated": {"exitCode": N}}`."""
    terminated = (state or {}).get("terminated")
    return {"terminated": {"exitCode": terminated.get("exitCode")}} if terminated else {}


def trim_pod(body) -> dict:
    """The parts of a pod that plan() reads, and nothing else (kopf bodies are live views:
    this copies). The index keeps one per pod, so at 1,000 jobs of 8 workers every field
    here is held 8,000 times; tests/unit/test_index_slim.py checks that plan() decides the
    same on a trimmed pod as on the whole body.

    - metadata: name, namespace, uid, labels (generation, worker index: desired/names.py),
      the owner references' uids (`owned_by`), deletionTimestamp;
    - spec.nodeName (scheduled; node lost or cordoned);
    - status: phase and reason (failures.classify_pod), the conditions plan() asks about
      (Ready, DisruptionTarget: `is_ready`, `_disrupted`) when True, as type and status only, and the
      exit codes of terminated containers, current or last (`_terminated_codes`).
    """
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    conditions = [
        {"type": _i(c.get("type")), "status": "True"}
        for c in status.get("conditions") or []
        if c.get("status") == "True" and c.get("type") in CONDITIONS_READ
    ]
    containers = []
    for cs in status.get("containerStatuses") or []:
        state, last = _exit_state(cs.get("state")), _exit_state(cs.get("lastState"))
        if state or last:
            containers.append({"state": state, "lastState": last})
    trimmed_status = {"phase": _i(status.get("phase")), "reason": _i(status.get("reason"))}
    if conditions:
        trimmed_status["conditions"] = conditions
    if containers:
        trimmed_status["containerStatuses"] = containers
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": _i(meta.get("namespace")),
            "uid": meta.get("uid"),
            "labels": {_i(k): _i(v) for k, v in (meta.get("labels") or {}).items()},
            "ownerReferences": [{"uid": r.get("uid")} for r in meta.get("ownerReferences") or []],
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {"nodeName": _i(spec.get("nodeName"))},
        "status": trimmed_status,
    }


def _uids(pods: list[dict]) -> set[str]:
    return {p["metadata"]["uid"] for p in pods if p["metadata"].get("uid")}


def nothing_waits_on_pods(phase: str, rescaling: bool) -> bool:
    """Whether no pass waits on the job's pods, so that a re-list can wait the settled
    period: it runs with no rescale, it is queued for admission (no workers yet; at a
    thousand arrivals the queued jobs' lists were 5.5 requests per job), or it finished
    (its exited workers are kept for their logs only)."""
    return phase in ("Queued", *FINISHED_PHASES) or (phase == "Running" and not rescaling)


class PodCache:
    """Per job: when its pods were last listed, the ghosts found, and index health."""

    def __init__(
        self, relist_seconds: float = 60.0, stale_after: float = 120.0, settled_relist_seconds: float = 300.0
    ) -> None:
        self.relist_seconds = relist_seconds
        self.settled_relist_seconds = settled_relist_seconds
        self.stale_after = stale_after
        self._listed_at: dict[JobKey, float] = {}
        self._ghosts: dict[JobKey, set[str]] = {}
        self._disagree_since: dict[JobKey, float] = {}

    def relist_due(self, key: JobKey, settled: bool = False) -> bool:
        """A job in motion is re-listed every `relist_seconds`; a `settled` one
        (`nothing_waits_on_pods`) every `settled_relist_seconds`."""
        period = max(self.relist_seconds, self.settled_relist_seconds) if settled else self.relist_seconds
        return time.monotonic() - self._listed_at.get(key, float("-inf")) >= period

    def request_relist(self, key: JobKey) -> None:
        """A delete found its pod gone: the index may be stale; list at the next pass."""
        self._listed_at.pop(key, None)

    def listed(self, key: JobKey, indexed_before: list[dict], listed: list[dict]) -> list[dict]:
        """Record a list made after the index showed `indexed_before`; return the pods to use.

        A pod the index showed before the list started and the list lacks is a ghost. A pod
        the list has and the index lacked may just be new; both count as disagreement.
        """
        now = time.monotonic()
        self._listed_at[key] = now
        before, api = _uids(indexed_before), _uids(listed)
        self._ghosts[key] = before - api
        if self._ghosts[key]:
            log.warning(
                f"{key[0]}/{key[1]}: the pod index kept {len(self._ghosts[key])} pod(s) the API no longer has "
                "(a watch gap); using the API's list"
            )
        if before != api:
            self._disagree_since.setdefault(key, now)
        else:
            self._disagree_since.pop(key, None)
        return [trim_pod(p) for p in listed]

    def view(self, key: JobKey, indexed: list[dict]) -> list[dict]:
        """The index without the ghosts the last list exposed (dropped once the index has)."""
        ghosts = self._ghosts.get(key)
        if not ghosts:
            return indexed
        ghosts &= _uids(indexed)
        return [p for p in indexed if p["metadata"].get("uid") not in ghosts]

    def stale(self) -> list[str]:
        """Jobs whose pod index has disagreed with the API for longer than `stale_after`."""
        now = time.monotonic()
        return [f"{ns}/{name}" for (ns, name), t in self._disagree_since.items() if now - t > self.stale_after]

    def forget(self, key: JobKey) -> None:
        for table in (self._listed_at, self._ghosts, self._disagree_since):
            table.pop(key, None)
