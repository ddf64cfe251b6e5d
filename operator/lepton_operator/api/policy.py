"""The admin policy: what a LeptonJob may ask for, beyond what the schema allows.

Whoever may create a LeptonJob gets pods created by the operator's ServiceAccount, so the
operator is a deputy: it must not be a way around what the cluster admin allows. The CRD
schema checks syntax and bounds; `AdminPolicy` (set in the chart's values as `policy:`,
read by `lepton-operator run --policy-file`) says what is allowed, and `check_policy()`
names every violation by its rule. The operator checks it on every pass, before anything
is created (reconcile/plan.py).

Two rules hold whatever the policy says: a toleration without a key (it tolerates every
taint) is refused, and a job never mounts another LeptonJob's checkpoint claim.

Pure: imports neither kopf nor the Kubernetes client.
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatchcase
from typing import Annotated, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from lepton_operator.api.models import (
    DNS_LABEL_PATTERN,
    JOB_NAME_PATTERN,
    MAX_JOB_NAME_LENGTH,
    MOUNT_PATH_PATTERN,
    NON_NEGATIVE_QUANTITY_PATTERN,
    RESERVED_ENV_NAMES,
    RESERVED_ENV_PREFIXES,
    LeptonJobSpec,
)

# The claim the operator creates for a job is `<job>-checkpoints` (desired.checkpoint_pvc_name).
CHECKPOINT_CLAIM_SUFFIX = "-checkpoints"
# Kubernetes' own PriorityClasses (system-node-critical, system-cluster-critical).
SYSTEM_PRIORITY_PREFIX = "system-"
# What one message shows of an admin's list.
SHOWN_VALUES = 8

Name = Annotated[str, Field(min_length=1, max_length=253)]
MountPath = Annotated[str, Field(pattern=MOUNT_PATH_PATTERN, max_length=1024)]
MountPrefix = Annotated[str, Field(pattern=rf"^/$|{MOUNT_PATH_PATTERN}", max_length=1024)]


# ------------------------------------------------------------------ fabric profiles

# The only capability a profile may add. RDMA (InfiniBand, RoCE) registers memory with the
# NIC, which pins (mlocks) the training buffers beyond RLIMIT_MEMLOCK: IPC_LOCK is what NCCL's
# and UCX's verbs transports ask for. Anything broader (SYS_RESOURCE overrides every rlimit
# and quota, NET_ADMIN/NET_RAW/SYS_ADMIN reach the node's network or kernel) is never needed
# by a training process and is refused; widening this set is a code change, not a values edit.
PROFILE_CAPABILITIES = frozenset({"IPC_LOCK"})
# A profile's environment: fabric tuning only (NCCL, UCX, gloo's interface). It can never set
# what the operator or torchrun own (PET_*, LEPTON_*, RANK, ...) nor LD_PRELOAD-like variables.
PROFILE_ENV_PREFIXES = ("NCCL_", "UCX_", "GLOO_")
# Resources a profile may not add: the job's own (its spec sets them, and the GPU count is what
# the allocator, maxGpusPerJob and quotas read).
PROFILE_FORBIDDEN_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"})
# Extended resources are `<domain>/<name>` (rdma/hca_shared_devices_a, nvidia.com/hostdev).
EXTENDED_RESOURCE_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
# Annotation keys: an optional DNS prefix and a name (the operator's own prefixes are refused).
ANNOTATION_KEY_PATTERN = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
PROFILE_FORBIDDEN_ANNOTATION_PREFIXES = ("lepton.ai/", "prometheus.io/", "kubernetes.io/", "k8s.io/")
# The label on every worker of a profile (its name): what an admin's Pod Security exemption keys on.
LABEL_FABRIC_PROFILE = "lepton.ai/fabric-profile"

EnvName = Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$", max_length=128)]
_CAPABILITIES_SHOWN = ", ".join(sorted(PROFILE_CAPABILITIES))
_ENV_PREFIXES_SHOWN = ", ".join(p + "*" for p in PROFILE_ENV_PREFIXES)


class FabricProfile(BaseModel):
    """A named worker profile the admin defines and a LeptonJob picks with `spec.profile`.

    It holds what a user may never set directly: extra device resources, pod annotations
    (a secondary network), the IPC_LOCK capability, the fabric's NCCL/UCX environment and a
    /dev/shm size. Only the namespaces listed may use it.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, strict=True)

    namespaces: list[Name] = Field(
        description=(
            "Namespaces whose jobs may use the profile (`*` and `?` wildcards, as `allowedSecretNames`). "
            "No default: a profile is usable nowhere until the admin says where."
        ),
        min_length=1,
        max_length=256,
    )
    resources: dict[
        Annotated[str, Field(pattern=EXTENDED_RESOURCE_PATTERN, max_length=253)], Annotated[int, Field(ge=1, le=1024)]
    ] = Field(
        {},
        description=(
            "Extended resources added to each worker's requests and limits, e.g. `rdma/hca_shared_devices_a: 1`. "
            "Never cpu, memory or GPUs: those are the job's own."
        ),
        max_length=16,
    )
    annotations: dict[
        Annotated[str, Field(pattern=ANNOTATION_KEY_PATTERN, max_length=253)], Annotated[str, Field(max_length=4096)]
    ] = Field(
        {},
        description="Pod annotations, e.g. `k8s.v1.cni.cncf.io/networks: ib-net` (Multus) for a secondary network.",
        max_length=16,
    )
    capabilities: list[str] = Field(
        [],
        description=f"Linux capabilities added to the trainer container; only {_CAPABILITIES_SHOWN}.",
        max_length=8,
    )
    env: dict[EnvName, Annotated[str, Field(max_length=4096)]] = Field(
        {},
        description=(
            f"Environment defaults of the workers ({_ENV_PREFIXES_SHOWN} names only), "
            "e.g. `NCCL_IB_HCA: mlx5`; a job's own `env` entry of the same name overrides one."
        ),
        max_length=64,
    )
    shm_size: Optional[Annotated[str, Field(pattern=NON_NEGATIVE_QUANTITY_PATTERN, max_length=64)]] = Field(
        None, description="Size limit of /dev/shm when the job sets no `resources.sharedMemory`."
    )

    def problems(self, name: str) -> list[str]:
        """What the allow-lists refuse in this profile (the schema checked the shapes)."""
        where = f"profiles.{name}"
        out = []
        if not re.fullmatch(DNS_LABEL_PATTERN, name) or len(name) > 63:
            out.append(f"{where}: the name must be a DNS label (a job names it in spec.profile)")
        for cap in self.capabilities:
            if cap not in PROFILE_CAPABILITIES:
                out.append(f"{where}.capabilities: {cap} is not allowed (allowed: {_CAPABILITIES_SHOWN})")
        for key in self.resources:
            if key in PROFILE_FORBIDDEN_RESOURCES or "kubernetes.io/" in key:
                out.append(f"{where}.resources: {key} is not a device resource a profile may add")
        for key in self.annotations:
            if key.startswith(PROFILE_FORBIDDEN_ANNOTATION_PREFIXES) or ".kubernetes.io/" in key:
                out.append(f"{where}.annotations: {key} belongs to the operator or Kubernetes")
        for var in self.env:
            reserved = var in RESERVED_ENV_NAMES or var.startswith(RESERVED_ENV_PREFIXES)
            if reserved or not var.startswith(PROFILE_ENV_PREFIXES):
                out.append(f"{where}.env: {var} is not allowed (only {_ENV_PREFIXES_SHOWN})")
        return out

    def allows_namespace(self, namespace: str) -> bool:
        return any(fnmatchcase(namespace, p) for p in self.namespaces)


