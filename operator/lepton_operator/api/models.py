"""The LeptonJob API: the single source of truth.

The pydantic models below define `lepton.ai/v1alpha1` `LeptonJob`. The CRD in
`crds/leptonjobs.lepton.ai.yaml` is generated from them (`lepton-operator crd`), so every
field carries a description (it becomes `kubectl explain`) and bounds. Rules that an
OpenAPI schema cannot express (min <= initial <= max, exactly one checkpoint source,
reserved env names) live in `validate_job()`, which the operator runs on every job: the
CRD also carries them as CEL rules for modern clusters, but a 1.20 apiserver ignores those.

This module imports neither kopf nor the Kubernetes client.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, ValidationError
from pydantic.alias_generators import to_camel

GROUP = "lepton.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LeptonJob"
PLURAL = "leptonjobs"
SINGULAR = "leptonjob"
SHORT_NAMES = ["lj"]
CRD_NAME = f"{PLURAL}.{GROUP}"
# kopf puts it on every job (its daemons need it) to stop them before the job goes.
FINALIZER = f"{GROUP}/operator"

# Names: `<name>-worker-<index>` must stay a 63-character DNS label, and so must the
# Service `<name>-workers`. With at most 1000 workers the index has 3 digits.
MAX_WORKERS = 1000
WORKER_SUFFIX_MAX = len("-worker-") + len(str(MAX_WORKERS - 1))
MAX_JOB_NAME_LENGTH = 63 - WORKER_SUFFIX_MAX  # 52
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Job names are DNS-1035 labels (start with a letter): the Service `<name>-workers` must
# be one, and the apiserver rejects a Service named `1job-workers`.
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Upper bound of the spec's durations (one year): large enough for any job, small enough
# that deadline arithmetic never overflows anything downstream.
MAX_DURATION_SECONDS = 366 * 24 * 3600
# The resource.Quantity grammar of k8s.io/apimachinery (pkg/api/resource/quantity.go):
#   <quantity> ::= <signedNumber><suffix>;  <number> ::= <digits> | <digits>.<digits> | <digits>. | .<digits>
#   <suffix> ::= <binarySI> (Ki|Mi|Gi|Ti|Pi|Ei) | <decimalSI> (n|u|m|""|k|M|G|T|P|E) | <decimalExponent>
# "1." is valid there (its parser even says "we currently allow 1.G"). The grammar allows
# `e<signedNumber>`, but the parser takes only an integer exponent ("1e1.5" is refused),
# so the exponent here is `[+-]?<digits>`. Plain groups: the same regex serves pydantic
# (Rust regex) and the CRD's OpenAPI pattern (Go RE2), where `$` is the end of the text.
_QUANTITY_NUMBER = r"([0-9]+(\.[0-9]*)?|\.[0-9]+)"
_QUANTITY_SUFFIX = r"([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?"
QUANTITY_PATTERN = rf"^[+-]?{_QUANTITY_NUMBER}{_QUANTITY_SUFFIX}$"
# Every quantity of the spec is an amount the server refuses when negative (pod requests
# and limits, emptyDir sizeLimit, PVC storage), which would leave the job Pending forever.
NON_NEGATIVE_QUANTITY_PATTERN = rf"^\+?{_QUANTITY_NUMBER}{_QUANTITY_SUFFIX}$"
# A quantity whose number has a non-zero digit is > 0 (the suffix cannot make it 0). `[+]`,
# not `\+`: the same text is a CEL string literal in the CRD.
POSITIVE_QUANTITY_PREFIX = r"^[+]?[0-9.]*[1-9]"
# Mount paths are absolute and normalised (no trailing '/', no empty, '.' or '..' part),
# so that comparing the strings compares the paths: the operator's check and the CRD's CEL
# rules see "/data/" and "/data" as the same mount.
MOUNT_PATH_PATTERN = r"^(/([^/.\n][^/\n]*|\.[^/.\n][^/\n]*|\.\.[^/\n]+))+$"
# The memory-backed /dev/shm every worker gets (desired/workers.py SHM_MOUNT_PATH).
SHM_MOUNT_PATH = "/dev/shm"
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

# Bounds of the status messages (the CRD's maxLength; metav1.Condition's for conditions):
# a longer one makes the whole status write fail with 422.
STATUS_MESSAGE_MAX_LENGTH = 4096
CONDITION_MESSAGE_MAX_LENGTH = 32768

DEFAULT_TRAINER_IMAGE = "lepton-ai/lepton-trainer:0.1.0"
DEFAULT_RENDEZVOUS_PORT = 29400
DEFAULT_METRICS_PORT = 9400

# Environment variables the operator sets in every worker. A user may not set them:
# torchrun and the trainer would silently get the wrong world size or rendezvous.
RESERVED_ENV_NAMES = frozenset(
    {
        "PET_NNODES",
        "PET_NPROC_PER_NODE",
        "PET_RDZV_BACKEND",
        "PET_RDZV_ENDPOINT",
        "PET_RDZV_ID",
        "PET_RDZV_CONF",
        "PET_MAX_RESTARTS",
        "PET_NODE_RANK",
        "LEPTON_JOB_NAME",
        "LEPTON_GENERATION",
        "LEPTON_WORLD_SIZE",
        "LEPTON_WORKER_INDEX",
        "LEPTON_CHECKPOINT_DIR",
        "LEPTON_METRICS_PORT",
        "LEPTON_JOB_TOTAL_WORKERS",
        "LEPTON_JOB_WORKER_INDEX",
        "LEPTON_JOB_WORKER_PREFIX",
        "LEPTON_SUBDOMAIN",
        "POD_IP",
        "POD_NAME",
        "POD_NAMESPACE",
        # torchrun sets these for each worker process.
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    }
)
RESERVED_ENV_PREFIXES = ("PET_", "TORCHELASTIC_")


def _format_time(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


Timestamp = Annotated[datetime, PlainSerializer(_format_time, return_type=str)]
"""A point in time, serialised the Kubernetes way (RFC 3339, UTC, seconds)."""

Quantity = Annotated[str, Field(pattern=NON_NEGATIVE_QUANTITY_PATTERN, max_length=64)]


class ApiModel(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_k8s(self) -> dict:
        """The wire form: camelCase, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------- spec


