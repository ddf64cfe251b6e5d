"""Classify worker pods: running, succeeded, retryable or permanent failure, disrupted.

The rule is the training-operator `ExitCode` policy (docs/rescale-protocol.md, "Failures use the
same path"): exit code 0 is success; 1-127 is a permanent failure (a bug, a bad argument:
retrying repeats it); 128-255 is retryable (killed by a signal, OOM-killed, or the
trainer's own PEER_LOST / RENDEZVOUS_FAILED codes). A pod evicted, preempted or lost with
its node is "disrupted" whatever its code says: the cluster took it away, so its new
generation does not spend the job's restart budget (docs/rescale-protocol.md).

Pure: takes pod dicts (the API's JSON form), imports neither kopf nor the client.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

Outcome = Literal["pending", "running", "succeeded", "retryable", "permanent", "disrupted"]

# Pod `status.reason` values that mean the node or the cluster took the pod away, not the
# program (outcome "disrupted": a new generation that does not spend the restart budget):
# Evicted (kubelet pressure, Eviction API), Preempting (scheduler preemption), NodeLost
# (node controller), Shutdown / NodeShutdown / Terminated (graceful node shutdown),
# UnexpectedAdmissionError and OutOf<resource> (kubelet admission: the pod never ran).
DISRUPTION_POD_REASONS = frozenset(
    {
        "Evicted",
        "Preempting",
        "NodeLost",
        "Shutdown",
        "NodeShutdown",
        "Terminated",
        "UnexpectedAdmissionError",
        "NodeAffinity",
    }
)
# Pod condition types that Kubernetes >= 1.26 sets when it disrupts a pod on purpose.
DISRUPTION_CONDITIONS = ("DisruptionTarget",)


@dataclasses.dataclass(frozen=True)
class PodOutcome:
    """What one worker pod's state means for the job."""

    outcome: Outcome
    exit_code: Optional[int] = None
    reason: str = ""

    @property
    def failed(self) -> bool:
        """The worker stopped without success, whoever was at fault."""
        return self.outcome in ("retryable", "permanent", "disrupted")

    def describe(self, pod_name: str) -> str:
        """A sentence naming the worker and why it stopped, for conditions and events."""
        if self.exit_code is not None:
            text = f"worker {pod_name} exited with code {self.exit_code}"
        else:
            text = f"worker {pod_name} failed"
        return f"{text} ({self.reason})" if self.reason else text


def classify_exit_code(code: int) -> Outcome:
    """0 succeeded, 1-127 permanent, everything else (128-255, signals) retryable."""
    if code == 0:
        return "succeeded"
    if 1 <= code <= 127:
        return "permanent"
    return "retryable"


def _terminated_codes(pod: dict) -> list[int]:
    """Exit codes of the pod's terminated containers, in container order."""
    codes = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        terminated = state.get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if terminated and terminated.get("exitCode") is not None:
            code = int(terminated["exitCode"])
            # A negative code means "killed by signal N" in some runtimes: 128 + N.
            codes.append(128 - code if code < 0 else code)
    return codes


def _disrupted(pod: dict) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") in DISRUPTION_CONDITIONS and cond.get("status") == "True":
            return True
    return False


def classify_pod(pod: dict) -> PodOutcome:
    """Classify a worker pod by its phase, reason and exit codes (see module docstring).

    A pod that failed without any exit code (admission error, lost node) is retryable:
    nothing says the program is at fault. With several containers a permanent code wins
    (it is the root cause), as the trainer's own `exitcodes.combine` does for its ranks.
    """
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    reason = status.get("reason") or ""

    if reason in DISRUPTION_POD_REASONS or reason.startswith("OutOf"):
        codes = _terminated_codes(pod)
        return PodOutcome("disrupted", codes[0] if codes else None, reason)
    if phase == "Unknown":  # the node stopped reporting: treat the worker as lost
        return PodOutcome("disrupted", None, reason or "NodeLost")
    if phase == "Succeeded":
        return PodOutcome("succeeded", 0, "")
    if phase == "Failed":
        codes = _terminated_codes(pod)
        if _disrupted(pod):
            return PodOutcome("disrupted", codes[0] if codes else None, reason or "DisruptionTarget")
        permanent = [c for c in codes if classify_exit_code(c) == "permanent"]
        if permanent:
            return PodOutcome("permanent", permanent[0], reason)
        nonzero = [c for c in codes if c != 0]
        if nonzero:
            return PodOutcome("retryable", nonzero[0], reason)
        return PodOutcome("retryable", None, reason or "no exit code reported")
    if phase == "Running":
        return PodOutcome("running")
    return PodOutcome("pending")


def is_ready(pod: dict) -> bool:
    """True when the pod runs and its Ready condition is True."""
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def is_scheduled(pod: dict) -> bool:
    """True when the scheduler has bound the pod to a node."""
    return bool((pod.get("spec") or {}).get("nodeName"))


def is_terminating(pod: dict) -> bool:
    """True when deletion was requested (the pod may still run out its grace period)."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))
