"""Helpers of the integration tests that drive LeptonJobs on the local control plane."""

from __future__ import annotations

from lepton_operator.api.models import API_VERSION, GROUP, KIND, PLURAL, VERSION
from lepton_operator.desired import LABEL_GENERATION, LABEL_JOB_NAME
from lepton_operator.reconcile.kube import Kube

# Operator flags for tests: one replica, no endpoints, a short resync.
FAST = ("--standalone", "--liveness-port", "0", "--metrics-port", "0", "--resync-seconds", "5")


def job_body(name: str, **spec) -> dict:
    base = {
        "image": "lepton-ai/lepton-trainer:0.1.0",
        "workers": {"min": 1, "max": 4, "initial": 2},
        "resources": {"gpus": 1},
        "terminationGracePeriodSeconds": 1,
        "restart": {"maxRestarts": 3, "backoffSeconds": 1},  # 1, 2, 4 s: exercised, yet fast
    }
    base.update(spec)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": base}


def create_job(kube: Kube, namespace: str, body: dict) -> dict:
    return kube.request("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", body=body)


def get_job(kube: Kube, namespace: str, name: str) -> dict:
    return kube.get_job(namespace, name) or {}


def patch_spec(kube: Kube, namespace: str, name: str, spec_patch: dict) -> dict:
    return kube.request(
        "PATCH",
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
        body={"spec": spec_patch},
        content_type="application/merge-patch+json",
    )


def status(kube, namespace, name) -> dict:
    return get_job(kube, namespace, name).get("status") or {}


def condition(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == type_), {})


def pods(kube: Kube, namespace: str, job: str, include_terminating: bool = True) -> dict[str, dict]:
    items = kube.request(
        "GET", f"/api/v1/namespaces/{namespace}/pods", query={"labelSelector": f"{LABEL_JOB_NAME}={job}"}
    )["items"]
    return {
        p["metadata"]["name"]: p for p in items if include_terminating or not p["metadata"].get("deletionTimestamp")
    }


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
