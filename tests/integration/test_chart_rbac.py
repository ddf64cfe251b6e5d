"""The chart's RBAC really suffices, and grants nothing it should not (docs/reliability.md, row 14).

The RBAC objects are rendered by helm from the chart, applied to a local control plane
(a real kube-apiserver with `--authorization-mode=RBAC`), and the operator runs with the
chart ServiceAccount's own identity: a token from the TokenRequest API, authenticated by
the apiserver's service-account authenticator exactly as in-cluster. No impersonation, no
admin fallback: anything the chart forgot shows up as a 403 in the operator's log.

The control plane is this module's own: its apiserver runs the
OwnerReferencesPermissionEnforcement admission plugin (OpenShift's default, off in the
session's clusters), under which every child the operator creates (ownerReference with
blockOwnerDeletion) needs `update` on `leptonjobs/finalizers`.

What the ServiceAccount may do is then read back from the apiserver (a
SelfSubjectRulesReview through its own token: what `kubectl auth can-i --list` prints)
and compared with the allowlist below, kept here apart from the chart: a verb added to or
dropped from the chart shows up as a difference.

Two modes, each matching how the chart runs the operator:
- `watchNamespaces: [ns]` -> Role + RoleBinding in ns, operator `--namespace ns`;
- default values -> ClusterRole + ClusterRoleBinding, operator `--all-namespaces`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config, utils
from kubernetes.client.rest import ApiException

from lepton_localcluster import OperatorProcess
from lepton_localcluster.crds import install_crds
from lepton_operator.api.models import GROUP, PLURAL, VERSION

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lepton-operator"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
PEERING_KINDS = {"KopfPeering": "kopfpeerings", "ClusterKopfPeering": "clusterkopfpeerings"}
JOB = "rbac"
# No fixed ports (other operators may run on this machine); peering stays on, so the
# peering rules are exercised too.
OPERATOR_ARGS = ("--liveness-port", "0", "--metrics-port", "0", "--resync-seconds", "5")
POD_LABEL = f"lepton.ai/job-name={JOB}"
OWNER_REFERENCES_ENFORCED = "--enable-admission-plugins=OwnerReferencesPermissionEnforcement"
# A cluster of this module's own whose apiserver enforces ownerReference permissions.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.own_cluster(crds=False, extra_args={"kube-apiserver": [OWNER_REFERENCES_ENFORCED]}),
]


def _triples(group: str, resources: list[str], verbs: list[str]) -> set[tuple[str, str, str]]:
    return {(group, r, v) for r in resources for v in verbs}


# What the operator may do in a namespace it manages: exactly what its code and kopf call.
IN_A_MANAGED_NAMESPACE = (
    _triples("", ["pods"], ["get", "list", "watch", "create", "delete"])
    | _triples("", ["services", "persistentvolumeclaims"], ["get", "list", "watch", "create"])
    | _triples("policy", ["poddisruptionbudgets"], ["get", "list", "watch", "create", "patch"])
    | _triples("networking.k8s.io", ["networkpolicies"], ["get", "list", "watch", "create", "patch"])
    | _triples("", ["events"], ["create"])
    | _triples("lepton.ai", ["leptonjobs"], ["get", "list", "watch", "patch", "delete"])
    | _triples("lepton.ai", ["leptonjobs/status"], ["patch"])
    | _triples("lepton.ai", ["leptonjobs/finalizers"], ["update"])
)
# Cluster-scoped, in both modes: kopf's CRD watch, the node view (read-only).
CLUSTER_READS = (
    _triples("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"])
    | _triples("", ["nodes"], ["list"])
    | _triples("scheduling.k8s.io", ["priorityclasses"], ["list"])
)
NAMESPACE_READS = _triples("", ["namespaces"], ["list", "watch"])  # namespaced mode: kopf's namespace watch
PEERING = ["get", "list", "watch", "patch"]  # the chart creates the peering object


def render_rbac(helm: str, release: str, namespace: str, values: list[str]) -> list[dict]:
    """The chart's ServiceAccount, RBAC and kopf peering objects, as helm renders them."""
    cmd = [helm, "template", release, str(CHART), "--namespace", namespace, *values]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc and doc["kind"] in (*RBAC_KINDS, *PEERING_KINDS)]


