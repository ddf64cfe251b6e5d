"""Names and labels of what the operator creates for a job: one place of truth.

Every child name is deterministic (`<job>-worker-<i>`, `<job>-workers`,
`<job>-checkpoints`), so a restarted operator finds what it created and a create that
answers 409 AlreadyExists means "already done".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..api.models import JOB_NAME_PATTERN, MAX_JOB_NAME_LENGTH, MAX_WORKERS

LABEL_JOB_NAME = "lepton.ai/job-name"
LABEL_WORKER_INDEX = "lepton.ai/worker-index"
LABEL_GENERATION = "lepton.ai/generation"
LABEL_WORLD_SIZE = "lepton.ai/world-size"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "lepton-operator"

ANNOTATION_TEMPLATE_HASH = "lepton.ai/template-hash"

# A Kubernetes object name (RFC 1123 subdomain) as the namespace and uid may carry.
_NAMESPACE_PATTERN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_UID_PATTERN = r"[A-Za-z0-9-]{1,64}"


@dataclass(frozen=True)
class JobRef:
    """The identity of a LeptonJob: what every child's name, labels and owner reference need."""

    name: str
    namespace: str
    uid: str

    def check(self) -> None:
        """Raise ValueError unless the names are safe to put into child names and env.

        The CRD schema and `parse_job()` already reject bad names; builders check again
        so that no path (an old CRD without the name limit, a 1.20 server) can turn a
        hostile name into a hostile pod.
        """
        if len(self.name) > MAX_JOB_NAME_LENGTH or not re.fullmatch(JOB_NAME_PATTERN, self.name):
            raise ValueError(f"job name {self.name!r} is not a DNS-1035 label of at most {MAX_JOB_NAME_LENGTH}")
        if len(self.namespace) > 63 or not re.fullmatch(_NAMESPACE_PATTERN, self.namespace):
            raise ValueError(f"namespace {self.namespace!r} is not a DNS label")
        if not re.fullmatch(_UID_PATTERN, self.uid):
            raise ValueError(f"uid {self.uid!r} is not a Kubernetes uid")


def worker_pod_name(job_name: str, index: int) -> str:
    """`<name>-worker-<index>`: also the pod's hostname."""
    if not 0 <= index < MAX_WORKERS:
        raise ValueError(f"worker index {index} is outside [0, {MAX_WORKERS})")
    return f"{job_name}-worker-{index}"


def worker_prefix(job_name: str) -> str:
    """`<name>-worker`: host names are `<prefix>-<index>` (Lepton's LEPTON_JOB_WORKER_PREFIX)."""
    return f"{job_name}-worker"


def service_name(job_name: str) -> str:
    """`<name>-workers`: the headless Service, and the pods' subdomain."""
    return f"{job_name}-workers"


def checkpoint_pvc_name(job_name: str) -> str:
    """`<name>-checkpoints`: the checkpoint claim the operator creates when asked to."""
    return f"{job_name}-checkpoints"


def worker_host(job: JobRef, index: int) -> str:
    """The cluster DNS name of a worker: `<name>-worker-<i>.<name>-workers.<ns>.svc`."""
    return f"{worker_pod_name(job.name, index)}.{service_name(job.name)}.{job.namespace}.svc"


def disruption_budget_name(job_name: str) -> str:
    """The job's PodDisruptionBudget (another kind than the Service of the same name)."""
    return f"{job_name}-workers"


def worker_selector(job_name: str) -> dict[str, str]:
    """Labels that select every worker of a job, whatever its generation."""
    return {LABEL_JOB_NAME: job_name, LABEL_MANAGED_BY: MANAGED_BY}


def selector_string(job_name: str) -> str:
    """`worker_selector()` as a label selector string (status.selector, scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in sorted(worker_selector(job_name).items()))


def worker_labels(job_name: str, index: int, generation: int, world_size: int) -> dict[str, str]:
    """Labels of one worker pod."""
    return {
        **worker_selector(job_name),
        LABEL_WORKER_INDEX: str(index),
        LABEL_GENERATION: str(generation),
        LABEL_WORLD_SIZE: str(world_size),
    }


def _label_int(pod: dict, key: str) -> int:
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(key, ""))
    except ValueError:
        return -1


def pod_generation(pod: dict) -> int:
    """The generation label of a worker pod (-1 when missing or not a number)."""
    return _label_int(pod, LABEL_GENERATION)


def pod_index(pod: dict) -> int:
    """The worker-index label of a worker pod (-1 when missing or not a number)."""
    return _label_int(pod, LABEL_WORKER_INDEX)


def owned_by(obj: dict, uid: str) -> bool:
    """True when one of the object's ownerReferences points at the job's uid."""
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])
