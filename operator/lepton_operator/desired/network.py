"""Pure builder: the NetworkPolicy that isolates a job's workers.

Worker 0's c10d store has no authentication and torchrun unpickles what it reads from
it, so any pod that reaches the rendezvous port can disrupt or take over every worker of
the job. The policy admits, to the job's workers:

- every TCP port from the pods of the same job (the same namespace and the job's worker
  labels): the rendezvous ports (`rendezvousPort` and `rendezvousPort + 1`, one per
  generation's parity) and the ports NCCL and gloo open between workers, which are
  ephemeral and cannot be listed;
- the metrics port from the namespaces the admin lists for Prometheus;
- nothing else. Egress is not restricted (workers read data and write checkpoints
  wherever their storage is).

A metrics namespace entry is a namespace name, matched by the label
`kubernetes.io/metadata.name` (set by the apiserver from 1.21 on), or a `key=value`
label that the admin put on the namespace (what Kubernetes 1.20 needs: it sets no such
label).
"""

from __future__ import annotations

import re
from typing import Iterable

from ..api.models import LeptonJobSpec
from .names import JobRef, worker_selector
from .workers import owner_reference

NETWORK_POLICY_API_VERSION = "networking.k8s.io/v1"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_PREFIX = rf"{_DNS_LABEL}(\.{_DNS_LABEL})*"
NAMESPACE_ENTRY_PATTERN = rf"{_DNS_LABEL}|({_LABEL_PREFIX}/)?{_LABEL_NAME}=({_LABEL_NAME})?"
"""A namespace name, or `key=value` (a label key with an optional DNS prefix, a label value)."""


def network_policy_name(job_name: str) -> str:
    """`<name>-workers`, like the Service and the PodDisruptionBudget (other kinds)."""
    return f"{job_name}-workers"


def namespace_selector(entry: str) -> dict[str, str]:
    """The namespace labels an entry selects: `monitoring` -> the namespace named so,
    `team=observability` -> namespaces with that label. ValueError when malformed."""
    if not re.fullmatch(NAMESPACE_ENTRY_PATTERN, entry):
        raise ValueError(f"{entry!r} is neither a namespace name nor a label key=value")
    if "=" not in entry:
        return {NAMESPACE_NAME_LABEL: entry}
    key, value = entry.split("=", 1)
    if "/" in key and len(key.split("/", 1)[0]) > 253:
        raise ValueError(f"{entry!r}: a label key prefix has at most 253 characters")
    return {key: value}


def build_network_policy(job: JobRef, spec: LeptonJobSpec, metrics_namespaces: Iterable[str]) -> dict:
    """The job's NetworkPolicy (see the module docstring); owned by the job, so garbage
    collection deletes it with the job.

    With no metrics namespaces, only the job's own pods reach the metrics port (the
    autoscaler and the hang watchdog then get no data).
    """
    job.check()
    ingress: list[dict] = [
        {"from": [{"podSelector": {"matchLabels": worker_selector(job.name)}}], "ports": [{"protocol": "TCP"}]}
    ]
    namespaces = [{"namespaceSelector": {"matchLabels": namespace_selector(e)}} for e in metrics_namespaces]
    if namespaces:
        ingress.append({"from": namespaces, "ports": [{"protocol": "TCP", "port": spec.metrics_port}]})
    return {
        "apiVersion": NETWORK_POLICY_API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(job.name),
            "namespace": job.namespace,
            "labels": worker_selector(job.name),
            "ownerReferences": [owner_reference(job)],
        },
        # Every field the apiserver would default is set, so a stored policy that nobody
        # changed equals this one (no patch at every pass).
        "spec": {
            "podSelector": {"matchLabels": worker_selector(job.name)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
