"""The per-job NetworkPolicy on the real local apiserver (docs/reliability.md, row 25).

Enforcement is NOT tested here: the local cluster runs no network plugin, so nothing
enforces NetworkPolicies (the objects are stored and served, and inert). These tests
assert what the operator controls: each job gets a policy that selects its workers and
admits only the job's own pods (every TCP port: the rendezvous ports and NCCL's) and the
listed Prometheus namespaces (the metrics port), owned by the job and collected with it;
a hand edit is patched back; `--no-network-policies` creates none; the job runs either
way (default kubelet mode: Running). Who reaches which port under the policy is checked
in tests/unit/test_network_policy.py.
"""

from __future__ import annotations

import time
from typing import Optional

import pytest
from jobs import FAST, create_job, job_body, pods, running, wait

from lepton_operator.api.models import GROUP, PLURAL, VERSION, parse_job
from lepton_operator.desired import JobRef, worker_selector
from lepton_operator.desired.network import build_network_policy

pytestmark = pytest.mark.integration

POLICIES = "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"


def policy(kube, namespace: str, name: str) -> Optional[dict]:
    items = kube.request("GET", POLICIES.format(ns=namespace))["items"]
    return next((p for p in items if p["metadata"]["name"] == name), None)


def wanted(job: dict, namespaces: list[str]) -> dict:
    meta = job["metadata"]
    ref = JobRef(meta["name"], meta["namespace"], meta["uid"])
    return build_network_policy(ref, parse_job(ref.name, job["spec"]), namespaces)


def test_each_job_gets_a_policy_that_admits_only_its_own_pods_and_prometheus(kube, k8s, namespace, run_operator):
    op = run_operator(*FAST, "--prometheus-namespaces", "monitoring,lepton.ai/prometheus=true")
    job = create_job(kube, namespace, job_body("iso", rendezvousPort=29500, metricsPort=9500))
    uid = job["metadata"]["uid"]
    wait(k8s, running(kube, namespace, "iso", 2), 40, "job Running with 2 workers", op)
    found = wait(k8s, lambda: policy(kube, namespace, "iso-workers"), 30, "NetworkPolicy iso-workers", op)

    meta, spec = found["metadata"], found["spec"]
    assert meta["labels"] == worker_selector("iso")
    owner = meta["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("LeptonJob", uid, True)
    assert spec["podSelector"] == {"matchLabels": worker_selector("iso")}
    assert spec["policyTypes"] == ["Ingress"]  # egress stays open
    own, prometheus = spec["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": worker_selector("iso")}}], "ports": [{"protocol": "TCP"}]}
    assert prometheus["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        {"namespaceSelector": {"matchLabels": {"lepton.ai/prometheus": "true"}}},
    ]
    assert prometheus["ports"] == [{"protocol": "TCP", "port": 9500}]
    # Stored as built (the server defaults nothing we left out), so no pass patches it.
    assert spec == wanted(job, ["monitoring", "lepton.ai/prometheus=true"])["spec"]
    for pod in pods(kube, namespace, "iso").values():  # the policy selects every worker
        assert worker_selector("iso").items() <= pod["metadata"]["labels"].items()

    version = found["metadata"]["resourceVersion"]
    time.sleep(7)  # more than a resync (5 s): passes ran and left it alone
    assert policy(kube, namespace, "iso-workers")["metadata"]["resourceVersion"] == version

    kube.request("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/iso")
    wait(k8s, lambda: policy(kube, namespace, "iso-workers") is None, 60, "NetworkPolicy collected with its job", op)


def test_a_hand_edited_policy_is_patched_back(kube, k8s, namespace, run_operator):
    op = run_operator(*FAST)  # Prometheus in `monitoring` by default
    job = create_job(kube, namespace, job_body("edited"))
    wait(k8s, running(kube, namespace, "edited", 2), 40, "job Running with 2 workers", op)
    wait(k8s, lambda: policy(kube, namespace, "edited-workers"), 30, "NetworkPolicy edited-workers", op)

    kube.request(  # open the workers to every pod of the cluster
        "PATCH",
        POLICIES.format(ns=namespace) + "/edited-workers",
        body={"spec": {"ingress": [{}]}},
        content_type="application/merge-patch+json",
    )
    want = wanted(job, ["monitoring"])["spec"]
    wait(k8s, lambda: policy(kube, namespace, "edited-workers")["spec"] == want, 30, "the policy patched back", op)
    wait(k8s, running(kube, namespace, "edited", 2), 10, "job still Running", op)


def test_no_network_policies_creates_none_and_the_job_runs(kube, k8s, namespace, run_operator):
    op = run_operator(*FAST, "--no-network-policies")
    create_job(kube, namespace, job_body("open"))
    wait(k8s, running(kube, namespace, "open", 2), 40, "job Running with 2 workers", op)
    time.sleep(6)  # a resync later, still none
    assert kube.request("GET", POLICIES.format(ns=namespace))["items"] == []