def install(k8s, objects: list[dict]) -> None:
    """Create the rendered objects as an admin (what `helm install` does)."""
    utils.create_from_yaml(k8s.api_client, yaml_objects=[o for o in objects if o["kind"] in RBAC_KINDS])
    for obj in objects:
        if obj["kind"] == "KopfPeering":
            k8s.custom.create_namespaced_custom_object(
                "kopf.dev", "v1", obj["metadata"]["namespace"], "kopfpeerings", obj
            )
        elif obj["kind"] == "ClusterKopfPeering":
            try:
                k8s.custom.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", obj)
            except ApiException as exc:
                if exc.status != 409:
                    raise


def delete_cluster_scoped(api_client, objects: list[dict]) -> None:
    rbac = client.RbacAuthorizationV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    for obj in objects:
        try:
            if obj["kind"] == "ClusterRole":
                rbac.delete_cluster_role(obj["metadata"]["name"])
            elif obj["kind"] == "ClusterRoleBinding":
                rbac.delete_cluster_role_binding(obj["metadata"]["name"])
            elif obj["kind"] == "ClusterKopfPeering":
                custom.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", obj["metadata"]["name"])
        except ApiException as exc:
            if exc.status != 404:
                raise


def ensure_crds(k8s) -> None:
    """The chart's CRDs (LeptonJob, kopf peering), installed by an admin as helm would:
    the operator itself may only read CRDs."""
    install_crds(k8s.api_client)


