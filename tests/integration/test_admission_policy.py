"""The admin policy on a real apiserver (docs/reliability.md, rows 13 and 24).

The operator runs with `--policy-file`, as the chart starts it. Every rule has a hostile
LeptonJob that ends Failed/InvalidSpec naming the rule, with nothing created for it (no
pod, Service, PodDisruptionBudget, claim or NetworkPolicy, and no pod ever: no event
about one), and an allowed job next to it that starts. A running job whose policy changes
under it keeps its workers (PolicyViolation) and starts no new generation until it
complies.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from jobs import FAST, condition, create_job, events, job_body, patch_spec, pods, running, status, wait

from lepton_operator.desired import LABEL_JOB_NAME

pytestmark = pytest.mark.integration

POLICY = {
    "allowedTolerationKeys": ["nvidia.com/gpu", "gpu-pool"],
    "allowedSecretNames": ["wandb-*"],
    "maxGpusPerJob": 4,
    # 1 MiB, so that the "times workers.max" case needs no huge spec.
    "maxCommandArgsEnvBytesAllWorkers": 1024 * 1024,
}
SMALL = {"workers": {"min": 1, "max": 2, "initial": 1}, "resources": {"gpus": 0}}


def data(path: str = "/data", read_only: bool = True, claim: str = "datasets") -> dict:
    return {"dataVolumes": [{"claimName": claim, "mountPath": path, "readOnly": read_only}]}


def secret(name: str) -> dict:
    return {"env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "k", "optional": True}}}]}


def blob(count: int, size: int = 30_000) -> dict:
    return {"env": [{"name": f"BLOB_{i}", "value": "x" * size} for i in range(count)]}


# (job name, spec settings, the rule it breaks (None: it starts)); each hostile job has an
# allowed one right after it.
CASES = [
    ("pc-system", {"priorityClassName": "system-node-critical"}, "allowedPriorityClasses"),
    ("pc-custom", {"priorityClassName": "PRIORITY"}, None),  # a PriorityClass made for the test
    ("tolerate-all", {"tolerations": [{"operator": "Exists"}]}, "allowedTolerationKeys"),
    ("tolerate-pool", {"tolerations": [{"key": "gpu-pool", "operator": "Exists", "effect": "NoSchedule"}]}, None),
    ("control-plane", {"nodeSelector": {"node-role.kubernetes.io/control-plane": "true"}}, "forbiddenNodeSelectorKeys"),
    ("gpu-pool", {"nodeSelector": {"lepton.ai/test-pool": "none"}}, None),  # Pending: no such node, yet created
    ("mount-proc", data("/proc/data"), "forbiddenMountPaths"),
    ("mount-data", data("/data"), None),
    ("data-rw", data(read_only=False), "allowReadWriteDataVolumes"),
    ("data-ro", data(read_only=True), None),
    ("secret-any", secret("db-password"), "allowedSecretNames"),
    ("secret-listed", secret("wandb-key"), None),
    ("gpus", {"resources": {"gpus": 4}}, "maxGpusPerJob"),  # 4 x workers.max 2 = 8 > 4
    ("gpus-fit", {"resources": {"gpus": 2}}, None),  # 2 x 2 = 4
    ("steal", data(claim="victim-checkpoints"), "checkpointClaims"),
    ("victim", {"checkpoint": {"size": "1Gi"}}, None),  # its own created claim
    ("env-big", blob(3), "maxCommandArgsEnvBytes"),  # 90 KB > 64 KiB in every pod
    ("env-fits", blob(2), None),
    ("env-wide", {**blob(1), "workers": {"min": 1, "max": 40, "initial": 1}}, "maxCommandArgsEnvBytesAllWorkers"),
    ("env-narrow", {**blob(1), "workers": {"min": 1, "max": 4, "initial": 1}}, None),
]


def write_policy(tmp_path, policy: dict) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(policy))  # JSON is YAML too; the chart renders YAML
    return str(path)


def children(kube, namespace: str, job: str) -> list[str]:
    """Everything of the job in the namespace: pods, Services, claims, budgets, NetworkPolicies."""
    query = {"labelSelector": f"{LABEL_JOB_NAME}={job}"}
    paths = [
        f"/api/v1/namespaces/{namespace}/pods",
        f"/api/v1/namespaces/{namespace}/services",
        f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
        f"/apis/{kube.policy_version()}/namespaces/{namespace}/poddisruptionbudgets",
        f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies",
    ]
    return [f"{o['kind']}/{o['metadata']['name']}" for p in paths for o in kube.request("GET", p, query=query)["items"]]


def pod_events(kube, namespace: str, job: str) -> list[str]:
    """Events about any pod of the job (scheduling, binding): a pod that ever existed leaves one."""
    items = kube.request("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
    return [e["reason"] for e in items if e["involvedObject"]["name"].startswith(f"{job}-worker-")]


def failed(kube, namespace, name):
    return lambda: (s := status(kube, namespace, name)).get("phase") == "Failed" and s


def started(kube, namespace, name):
    return lambda: status(kube, namespace, name).get("workerGeneration", 0) >= 1 and pods(kube, namespace, name)


def test_each_rule_fails_its_hostile_job_creating_nothing_and_starts_its_neighbour(
    kube, k8s, namespace, run_operator, tmp_path
):
    priority = f"training-{uuid.uuid4().hex[:8]}"
    kube.request(
        "POST", "/apis/scheduling.k8s.io/v1/priorityclasses", body={"metadata": {"name": priority}, "value": 1000}
    )
    try:
        op = run_operator(*FAST, "--policy-file", write_policy(tmp_path, POLICY))
        for name, spec, _rule in CASES:
            spec = {**SMALL, **spec}
            if spec.get("priorityClassName") == "PRIORITY":
                spec["priorityClassName"] = priority
            create_job(kube, namespace, job_body(name, **spec))  # the schema accepts every one

        for name, _spec, rule in CASES:
            if rule is None:
                wait(k8s, started(kube, namespace, name), 60, f"{name} started", op)
                assert condition(status(kube, namespace, name), "InvalidSpec").get("status") != "True", name
                continue
            st = wait(k8s, failed(kube, namespace, name), 60, f"{name} Failed", op)
            cond = condition(st, "InvalidSpec")
            assert cond["status"] == "True" and cond["reason"] == "InvalidSpec", name
            assert f"policy {rule}: " in cond["message"] and f"policy {rule}: " in st["message"], (name, st)
            wait(k8s, lambda n=name: events(kube, namespace, n, "InvalidSpec"), 10, f"{name}: InvalidSpec event", op)

        time.sleep(2)  # a few more passes (resync 5 s, and every trigger of the allowed jobs)
        for name, _spec, rule in CASES:
            if rule is not None:
                assert children(kube, namespace, name) == [], name
                assert pod_events(kube, namespace, name) == [], name
                assert status(kube, namespace, name).get("phase") == "Failed", name
    finally:
        kube.request("DELETE", f"/apis/scheduling.k8s.io/v1/priorityclasses/{priority}")


def test_no_pod_over_the_size_limit_is_ever_written(kube, k8s, namespace, run_operator, tmp_path):
    """etcd pressure (row 24): the oversized jobs never get an object; the pods that exist fit."""
    op = run_operator(*FAST, "--policy-file", write_policy(tmp_path, POLICY))
    oversized = {"huge": blob(4, 32_768), "wide": {**blob(1), "workers": {"min": 1, "max": 1000, "initial": 1}}}
    for name, spec in oversized.items():
        create_job(kube, namespace, job_body(name, **{**SMALL, **spec}))
    create_job(kube, namespace, job_body("fits", **{**SMALL, **blob(2)}))
    wait(k8s, started(kube, namespace, "fits"), 60, "the job that fits started", op)
    for name in oversized:
        st = wait(k8s, failed(kube, namespace, name), 60, f"{name} Failed", op)
        assert "policy maxCommandArgsEnvBytes" in condition(st, "InvalidSpec")["message"]
    time.sleep(2)
    for name in oversized:
        assert children(kube, namespace, name) == [] and pod_events(kube, namespace, name) == [], name
    written = kube.request("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
    assert {p["metadata"]["labels"][LABEL_JOB_NAME] for p in written} == {"fits"}
    for pod in written:
        user_env = [e for e in pod["spec"]["containers"][0]["env"] if e["name"].startswith("BLOB_")]
        assert len(json.dumps(user_env, separators=(",", ":")).encode()) <= 64 * 1024, pod["metadata"]["name"]


def test_a_running_job_whose_policy_changes_keeps_its_workers_until_it_complies(
    kube, k8s, local_cluster, namespace, run_operator, tmp_path
):
    path = write_policy(tmp_path, POLICY)  # gpu-pool may be tolerated
    op = run_operator(*FAST, "--policy-file", path)
    pool = [{"key": "gpu-pool", "operator": "Exists", "effect": "NoSchedule"}]
    create_job(kube, namespace, job_body("pooled", tolerations=pool))
    wait(k8s, running(kube, namespace, "pooled", 2, 1), 60, "Running", op)
    before = {name: p["metadata"]["uid"] for name, p in pods(kube, namespace, "pooled").items()}

    # The admin removes gpu-pool from the policy (a changed ConfigMap rolls the operator).
    write_policy(tmp_path, {**POLICY, "allowedTolerationKeys": ["nvidia.com/gpu"]})
    op.restart()
    st = wait(
        k8s,
        lambda: condition(s := status(kube, namespace, "pooled"), "PolicyViolation").get("status") == "True" and s,
        30,
        "PolicyViolation",
        op,
    )
    cond = condition(st, "PolicyViolation")
    assert "policy allowedTolerationKeys: " in cond["message"] and "gpu-pool" in cond["message"]
    assert st["phase"] == "Running"
    wait(k8s, lambda: events(kube, namespace, "pooled", "PolicyViolation"), 10, "PolicyViolation event", op)
    assert {n: p["metadata"]["uid"] for n, p in pods(kube, namespace, "pooled").items()} == before

    # A failed worker ends the generation, but no new one starts while the job violates.
    local_cluster.kubelet.inject_exit(namespace, "pooled-worker-1", 137)
    wait(k8s, lambda: not pods(kube, namespace, "pooled"), 30, "the old generation gone", op)
    time.sleep(7)  # more than a resync
    assert pods(kube, namespace, "pooled") == {}
    assert status(kube, namespace, "pooled")["workerGeneration"] == 1

    # The user drops the toleration: the job complies and its next generation starts.
    patch_spec(kube, namespace, "pooled", {"tolerations": []})
    st = wait(k8s, running(kube, namespace, "pooled", 2), 60, "Running again", op)
    assert st["workerGeneration"] > 1 and condition(st, "PolicyViolation")["status"] == "False"


def test_the_operator_refuses_to_start_with_an_invalid_policy_file(run_operator, namespace, tmp_path):
    op = run_operator(*FAST, "--policy-file", write_policy(tmp_path, {"allowedTolerationKey": ["typo"]}))
    deadline = time.monotonic() + 30
    while op.running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert op.proc.returncode == 2
    assert "refusing to start" in op.log_text() and "allowedTolerationKey" in op.log_text()
