"""A CPU LeptonJob through its whole life on a kind cluster, installed with the Helm chart.

The steps run in order and share one job (module scope): each needs the previous one's
state, and a cluster round trip per step would cost minutes. What each proves:

1. the operator creates the worker pods and the headless Service;
2. the workers find each other through the Service's DNS names (c10d on worker 0) and
   train: worker 0 logs progress lines `step=`;
3. Prometheus (kubernetes pod discovery) scrapes the trainers with the labels the
   autoscaler queries (`namespace`, `job_name`);
4. `kubectl scale lj/e2e --replicas=3` stops generation 1 and starts generation 2 with
   three workers, which resumes from the checkpoint (`event=resumed step=N`, N > 0);
5. deleting the job removes its pods and Service.
"""

from __future__ import annotations

import re

import pytest
import yaml
from kindlib import TRAINER_IMAGE, wait_until

pytestmark = pytest.mark.kind

JOB = "e2e"
CLAIM = "e2e-checkpoints-rwo"
SELECTOR = f"lepton.ai/job-name={JOB}"
SERVICE = f"{JOB}-workers"


def job_manifest(namespace: str) -> dict:
    """A small CPU job: real DDP on the tiny model, checkpoints every 20 steps."""
    return {
        "apiVersion": "lepton.ai/v1alpha1",
        "kind": "LeptonJob",
        "metadata": {"name": JOB, "namespace": namespace},
        "spec": {
            "image": TRAINER_IMAGE,
            "imagePullPolicy": "IfNotPresent",  # loaded into kind, never pulled
            # --max-steps: the suite deletes the job; it must not finish first.
            "args": ["--max-steps", "100000", "--checkpoint-every-steps", "20", "--log-every-seconds", "2"],
            "workers": {"min": 1, "max": 3, "initial": 2},
            "resources": {"gpus": 0, "cpu": "500m", "memory": "1Gi"},
            # One kind worker node: an RWO claim from kind's local-path provisioner is
            # shared by every generation (a created PVC would ask for RWX, which it lacks).
            "checkpoint": {"claimName": CLAIM},
            "terminationGracePeriodSeconds": 60,
        },
    }


def claim_manifest(namespace: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": CLAIM, "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }


@pytest.fixture(scope="module")
def job(kind_cluster, e2e_namespace):
    manifests = yaml.safe_dump_all([claim_manifest(e2e_namespace), job_manifest(e2e_namespace)])
    kind_cluster.kubectl("apply", "-f", "-", input=manifests)
    try:
        yield JOB
    finally:
        kind_cluster.kubectl(
            "-n", e2e_namespace, "delete", "leptonjob", JOB, "--ignore-not-found", "--wait=false", check=False
        )
        kind_cluster.kubectl(
            "-n", e2e_namespace, "delete", "pvc", CLAIM, "--ignore-not-found", "--wait=false", check=False
        )


def _pods(cluster, namespace: str) -> list[dict]:
    return cluster.kubectl_json("-n", namespace, "get", "pods", "-l", SELECTOR)["items"]


def _running(pods: list[dict], generation: str, count: int) -> bool:
    current = [
        p
        for p in pods
        if p["metadata"]["labels"].get("lepton.ai/generation") == generation
        and not p["metadata"].get("deletionTimestamp")
    ]
    return len(current) == count and all(p["status"].get("phase") == "Running" for p in current)


def test_job_creates_worker_pods_and_headless_service(kind_cluster, e2e_namespace, job):
    pods = wait_until(
        lambda: (lambda p: p if _running(p, "1", 2) else None)(_pods(kind_cluster, e2e_namespace)),
        timeout=300,
        what="2 running generation-1 workers",
    )
    assert sorted(p["metadata"]["name"] for p in pods) == [f"{JOB}-worker-0", f"{JOB}-worker-1"]
    for pod in pods:
        spec = pod["spec"]
        assert spec["hostname"] == pod["metadata"]["name"] and spec["subdomain"] == SERVICE
        assert spec.get("automountServiceAccountToken") is False
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "LeptonJob"

    service = kind_cluster.kubectl_json("-n", e2e_namespace, "get", "service", SERVICE)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"].get("publishNotReadyAddresses") is True