def service_account_kubeconfig(cluster, k8s, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig whose user is the ServiceAccount (a bound token from TokenRequest)."""
    request = k8s.core.create_namespaced_service_account_token(
        service_account, namespace, {"spec": {"expirationSeconds": 3600}}
    )
    kubeconfig = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    kubeconfig["users"] = [{"name": service_account, "user": {"token": request.status.token}}]
    for context in kubeconfig["contexts"]:
        context["context"]["user"] = service_account
    path.write_text(yaml.safe_dump(kubeconfig))
    path.chmod(0o600)
    return path


class AllNamespacesOperator(OperatorProcess):
    """The operator as the chart runs it by default: `run --all-namespaces`."""

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "lepton_operator.cli", "run", "--all-namespaces", *self.args]


def pods_of_generation(k8s, namespace: str, generation: int, count: int):
    pods = [
        p
        for p in k8s.core.list_namespaced_pod(namespace, label_selector=POD_LABEL).items
        if p.metadata.deletion_timestamp is None
    ]
    current = [p for p in pods if p.metadata.labels.get("lepton.ai/generation") == str(generation)]
    if len(pods) == count and len(current) == count and all(p.status.phase == "Running" for p in current):
        return current
    return None


def run_lifecycle(k8s, namespace: str) -> None:
    """Create a 2-worker GPU job, scale it to 3 (a new generation), delete it."""
    job = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LeptonJob",
        "metadata": {"name": JOB},
        "spec": {
            "workers": {"min": 1, "max": 3, "initial": 2},
            "resources": {"gpus": 1},
            "checkpoint": {"size": "1Gi"},  # the operator creates a PVC: that verb is exercised too
            "terminationGracePeriodSeconds": 5,
        },
    }
    k8s.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    k8s.wait_for(lambda: pods_of_generation(k8s, namespace, 1, 2), timeout=90, message="2 running workers")
    k8s.core.read_namespaced_service(f"{JOB}-workers", namespace)
    k8s.core.read_namespaced_persistent_volume_claim(f"{JOB}-checkpoints", namespace)

    # What `kubectl scale lj/rbac --replicas=3` does.
    k8s.custom.patch_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, JOB, {"spec": {"replicas": 3}})
    k8s.wait_for(
        lambda: pods_of_generation(k8s, namespace, 2, 3), timeout=180, message="3 running workers of generation 2"
    )

    def status_written():
        status = k8s.custom.get_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, JOB).get(
            "status", {}
        )
        return status.get("workerGeneration") == 2 and status.get("worldSize") == 3

    k8s.wait_for(status_written, timeout=60, message="status of generation 2 written by the operator")

    k8s.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, JOB)

    def job_gone():
        try:
            k8s.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, JOB)
        except ApiException as exc:
            return exc.status == 404
        return False

    k8s.wait_for(job_gone, timeout=60, message="the job to be deleted (finalizers released)")
    k8s.wait_for(
        lambda: not k8s.core.list_namespaced_pod(namespace, label_selector=POD_LABEL).items,
        timeout=90,
        message="the workers to be gone",
    )


# `lepton-operator run` creates its peering object without looking first; the chart has
# already created it, but the apiserver authorizes a create before it finds the conflict,
# so the operator logs a 403 where it would otherwise get 409. The fix is in the operator
# (read first, create only when missing), not in more RBAC: until then this one line is
# reported as an expected failure, and the test passes on its own once it is gone.
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+\s*")


def assert_no_forbidden(operator) -> None:
    """Fail on any RBAC denial in the operator log."""
    offending = []
    for line in operator.log_text().splitlines():
        message = TIMESTAMP.sub("", line)  # a timestamp's milliseconds may read "403"
        # kopf degrades quietly when it lacks a read ("Not enough permissions to ..."): a gap too.
        # A whole word only: the admin policy logged at start has `forbiddenMountPaths`.
        if re.search(r"\b403\b", message) or re.search(r"\bforbidden\b|not enough permissions", message, re.I):
            offending.append(line)
    assert not offending, "the operator hit RBAC denials:\n" + "\n".join(offending[:20])


def granted(identity, namespace: str) -> set[tuple[str, str, str]]:
    """What the identity may do in `namespace` (Role and ClusterRole rules alike), as the
    apiserver itself reports it to that identity, flattened to (group, resource, verb)."""
    review = client.AuthorizationV1Api(identity).create_self_subject_rules_review({"spec": {"namespace": namespace}})
    assert not review.status.incomplete, review.status.evaluation_error
    triples = set()
    for rule in review.status.resource_rules:
        assert not rule.resource_names, rule  # the chart never narrows a rule by name
        for group in rule.api_groups or []:
            triples |= _triples(group, rule.resources or [], rule.verbs)
    return triples


def every_user(k8s) -> set[tuple[str, str, str]]:
    """What any authenticated user may do (system:basic-user: review its own access)."""
    role = k8s.rbac.read_cluster_role("system:basic-user")
    return {t for rule in role.rules for group in rule.api_groups for t in _triples(group, rule.resources, rule.verbs)}


def assert_granted(identity, k8s, namespace: str, expected: set) -> None:
    actual = granted(identity, namespace) - every_user(k8s)
    assert actual == expected, (
        f"in namespace {namespace}: granted but not on the allowlist {sorted(actual - expected)}; "
        f"on the allowlist but not granted {sorted(expected - actual)}"
    )


def assert_owner_references_enforced(identity, namespace: str) -> None:
    """The admission plugin is really on: the ServiceAccount may create pods, but not one
    whose blockOwnerDeletion ownerReference points at an owner it cannot finalize."""
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "0", "blockOwnerDeletion": True}
    pod = {
        "metadata": {"name": "blocked", "ownerReferences": [owner]},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    with pytest.raises(ApiException) as refused:
        client.CoreV1Api(identity).create_namespaced_pod(namespace, pod)
    assert refused.value.status == 403 and "blockOwnerDeletion" in refused.value.body


def assert_cannot(identity, action, what: str) -> None:
    try:
        action(identity)
    except ApiException as exc:
        assert exc.status == 403, f"{what}: expected 403, got {exc.status}"
    else:
        pytest.fail(f"the operator's ServiceAccount can {what}")


def test_namespaced_role_suffices_for_a_full_lifecycle(helm, cluster, k8s, namespace, run_operator, tmp_path):
    release = f"rbac-{namespace[-5:]}"
    objects = render_rbac(helm, release, namespace, ["--set", f"watchNamespaces={{{namespace}}}"])
    assert {o["kind"] for o in objects} == {*RBAC_KINDS, "KopfPeering"}
    try:
        ensure_crds(k8s)
        install(k8s, objects)
        sa_name = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
        kubeconfig = service_account_kubeconfig(cluster, k8s, namespace, sa_name, tmp_path / "sa-kubeconfig")

        identity = config.new_client_from_config(config_file=str(kubeconfig))
        assert_owner_references_enforced(identity, namespace)

        operator = run_operator(*OPERATOR_ARGS, env={"KUBECONFIG": str(kubeconfig)})
        run_lifecycle(k8s, namespace)
        assert operator.running(), operator.log_text()[-3000:]
        assert_no_forbidden(operator)

        # And it can do no more than that: exactly the allowlist in its namespace, only the
        # cluster-scoped reads anywhere else.
        cluster_wide = CLUSTER_READS | NAMESPACE_READS
        assert_granted(
            identity,
            k8s,
            namespace,
            IN_A_MANAGED_NAMESPACE | _triples("kopf.dev", ["kopfpeerings"], PEERING) | cluster_wide,
        )
        assert_granted(identity, k8s, "kube-system", cluster_wide)

        core = client.CoreV1Api(identity)
        assert_cannot(core, lambda c: c.list_namespaced_secret(namespace), "read secrets")
        assert_cannot(core, lambda c: c.read_namespaced_secret("anything", namespace), "get a secret")
        assert_cannot(core, lambda c: c.list_namespaced_pod("default"), "list pods outside its namespace")
        assert_cannot(core, lambda c: c.list_namespaced_config_map(namespace), "read configmaps")
        assert_cannot(core, lambda c: c.patch_node("any", {"metadata": {"labels": {"x": "y"}}}), "write nodes")
        assert_cannot(
            client.ApiextensionsV1Api(identity),
            lambda c: c.delete_custom_resource_definition(f"{PLURAL}.{GROUP}"),
            "delete CRDs",
        )
        assert_cannot(
            client.RbacAuthorizationV1Api(identity),
            lambda c: c.create_namespaced_role(namespace, {"metadata": {"name": "x"}, "rules": []}),
            "create roles",
        )
    finally:
        delete_cluster_scoped(k8s.api_client, objects)


def test_cluster_role_suffices_for_a_full_lifecycle(helm, cluster, k8s, namespace, tmp_path):
    release = f"rbac-{namespace[-5:]}"
    objects = render_rbac(helm, release, namespace, [])
    assert {o["kind"] for o in objects} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    operator = None
    try:
        ensure_crds(k8s)
        install(k8s, objects)
        sa_name = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
        kubeconfig = service_account_kubeconfig(cluster, k8s, namespace, sa_name, tmp_path / "sa-kubeconfig")

        identity = config.new_client_from_config(config_file=str(kubeconfig))
        assert_owner_references_enforced(identity, namespace)

        operator = AllNamespacesOperator(
            cluster,
            namespace,
            list(OPERATOR_ARGS),
            {"KUBECONFIG": str(kubeconfig)},
            cluster.logs_dir / f"operator-all-{namespace}.log",
        )
        run_lifecycle(k8s, namespace)
        assert operator.running(), operator.log_text()[-3000:]
        assert_no_forbidden(operator)

        # Exactly the allowlist, and in every namespace alike: kube-system included (the reach
        # of cluster mode that the README's "Security model" warns about).
        everywhere = IN_A_MANAGED_NAMESPACE | _triples("kopf.dev", ["clusterkopfpeerings"], PEERING) | CLUSTER_READS
        assert_granted(identity, k8s, namespace, everywhere)
        assert_granted(identity, k8s, "kube-system", everywhere)

        core = client.CoreV1Api(identity)
        assert_cannot(core, lambda c: c.list_secret_for_all_namespaces(), "read secrets in any namespace")
        assert_cannot(core, lambda c: c.list_namespaced_secret(namespace), "read secrets")
        assert_cannot(core, lambda c: c.create_namespace({"metadata": {"name": "x"}}), "create namespaces")
    finally:
        if operator is not None:
            operator.stop()
            if sys.exc_info()[0] is not None:
                sys.stderr.write(f"\n--- operator log\n{operator.log_text()[-5000:]}\n")
        delete_cluster_scoped(k8s.api_client, objects)
