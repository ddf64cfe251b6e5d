"""Pure: `spec.placement` as the scheduler's own primitives on a worker pod.

The operator never picks nodes; it states the placement against the generation's labels
and the real scheduler places each pod:

- **Pack**: preferred pod affinity (weight 100) to the workers of the same job and
  generation, over `topologyKey`. Preferred, not required: a generation that does not fit
  one domain still schedules, and the scheduler's score puts each next worker where the
  generation already is, so it fills one domain before it takes the next (the fewest
  domains). The first worker goes wherever the scheduler scores best; the cluster
  allocator gives a Pack job no more GPUs than its largest domain has free.
- **Spread**: a topology spread constraint, maxSkew 1 over `topologyKey`, on the
  generation's workers, `ScheduleAnyway`: spreading is a preference, like Pack's packing.
  `DoNotSchedule` would count a domain whose GPUs are all taken as a domain with zero
  workers, and leave the generation Pending (until the operator shrinks it) whenever one
  domain is full.
- **exclusive**: required pod anti-affinity, over `topologyKey`, against the workers of
  every other LeptonJob (`managed-by: lepton-operator`, another job name). The scheduler
  checks existing pods' required anti-affinity against an incoming pod too, so it works
  both ways: this job's workers avoid domains where other jobs' workers run, and other
  jobs' workers avoid the domains this job's workers use. `namespaceSelector: {}` makes it
  cluster-wide on Kubernetes 1.22+; older servers drop the field (a term then covers the
  job's namespace only).

Every term selects by generation or job name, so the next generation of the same job
(created while the old one still stops) is neither attracted to nor kept out by the old.
"""

from __future__ import annotations

import copy

from ..api.models import LeptonJobSpec
from .names import LABEL_GENERATION, LABEL_JOB_NAME, LABEL_MANAGED_BY, MANAGED_BY, worker_selector

PACK_WEIGHT = 100  # the most a preferred term may weigh


def generation_selector(job_name: str, generation: int) -> dict:
    """The label selector of one generation's workers."""
    return {"matchLabels": {**worker_selector(job_name), LABEL_GENERATION: str(generation)}}


def other_jobs_selector(job_name: str) -> dict:
    """The label selector of every other LeptonJob's workers."""
    return {
        "matchExpressions": [
            {"key": LABEL_MANAGED_BY, "operator": "In", "values": [MANAGED_BY]},
            {"key": LABEL_JOB_NAME, "operator": "NotIn", "values": [job_name]},
        ]
    }


def placement_scheduling(job_name: str, spec: LeptonJobSpec, generation: int) -> dict:
    """The pod spec fields (`affinity`, `topologySpreadConstraints`) that carry out
    `spec.placement` for a worker of `generation`; {} without a placement."""
    placement = spec.placement
    if placement is None or placement.topology_key is None:
        return {}
    key = placement.topology_key
    out: dict = {}
    if placement.mode == "Pack":
        term = {"labelSelector": generation_selector(job_name, generation), "topologyKey": key}
        out["affinity"] = {
            "podAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": PACK_WEIGHT, "podAffinityTerm": term}]
            }
        }
    elif placement.mode == "Spread":
        out["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": generation_selector(job_name, generation),
            }
        ]
    if placement.exclusive:
        term = {"labelSelector": other_jobs_selector(job_name), "namespaceSelector": {}, "topologyKey": key}
        out.setdefault("affinity", {})["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [term]}
    return out


def apply_placement(pod_spec: dict, scheduling: dict) -> None:
    """Merge `scheduling` into a pod spec (in place): maps merge key by key, lists are
    extended, so whatever the spec already has (a nodeSelector, tolerations, an admin's
    affinity) is kept."""
    _merge(pod_spec, scheduling)


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        have = into.get(key)
        if isinstance(have, dict) and isinstance(value, dict):
            _merge(have, value)
        elif isinstance(have, list) and isinstance(value, list):
            have.extend(copy.deepcopy(value))
        else:
            into[key] = copy.deepcopy(value)