class ConfigMapKeySelector(ApiModel):
    """A key of a ConfigMap in the job's namespace."""

    name: str = Field(description="Name of the ConfigMap.", min_length=1, max_length=253)
    key: str = Field(description="Key within the ConfigMap.", min_length=1, max_length=253)
    optional: Optional[bool] = Field(None, description="Whether the ConfigMap or key may be missing.")


class SecretKeySelector(ApiModel):
    """A key of a Secret in the job's namespace."""

    name: str = Field(description="Name of the Secret.", min_length=1, max_length=253)
    key: str = Field(description="Key within the Secret.", min_length=1, max_length=253)
    optional: Optional[bool] = Field(None, description="Whether the Secret or key may be missing.")


class FieldSelector(ApiModel):
    """A field of the worker pod, as the downward API exposes it."""

    field_path: str = Field(
        description="Pod field, e.g. `metadata.name`, `metadata.namespace`, `status.podIP`, `spec.nodeName`.",
        min_length=1,
        max_length=256,
    )


class EnvVarSource(ApiModel):
    """Where an environment variable's value comes from (exactly one source)."""

    config_map_key_ref: Optional[ConfigMapKeySelector] = Field(None, description="A ConfigMap key.")
    secret_key_ref: Optional[SecretKeySelector] = Field(None, description="A Secret key.")
    field_ref: Optional[FieldSelector] = Field(None, description="A field of the worker pod.")


class EnvVar(ApiModel):
    """An environment variable for the training container."""

    name: str = Field(
        description="Variable name. Names the operator sets (PET_*, LEPTON_JOB_NAME, RANK, ...) are rejected.",
        min_length=1,
        max_length=128,
        pattern=ENV_NAME_PATTERN,
    )
    value: Optional[str] = Field(None, description="Literal value.", max_length=32768)
    value_from: Optional[EnvVarSource] = Field(None, description="Value taken from a ConfigMap, Secret or pod field.")


class WorkersSpec(ApiModel):
    """How many workers (pods) the job runs; each worker runs `nprocPerNode` processes."""

    min: int = Field(1, description="Fewest workers the job may run with.", ge=1, le=MAX_WORKERS)
    max: int = Field(1, description="Most workers the job may run with.", ge=1, le=MAX_WORKERS)
    initial: Optional[int] = Field(
        None, description="Workers of the first generation (default: `min`).", ge=1, le=MAX_WORKERS
    )
    # Not Optional: a 1.20 apiserver answers GET /scale with a 500 when the spec replicas
    # field is absent, so `kubectl scale` would fail on a fresh job. The CRD defaults it to
    # 0, which means "not scaled yet: use `initial`".
    replicas: int = Field(
        0,
        description=(
            "Requested worker count, set by `kubectl scale lj/NAME --replicas=N` or by the autoscaler. "
            "Clamped to [min, max]. 0 (the default): `initial`."
        ),
        ge=0,
        le=MAX_WORKERS,
    )


class ResourcesSpec(ApiModel):
    """Resources of each worker. GPU requests equal limits (GPUs cannot be overcommitted)."""

    gpus: int = Field(0, description="GPUs per worker (`nvidia.com/gpu`); 0 for a CPU job.", ge=0, le=16)
    cpu: Optional[Quantity] = Field(None, description="CPU request and limit per worker, e.g. `8` or `500m`.")
    memory: Optional[Quantity] = Field(None, description="Memory request and limit per worker, e.g. `64Gi`.")
    shared_memory: Optional[Quantity] = Field(
        None, description="Size limit of the memory-backed /dev/shm (default: unbounded within memory)."
    )


