"""The operator core on the real local control plane (RELIABILITY rows 1-10, 13, 15).

Each test starts `lepton-operator run` as a subprocess (the `run_operator` fixture) against
the session's cluster in default kubelet mode (pods are marked Running, nothing runs;
`inject_exit` / `evict` play the workers' fate). Specs use 1-second grace periods so
deletions finish fast (the kubelet also caps them at 2 s).
"""

from __future__ import annotations

import copy
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from lepton_operator.api.crd import crd_for_server
from lepton_operator.api.models import API_VERSION, GROUP, KIND, PLURAL, VERSION
from lepton_operator.build import LABEL_GENERATION, LABEL_JOB_NAME, LABEL_MANAGED_BY, LABEL_WORKER_INDEX, MANAGED_BY
from lepton_operator.localcluster.procs import free_port
from lepton_operator.reconcile.kube import Kube

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAST = ("--standalone", "--liveness-port", "0", "--metrics-port", "0", "--resync-seconds", "5")


# ------------------------------------------------------------------ fixtures, helpers


def _install(api_client, crd: dict) -> None:
    ext = client.ApiextensionsV1Api(api_client)
    try:
        ext.create_custom_resource_definition(crd)
    except ApiException as e:
        if e.status != 409:
            raise
    group, version, plural = crd["spec"]["group"], crd["spec"]["versions"][0]["name"], crd["spec"]["names"]["plural"]
    custom = client.CustomObjectsApi(api_client)
    deadline = time.monotonic() + 30
    while True:  # served once Established and in discovery
        try:
            custom.list_cluster_custom_object(group, version, plural)
            return
        except ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def crds(local_cluster):
    """The LeptonJob CRD (as for this server's version) and kopf's peering CRDs."""
    api = local_cluster.api_client()
    version = client.VersionApi(api).get_code().git_version
    _install(api, crd_for_server(version))
    for crd in yaml.safe_load_all((ROOT / "crds" / "kopf-peering.yaml").read_text()):
        _install(api, crd)
    return api


@pytest.fixture
def kube(crds, local_cluster) -> Kube:
    return Kube(local_cluster.api_client())


def job_body(name: str, **spec) -> dict:
    base = {
        "image": "lepton-ai/lepton-trainer:0.1.0",
        "workers": {"min": 1, "max": 4, "initial": 2},
        "resources": {"gpus": 1},
        "terminationGracePeriodSeconds": 1,
        "restart": {"maxRestarts": 3},
    }
    base.update(spec)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": base}


def create_job(kube: Kube, namespace: str, body: dict) -> dict:
    return kube.request("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", body=body)


def get_job(kube: Kube, namespace: str, name: str) -> dict:
    return kube.get_job(namespace, name) or {}


def patch_spec(kube: Kube, namespace: str, name: str, spec_patch: dict) -> dict:
    return kube.request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
                        body={"spec": spec_patch}, content_type="application/merge-patch+json")


def status(kube, namespace, name) -> dict:
    return get_job(kube, namespace, name).get("status") or {}


def condition(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == type_), {})


def pods(kube: Kube, namespace: str, job: str, include_terminating: bool = True) -> dict[str, dict]:
    items = kube.request("GET", f"/api/v1/namespaces/{namespace}/pods",
                         query={"labelSelector": f"{LABEL_JOB_NAME}={job}"})["items"]
    return {p["metadata"]["name"]: p for p in items
            if include_terminating or not p["metadata"].get("deletionTimestamp")}


def generations(kube, namespace, job) -> dict[str, int]:
    return {n: int(p["metadata"]["labels"][LABEL_GENERATION]) for n, p in pods(kube, namespace, job).items()}


def env_of(pod: dict) -> dict:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", [])}


def events(kube, namespace, name, reason=None) -> list[dict]:
    items = kube.request("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
    return [e for e in items if e["involvedObject"]["name"] == name and (reason is None or e["reason"] == reason)]


def wait(k8s, predicate, timeout=30, message="condition", operator=None):
    try:
        return k8s.wait_for(predicate, timeout=timeout, interval=0.25, message=message)
    except BaseException:
        if operator is not None:
            print(operator.log_text()[-4000:])
        raise


def running(kube, namespace, name, size=None, generation=None):
    def check():
        st = status(kube, namespace, name)
        ok = st.get("phase") == "Running" and (size is None or st.get("worldSize") == size)
        ok = ok and (generation is None or st.get("workerGeneration") == generation)
        return ok and st.get("workers", {}).get("ready") == st.get("worldSize") and st
    return check


# ------------------------------------------------------------------ row 1 and 15


def test_job_creates_gpu_workers_service_and_status(kube, k8s, namespace, run_operator):
    op = run_operator(*FAST)
    job = create_job(kube, namespace, job_body("train"))
    uid = job["metadata"]["uid"]
    st = wait(k8s, running(kube, namespace, "train", 2), 40, "job Running with 2 workers", op)
    assert st["workerGeneration"] == 1 and st["replicas"] == 2 and st["restarts"] == 0
    assert st["selector"] == f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_JOB_NAME}=train"
    assert condition(st, "Ready")["status"] == "True"
    assert st["templateHash"] and st["startTime"]

    found = pods(kube, namespace, "train")
    assert sorted(found) == ["train-worker-0", "train-worker-1"]
    for name, pod in found.items():
        index = int(pod["metadata"]["labels"][LABEL_WORKER_INDEX])
        owner = pod["metadata"]["ownerReferences"][0]
        assert (owner["uid"], owner["controller"], owner["blockOwnerDeletion"]) == (uid, True, True)
        c = pod["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" == c["resources"]["requests"]["nvidia.com/gpu"]
        env = env_of(pod)
        assert env["PET_NNODES"] == "2" and env["PET_RDZV_ID"] == f"{uid}-g1"
        assert env["PET_RDZV_ENDPOINT"] == f"train-worker-0.train-workers.{namespace}.svc:29400"
        assert env["PET_RDZV_CONF"] == ("is_host=1" if index == 0 else "is_host=0")
        assert pod["spec"]["hostname"] == name and pod["spec"]["subdomain"] == "train-workers"
        assert pod["spec"]["restartPolicy"] == "Never"
        # Row 15: Pod Security "restricted".
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert not sc.get("privileged")
        assert pod["spec"].get("nodeName")

    svc = kube.request("GET", f"/api/v1/namespaces/{namespace}/services/train-workers")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["metadata"]["ownerReferences"][0]["uid"] == uid
    assert events(kube, namespace, "train", "WorkersReady")
    # kopf's bookkeeping stays out of status.
    assert "kopf" not in get_job(kube, namespace, "train").get("status", {})
