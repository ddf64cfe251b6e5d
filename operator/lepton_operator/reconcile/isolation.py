"""The job's NetworkPolicy in a reconcile pass: create it when missing, patch it back when
it differs (`desired.network` builds it; docs/reliability.md, row 25).

Like the PodDisruptionBudget, the policy is observed through a kopf index
(`handlers.network_policies_by_job`, registered only with `--network-policies`: without
it the operator neither watches nor needs RBAC for NetworkPolicies) and compared with
what the builder wants; a hand edit is patched back at the next pass. Turning the flag
off leaves the policies already created in place (the operator never deletes them; they
go with their jobs).

`ensure_network_policy()` is pure; `observe()` and `trim_network_policy()` are what the
loop and the index hand it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from typing import Optional

from lepton_operator.api.conditions import REASON_NAME_TAKEN
from lepton_operator.desired import owned_by
from lepton_operator.desired.network import build_network_policy, namespace_selector
from lepton_operator.reconcile.jobpass import WARNING, JobPass

KIND = "NetworkPolicy"


@dataclasses.dataclass(frozen=True)
class NetworkIsolation:
    """What a pass needs to keep the job's NetworkPolicy: the operator's setting and the
    job's policies as the index holds them (`trim_network_policy()`)."""

    metrics_namespaces: tuple[str, ...]
    observed: tuple[dict, ...] = ()


def trim_network_policy(body) -> dict:
    """What the index keeps of a NetworkPolicy: its name, owners and spec."""
    meta = body.get("metadata") or {}
    return {
        "metadata": {"name": meta.get("name"), "ownerReferences": list(meta.get("ownerReferences") or [])},
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
    }


def observe(config, index, key) -> Optional[NetworkIsolation]:
    """The pass's input from the operator's config and the index (None: policies are off)."""
    if not config.network_policies:
        return None
    return NetworkIsolation(tuple(config.prometheus_namespaces), tuple((index or {}).get(key, [])))


def merge_patch(observed: dict, wanted: dict) -> dict:
    """The JSON merge patch (RFC 7386) that turns `observed` into `wanted` ({} when equal):
    keys only `observed` has are removed (null), lists are replaced whole."""
    patch: dict = {key: None for key in observed if key not in wanted}
    for key, value in wanted.items():
        old = observed.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            sub = merge_patch(old, value)
            if sub:
                patch[key] = sub
        elif old != value:
            patch[key] = value
    return patch


def ensure_network_policy(p: JobPass, net: Optional[NetworkIsolation]) -> None:
    """Create the job's NetworkPolicy when missing, patch it when it differs.

    Created first among the pass's creates (the first workers' creates go out with it; a
    store listens only once its container has started). Left alone while an immutable
    field's change is pending: the running workers still use the old ports. A policy of
    that name that the job does not own is never touched (event `NameTaken`).
    """
    if net is None:
        return
    wanted = build_network_policy(p.job, p.spec, net.metrics_namespaces)
    name = wanted["metadata"]["name"]
    found = next((o for o in net.observed if (o.get("metadata") or {}).get("name") == name), None)
    if found is None:
        p.plan.creates.insert(0, wanted)
    elif not owned_by(found, p.job.uid):
        p.plan.event(
            WARNING,
            REASON_NAME_TAKEN,
            f"NetworkPolicy {name} exists and is not owned by this job; "
            "the workers are not isolated until it is removed",
        )
    elif not p.immutable_changed():
        change = merge_patch(found.get("spec") or {}, wanted["spec"])
        if change:
            p.plan.patches.append((KIND, name, {"spec": change}))


def namespace_list(text: str) -> tuple[str, ...]:
    """`--prometheus-namespaces`: comma-separated namespace names or `key=value` namespace
    labels ('' for none), checked, duplicates dropped."""
    entries = tuple(dict.fromkeys(e.strip() for e in text.split(",") if e.strip()))
    for entry in entries:
        try:
            namespace_selector(entry)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
    return entries