class CheckpointSpec(ApiModel):
    """Where workers keep checkpoints: an existing claim, or a PVC the operator creates and owns."""

    claim_name: Optional[str] = Field(
        None, description="Existing PersistentVolumeClaim to use.", max_length=253, pattern=DNS_LABEL_PATTERN
    )
    size: Optional[Quantity] = Field(
        None,
        description=(
            "Size of a PVC the operator creates (`<job>-checkpoints`). Its access mode is ReadWriteMany "
            "when workers.max > 1 (workers on several nodes share it; the storage class must support RWX) "
            "and ReadWriteOnce for single-worker jobs."
        ),
    )
    storage_class_name: Optional[str] = Field(
        None, description="Storage class of the created PVC (default: the cluster's).", max_length=253
    )
    mount_path: str = Field(
        "/checkpoints",
        description=(
            "Where the checkpoint volume is mounted; exported as LEPTON_CHECKPOINT_DIR. A normalised absolute "
            "path (no trailing '/', no '.' or '..' part), not /dev/shm, and neither inside nor above a data "
            "volume's mount path."
        ),
        max_length=1024,
        pattern=MOUNT_PATH_PATTERN,
    )


class DataVolume(ApiModel):
    """A PersistentVolumeClaim mounted into every worker (datasets, caches)."""

    claim_name: str = Field(description="Existing PersistentVolumeClaim.", max_length=253, pattern=DNS_LABEL_PATTERN)
    mount_path: str = Field(
        description=(
            "Mount path in the container: a normalised absolute path (no trailing '/', no '.' or '..' part), "
            "not /dev/shm, and neither inside nor above another mount of the job (checkpoint, data volumes)."
        ),
        max_length=1024,
        pattern=MOUNT_PATH_PATTERN,
    )
    read_only: bool = Field(True, description="Mount read-only.")


class RestartSpec(ApiModel):
    """How the job reacts to worker failures."""

    max_restarts: int = Field(
        3,
        description=(
            "New generations started after a retryable worker failure (exit 128-255) or a hang "
            "before the job fails. Exit codes 1-127 fail the job at once. Disruptions (eviction, "
            "preemption, a lost or drained node) never spend it."
        ),
        ge=0,
        le=1000,
    )
    backoff_seconds: int = Field(
        10,
        description=(
            "Wait before the new generation of a restart: this long after the first failure, "
            "doubling with each restart up to 300 s (the Job controller's backoff). 0: no wait."
        ),
        ge=0,
        le=3600,
    )
    node_lost_seconds: int = Field(
        60,
        description=(
            "A worker whose node has not been Ready for this long is lost: its pod is force-deleted "
            "and a new generation starts without that node (a disruption, not a restart)."
        ),
        ge=10,
        le=86400,
    )
    hang_seconds: int = Field(
        1800,
        description=(
            "A Running job whose trainers report no new samples (lepton_trainer_samples_total) for "
            "this long is hung: a new generation starts, counted as a restart. 0: never (needs Prometheus)."
        ),
        ge=0,
        le=7 * 24 * 3600,
    )


# Cap of the exponential restart backoff, as the Job controller's (6 min there).
MAX_RESTART_BACKOFF_SECONDS = 300


def restart_backoff_seconds(restart: RestartSpec, restarts: int) -> float:
    """Seconds between a failure and the new generation of restart number `restarts` (1-based)."""
    if restart.backoff_seconds == 0 or restarts < 1:
        return 0.0
    return float(min(MAX_RESTART_BACKOFF_SECONDS, restart.backoff_seconds * 2 ** (restarts - 1)))


class Toleration(ApiModel):
    """A node taint the workers tolerate."""

    key: Optional[str] = Field(None, description="Taint key (empty with Exists: all taints).", max_length=316)
    operator: Optional[Literal["Exists", "Equal"]] = Field(None, description="Exists or Equal (default Equal).")
    value: Optional[str] = Field(None, description="Taint value for Equal.", max_length=63)
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = Field(
        None, description="Taint effect to tolerate (empty: all)."
    )
    toleration_seconds: Optional[int] = Field(
        None, description="How long a NoExecute taint is tolerated.", ge=0, le=MAX_DURATION_SECONDS
    )


