"""The operator core on the real local control plane (docs/reliability.md, rows 1-10, 13, 15).

Each test starts `lepton-operator run` as a subprocess (the `run_operator` fixture) against
the session's cluster in default kubelet mode (pods are marked Running, nothing runs;
`inject_exit` / `evict` play the workers' fate). Specs use 1-second grace periods so
deletions finish fast (the kubelet also caps them at 2 s).
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from jobs import (
    FAST,
    condition,
    create_job,
    env_of,
    events,
    generations,
    get_job,
    job_body,
    patch_spec,
    pods,
    running,
    status,
    wait,
)
from kubernetes.client.rest import ApiException

from lepton_localcluster.procs import free_port
from lepton_operator.api.models import GROUP, PLURAL, VERSION
from lepton_operator.desired import LABEL_GENERATION, LABEL_JOB_NAME, LABEL_MANAGED_BY, LABEL_WORKER_INDEX, MANAGED_BY

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


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
        assert env["PET_RDZV_CONF"].startswith(f"is_host={int(index == 0)},read_timeout=")
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
    wait(k8s, lambda: events(kube, namespace, "train", "WorkersReady"), 10, "WorkersReady event", op)
    # kopf's bookkeeping stays out of status.
    assert "kopf" not in get_job(kube, namespace, "train").get("status", {})


# ------------------------------------------------------------------ row 2: failures


def test_retryable_exit_starts_a_new_generation_and_counts_one_restart(
    kube, k8s, local_cluster, namespace, run_operator
):
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("flaky"))
    wait(k8s, running(kube, namespace, "flaky", 2, 1), 40, "generation 1 Running", op)
    local_cluster.kubelet.inject_exit(namespace, "flaky-worker-1", 137)
    st = wait(k8s, running(kube, namespace, "flaky", 2, 2), 40, "generation 2 Running", op)
    assert st["restarts"] == 1
    assert st["lastRescale"]["reason"] == "WorkerRestart" and st["lastRescale"]["downtimeSeconds"] >= 0
    assert set(generations(kube, namespace, "flaky").values()) == {2}
    uid = get_job(kube, namespace, "flaky")["metadata"]["uid"]
    assert env_of(pods(kube, namespace, "flaky")["flaky-worker-0"])["PET_RDZV_ID"] == f"{uid}-g2"
    assert events(kube, namespace, "flaky", "WorkerRestart")
    time.sleep(3)  # more passes must not count it again
    assert status(kube, namespace, "flaky")["restarts"] == 1


def test_eviction_starts_a_new_generation_without_spending_the_restart_budget(
    kube, k8s, local_cluster, namespace, run_operator
):
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("evicted", restart={"maxRestarts": 0}))
    wait(k8s, running(kube, namespace, "evicted", 2, 1), 40, "Running", op)
    local_cluster.kubelet.evict(namespace, "evicted-worker-0")
    st = wait(k8s, running(kube, namespace, "evicted", 2, 2), 40, "generation 2 after eviction", op)
    assert (st["restarts"], st["disruptions"]) == (0, 1)
    assert st["lastRescale"]["reason"] == "WorkerDisrupted"


def test_permanent_exit_fails_the_job(kube, k8s, local_cluster, namespace, run_operator):
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("broken"))
    wait(k8s, running(kube, namespace, "broken", 2), 40, "Running", op)
    local_cluster.kubelet.inject_exit(namespace, "broken-worker-1", 1)
    st = wait(k8s, lambda: (s := status(kube, namespace, "broken")).get("phase") == "Failed" and s, 30, "Failed", op)
    assert "broken-worker-1" in st["message"] and "code 1" in st["message"]
    assert condition(st, "Failed")["reason"] == "WorkerFailed" and st["completionTime"]
    assert st["restarts"] == 0
    # The healthy worker is stopped; the failed one stays for its logs.
    wait(k8s, lambda: sorted(pods(kube, namespace, "broken")) == ["broken-worker-1"], 20, "worker 0 removed", op)


def test_restart_budget_exhausted_fails_the_job(kube, k8s, local_cluster, namespace, run_operator):
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("budget", restart={"maxRestarts": 1}))
    wait(k8s, running(kube, namespace, "budget", 2, 1), 40, "Running", op)
    local_cluster.kubelet.inject_exit(namespace, "budget-worker-0", 143)
    wait(k8s, running(kube, namespace, "budget", 2, 2), 40, "generation 2", op)
    local_cluster.kubelet.inject_exit(namespace, "budget-worker-1", 137)
    st = wait(k8s, lambda: (s := status(kube, namespace, "budget")).get("phase") == "Failed" and s, 30, "Failed", op)
    assert condition(st, "Failed")["reason"] == "RestartBudgetExhausted" and st["restarts"] == 1


def test_success_when_every_worker_exits_zero(kube, k8s, local_cluster, namespace, run_operator):
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("done", ttlSecondsAfterFinished=3))
    wait(k8s, running(kube, namespace, "done", 2), 40, "Running", op)
    for i in range(2):
        local_cluster.kubelet.inject_exit(namespace, f"done-worker-{i}", 0)
    st = wait(
        k8s, lambda: (s := status(kube, namespace, "done")).get("phase") == "Succeeded" and s, 30, "Succeeded", op
    )
    assert condition(st, "Succeeded")["reason"] == "AllWorkersSucceeded" and st["completionTime"]
    # ttlSecondsAfterFinished: the job is deleted, and its children with it.
    wait(k8s, lambda: kube.get_job(namespace, "done") is None, 30, "job deleted by TTL", op)


# ------------------------------------------------------------------ rows 3, 4: hands and finalizers


def test_service_and_pod_deleted_by_hand(kube, k8s, namespace, run_operator):
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("handy"))
    wait(k8s, running(kube, namespace, "handy", 2, 1), 40, "Running", op)
    kube.delete(namespace, "Service", "handy-workers", None)
    wait(k8s, lambda: kube.exists(namespace, "Service", "handy-workers"), 20, "Service recreated", op)
    kube.delete(namespace, "Pod", "handy-worker-1", 0)
    st = wait(k8s, running(kube, namespace, "handy", 2, 2), 40, "a new generation after a lost worker", op)
    # Deleted by someone else: the cluster took it, not a failure of the job.
    assert st["lastRescale"]["reason"] == "WorkerLost" and (st["restarts"], st["disruptions"]) == (0, 1)


def test_replacement_waits_while_the_old_pod_is_terminating(kube, k8s, namespace, run_operator):
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("held"))
    wait(k8s, running(kube, namespace, "held", 2, 1), 40, "Running", op)
    path = f"/api/v1/namespaces/{namespace}/pods/held-worker-0"
    kube.request(
        "PATCH",
        path,
        body={"metadata": {"finalizers": ["lepton.ai/test-hold"]}},
        content_type="application/merge-patch+json",
    )
    kube.delete(namespace, "Pod", "held-worker-0", 1)
    wait(k8s, lambda: "held-worker-1" not in pods(kube, namespace, "held"), 20, "worker 1 stopped", op)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:  # the held pod is Terminating: nothing may replace any rank
        found = pods(kube, namespace, "held")
        assert (
            list(found) == ["held-worker-0"] and found["held-worker-0"]["metadata"]["labels"][LABEL_GENERATION] == "1"
        )
        time.sleep(0.5)
    kube.request("PATCH", path, body={"metadata": {"finalizers": None}}, content_type="application/merge-patch+json")
    wait(k8s, running(kube, namespace, "held", 2, 2), 40, "generation 2 once the old pod is gone", op)


# ------------------------------------------------------------------ scaling, capacity


def test_kubectl_scale_starts_a_generation_of_the_new_size(kube, k8s, local_cluster, namespace, run_operator):
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("elastic"))
    wait(k8s, running(kube, namespace, "elastic", 2, 1), 40, "Running", op)
    scale = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/elastic/scale"
    kube.request("PATCH", scale, body={"spec": {"replicas": 3}}, content_type="application/merge-patch+json")
    st = wait(k8s, running(kube, namespace, "elastic", 3, 2), 40, "3 workers in generation 2", op)
    assert (st["lastRescale"]["from"], st["lastRescale"]["to"], st["lastRescale"]["reason"]) == (2, 3, "ManualScale")
    assert sorted(pods(kube, namespace, "elastic")) == [f"elastic-worker-{i}" for i in range(3)]
    assert kube.request("GET", scale)["status"]["replicas"] == 3
    kube.request("PATCH", scale, body={"spec": {"replicas": 1}}, content_type="application/merge-patch+json")
    wait(k8s, running(kube, namespace, "elastic", 1, 3), 40, "1 worker in generation 3", op)
    assert sorted(pods(kube, namespace, "elastic")) == ["elastic-worker-0"]


def test_scale_up_without_capacity_leaves_the_running_generation(kube, k8s, namespace, run_operator):
    op = run_operator(*FAST)
    # 8 GPUs per worker on two 8-GPU nodes: a third worker can never be placed. The first
    # generation gets a minute to be placed (earlier tests' pods may still hold GPUs: it
    # would otherwise shrink), the scale-up 5 s.
    spec = {"resources": {"gpus": 8}, "autoscaling": {"capacityTimeoutSeconds": 60, "capacityBackoffSeconds": 600}}
    create_job(kube, namespace, job_body("big", **spec))
    st = wait(k8s, running(kube, namespace, "big", 2, 1), 70, "Running", op)
    patch_spec(kube, namespace, "big", {"autoscaling": {"capacityTimeoutSeconds": 5}})
    before = {n: p["metadata"]["uid"] for n, p in pods(kube, namespace, "big").items()}
    patch_spec(kube, namespace, "big", {"workers": {"replicas": 3}})

    def refused():
        s = status(kube, namespace, "big")
        return condition(s, "Rescaling").get("reason") == "InsufficientCapacity" and s

    st = wait(k8s, refused, 40, "InsufficientCapacity", op)
    assert st["worldSize"] == 2 and st["workerGeneration"] == 1 and st["autoscaling"]["backoffUntil"]
    wait(k8s, lambda: events(kube, namespace, "big", "InsufficientCapacity"), 10, "the event, posted after status", op)
    wait(k8s, lambda: "big-worker-2" not in pods(kube, namespace, "big"), 20, "the added worker removed", op)
    time.sleep(3)  # backoff: no new attempt, old workers untouched
    now = {n: p["metadata"]["uid"] for n, p in pods(kube, namespace, "big").items()}
    assert now == before
    assert status(kube, namespace, "big")["phase"] == "Running"


# ------------------------------------------------------------------ row 10: suspend


def test_suspend_keeps_the_service_and_resume_starts_a_new_generation(kube, k8s, namespace, run_operator):
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("nap", activeDeadlineSeconds=3600))
    wait(k8s, running(kube, namespace, "nap", 2, 1), 40, "Running", op)
    patch_spec(kube, namespace, "nap", {"suspend": True})
    wait(
        k8s,
        lambda: status(kube, namespace, "nap").get("phase") == "Suspended" and not pods(kube, namespace, "nap"),
        30,
        "Suspended, no pods",
        op,
    )
    assert kube.exists(namespace, "Service", "nap-workers")
    time.sleep(2)
    patch_spec(kube, namespace, "nap", {"suspend": False})
    st = wait(k8s, running(kube, namespace, "nap", 2, 2), 40, "resumed as generation 2", op)
    assert st["suspendedSeconds"] >= 2 and st["lastRescale"]["reason"] == "Resumed"
    assert condition(st, "Suspended")["status"] == "False"


# ------------------------------------------------------------------ row 5: operator killed


def test_operator_killed_mid_rescale_resumes_without_duplicates(kube, k8s, local_cluster, namespace, run_operator):
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("crash", terminationGracePeriodSeconds=2))
    wait(k8s, running(kube, namespace, "crash", 2, 1), 40, "Running", op)
    local_cluster.kubelet.inject_exit(namespace, "crash-worker-0", 137)
    wait(
        k8s,
        lambda: (status(kube, namespace, "crash").get("rescale") or {}).get("stage") == "Stopping",
        20,
        "restart under way",
        op,
    )
    op.kill()  # SIGKILL in the middle of the restart
    time.sleep(1)
    op.start()
    st = wait(k8s, running(kube, namespace, "crash", 2, 2), 60, "generation 2 after operator restart", op)
    assert st["restarts"] == 1
    found = pods(kube, namespace, "crash")
    assert sorted(found) == ["crash-worker-0", "crash-worker-1"]
    assert {p["metadata"]["labels"][LABEL_GENERATION] for p in found.values()} == {"2"}


# ------------------------------------------------------------------ row 6: two replicas


def test_two_operator_replicas_only_one_acts(kube, k8s, namespace, run_operator):
    a = run_operator("--liveness-port", "0", "--metrics-port", "0", "--peering", "lepton-test", "--priority", "10")
    b = run_operator("--liveness-port", "0", "--metrics-port", "0", "--peering", "lepton-test", "--priority", "5")
    time.sleep(4)  # let them see each other
    create_job(kube, namespace, job_body("peered"))
    wait(k8s, running(kube, namespace, "peered", 2, 1), 60, "Running", a)
    time.sleep(2)
    assert "created Pod" in a.log_text()
    assert "created Pod" not in b.log_text()
    a.stop()  # the standby takes over
    patch_spec(kube, namespace, "peered", {"workers": {"replicas": 3}})
    wait(k8s, running(kube, namespace, "peered", 3, 2), 90, "the standby acted after the leader stopped", b)


# ------------------------------------------------------------------ row 8: foreign pods and names


def test_foreign_pod_with_our_labels_is_never_adopted_or_deleted(kube, k8s, namespace, run_operator):
    # A pod (not owned by the job) already holds worker 0's name and carries our labels.
    labels = {LABEL_JOB_NAME: "owned", LABEL_MANAGED_BY: MANAGED_BY, LABEL_GENERATION: "1", LABEL_WORKER_INDEX: "0"}
    foreign = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "owned-worker-0", "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}], "nodeName": "does-not-exist"},
    }
    created = kube.request("POST", f"/api/v1/namespaces/{namespace}/pods", body=foreign)
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("owned"))
    wait(k8s, lambda: events(kube, namespace, "owned", "NameTaken"), 30, "NameTaken event", op)
    time.sleep(3)
    found = pods(kube, namespace, "owned")
    assert found["owned-worker-0"]["metadata"]["uid"] == created["metadata"]["uid"]  # untouched
    assert not found["owned-worker-0"]["metadata"].get("deletionTimestamp")
    assert not found["owned-worker-0"]["metadata"].get("ownerReferences")  # not adopted
    assert status(kube, namespace, "owned")["phase"] == "Pending"
    kube.delete(namespace, "Pod", "owned-worker-0", 0)  # the owner of the name removes it
    wait(k8s, running(kube, namespace, "owned", 2, 1), 40, "job starts once the name is free", op)


def test_a_foreign_service_and_budget_holding_our_names_give_name_taken_until_removed(
    kube, k8s, namespace, run_operator
):
    # Objects the job does not own hold the names of its Service (no labels) and of its
    # PodDisruptionBudget (our labels: still not ours). A create is answered 409 for each.
    policy = kube.policy_version()
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "held-workers", "namespace": namespace},
        "spec": {"ports": [{"port": 80}], "selector": {"app": "someone-else"}},
    }
    labels = {LABEL_JOB_NAME: "held", LABEL_MANAGED_BY: MANAGED_BY}
    budget = {
        "apiVersion": policy,
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "held-workers", "namespace": namespace, "labels": labels},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "someone-else"}}},
    }
    budgets = f"/apis/{policy}/namespaces/{namespace}/poddisruptionbudgets"
    services = f"/api/v1/namespaces/{namespace}/services"
    foreign = {
        services: kube.request("POST", services, body=service),
        budgets: kube.request("POST", budgets, body=budget),
    }
    op = run_operator(*FAST)
    job = create_job(kube, namespace, job_body("held"))

    def name_taken(value):
        return lambda: condition(status(kube, namespace, "held"), "NameTaken").get("status") == value

    def both_taken():  # the Service at the first pass, the budget with the first workers
        message = condition(status(kube, namespace, "held"), "NameTaken").get("message", "")
        return "PodDisruptionBudget held-workers" in message and "Service held-workers" in message

    wait(k8s, name_taken("True"), 30, "condition NameTaken", op)
    wait(k8s, both_taken, 30, "NameTaken naming the Service and the budget", op)
    wait(k8s, running(kube, namespace, "held", 2, 1), 40, "the workers run meanwhile", op)
    time.sleep(6)  # more passes (resync 5 s), each trying the creates again
    warned = events(kube, namespace, "held", "NameTaken")
    assert sorted(e["message"].split(" exists")[0] for e in warned) == [
        "PodDisruptionBudget held-workers",
        "Service held-workers",
    ]
    assert all(e["count"] == 1 for e in warned)  # said once, not at every pass
    for path, created in foreign.items():  # never adopted, patched or deleted
        held = kube.request("GET", f"{path}/held-workers")
        assert held["metadata"]["uid"] == created["metadata"]["uid"]
        assert not held["metadata"].get("ownerReferences") and held["spec"] == created["spec"]

    for path in foreign:  # the owner of the names removes its objects
        kube.request("DELETE", f"{path}/held-workers")
    wait(k8s, name_taken("False"), 40, "NameTaken cleared once the names are free", op)
    for path in foreign:  # the job's own now hold the names
        owners = kube.request("GET", f"{path}/held-workers")["metadata"]["ownerReferences"]
        assert [o["uid"] for o in owners] == [job["metadata"]["uid"]]


# ------------------------------------------------------------------ row 9: deleted while down


def test_job_deleted_while_operator_down_is_cleaned_up(kube, k8s, namespace, run_operator):
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("orphan"))
    wait(k8s, running(kube, namespace, "orphan", 2), 40, "Running", op)
    op.stop()
    kube.request("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/orphan")
    op.start()
    wait(k8s, lambda: kube.get_job(namespace, "orphan") is None, 30, "job gone", op)
    wait(
        k8s,
        lambda: not pods(kube, namespace, "orphan") and not kube.exists(namespace, "Service", "orphan-workers"),
        60,
        "children garbage-collected",
        op,
    )


# ------------------------------------------------------------------ row 13: hostile input


HOSTILE = [
    ("a" * 53, {}, "metadata.name"),
    ("minmax", {"workers": {"min": 3, "max": 2}}, "min (3)"),
    ("initial", {"workers": {"min": 1, "max": 2, "initial": 5}}, "initial"),
    ("reserved", {"env": [{"name": "PET_NNODES", "value": "64"}]}, "reserved"),
    ("prefix", {"env": [{"name": "TORCHELASTIC_FOO", "value": "x"}]}, "reserved"),
    # Rules a 1.20 server cannot check (CEL is stripped there): the operator refuses them
    # before the apiserver would refuse the pods they make.
    ("ports", {"metricsPort": 29401}, "spec.metricsPort (29401) must differ"),
    ("shm", {"dataVolumes": [{"claimName": "data", "mountPath": "/dev/shm"}]}, "/dev/shm"),
    (
        "nested",
        {"dataVolumes": [{"claimName": "a", "mountPath": "/data"}, {"claimName": "b", "mountPath": "/data/x"}]},
        "are nested",
    ),
    ("hang", {"restart": {"hangSeconds": 5}}, "hangSeconds"),
    ("qty", {"resources": {"memory": "1.2.3Gi"}}, "spec.resources.memory"),  # the schema refuses it
    # 128 problems: the status still fits the schema's bounds (summarised), so it is written.
    ("many", {"env": [{"name": f"PET_X{i}", "value": "x"} for i in range(128)]}, "more"),
]


@pytest.mark.parametrize("name, spec, needle", HOSTILE, ids=[h[0][:12] for h in HOSTILE])
def test_hostile_spec_is_rejected_or_failed_creating_nothing(kube, k8s, namespace, run_operator, name, spec, needle):
    op = run_operator(*FAST)
    try:
        create_job(kube, namespace, job_body(name, **spec))
    except ApiException as e:  # the apiserver's schema refused it: fine, nothing exists
        assert e.status == 422
        return
    st = wait(k8s, lambda: (s := status(kube, namespace, name)).get("phase") == "Failed" and s, 30, "Failed", op)
    cond = condition(st, "InvalidSpec")
    assert cond["status"] == "True" and cond["reason"] == "InvalidSpec" and needle in cond["message"]
    # Events are posted after the status write: give the operator a moment.
    wait(k8s, lambda: events(kube, namespace, name, "InvalidSpec"), 10, "an InvalidSpec event", op)
    time.sleep(1)
    assert pods(kube, namespace, name) == {}
    assert not kube.exists(namespace, "Service", f"{name}-workers")


@pytest.mark.parametrize(
    "spec",
    [
        {"workers": {"min": 0}},
        {"resources": {"gpus": 17}},
        {"workers": {"max": 100000}},
        {"image": "x" * 600},
        {"rendezvousPort": 80},
    ],
)
def test_schema_refuses_out_of_bounds_values(kube, crds, namespace, spec):
    with pytest.raises(ApiException) as e:
        create_job(kube, namespace, job_body("bad", **spec))
    assert e.value.status == 422


def test_privileged_fields_cannot_be_smuggled_into_workers(kube, k8s, namespace, run_operator):
    """Unknown spec fields are pruned by the structural schema; workers stay restricted."""
    op = run_operator(*FAST)
    body = job_body(
        "sneaky", hostNetwork=True, securityContext={"privileged": True}, podTemplate={"spec": {"hostPID": True}}
    )
    create_job(kube, namespace, body)
    stored = get_job(kube, namespace, "sneaky")["spec"]
    assert not {"hostNetwork", "securityContext", "podTemplate"} & set(stored)
    wait(k8s, running(kube, namespace, "sneaky", 2), 40, "Running", op)
    for pod in pods(kube, namespace, "sneaky").values():
        spec = pod["spec"]
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        assert not spec["containers"][0]["securityContext"].get("privileged")


# ------------------------------------------------------------------ metrics and liveness


def test_metrics_and_liveness_endpoints(kube, k8s, namespace, run_operator):
    mport, lport = free_port(), free_port()
    op = run_operator(
        "--standalone", "--metrics-port", str(mport), "--liveness-port", str(lport), "--bind-address", "127.0.0.1"
    )
    create_job(kube, namespace, job_body("observed"))
    wait(k8s, running(kube, namespace, "observed", 2), 40, "Running", op)

    def scrape():
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2).read().decode()
        return 'lepton_operator_jobs{phase="Running"} 1.0' in text and text

    text = wait(k8s, scrape, 20, "jobs gauge", op)
    assert "lepton_operator_reconcile_duration_seconds_count" in text
    health = urllib.request.urlopen(f"http://127.0.0.1:{lport}/healthz", timeout=5)
    assert health.status == 200


# ------------------------------------------------------------------ row 7


def test_operator_converges_after_the_apiserver_restarts(kube, k8s, local_cluster, namespace, run_operator):
    """Kill the apiserver for a few seconds under a running operator: its watches break;
    changes made after the restart (a scale, a pod deleted by hand) must still be acted on."""
    op = run_operator(*FAST)
    create_job(kube, namespace, job_body("survivor"))
    wait(k8s, running(kube, namespace, "survivor", 2, 1), 40, "Running", op)

    local_cluster.restart_component("kube-apiserver", downtime=3)

    scale = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/survivor/scale"
    kube.request("PATCH", scale, body={"spec": {"replicas": 3}}, content_type="application/merge-patch+json")
    wait(k8s, running(kube, namespace, "survivor", 3, 2), 90, "3 workers in generation 2 after the restart", op)
    k8s.core.delete_namespaced_pod("survivor-worker-2", namespace)
    # A lost worker of a running generation starts a new one (reason WorkerLost).
    wait(k8s, running(kube, namespace, "survivor", 3, 3), 60, "generation 3 after a pod was deleted", op)
    assert op.running(), op.log_text()[-3000:]
    assert sorted(pods(kube, namespace, "survivor", include_terminating=False)) == [
        f"survivor-worker-{i}" for i in range(3)
    ]