class AdminPolicy(BaseModel):
    """What LeptonJobs may ask for; each default says why it is the default."""

    # forbid + strict: a misspelt key or a quoted "false" in an admin's file is an error, never a guess.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, strict=True)

    allowed_priority_classes: list[Name] = Field(
        ["*"],
        description=(
            "PriorityClasses a job may name (`*` and `?` wildcards); a job without one is always allowed. "
            "A wildcard never matches `system-*` classes: list one by its exact name to allow it. "
            "Default `*`: any class but Kubernetes' node- and cluster-critical ones, which would let a "
            "training job preempt the pods that keep nodes and the cluster running."
        ),
        max_length=256,
    )
    allowed_toleration_keys: list[Name] = Field(
        ["nvidia.com/gpu"],
        description=(
            "Taint keys a job may tolerate (exact keys). Default: the GPU nodes' usual taint only; add "
            "the taints of your GPU pools. A toleration without a key tolerates every taint (control-plane "
            "nodes, NoExecute evictions) and is refused whatever this says."
        ),
        max_length=256,
    )
    forbidden_node_selector_keys: list[Name] = Field(
        ["node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"],
        description=(
            "Node labels a job may not select on (exact keys). Default: the control-plane labels, so that "
            "no training job is steered onto the nodes that run the API server and etcd."
        ),
        max_length=256,
    )
    allowed_mount_path_prefixes: list[MountPrefix] = Field(
        ["/"],
        description=(
            "Every mount path of a job (checkpoint, data volumes) must be one of these or inside one. "
            "Default `/`: anywhere but the forbidden paths below."
        ),
        min_length=1,
        max_length=256,
    )
    forbidden_mount_paths: list[MountPath] = Field(
        ["/proc", "/sys", "/dev", "/etc", "/var/run", "/run"],
        description=(
            "No mount may be at one of these paths or inside one. Default: where the kernel, the container "
            "runtime and the kubelet put what a container trusts (/proc, /sys, /dev, /etc/hosts and "
            "resolv.conf, service account tokens under /var/run and /run); a volume there can shadow "
            "them or attack the runtime's mount setup."
        ),
        max_length=256,
    )
    allow_read_write_data_volumes: bool = Field(
        False,
        description=(
            "Whether `dataVolumes` may be mounted read-write. Default false: data volumes are inputs that "
            "several jobs may share, and a job writes only to its checkpoint volume, so a buggy or hostile "
            "job cannot corrupt a dataset other jobs read."
        ),
    )
    allowed_secret_names: list[Name] = Field(
        [],
        description=(
            "Secrets a job may read through `env[].valueFrom.secretKeyRef` (`*` and `?` wildcards). Default: "
            "none, because the operator would otherwise hand any Secret of the namespace to whoever may "
            "create a LeptonJob, who may not be allowed to read Secrets."
        ),
        max_length=256,
    )
    max_command_args_env_bytes: int = Field(
        64 * 1024,
        description=(
            "Most bytes (JSON) of `command`, `args` and `env` together, which every worker pod copies. "
            "Default 64 KiB: real launch lines and settings take a few KiB, and a pod stays far below "
            "etcd's 1.5 MiB request limit."
        ),
        ge=1024,
        le=1024 * 1024,
    )
    max_command_args_env_bytes_all_workers: int = Field(
        16 * 1024 * 1024,
        description=(
            "Most bytes of `command`, `args` and `env` times `workers.max`: what one job may write into "
            "etcd through its pods. Default 16 MiB, under 1% of etcd's default 2 GiB quota, so that one "
            "job (a namespaced permission) cannot fill etcd and take the whole cluster down."
        ),
        ge=1024,
        le=1024 * 1024 * 1024,
    )
    max_gpus_per_job: Optional[int] = Field(
        None,
        description=(
            "Most GPUs one job may hold: `resources.gpus` times `workers.max`. Default none (unlimited): "
            "GPU quotas are usually per namespace (ResourceQuota on `requests.nvidia.com/gpu`); set this "
            "to cap a single job as well."
        ),
        ge=0,
        le=1_000_000,
    )
    max_priority: int = Field(
        0,
        description=(
            "Highest `spec.priority` a job may give itself for the cluster allocator (a higher-priority job "
            "is admitted first and may shrink others to their min). Default 0: users may lower their jobs' "
            "priority, and raising it goes through a PriorityClass (`allowedPriorityClasses`), which the "
            "admin controls."
        ),
        ge=-1_000_000_000,
        le=1_000_000_000,
    )
    profiles: dict[Annotated[str, Field(max_length=63)], FabricProfile] = Field(
        {},
        description=(
            "Fabric profiles by name (`spec.profile`): extra device resources, pod annotations, the IPC_LOCK "
            "capability, NCCL/UCX environment and /dev/shm size, each with the namespaces allowed to use it. "
            "Default none: a job gets nothing beyond the restricted pod the operator always builds."
        ),
        max_length=64,
    )

    @model_validator(mode="after")
    def _profiles_within_the_allow_lists(self) -> "AdminPolicy":
        problems = [p for name, profile in self.profiles.items() for p in profile.problems(name)]
        if problems:
            raise ValueError("; ".join(problems))
        return self