def test_workers_rendezvous_over_dns_and_train(kind_cluster, e2e_namespace, job):
    def progress():
        log = kind_cluster.kubectl("-n", e2e_namespace, "logs", f"{JOB}-worker-0", "--tail=400")
        return log if re.search(r"^step=\d+/", log, re.MULTILINE) else None

    log = wait_until(progress, timeout=600, interval=5, what="progress lines `step=` from worker 0")
    # Worker 1 reached worker 0's store through <job>-worker-0.<job>-workers.<ns>.svc.
    env = {
        e["name"]: e.get("value")
        for e in kind_cluster.kubectl_json("-n", e2e_namespace, "get", "pod", f"{JOB}-worker-1")["spec"]["containers"][
            0
        ]["env"]
    }
    assert env["PET_RDZV_ENDPOINT"].startswith(f"{JOB}-worker-0.{SERVICE}.{e2e_namespace}.svc:")
    assert env["PET_NNODES"] == "2"
    assert "Traceback" not in log


def test_trainer_metrics_reach_prometheus(kind_cluster, e2e_namespace, job):
    labels = f'namespace="{e2e_namespace}", job_name="{JOB}"'

    def scraped():
        result = kind_cluster.prometheus_query(f"sum(lepton_trainer_samples_total{{{labels}}})")
        return result if result and float(result[0]["value"][1]) > 0 else None

    wait_until(scraped, timeout=300, interval=5, what="lepton_trainer_samples_total in Prometheus")
    world = kind_cluster.prometheus_query(f"lepton_trainer_world_size{{{labels}}}")
    assert {float(series["value"][1]) for series in world} == {2.0}


def test_forced_scale_starts_generation_2_that_resumes_from_checkpoint(kind_cluster, e2e_namespace, job):
    def checkpointed():
        log = kind_cluster.kubectl("-n", e2e_namespace, "logs", f"{JOB}-worker-0", "--tail=2000")
        return "event=checkpoint_saved" in log

    wait_until(checkpointed, timeout=300, interval=5, what="a checkpoint from generation 1")

    kind_cluster.kubectl("-n", e2e_namespace, "scale", f"leptonjob/{JOB}", "--replicas=3")
    pods = wait_until(
        lambda: (lambda p: p if _running(p, "2", 3) else None)(_pods(kind_cluster, e2e_namespace)),
        timeout=600,
        what="3 running generation-2 workers",
    )
    # Generation 1 is gone entirely before generation 2 runs (never two of a rank).
    assert {p["metadata"]["labels"]["lepton.ai/generation"] for p in pods} == {"2"}

    def resumed():
        log = kind_cluster.kubectl("-n", e2e_namespace, "logs", f"{JOB}-worker-0", "--tail=2000")
        match = re.search(r"event=resumed step=(\d+)", log)
        return int(match.group(1)) if match else None

    step = wait_until(resumed, timeout=600, interval=5, what="`event=resumed` from generation 2")
    assert step > 0

    status = kind_cluster.kubectl_json("-n", e2e_namespace, "get", "leptonjob", JOB)["status"]
    assert status["workerGeneration"] == 2 and status["worldSize"] == 3
    assert status["restarts"] == 0  # the capacity-confirmed scale-up cost no restart
    assert status["lastRescale"]["from"] == 2 and status["lastRescale"]["to"] == 3


def test_deleting_the_job_removes_everything(kind_cluster, e2e_namespace, job):
    kind_cluster.kubectl("-n", e2e_namespace, "delete", "leptonjob", JOB, "--wait=true", "--timeout=180s", timeout=200)

    def gone():
        pods = _pods(kind_cluster, e2e_namespace)
        services = kind_cluster.kubectl("-n", e2e_namespace, "get", "service", SERVICE, "--ignore-not-found")
        return not pods and not services.strip()

    wait_until(gone, timeout=300, what="the job's pods and Service to be deleted")
