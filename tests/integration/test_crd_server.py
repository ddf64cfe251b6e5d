"""The generated CRD and the built objects against a real kube-apiserver (1.20.2, local).

What a user meets before the operator does anything: the CRD installs, `kubectl explain`
explains, hostile or malformed jobs are refused by the apiserver's schema, defaults are
filled in, `kubectl scale` works through the scale subresource, and `kubectl get lj`
shows the printer columns. And the objects the builders produce are accepted as they
are (names, hostname/subdomain, env, security context, volumes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from lepton_localcluster.crds import install_crd
from lepton_operator.api.crd import CEL_MIN_MINOR, build_crd, crd_for_server, kubernetes_minor
from lepton_operator.api.models import (
    API_VERSION,
    CRD_NAME,
    GROUP,
    KIND,
    MAX_JOB_NAME_LENGTH,
    PLURAL,
    VERSION,
    parse_job,
)
from lepton_operator.desired import (
    JobRef,
    build_checkpoint_pvc,
    build_service,
    build_worker_pod,
    selector_string,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(api_cluster):
    api_client = api_cluster.api_client()
    version = client.VersionApi(api_client).get_code().git_version
    install_crd(api_client, crd_for_server(version))
    return api_client


@pytest.fixture
def custom(api):
    return client.CustomObjectsApi(api)


def job_body(name: str, spec: dict | None = None) -> dict:
    body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}}
    if spec is not None:
        body["spec"] = spec
    return body


def create(custom, namespace: str, body: dict) -> dict:
    return custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def rejection(custom, namespace: str, body: dict) -> str:
    with pytest.raises(ApiException) as info:
        create(custom, namespace, body)
    assert info.value.status == 422, info.value.body
    return info.value.body


def kubectl(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True, text=True, timeout=60
    )


# ------------------------------------------------------------------ install


def test_crd_installs_and_serves_names(api, api_cluster):
    crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(CRD_NAME)
    assert crd.status.accepted_names.short_names == ["lj"]
    assert crd.status.accepted_names.categories == ["lepton"]
    version = crd.spec.versions[0]
    assert version.subresources.scale.spec_replicas_path == ".spec.workers.replicas"
    assert [c.name for c in version.additional_printer_columns][:6] == [
        "Phase",
        "Ready",
        "Workers",
        "Min",
        "Max",
        "Throughput",
    ]


def test_apiserver_1_20_accepts_the_cel_rules_and_drops_them(api):
    """The full CRD (CEL included) is valid server-side on 1.20; the server keeps no rules.

    (kubectl's client-side validation refuses the unknown key on such a server, which is
    why `crd_for_server()` strips it there.) Checked on a copy under another group so the
    real CRD stays as installed.
    """
    version = client.VersionApi(api).get_code().git_version
    if kubernetes_minor(version) >= (1, CEL_MIN_MINOR):
        pytest.skip(f"the apiserver is {version}: it enforces CEL rules (this checks servers before 1.25)")
    crd = build_crd()
    assert "x-kubernetes-validations" in json.dumps(crd)
    crd["spec"]["group"] = "celcheck.lepton.ai"
    crd["metadata"]["name"] = f"{PLURAL}.celcheck.lepton.ai"
    ext = client.ApiextensionsV1Api(api)
    try:
        install_crd(api, crd)
        stored = api.sanitize_for_serialization(ext.read_custom_resource_definition(crd["metadata"]["name"]))
        assert "x-kubernetes-validations" not in json.dumps(stored)
    finally:
        try:
            ext.delete_custom_resource_definition(crd["metadata"]["name"])
        except ApiException as e:
            if e.status != 404:
                raise


def test_openapi_publishes_the_descriptions(api, api_cluster):
    """What `kubectl explain lj.spec` reads: the published OpenAPI with our descriptions."""

    def definition():
        method, url, headers, body, _ = api.param_serialize("GET", "/openapi/v2", auth_settings=["BearerToken"])
        response = api.call_api(method, url, header_params=headers, body=body)
        response.read()
        return json.loads(response.data)["definitions"].get("ai.lepton.v1alpha1.LeptonJob")

    deadline = time.monotonic() + 60
    while (found := definition()) is None and time.monotonic() < deadline:
        time.sleep(1)
    assert found is not None, "LeptonJob never appeared in /openapi/v2"
    spec = found["properties"]["spec"]
    assert "elastic PyTorch" in spec["description"]
    assert "Fewest workers" in spec["properties"]["workers"]["properties"]["min"]["description"]
    if shutil.which("kubectl"):
        result = kubectl(api_cluster, "explain", "lj.spec.workers")
        assert result.returncode == 0, result.stderr
        assert "Fewest workers the job may run with" in result.stdout


# ----------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "name, spec, complaint",
    [
        ("a" * (MAX_JOB_NAME_LENGTH + 1), {}, "metadata.name"),
        ("1job", {}, "metadata.name"),  # `1job-workers` could never be a Service
        ("neg", {"workers": {"min": -1}}, "spec.workers.min"),
        ("huge", {"workers": {"max": 100000}}, "spec.workers.max"),
        ("gpus", {"resources": {"gpus": 99}}, "spec.resources.gpus"),
        ("qty", {"resources": {"memory": "12 Gi"}}, "spec.resources.memory"),
        ("qty2", {"checkpoint": {"size": "1Gi; rm -rf /"}}, "spec.checkpoint.size"),
        ("port", {"rendezvousPort": 22}, "spec.rendezvousPort"),
        ("env", {"env": [{"name": "A=B", "value": "x"}]}, "spec.env"),
        ("many", {"args": ["x"] * 300}, "spec.args"),
        ("img", {"image": "x" * 600}, "spec.image"),
        ("pull", {"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy"),
        ("pc", {"priorityClassName": "Not_A_Name"}, "spec.priorityClassName"),
    ],
)
def test_hostile_or_malformed_jobs_are_rejected_by_the_schema(custom, namespace, name, spec, complaint):
    assert complaint in rejection(custom, namespace, job_body(name, spec))


def test_several_problems_are_reported_together(custom, namespace):
    body = rejection(custom, namespace, job_body("multi", {"workers": {"min": 0}, "resources": {"gpus": 99}}))
    assert "spec.workers.min" in body and "spec.resources.gpus" in body


def test_unknown_fields_are_pruned_not_stored(custom, namespace):
    body = job_body("pruned", {"workers": {"min": 1, "max": 2, "sneaky": 1}, "securityContext": {"privileged": True}})
    created = create(custom, namespace, body)
    assert "securityContext" not in created["spec"] and "sneaky" not in created["spec"]["workers"]


def test_longest_valid_name_is_accepted(custom, namespace):
    created = create(custom, namespace, job_body("a" * MAX_JOB_NAME_LENGTH, {}))
    assert len(created["metadata"]["name"]) == MAX_JOB_NAME_LENGTH


def test_defaults_are_filled_in_by_the_server(custom, namespace):
    created = create(custom, namespace, job_body("defaults"))  # no spec at all
    spec = created["spec"]
    assert spec["image"] == "lepton-ai/lepton-trainer:0.1.0"
    assert spec["workers"] == {"min": 1, "max": 1, "replicas": 0}  # 0: not scaled yet
    assert spec["resources"] == {"gpus": 0}
    assert spec["autoscaling"]["enabled"] is False and spec["restart"] == {
        "maxRestarts": 3,
        "backoffSeconds": 10,
        "nodeLostSeconds": 60,
        "hangSeconds": 1800,
    }
    # and what the server stored is what the operator reads
    assert parse_job("defaults", spec) == parse_job("defaults", {})


# ------------------------------------------------------------------------ scale


def test_scale_subresource_get_and_patch(api, custom, namespace, api_cluster):
    create(custom, namespace, job_body("scaled", {"workers": {"min": 1, "max": 4}}))
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "scaled",
        {
            "status": {
                "replicas": 1,
                "selector": selector_string("scaled"),
                "phase": "Running",
                "worldSize": 1,
                "workers": {"ready": 1, "desired": 1},
                "throughput": 41.5,
            }
        },
    )
    # A fresh job has never been scaled: 1.20 answers 500 here unless the CRD defaults
    # spec.workers.replicas (it does, to 0 = "use initial").
    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, "scaled")
    assert scale["spec"].get("replicas", 0) == 0  # 0 is omitted on the wire
    assert scale["status"]["replicas"] == 1
    assert scale["status"]["selector"] == selector_string("scaled")
    custom.patch_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, "scaled", {"spec": {"replicas": 3}})
    job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "scaled")
    assert job["spec"]["workers"]["replicas"] == 3
    assert parse_job("scaled", job["spec"]).requested_workers() == 3
    if shutil.which("kubectl"):
        result = kubectl(api_cluster, "scale", "lj/scaled", "-n", namespace, "--replicas=2")
        assert result.returncode == 0, result.stderr
        result = kubectl(api_cluster, "get", "lj", "-n", namespace, "scaled")
        assert result.returncode == 0, result.stderr
        header, row = result.stdout.splitlines()[:2]
        assert header.split() == ["NAME", "PHASE", "READY", "WORKERS", "MIN", "MAX", "THROUGHPUT", "PROGRESS", "AGE"]
        assert row.split()[:7] == ["scaled", "Running", "1", "1", "1", "4", "41.5"]


def test_status_is_a_subresource(custom, namespace):
    create(custom, namespace, job_body("statusonly", {}))
    updated = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "statusonly", {"status": {"phase": "Succeeded"}}
    )
    assert "phase" not in updated.get("status", {})  # writes to the main resource ignore status


# ------------------------------------------------------------- built objects


def test_built_objects_are_accepted_by_the_apiserver(api, custom, namespace):
    """Service, PVC and pods exactly as the builders make them, for a GPU job."""
    raw = {
        "workers": {"min": 1, "max": 4},
        "resources": {"gpus": 2, "cpu": "4", "memory": "8Gi", "sharedMemory": "2Gi"},
        "checkpoint": {"size": "1Gi"},
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "optional": True}}}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    created = create(custom, namespace, job_body("built", raw))
    job = JobRef(name="built", namespace=namespace, uid=created["metadata"]["uid"])
    spec = parse_job("built", created["spec"])
    core = client.CoreV1Api(api)
    core.create_namespaced_service(namespace, build_service(job, spec))
    core.create_namespaced_persistent_volume_claim(namespace, build_checkpoint_pvc(job, spec))
    for index in range(2):
        # server-side dry run: the apiserver validates everything, nothing is scheduled
        pod = core.create_namespaced_pod(namespace, build_worker_pod(job, spec, index, 1, 2), dry_run="All")
        assert pod.spec.hostname == f"built-worker-{index}" and pod.spec.subdomain == "built-workers"
        assert pod.spec.security_context.run_as_non_root is True
        assert pod.metadata.owner_references[0].uid == job.uid
    service = core.read_namespaced_service("built-workers", namespace)
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses is True


def test_builders_at_the_longest_name_and_highest_index(api, custom, namespace):
    name = "b" * MAX_JOB_NAME_LENGTH
    created = create(custom, namespace, job_body(name, {"workers": {"min": 1, "max": 1000}}))
    job = JobRef(name=name, namespace=namespace, uid=created["metadata"]["uid"])
    spec = parse_job(name, created["spec"])
    core = client.CoreV1Api(api)
    core.create_namespaced_service(namespace, build_service(job, spec), dry_run="All")
    pod = core.create_namespaced_pod(namespace, build_worker_pod(job, spec, 999, 1, 1000), dry_run="All")
    assert len(pod.spec.hostname) == 63