DEFAULT_POLICY = AdminPolicy()


class InvalidPolicy(ValueError):
    """A policy file the operator refuses to start with."""


def parse_policy(text: str) -> AdminPolicy:
    """The policy in a YAML or JSON document (empty: the defaults); InvalidPolicy names each problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidPolicy(f"not YAML or JSON: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidPolicy(f"the policy must be a mapping of settings, not a {type(data).__name__}")
    try:
        policy = AdminPolicy.model_validate(data)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'policy'}: {err['msg']}" for err in e.errors()]
        raise InvalidPolicy("; ".join(problems)) from None
    return policy


def command_args_env_bytes(spec: LeptonJobSpec) -> int:
    """Bytes (compact JSON, as stored) of the spec's command, args and env."""
    part = spec.model_dump(mode="json", by_alias=True, exclude_none=True, include={"command", "args", "env"})
    return len(json.dumps(part, separators=(",", ":"), ensure_ascii=False).encode())


def _shown(values: list[str]) -> str:
    if not values:
        return "none"
    more = len(values) - SHOWN_VALUES
    return ", ".join(values[:SHOWN_VALUES]) + (f" and {more} more" if more > 0 else "")


def _inside(path: str, prefix: str) -> bool:
    """Whether a normalised absolute path is `prefix` or lies inside it."""
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def _priority_class_allowed(name: str, patterns: list[str]) -> bool:
    if name in patterns:
        return True
    return not name.startswith(SYSTEM_PRIORITY_PREFIX) and any(fnmatchcase(name, p) for p in patterns)


