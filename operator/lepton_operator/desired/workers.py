"""Pure builders: a LeptonJob becomes worker pods, a headless Service and a checkpoint PVC.

Each function returns a plain dict in the Kubernetes wire form (camelCase keys, resource
quantities as strings), ready for `kopf.adopt()`-free creation: ownerReferences are set
here. Nothing in a LeptonJob's spec is copied into a pod field that could make it
privileged: the spec is an allowlist (image, command, args, env, resources, node
selector, tolerations, priority class, claims), and the security context is fixed. The
only additions are the cluster admin's: a fabric profile (`apply_fabric_profile`), which a
job names but cannot change.
"""

from __future__ import annotations

from typing import Optional

from ..api.models import API_VERSION, KIND, LeptonJobSpec
from ..api.policy import LABEL_FABRIC_PROFILE, FabricProfile
from .names import (
    ANNOTATION_TEMPLATE_HASH,
    JobRef,
    checkpoint_pvc_name,
    disruption_budget_name,
    service_name,
    worker_host,
    worker_labels,
    worker_pod_name,
    worker_prefix,
    worker_selector,
)
from .placement import apply_placement, placement_scheduling

CONTAINER_NAME = "trainer"
GPU_RESOURCE = "nvidia.com/gpu"
METRICS_PATH = "/metrics"
PORT_NAME_METRICS = "metrics"
PORT_NAME_RENDEZVOUS = "rendezvous"
PORT_NAME_RENDEZVOUS_ALT = "rendezvous-alt"  # odd generations' store

VOLUME_SHM = "dshm"
VOLUME_CHECKPOINTS = "checkpoints"
SHM_MOUNT_PATH = "/dev/shm"

# Workers run as this non-root user and group; fsGroup makes claims writable by it.
WORKER_UID = 1000
WORKER_GID = 1000


