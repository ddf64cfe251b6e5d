"""Settings of one operator process (`lepton-operator run` fills them from its flags).

They live in the `OperatorContext` (`ctx.config`), never in a module global.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from lepton_operator.api.policy import DEFAULT_POLICY, AdminPolicy
from lepton_operator.scaling.allocator import Settings


@dataclasses.dataclass
class OperatorConfig:
    """Settings of one operator process."""

    prometheus_url: Optional[str] = None
    """Base URL of the Prometheus HTTP API (e.g. http://prometheus:9090); None: no autoscaling data."""
    prometheus_timeout: float = 5.0
    """Seconds a Prometheus query may take before it counts as unavailable."""
    prometheus_token_file: Optional[str] = None
    """File with a bearer token for Prometheus (re-read on every query, so rotation works)."""
    prometheus_ca_file: Optional[str] = None
    """CA bundle that signs Prometheus' TLS certificate."""
    resync_seconds: float = 30.0
    """Safety net: a job is reconciled at least this often even when nothing changed."""
    relist_seconds: float = 60.0
    """Each job's pods are re-listed from the API this often (a stale watch cache heals)."""
    settled_relist_seconds: float = 300.0
    """... and this often while nothing waits on its pods (`podcache.nothing_waits_on_pods`)."""
    debounce_seconds: float = 0.2
    """A pass waits this long after a trigger, so a burst of pod events makes one pass."""
    policy: AdminPolicy = DEFAULT_POLICY
    """What LeptonJobs may ask for (`--policy-file`; api/policy.py); checked on every pass."""
    network_policies: bool = True
    """Keep a NetworkPolicy per job: only the job's own pods reach its workers (reconcile/isolation.py)."""
    prometheus_namespaces: tuple[str, ...] = ("monitoring",)
    """Namespaces (names, or `key=value` namespace labels) whose pods may reach the workers' metrics port."""
    allocator: bool = True
    """The cluster allocator decides every job's size and admits jobs (gang admission);
    off: each job is scaled on its own (scaling/policy.py) and starts when created."""
    allocator_interval_seconds: float = 30.0
    """How often the allocator runs (also at the next tick after a job arrives or finishes)."""
    allocator_settings: Settings = dataclasses.field(default_factory=Settings)
    """Hysteresis, horizon, starvation bound (scaling/allocator.py)."""
    gpu_budget: Optional[int] = None
    """Namespaced mode: the GPUs the allocator may hand out (nodes are not readable there)."""
    namespaces: tuple[str, ...] = ()
    """Namespaces the operator serves (globs allowed); empty: the whole cluster."""