def checkpoint_claim_owner(claim: str) -> Optional[str]:
    """The LeptonJob whose created checkpoint claim this name is (`<job>-checkpoints`), or None."""
    if not claim.endswith(CHECKPOINT_CLAIM_SUFFIX):
        return None
    job = claim[: -len(CHECKPOINT_CLAIM_SUFFIX)]
    return job if len(job) <= MAX_JOB_NAME_LENGTH and re.fullmatch(JOB_NAME_PATTERN, job) else None


def job_profile(spec: LeptonJobSpec, policy: AdminPolicy = DEFAULT_POLICY) -> Optional[FabricProfile]:
    """The fabric profile the spec names, or None (no profile, or one the policy does not define)."""
    return policy.profiles.get(spec.profile) if spec.profile is not None else None


def _profile_errors(spec: LeptonJobSpec, policy: AdminPolicy, namespace: Optional[str]) -> list[str]:
    """`spec.profile` must name a profile of the policy that allows the job's namespace."""
    if spec.profile is None:
        return []
    profile = policy.profiles.get(spec.profile)
    if profile is None:
        return [
            f"policy profiles: spec.profile {spec.profile} is not a profile the admin defined "
            f"(defined: {_shown(sorted(policy.profiles))})"
        ]
    if namespace is None or not profile.allows_namespace(namespace):
        return [
            f"policy profiles: namespace {namespace} may not use profile {spec.profile} "
            f"(allowed: {_shown(profile.namespaces)})"
        ]
    return []