def owner_reference(job: JobRef) -> dict:
    """The job as controlling owner: garbage collection deletes children with the job."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: JobRef, name: str, labels: dict, annotations: Optional[dict] = None) -> dict:
    meta = {"name": name, "namespace": job.namespace, "labels": labels}
    if annotations:
        meta["annotations"] = annotations
    meta["ownerReferences"] = [owner_reference(job)]
    return meta


# ------------------------------------------------------------------------- env


def _env(name: str, value) -> dict:
    return {"name": name, "value": str(value)}


def _field_env(name: str, field_path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}}}


def rendezvous_port(spec: LeptonJobSpec, generation: int) -> int:
    """The c10d store's port for a generation: `rendezvousPort` or the next port, by parity.

    Consecutive generations use different ports (the operator never gives the next
    generation the running one's parity). Workers of generation g+1 created before g has
    stopped (capacity confirmation) resolve worker 0's name to g's worker 0, but nothing
    listens there on their port: they keep retrying until g+1's worker 0 hosts it, and
    never join g's rendezvous (which cost a restart whenever g then stopped).
    """
    return spec.rendezvous_port + (generation - 1) % 2  # generation 1 uses rendezvousPort itself


def rendezvous_wait_seconds(spec: LeptonJobSpec) -> int:
    """How long a worker may wait for the store: through capacity confirmation, the old
    generation's graceful stop and worker 0's start (5 minutes for pulling and starting)."""
    return spec.autoscaling.capacity_timeout_seconds + spec.termination_grace_period_seconds + 300


def checkpoint_dir(job: JobRef, spec: LeptonJobSpec) -> str:
    """The job's own directory on the checkpoint volume: a reused claim never resumes
    another job's checkpoints."""
    return f"{spec.checkpoint.mount_path.rstrip('/')}/{job.uid}"


def worker_env(job: JobRef, spec: LeptonJobSpec, index: int, generation: int, world_size: int) -> list[dict]:
    """The environment of worker `index` (operator variables first, then the user's).

    torchrun reads PET_*: a fixed `--nnodes` per generation and a rendezvous id unique to
    the generation (pytorch#82160), hosted by worker 0 (`is_host` says so explicitly:
    guessing from host names fails behind /etc/hosts, kubeflow/trainer#2041) on a port
    that alternates between generations (`rendezvous_port`); `read_timeout` lets a worker
    wait that long for the store (torch retries the connection until then). The
    operator owns restarts, so torchrun's own are off. Lepton's names are set too so that
    scripts written for Lepton (`${LEPTON_JOB_WORKER_PREFIX}-0.${LEPTON_SUBDOMAIN}`) run
    unchanged. User variables come last: they may refer to ours as `$(POD_IP)`.
    """
    wait = rendezvous_wait_seconds(spec)
    env = [
        _env("PET_NNODES", world_size),
        _env("PET_NPROC_PER_NODE", spec.processes_per_worker),
        _env("PET_RDZV_BACKEND", "c10d"),
        _env("PET_RDZV_ENDPOINT", f"{worker_host(job, 0)}:{rendezvous_port(spec, generation)}"),
        _env("PET_RDZV_ID", f"{job.uid}-g{generation}"),
        _env("PET_RDZV_CONF", f"is_host={int(index == 0)},read_timeout={wait},join_timeout={max(600, wait + 60)}"),
        _env("PET_MAX_RESTARTS", 0),
        _env("LEPTON_JOB_NAME", job.name),
        _env("LEPTON_GENERATION", generation),
        _env("LEPTON_WORLD_SIZE", world_size),
        _env("LEPTON_WORKER_INDEX", index),
        _env("LEPTON_METRICS_PORT", spec.metrics_port),
        _env("LEPTON_JOB_TOTAL_WORKERS", world_size),
        _env("LEPTON_JOB_WORKER_INDEX", index),
        _env("LEPTON_JOB_WORKER_PREFIX", worker_prefix(job.name)),
        _env("LEPTON_SUBDOMAIN", service_name(job.name)),
    ]
    if spec.checkpoint is not None:
        # Unset without a checkpoint volume: the trainer then keeps no checkpoints
        # (a directory in the container would vanish with the pod anyway).
        env.append(_env("LEPTON_CHECKPOINT_DIR", checkpoint_dir(job, spec)))
    env += [
        _field_env("POD_IP", "status.podIP"),
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
    ]
    env += [var.to_k8s() for var in spec.env]
    return env


# -------------------------------------------------------------------- resources


def worker_resources(spec: LeptonJobSpec) -> dict:
    """Requests equal limits: GPUs cannot be overcommitted, and equal CPU/memory gives the
    workers the Guaranteed QoS class (last to be evicted under node pressure)."""
    amounts: dict[str, str] = {}
    if spec.resources.cpu is not None:
        amounts["cpu"] = spec.resources.cpu
    if spec.resources.memory is not None:
        amounts["memory"] = spec.resources.memory
    if spec.resources.gpus:
        amounts[GPU_RESOURCE] = str(spec.resources.gpus)
    if not amounts:
        return {}
    return {"requests": dict(amounts), "limits": dict(amounts)}


# --------------------------------------------------------------------- security


def pod_security_context() -> dict:
    """Pod Security "restricted": non-root, RuntimeDefault seccomp; fsGroup for the claims."""
    return {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_GID,
        "fsGroup": WORKER_GID,
        # Large checkpoint volumes: chown only when the root's group is wrong.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict:
    """Pod Security "restricted" for the container: no escalation, no capabilities."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "runAsNonRoot": True,
    }


# ------------------------------------------------------------------------- pods


def _volumes(job: JobRef, spec: LeptonJobSpec) -> tuple[list[dict], list[dict]]:
    """(pod volumes, container mounts): /dev/shm, the checkpoint claim, the data claims."""
    # NCCL and DataLoader workers need far more shared memory than the 64Mi default.
    shm: dict = {"medium": "Memory"}
    if spec.resources.shared_memory is not None:
        shm["sizeLimit"] = spec.resources.shared_memory
    volumes = [{"name": VOLUME_SHM, "emptyDir": shm}]
    mounts = [{"name": VOLUME_SHM, "mountPath": SHM_MOUNT_PATH}]
    if spec.checkpoint is not None:
        claim = spec.checkpoint.claim_name or checkpoint_pvc_name(job.name)
        volumes.append({"name": VOLUME_CHECKPOINTS, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": VOLUME_CHECKPOINTS, "mountPath": spec.checkpoint.mount_path})
    for i, data in enumerate(spec.data_volumes):
        name = f"data-{i}"
        volumes.append(
            {"name": name, "persistentVolumeClaim": {"claimName": data.claim_name, "readOnly": data.read_only}}
        )
        mounts.append({"name": name, "mountPath": data.mount_path, "readOnly": data.read_only})
    return volumes, mounts


def build_worker_pod(
    job: JobRef,
    spec: LeptonJobSpec,
    index: int,
    generation: int,
    world_size: int,
    profile: Optional[FabricProfile] = None,
) -> dict:
    """Worker `index` of generation `generation`, which has `world_size` workers.

    The pod never restarts in place (restartPolicy Never): a failed worker ends its
    generation and the operator starts the next one. Worker 0 also serves the c10d
    rendezvous store, so only it exposes the rendezvous port. `profile`: the admin's
    fabric profile that `spec.profile` names (`apply_fabric_profile`).
    """
    job.check()
    if generation < 1:
        raise ValueError(f"generation must be >= 1, not {generation}")
    if not 0 <= index < world_size:
        raise ValueError(f"worker index {index} is outside the world size {world_size}")
    name = worker_pod_name(job.name, index)
    ports = [{"name": PORT_NAME_METRICS, "containerPort": spec.metrics_port, "protocol": "TCP"}]
    if index == 0:
        port = rendezvous_port(spec, generation)
        ports.append({"name": PORT_NAME_RENDEZVOUS, "containerPort": port, "protocol": "TCP"})
    volumes, mounts = _volumes(job, spec)

    container: dict = {"name": CONTAINER_NAME, "image": spec.image}
    if spec.image_pull_policy is not None:
        container["imagePullPolicy"] = spec.image_pull_policy
    if spec.command:
        container["command"] = list(spec.command)
    if spec.args:
        container["args"] = list(spec.args)
    container.update(
        {
            "env": worker_env(job, spec, index, generation, world_size),
            "ports": ports,
            "resources": worker_resources(spec),
            "securityContext": container_security_context(),
            "volumeMounts": mounts,
            # Only what the program writes to /dev/termination-log reaches the pod status:
            # FallbackToLogsOnError would copy log tails (which may hold secrets) there,
            # where `get pods` shows them to those not allowed `pods/log`.
            "terminationMessagePolicy": "File",
        }
    )

    pod_spec: dict = {
        "restartPolicy": "Never",
        "hostname": name,
        "subdomain": service_name(job.name),
        "automountServiceAccountToken": False,
        # Service env vars are noise to training code, and thousands of them slow pod start.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.to_k8s() for t in spec.tolerations]
    if spec.priority_class_name is not None:
        pod_spec["priorityClassName"] = spec.priority_class_name

    annotations = {
        ANNOTATION_TEMPLATE_HASH: spec.template_hash(),
        # A standard `kubernetes-pods` scrape job finds the workers by these.
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(spec.metrics_port),
        "prometheus.io/path": METRICS_PATH,
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(job, name, worker_labels(job.name, index, generation, world_size), annotations),
        "spec": pod_spec,
    }
    if spec.profile is not None:
        if profile is None:
            raise ValueError(f"spec.profile {spec.profile} needs the admin's profile to build a worker")
        apply_fabric_profile(pod, spec, profile)
    apply_placement(pod_spec, placement_scheduling(job.name, spec, generation))
    return pod


def apply_fabric_profile(pod: dict, spec: LeptonJobSpec, profile: FabricProfile) -> None:
    """Add exactly the admin's profile to a built worker pod (in place).

    Its extended resources join requests and limits; its annotations and the label
    `lepton.ai/fabric-profile: <name>` join the pod's; its capabilities (IPC_LOCK at most,
    api.policy.PROFILE_CAPABILITIES) are the only ones added to the otherwise restricted
    container (everything else stays dropped, no escalation, non-root); its environment
    comes before the user's, so a job's own `env` entry of the same name wins; its /dev/shm
    size applies unless the job sets `resources.sharedMemory`.
    """
    meta, pod_spec = pod["metadata"], pod["spec"]
    (container,) = pod_spec["containers"]
    meta["labels"][LABEL_FABRIC_PROFILE] = spec.profile
    if profile.annotations:
        meta.setdefault("annotations", {}).update(profile.annotations)
    if profile.resources:
        amounts = {key: str(value) for key, value in sorted(profile.resources.items())}
        resources = container["resources"]
        resources["requests"] = {**resources.get("requests", {}), **amounts}
        resources["limits"] = {**resources.get("limits", {}), **amounts}
    if profile.capabilities:
        container["securityContext"]["capabilities"]["add"] = sorted(profile.capabilities)
    own = {var.name for var in spec.env}
    defaults = [_env(name, value) for name, value in sorted(profile.env.items()) if name not in own]
    if defaults:
        env = container["env"]
        user_start = len(env) - len(spec.env)
        container["env"] = env[:user_start] + defaults + env[user_start:]
    if profile.shm_size is not None and spec.resources.shared_memory is None:
        shm = next(v for v in pod_spec["volumes"] if v["name"] == VOLUME_SHM)
        shm["emptyDir"]["sizeLimit"] = profile.shm_size


# ---------------------------------------------------------------------- service


def build_service(job: JobRef, spec: LeptonJobSpec) -> dict:
    """The headless Service that gives every worker the DNS name `<pod>.<service>.<ns>.svc`.

    publishNotReadyAddresses: workers must resolve each other while they wait in the
    rendezvous, before any of them is ready.
    """
    job.check()
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job.name), worker_selector(job.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": worker_selector(job.name),
            "ports": [
                {
                    "name": PORT_NAME_RENDEZVOUS,
                    "port": spec.rendezvous_port,
                    "targetPort": spec.rendezvous_port,
                    "protocol": "TCP",
                },
                {
                    "name": PORT_NAME_RENDEZVOUS_ALT,
                    "port": spec.rendezvous_port + 1,
                    "targetPort": spec.rendezvous_port + 1,
                    "protocol": "TCP",
                },
                {
                    "name": PORT_NAME_METRICS,
                    "port": spec.metrics_port,
                    "targetPort": spec.metrics_port,
                    "protocol": "TCP",
                },
            ],
        },
    }


# --------------------------------------------------------------------------- pvc


def checkpoint_access_modes(spec: LeptonJobSpec) -> list[str]:
    """ReadWriteMany when workers may sit on several nodes (max > 1), else ReadWriteOnce.

    Access modes cannot change after creation, so they follow `workers.max`, not the
    current world size. For a multi-worker job on storage without RWX, create an RWO claim
    yourself, pin the workers to one node, and pass it as `checkpoint.claimName`.
    """
    return ["ReadWriteMany"] if spec.workers.max > 1 else ["ReadWriteOnce"]


def build_checkpoint_pvc(job: JobRef, spec: LeptonJobSpec) -> Optional[dict]:
    """The checkpoint claim to create, or None when the job uses an existing claim or none.

    Owned by the job: it lives exactly as long as the job (rescales and restarts keep it;
    deleting the job deletes the checkpoints).
    """
    job.check()
    if spec.checkpoint is None or spec.checkpoint.size is None:
        return None
    pvc_spec: dict = {
        "accessModes": checkpoint_access_modes(spec),
        "resources": {"requests": {"storage": spec.checkpoint.size}},
    }
    if spec.checkpoint.storage_class_name is not None:
        pvc_spec["storageClassName"] = spec.checkpoint.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(job, checkpoint_pvc_name(job.name), worker_selector(job.name)),
        "spec": pvc_spec,
    }


# --------------------------------------------------------------------------- pdb


def build_disruption_budget(job: JobRef, min_available: int) -> dict:
    """A PodDisruptionBudget over all the job's workers: `minAvailable` = the running world
    size, so a voluntary eviction (kubectl drain) waits until the operator has moved the
    job with a checkpoint-aware stop (a cordoned node starts a new generation elsewhere).

    `policy/v1`; `kube.py` sends it as `policy/v1beta1` to servers older than 1.21.
    """
    job.check()
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(job, disruption_budget_name(job.name), worker_selector(job.name)),
        "spec": {"minAvailable": int(min_available), "selector": {"matchLabels": worker_selector(job.name)}},
    }