class AutoscalingSpec(ApiModel):
    """Throughput-driven autoscaling between `workers.min` and `workers.max`."""

    enabled: bool = Field(False, description="Let the operator change the worker count from measured throughput.")
    interval_seconds: int = Field(30, description="How often the autoscaler looks at the job.", ge=5, le=3600)
    window_seconds: int = Field(60, description="Rate window of the throughput query.", ge=10, le=3600)
    warmup_seconds: int = Field(
        60, description="Seconds after a generation starts whose throughput is ignored.", ge=0, le=3600
    )
    step: int = Field(
        1,
        description=(
            "Granularity of rescales: the worker count moves in multiples of this. A scale-up may "
            "take several steps at once (at most 4x the current size) when the throughput curve "
            "fitted to the sizes measured so far says every step pays; a scale-down returns to the "
            "largest smaller size measured."
        ),
        ge=1,
        le=64,
    )
    efficiency_threshold: float = Field(
        0.1,
        description=(
            "The floor on an added worker's marginal efficiency: a worker is added only while it is "
            "predicted to raise throughput by at least this fraction of the per-worker throughput, and "
            "workers below it are given back. 0.1 (the default) lets a job use idle GPUs while they "
            "still shorten it noticeably (benchmarks/allocator.py); raise it to trade speed for GPUs."
        ),
        ge=0.0,
        le=1.0,
    )
    cooldown_seconds: int = Field(120, description="No rescale sooner than this after the last one.", ge=0, le=86400)
    max_rescales_per_hour: int = Field(6, description="Budget of rescales in any hour.", ge=0, le=60)
    capacity_timeout_seconds: int = Field(
        120,
        description="How long added workers may wait to be scheduled before a scale-up is abandoned.",
        ge=5,
        le=3600,
    )
    capacity_backoff_seconds: int = Field(
        600, description="After a scale-up failed for capacity, no new attempt for this long.", ge=0, le=86400
    )


# A Kubernetes label key (apimachinery IsQualifiedName): an optional DNS-subdomain prefix
# and '/', then a name of at most 63 characters (alphanumerics, '-', '_', '.' inside).
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_KEY_MAX_LENGTH = 253 + 1 + 63


class Placement(ApiModel):
    """Where a generation's workers go, in topology domains (racks, NVLink domains, zones).

    Expressed with the scheduler's own primitives against the generation's labels, so the
    real scheduler does the placing (desired/workers.py `placement_scheduling`).
    """

    topology_key: Optional[str] = Field(
        None,
        description=(
            "Node label whose values are the topology domains, e.g. `topology.kubernetes.io/zone` or "
            "an admin's rack or NVLink-domain label. Required when mode is Pack or Spread or exclusive "
            "is true. Nodes without the label belong to no domain."
        ),
        max_length=LABEL_KEY_MAX_LENGTH,
        pattern=LABEL_KEY_PATTERN,
    )
    mode: Literal["None", "Pack", "Spread"] = Field(
        "None",
        description=(
            "Pack: all workers of a generation in one domain if they fit, else in the fewest domains "
            "(preferred pod affinity to the generation's workers; the cluster allocator gives a Pack job no "
            "more GPUs than its largest domain has free, unless its min fits no single domain). Spread: "
            "the generation's workers spread evenly over the domains (a topology spread constraint, maxSkew "
            "1, ScheduleAnyway: a preference, never a reason to stay Pending). None (the default): no "
            "preference."
        ),
    )
    exclusive: bool = Field(
        False,
        description=(
            "Keep other LeptonJobs' workers out of the domains this job's workers use, and this job's "
            "workers out of domains where other LeptonJobs' workers run (required pod anti-affinity, "
            "which the scheduler honours both ways). Across namespaces on Kubernetes 1.22 and later "
            "(namespaceSelector); older servers drop that field and keep to the job's namespace."
        ),
    )


# Fields that shape the worker pods. They cannot change while a job exists (CEL rules on
# modern clusters; the operator compares `template_hash()` with the one in status).
IMMUTABLE_FIELDS = (
    "image",
    "command",
    "args",
    "env",
    "resources",
    "nproc_per_node",
    "rendezvous_port",
    "metrics_port",
    "checkpoint",
    "data_volumes",
    "profile",
)
# Immutable fields added after the first release: hashed only when set, so that an upgrade
# leaves the template hash of every job that does not use them unchanged (a changed hash
# would flag their running workers as an immutable-field change).
HASHED_WHEN_SET = frozenset({"profile"})