def check_policy(
    job_name: str, spec: LeptonJobSpec, policy: AdminPolicy = DEFAULT_POLICY, namespace: Optional[str] = None
) -> list[str]:
    """Every way the spec breaks the policy, each message starting `policy <rule>:`; [] when allowed.

    `namespace`: the job's, which a profile must allow (None: no profile is allowed).
    """
    errors = _profile_errors(spec, policy, namespace)

    def refuse(rule: str, message: str) -> None:
        errors.append(f"policy {rule}: {message}")

    pc = spec.priority_class_name
    if pc and not _priority_class_allowed(pc, policy.allowed_priority_classes):
        refuse(
            "allowedPriorityClasses",
            f"spec.priorityClassName {pc} is not allowed (allowed: {_shown(policy.allowed_priority_classes)}; "
            f"a wildcard never matches {SYSTEM_PRIORITY_PREFIX}* classes)",
        )

    if spec.priority is not None and spec.priority > policy.max_priority:
        refuse("maxPriority", f"spec.priority {spec.priority} is above {policy.max_priority}")

    for i, t in enumerate(spec.tolerations):
        if not t.key:
            refuse(
                "allowedTolerationKeys",
                f"spec.tolerations[{i}] has no key: it would tolerate every taint, which is never allowed",
            )
        elif t.key not in policy.allowed_toleration_keys:
            refuse(
                "allowedTolerationKeys",
                f"spec.tolerations[{i}].key {t.key} is not allowed (allowed: {_shown(policy.allowed_toleration_keys)})",
            )

    for key in spec.node_selector:
        if key in policy.forbidden_node_selector_keys:
            refuse("forbiddenNodeSelectorKeys", f"spec.nodeSelector key {key} is forbidden")

    mounts = [(f"spec.dataVolumes[{i}].mountPath", v.mount_path) for i, v in enumerate(spec.data_volumes)]
    if spec.checkpoint is not None:
        mounts.append(("spec.checkpoint.mountPath", spec.checkpoint.mount_path))
    for where, path in mounts:
        if not any(_inside(path, prefix) for prefix in policy.allowed_mount_path_prefixes):
            refuse(
                "allowedMountPathPrefixes",
                f"{where} {path} is outside the allowed prefixes ({_shown(policy.allowed_mount_path_prefixes)})",
            )
        forbidden = next((f for f in policy.forbidden_mount_paths if _inside(path, f)), None)
        if forbidden is not None:
            refuse("forbiddenMountPaths", f"{where} {path} is {forbidden} or inside it")

    if not policy.allow_read_write_data_volumes:
        for i, v in enumerate(spec.data_volumes):
            if not v.read_only:
                refuse("allowReadWriteDataVolumes", f"spec.dataVolumes[{i}] ({v.claim_name}) must be readOnly")

    for var in spec.env:
        ref = var.value_from.secret_key_ref if var.value_from is not None else None
        if ref is not None and not any(fnmatchcase(ref.name, p) for p in policy.allowed_secret_names):
            refuse(
                "allowedSecretNames",
                f"spec.env[{var.name}] reads Secret {ref.name}, which is not allowed "
                f"(allowed: {_shown(policy.allowed_secret_names)})",
            )

    size = command_args_env_bytes(spec)
    if size > policy.max_command_args_env_bytes:
        refuse(
            "maxCommandArgsEnvBytes",
            f"command, args and env take {size} bytes, more than {policy.max_command_args_env_bytes}",
        )
    total = size * spec.workers.max
    if total > policy.max_command_args_env_bytes_all_workers:
        refuse(
            "maxCommandArgsEnvBytesAllWorkers",
            f"command, args and env ({size} bytes) times workers.max ({spec.workers.max}) is {total} bytes, "
            f"more than {policy.max_command_args_env_bytes_all_workers}",
        )

    gpus = spec.resources.gpus * spec.workers.max
    if policy.max_gpus_per_job is not None and gpus > policy.max_gpus_per_job:
        refuse(
            "maxGpusPerJob",
            f"resources.gpus ({spec.resources.gpus}) times workers.max ({spec.workers.max}) is {gpus} GPUs, "
            f"more than {policy.max_gpus_per_job}",
        )

    claims = [(f"spec.dataVolumes[{i}].claimName", v.claim_name) for i, v in enumerate(spec.data_volumes)]
    if spec.checkpoint is not None and spec.checkpoint.claim_name is not None:
        claims.append(("spec.checkpoint.claimName", spec.checkpoint.claim_name))
    for where, claim in claims:
        owner = checkpoint_claim_owner(claim)
        if owner is not None and owner != job_name:
            refuse(
                "checkpointClaims",
                f"{where} {claim} is LeptonJob {owner}'s checkpoint claim (names <job>{CHECKPOINT_CLAIM_SUFFIX} "
                "belong to the claims the operator creates); a job mounts only its own",
            )
    return errors
