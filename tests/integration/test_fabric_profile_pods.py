"""Fabric profiles on a real apiserver (issue 14; docs/reliability.md row 13).

The operator runs with `--policy-file` holding two profiles, as the chart renders
`policy.profiles`. A job naming the profile its namespace is allowed gets worker pods that,
read back from the API, carry exactly the profile's fields on top of the pod the same job
gets without one (and the apiserver kept them: the capability, the extended resource, the
annotation). A job naming a profile its namespace is not allowed ends Failed/InvalidSpec
naming the rule, with no pod, Service or budget ever created. No real fabric: the pods
stay Pending (no simulated node has `rdma/hca_shared_devices_a`), which is enough to read
what the operator wrote.
"""

from __future__ import annotations

import json
import time

import pytest
from jobs import FAST, condition, create_job, events, job_body, pods, status, wait

from lepton_operator.desired import LABEL_JOB_NAME

pytestmark = pytest.mark.integration

SMALL = {"workers": {"min": 2, "max": 2}, "resources": {"gpus": 1}, "env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}
RDMA = {
    "resources": {"rdma/hca_shared_devices_a": 1},
    "annotations": {"k8s.v1.cni.cncf.io/networks": "ib-sriov-net"},
    "capabilities": ["IPC_LOCK"],
    "env": {"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "eth0"},
    "shmSize": "8Gi",
}


def write_policy(tmp_path, namespace: str) -> str:
    policy = {
        "profiles": {
            "rdma": {"namespaces": [namespace], **RDMA},
            "rdma-elsewhere": {"namespaces": ["gpu-team-*"], **RDMA},
        }
    }
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(policy))
    return str(path)


def trainer(pod: dict) -> dict:
    (c,) = pod["spec"]["containers"]
    return c


def shm(pod: dict) -> dict:
    return next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]


def test_an_allowed_profile_gives_exactly_its_fields_and_a_disallowed_namespace_gets_invalid_spec(
    kube, k8s, namespace, run_operator, tmp_path
):
    op = run_operator(*FAST, "--policy-file", write_policy(tmp_path, namespace))
    create_job(kube, namespace, job_body("plain", **SMALL))
    create_job(kube, namespace, job_body("fabric", **SMALL, profile="rdma"))
    create_job(kube, namespace, job_body("outsider", **SMALL, profile="rdma-elsewhere"))

    both = wait(
        k8s,
        lambda: len(pods(kube, namespace, "plain")) == 2 and len(pods(kube, namespace, "fabric")) == 2,
        60,
        "the workers of both allowed jobs created",
        op,
    )
    assert both
    plain, fabric = pods(kube, namespace, "plain"), pods(kube, namespace, "fabric")
    for index in (0, 1):
        p, f = plain[f"plain-worker-{index}"], fabric[f"fabric-worker-{index}"]
        labels = {k: v for k, v in p["metadata"]["labels"].items() if k != LABEL_JOB_NAME}
        assert {k: v for k, v in f["metadata"]["labels"].items() if k != LABEL_JOB_NAME} == {
            **labels,
            "lepton.ai/fabric-profile": "rdma",
        }
        added = {k: v for k, v in f["metadata"]["annotations"].items() if k not in p["metadata"]["annotations"]}
        assert added == RDMA["annotations"]
        assert trainer(f)["securityContext"] == {
            **trainer(p)["securityContext"],
            "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]},
        }
        assert trainer(p)["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert f["spec"]["securityContext"] == p["spec"]["securityContext"]  # non-root, seccomp: unchanged
        for part in ("requests", "limits"):
            assert trainer(f)["resources"][part] == {**trainer(p)["resources"][part], "rdma/hca_shared_devices_a": "1"}
        env_p = [e for e in trainer(p)["env"] if not e["name"].startswith(("LEPTON_", "PET_RDZV_ID", "PET_RDZV_END"))]
        env_f = [e for e in trainer(f)["env"] if not e["name"].startswith(("LEPTON_", "PET_RDZV_ID", "PET_RDZV_END"))]
        profile_env = [{"name": n, "value": v} for n, v in sorted(RDMA["env"].items())]
        assert env_f == env_p[:-1] + profile_env + env_p[-1:]  # before the job's own NCCL_DEBUG
        assert shm(f) == {**shm(p), "sizeLimit": "8Gi"}
        assert "sizeLimit" not in shm(p)

    st = wait(
        k8s,
        lambda: (s := status(kube, namespace, "outsider")).get("phase") == "Failed" and s,
        60,
        "outsider Failed",
        op,
    )
    cond = condition(st, "InvalidSpec")
    assert cond["status"] == "True" and cond["reason"] == "InvalidSpec"
    assert f"policy profiles: namespace {namespace} may not use profile rdma-elsewhere" in cond["message"]
    wait(k8s, lambda: events(kube, namespace, "outsider", "InvalidSpec"), 10, "outsider: InvalidSpec event", op)
    time.sleep(2)  # a few more passes
    assert pods(kube, namespace, "outsider") == {}
    query = {"labelSelector": f"{LABEL_JOB_NAME}=outsider"}
    for path in (f"/api/v1/namespaces/{namespace}/services", f"/api/v1/namespaces/{namespace}/pods"):
        assert kube.request("GET", path, query=query)["items"] == [], path
    assert status(kube, namespace, "outsider").get("workerGeneration", 0) == 0