class LeptonJobSpec(ApiModel):
    """Desired state of a LeptonJob: an elastic PyTorch training job."""

    image: str = Field(
        DEFAULT_TRAINER_IMAGE, description="Container image of the workers.", min_length=1, max_length=512
    )
    image_pull_policy: Optional[Literal["Always", "IfNotPresent", "Never"]] = Field(
        None, description="Image pull policy of the workers."
    )
    command: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list,
        description="Container command (default: the image's entrypoint, which launches torchrun from PET_* env).",
        max_length=64,
    )
    args: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list, description="Arguments to the command or entrypoint.", max_length=256
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables.", max_length=128)
    workers: WorkersSpec = Field(default_factory=WorkersSpec, description="Worker count bounds.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Per-worker resources.")
    nproc_per_node: Optional[int] = Field(
        None, description="Training processes per worker (default: `resources.gpus`, or 1).", ge=1, le=64
    )
    rendezvous_port: int = Field(
        DEFAULT_RENDEZVOUS_PORT,
        description=(
            "Port of the c10d rendezvous store on worker 0. Generations alternate between this port and "
            "the next one, so workers of the next generation can never reach the running one's store."
        ),
        ge=1024,
        le=65534,
    )
    metrics_port: int = Field(
        DEFAULT_METRICS_PORT, description="Port on which workers serve Prometheus metrics.", ge=1024, le=65535
    )
    checkpoint: Optional[CheckpointSpec] = Field(None, description="Checkpoint storage, shared by all workers.")
    data_volumes: list[DataVolume] = Field(
        default_factory=list, description="Extra claims mounted into every worker.", max_length=8
    )
    restart: RestartSpec = Field(default_factory=RestartSpec, description="Failure handling.")
    termination_grace_period_seconds: int = Field(
        60, description="Time a stopping worker has to write its checkpoint.", ge=1, le=3600
    )
    active_deadline_seconds: Optional[int] = Field(
        None,
        description="Fail the job after this much running time (paused while suspended).",
        ge=1,
        le=MAX_DURATION_SECONDS,
    )
    ttl_seconds_after_finished: Optional[int] = Field(
        None,
        description="Delete the job this long after it Succeeded or Failed.",
        ge=0,
        le=MAX_DURATION_SECONDS,
    )
    suspend: bool = Field(False, description="Stop all workers (the Service stays); unset to resume.")
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, description="Node labels the workers require.", max_length=32
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the workers tolerate.", max_length=32
    )
    placement: Optional[Placement] = Field(
        None,
        description=(
            "Topology placement of each generation's workers (Pack, Spread, exclusive domains). "
            "A change applies from the next generation on."
        ),
    )
    priority_class_name: Optional[str] = Field(
        None,
        description=(
            "PriorityClass of the workers; its value is also the job's priority for the cluster allocator "
            "unless `priority` is set."
        ),
        max_length=253,
        pattern=DNS_LABEL_PATTERN,
    )
    priority: Optional[int] = Field(
        None,
        description=(
            "The job's priority for the cluster allocator (higher first; default: the value of "
            "`priorityClassName`, else 0). A higher-priority job is admitted first and may shrink "
            "lower-priority elastic jobs down to their `min`, never below."
        ),
        ge=-1_000_000_000,
        le=1_000_000_000,
    )
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Throughput autoscaling.")
    profile: Optional[str] = Field(
        None,
        description=(
            "Fabric profile of the workers, defined by the cluster admin in the operator's policy "
            "(`policy.profiles`): the extra resources (e.g. RDMA devices), pod annotations (a secondary "
            "network), the IPC_LOCK capability, NCCL_* defaults and /dev/shm size it lists. The job's "
            "namespace must be one the profile allows, else the job fails as InvalidSpec."
        ),
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
    )

    def template_hash(self) -> str:
        """A short digest of the immutable fields, recorded in status when workers first start."""
        unset = {name for name in HASHED_WHEN_SET if getattr(self, name) is None}
        subset = self.model_dump(mode="json", by_alias=True, include=set(IMMUTABLE_FIELDS) - unset)
        return hashlib.sha256(json.dumps(subset, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def initial_workers(self) -> int:
        return self.workers.initial if self.workers.initial is not None else self.workers.min

    @property
    def processes_per_worker(self) -> int:
        if self.nproc_per_node is not None:
            return self.nproc_per_node
        return self.resources.gpus or 1

    def requested_workers(self) -> int:
        """The worker count asked for now: `workers.replicas` (scale) or `initial`, clamped to [min, max]."""
        wanted = self.workers.replicas or self.initial_workers  # 0: not scaled yet
        return max(self.workers.min, min(self.workers.max, wanted))


# -------------------------------------------------------------------------- status

Phase = Literal["Queued", "Pending", "Running", "Rescaling", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = ("Queued", "Pending", "Running", "Rescaling", "Succeeded", "Failed", "Suspended")
FINISHED_PHASES = ("Succeeded", "Failed")


class StatusModel(ApiModel):
    """Base of status models: unknown fields are ignored, not rejected.

    A newer operator version (during a rollout or a rollback) may have written fields this
    one does not know; rejecting them would fail every pass on that job for good.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(StatusModel):
    """A condition in the standard Kubernetes shape (metav1.Condition)."""

    type: str = Field(description="Condition type, e.g. Ready, Rescaling, Failed.", max_length=316)
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason.", max_length=1024)
    message: str = Field("", description="Human-readable detail.", max_length=CONDITION_MESSAGE_MAX_LENGTH)
    last_transition_time: Timestamp = Field(description="When status last changed.")
    observed_generation: Optional[int] = Field(None, description="metadata.generation this was computed from.", ge=0)


class WorkersStatus(StatusModel):
    """Counts of the current generation's workers."""

    desired: int = Field(0, description="Workers the current generation should have.", ge=0)
    active: int = Field(0, description="Workers that exist and are not terminating.", ge=0)
    ready: int = Field(0, description="Workers running and ready.", ge=0)
    succeeded: int = Field(0, description="Workers that exited 0.", ge=0)
    failed: int = Field(0, description="Workers that failed.", ge=0)


class RescaleRecord(StatusModel):
    """One completed change of world size or restart."""

    from_: int = Field(alias="from", description="World size before.", ge=0)
    to: int = Field(description="World size after.", ge=0)
    reason: str = Field(description="Why (ManualScale, ScaleUpPaysOff, WorkerRestart, ...).", max_length=1024)
    message: str = Field("", description="Detail.", max_length=4096)
    time: Timestamp = Field(description="When the rescale started.")
    downtime_seconds: Optional[float] = Field(
        None, description="Seconds from stopping the old generation until all new workers were ready.", ge=0
    )


class RescaleInProgress(StatusModel):
    """A rescale that has started and not finished (kept in status so an operator restart resumes it)."""

    from_: int = Field(alias="from", description="World size before.", ge=0)
    to: int = Field(description="Target world size.", ge=0)
    reason: str = Field(description="Why.", max_length=1024)
    message: str = Field("", description="Detail.", max_length=4096)
    stage: Literal["ConfirmingCapacity", "Stopping", "Starting"] = Field(
        description="ConfirmingCapacity: added workers waiting to be scheduled; Stopping: old generation "
        "terminating; Starting: new generation created, not yet ready."
    )
    started_at: Timestamp = Field(description="When the rescale started.")
    stopped_at: Optional[Timestamp] = Field(None, description="When the old generation was asked to stop.")
    target_generation: int = Field(description="Generation being started.", ge=1)
    not_before: Optional[Timestamp] = Field(
        None, description="The new generation starts no earlier than this (waiting for capacity)."
    )


class HangReport(StatusModel):
    """The hang watchdog's finding: a generation made no progress for `hangSeconds`."""

    generation: int = Field(description="The generation that stopped making progress.", ge=1)
    detected_at: Timestamp = Field(description="When the watchdog found it.")
    message: str = Field("", description="What was measured.", max_length=4096)


class Observation(StatusModel):
    """Throughput measured at one world size."""

    world_size: int = Field(description="Workers.", ge=1)
    throughput: float = Field(description="Samples per second, whole job.", ge=0)
    measured_at: Timestamp = Field(description="When it was measured.")
    window_seconds: Optional[int] = Field(None, description="Seconds of training the rate covers.", ge=1)
    comm_fraction: Optional[float] = Field(
        None,
        description=(
            "Fraction of the step time spent waiting on communication over the same window "
            "(absent when the trainer exports no split)."
        ),
        ge=0,
        le=1,
    )


class AllocationStatus(StatusModel):
    """The cluster allocator's last decision for the job, with its numbers."""

    target: int = Field(description="Workers allocated (0 while queued).", ge=0)
    reason: str = Field(description="CamelCase reason.", max_length=128)
    message: str = Field(description="What was decided and why.", max_length=4096)
    predicted_throughput: Optional[float] = Field(None, description="Samples/s the model predicts at `target`.")
    marginal_gain: Optional[float] = Field(
        None, description="Samples/s the last step of workers adds at `target`, per the model."
    )
    # Optional, not "": the Kubernetes client sends an empty string as null.
    why_not_more: Optional[str] = Field(None, description="Why the job has no more workers.", max_length=1024)
    why_not_less: Optional[str] = Field(None, description="Why the job has no fewer workers.", max_length=1024)
    queue_position: Optional[int] = Field(
        None,
        description="Place in the admission queue while Queued, as of `time` (written again when the reason "
        "changes and every 5 minutes, not each time the jobs ahead move).",
        ge=1,
    )
    time: Timestamp = Field(description="When it was decided.")


class PlacementStatus(StatusModel):
    """The topology domains the current generation's workers occupy (spec.placement)."""

    topology_key: str = Field(description="The node label the domains are values of.", max_length=LABEL_KEY_MAX_LENGTH)
    domains: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list,
        description="Values of the topology label on the nodes of the current generation's Running workers, sorted.",
        max_length=MAX_WORKERS,
    )


class Decision(StatusModel):
    """An autoscaler decision."""

    target: int = Field(description="World size decided.", ge=0)
    reason: str = Field(description="Why.", max_length=4096)
    time: Timestamp = Field(description="When.")


# Recent measurements kept besides the latest per world size.
OBSERVATION_HISTORY = 32


class AutoscalingStatus(StatusModel):
    """What the autoscaler has seen and decided."""

    observations: list[Observation] = Field(
        default_factory=list,
        description=(
            "Throughput measurements, newest last: the latest per world size and the recent ones "
            "(the cluster allocator fits its model to all of them)."
        ),
        max_length=MAX_WORKERS + OBSERVATION_HISTORY,
    )
    last_decision: Optional[Decision] = Field(None, description="The latest decision.")
    backoff_until: Optional[Timestamp] = Field(
        None, description="No scale-up before this time (after a capacity failure)."
    )
    comm_fraction: Optional[float] = Field(
        None,
        description=(
            "Latest measured fraction of the step time the workers spend waiting on communication "
            "(gradient all-reduce not hidden behind backward, and the per-step stats all-reduce), "
            "from lepton_trainer_comm_seconds / lepton_trainer_step_seconds; absent when the "
            "trainer exports no split. The throughput model uses it to separate compute from communication."
        ),
        ge=0,
        le=1,
    )


class LeptonJobStatus(StatusModel):
    """Observed state of a LeptonJob, written by the operator."""

    observed_generation: Optional[int] = Field(None, description="metadata.generation last reconciled.", ge=0)
    phase: Optional[Phase] = Field(
        None, description="Queued, Pending, Running, Rescaling, Succeeded, Failed or Suspended."
    )
    message: Optional[str] = Field(
        None, description="Short summary of the latest state change.", max_length=STATUS_MESSAGE_MAX_LENGTH
    )
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.", max_length=32)
    replicas: int = Field(0, description="Current world size (scale subresource).", ge=0)
    selector: Optional[str] = Field(None, description="Label selector of the workers (scale subresource).")
    workers: WorkersStatus = Field(default_factory=WorkersStatus, description="Workers of the current generation.")
    worker_generation: int = Field(0, description="Generation of the worker set (0: none started yet).", ge=0)
    world_size: int = Field(0, description="Workers in the current generation.", ge=0)
    generation_start_time: Optional[Timestamp] = Field(None, description="When the current generation started.")
    template_hash: Optional[str] = Field(None, description="Digest of the immutable spec fields in use.")
    restarts: int = Field(0, description="Generations started because workers failed (spends maxRestarts).", ge=0)
    disruptions: int = Field(
        0, description="Generations started because the cluster took workers away (eviction, node loss, drain).", ge=0
    )
    latest_generation: int = Field(
        0, description="Highest generation number assigned so far (abandoned attempts included).", ge=0
    )
    hang: Optional[HangReport] = Field(None, description="Set by the hang watchdog; the core restarts that generation.")
    start_time: Optional[Timestamp] = Field(None, description="When the first workers were created.")
    completion_time: Optional[Timestamp] = Field(None, description="When the job Succeeded or Failed.")
    suspended_at: Optional[Timestamp] = Field(None, description="When the current suspension began.")
    suspended_seconds: float = Field(0, description="Total time spent suspended (pauses the deadline).", ge=0)
    rescale: Optional[RescaleInProgress] = Field(None, description="The rescale under way, if any.")
    last_rescale: Optional[RescaleRecord] = Field(None, description="The latest completed rescale or restart.")
    rescale_history: list[RescaleRecord] = Field(
        default_factory=list, description="Recent rescales, newest last (bounded).", max_length=50
    )
    throughput: Optional[float] = Field(None, description="Latest measured throughput, samples/s.", ge=0)
    progress: Optional[float] = Field(
        None, description="Fraction of the run's samples trained (from the trainer's metrics).", ge=0, le=1
    )
    remaining_samples: Optional[float] = Field(None, description="Samples left to train.", ge=0)
    estimated_completion_time: Optional[Timestamp] = Field(
        None, description="When the job will have trained its samples at the current throughput."
    )
    allocation: Optional[AllocationStatus] = Field(None, description="The cluster allocator's last decision.")
    placement: Optional[PlacementStatus] = Field(
        None, description="Topology domains of the current generation (set when spec.placement names a topologyKey)."
    )
    autoscaling: AutoscalingStatus = Field(default_factory=AutoscalingStatus, description="Autoscaler state.")


RESCALE_HISTORY_LIMIT = 50


# --------------------------------------------------------------------- validation


def validate_job_name(name: str) -> list[str]:
    """Errors for a job name that would make invalid child names."""
    errors = []
    if len(name) > MAX_JOB_NAME_LENGTH:
        errors.append(
            f"metadata.name is {len(name)} characters; at most {MAX_JOB_NAME_LENGTH} so that "
            f"'<name>-worker-{MAX_WORKERS - 1}' stays a 63-character DNS label"
        )
    # fullmatch: re.match's `$` also matches before a trailing newline ("job\n").
    if not re.fullmatch(JOB_NAME_PATTERN, name):
        errors.append(
            f"metadata.name {name!r} must be a DNS-1035 label (lowercase letters, digits, '-'; "
            "starting with a letter) so that the Service '<name>-workers' is valid"
        )
    return errors


def _nested_or_equal(a: str, b: str) -> bool:
    """Whether two normalised absolute paths are the same or one lies inside the other."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _mount_path_errors(spec: LeptonJobSpec) -> list[str]:
    """Mount paths that clash with /dev/shm or with each other.

    The same path twice makes every pod create fail with 422 ("must be unique"). A mount
    inside another one needs its mount point created in that volume, which fails at
    container start when it is read-only, and hides part of it; so nesting is refused too.
    The paths are normalised by MOUNT_PATH_PATTERN, so comparing strings compares paths.
    """
    mounts = [(f"spec.dataVolumes[{i}].mountPath", v.mount_path) for i, v in enumerate(spec.data_volumes)]
    if spec.checkpoint is not None:
        mounts.append(("spec.checkpoint.mountPath", spec.checkpoint.mount_path))
    errors = []
    for i, (where, path) in enumerate(mounts):
        if _nested_or_equal(path, SHM_MOUNT_PATH):
            errors.append(
                f"{where} ({path}) must be neither {SHM_MOUNT_PATH} nor inside or above it: "
                "every worker mounts its memory-backed shared memory there"
            )
        for other_where, other in mounts[:i]:
            if path == other:
                errors.append(f"{where} ({path}) is also {other_where}: mount paths must differ")
            elif _nested_or_equal(path, other):
                errors.append(
                    f"{where} ({path}) and {other_where} ({other}) are nested: a mount may not lie inside another"
                )
    return errors


def _placement_errors(spec: LeptonJobSpec) -> list[str]:
    """A placement that needs topology domains must say which node label defines them."""
    placement = spec.placement
    if placement is None or placement.topology_key is not None:
        return []
    if placement.mode != "None" or placement.exclusive:
        wants = f"mode {placement.mode}" if placement.mode != "None" else "exclusive: true"
        return [
            f"spec.placement.topologyKey is required with {wants}: name the node label whose values are "
            "the domains (e.g. topology.kubernetes.io/zone)"
        ]
    return []


def validate_spec_rules(spec: LeptonJobSpec) -> list[str]:
    """Cross-field rules the OpenAPI schema cannot state (also CEL rules in the CRD)."""
    errors = []
    w = spec.workers
    if w.min > w.max:
        errors.append(f"spec.workers.min ({w.min}) must be <= spec.workers.max ({w.max})")
    if w.initial is not None and not (w.min <= w.initial <= w.max):
        errors.append(f"spec.workers.initial ({w.initial}) must be within [min, max] = [{w.min}, {w.max}]")
    if spec.checkpoint is not None and (spec.checkpoint.claim_name is None) == (spec.checkpoint.size is None):
        errors.append("spec.checkpoint needs exactly one of claimName (existing claim) or size (created claim)")
    for var in spec.env:
        if var.name in RESERVED_ENV_NAMES or var.name.startswith(RESERVED_ENV_PREFIXES):
            errors.append(f"spec.env[{var.name}]: the name is reserved, the operator sets it")
        if (var.value is not None) and (var.value_from is not None):
            errors.append(f"spec.env[{var.name}] sets both value and valueFrom")
        if var.value_from is not None:
            sources = [
                s
                for s in (var.value_from.config_map_key_ref, var.value_from.secret_key_ref, var.value_from.field_ref)
                if s
            ]
            if len(sources) != 1:
                errors.append(f"spec.env[{var.name}].valueFrom needs exactly one source")
    errors.extend(_mount_path_errors(spec))
    errors.extend(_placement_errors(spec))
    size = spec.checkpoint.size if spec.checkpoint is not None else None
    if size is not None and not re.match(POSITIVE_QUANTITY_PREFIX, size):
        errors.append(f"spec.checkpoint.size ({size}) must be greater than zero: the server refuses an empty claim")
    if spec.metrics_port in (spec.rendezvous_port, spec.rendezvous_port + 1):
        errors.append(
            f"spec.metricsPort ({spec.metrics_port}) must differ from spec.rendezvousPort and the port after it "
            f"({spec.rendezvous_port}, {spec.rendezvous_port + 1}): generations alternate between those two"
        )
    if 0 < spec.restart.hang_seconds < 10:
        errors.append(f"spec.restart.hangSeconds ({spec.restart.hang_seconds}) must be 0 (off) or at least 10")
    return errors


class InvalidJob(ValueError):
    """A LeptonJob that the operator refuses to run; `errors` lists every problem."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


def parse_job(name: str, spec: dict) -> LeptonJobSpec:
    """Parse and check a job's spec; raise InvalidJob with every problem found."""
    errors = validate_job_name(name)
    try:
        parsed = LeptonJobSpec.model_validate(spec or {})
    except ValidationError as exc:  # flatten into readable lines
        for err in exc.errors():
            location = "spec." + ".".join(str(p) for p in err["loc"]) if err["loc"] else "spec"
            errors.append(f"{location}: {err['msg']}")
        raise InvalidJob(errors) from None
    errors.extend(validate_spec_rules(parsed))
    if errors:
        raise InvalidJob(errors)
    return parsed


def parse_status(status: Optional[dict]) -> LeptonJobStatus:
    """Parse the stored status; fields this version does not know are ignored (at any depth)."""
    return LeptonJobStatus.model_validate(status or {})
