"""Fixtures of the kind end-to-end tier (marker `kind`).

Session order: prerequisites -> cluster (created, or reused from $LEPTON_KIND_CLUSTER) ->
images built and loaded -> Prometheus from tests/e2e/prometheus.yaml -> the chart
installed (namespace labelled Pod Security "restricted") -> tests.

Where Docker, kind or kubectl is missing, every test skips with the reason (`pytest -rs`
prints it). With LEPTON_KIND_REQUIRED=1 (a CI lane that has Docker) it fails instead, so
the tier can never pass by not running. On a failed test the cluster's objects, events and
pod logs are attached to the report.

Environment:
  LEPTON_KIND_CLUSTER=name   reuse this kind cluster (left in place afterwards)
  LEPTON_KIND_KEEP=1         keep a cluster the suite created (for debugging)
  LEPTON_E2E_SKIP_BUILD=1    do not docker build; load the images already tagged
  LEPTON_KIND_REQUIRED=1     fail instead of skip when the prerequisites are missing
"""

from __future__ import annotations

import os

import kindlib
import pytest
from kindlib import (
    CHART,
    MONITORING_NAMESPACE,
    OPERATOR_DOCKERFILE,
    OPERATOR_IMAGE,
    OPERATOR_NAMESPACE,
    PROMETHEUS_MANIFEST,
    PROMETHEUS_URL,
    RELEASE,
    ROOT,
    TRAINER_DOCKERFILE,
    TRAINER_IMAGE,
    KindCluster,
    run,
    truthy,
)

E2E_NAMESPACE = "lepton-e2e"
_active: dict[str, KindCluster] = {}


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e is the kind tier, marked or not."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.kind)


@pytest.fixture(scope="session")
def kind_prerequisites():
    reason = kindlib.missing_prerequisite()
    if reason:
        if truthy(os.environ.get("LEPTON_KIND_REQUIRED")):
            pytest.fail(f"kind tier required (LEPTON_KIND_REQUIRED) but cannot run: {reason}", pytrace=False)
        pytest.skip(f"kind end-to-end skipped: {reason}")


@pytest.fixture(scope="session")
def kind_cluster(kind_prerequisites, tmp_path_factory):
    cluster = KindCluster.create_or_reuse(tmp_path_factory.mktemp("kind"))
    cluster.helm = kindlib.ensure_helm()
    _active["cluster"] = cluster
    try:
        yield cluster
    finally:
        _active.pop("cluster", None)
        cluster.delete()


@pytest.fixture(scope="session")
def images(kind_cluster):
    """Build the operator and trainer images (context: the repository) and load them into kind."""
    for image, dockerfile in ((OPERATOR_IMAGE, OPERATOR_DOCKERFILE), (TRAINER_IMAGE, TRAINER_DOCKERFILE)):
        if not truthy(os.environ.get("LEPTON_E2E_SKIP_BUILD")):
            if not dockerfile.is_file():
                pytest.fail(f"{dockerfile.relative_to(ROOT)} is missing; cannot build {image}", pytrace=False)
            run(["docker", "build", "-f", str(dockerfile), "-t", image, str(ROOT)], timeout=1800)
        kind_cluster.load_image(image)
    return [OPERATOR_IMAGE, TRAINER_IMAGE]


@pytest.fixture(scope="session")
def prometheus(kind_cluster):
    kind_cluster.kubectl("apply", "-f", str(PROMETHEUS_MANIFEST))
    kind_cluster.kubectl(
        "-n", MONITORING_NAMESPACE, "rollout", "status", "deployment/prometheus", "--timeout=300s", timeout=330
    )
    return PROMETHEUS_URL


@pytest.fixture(scope="session")
def operator_release(kind_cluster, images, prometheus):
    """The chart installed as a user would, into a namespace that enforces "restricted"."""
    cluster = kind_cluster
    cluster.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    cluster.kubectl(
        "label", "--overwrite", "namespace", OPERATOR_NAMESPACE, "pod-security.kubernetes.io/enforce=restricted"
    )
    repository, tag = OPERATOR_IMAGE.rsplit(":", 1)
    cluster.helm_cmd(
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--set",
        f"image.repository={repository}",
        "--set",
        f"image.tag={tag}",
        "--set",
        "image.pullPolicy=IfNotPresent",
        "--set",
        f"prometheus.url={prometheus}",
        # Prometheus runs in its own namespace: the per-job and the operator's NetworkPolicies
        # (kindnet enforces them) let it scrape and be reached there.
        "--set",
        f"networkPolicy.prometheusNamespaces={{{MONITORING_NAMESPACE}}}",
        "--wait",
        "--timeout",
        "5m",
    )
    cluster.kubectl("wait", "--for=condition=Established", "crd/leptonjobs.lepton.ai", "--timeout=60s")
    try:
        yield RELEASE
    finally:
        cluster.helm_cmd("uninstall", RELEASE, "--namespace", OPERATOR_NAMESPACE, "--wait", timeout=300)


@pytest.fixture(scope="session")
def e2e_namespace(kind_cluster, operator_release):
    """Namespace for the jobs; Pod Security "restricted" is enforced, so worker pods must comply."""
    kind_cluster.kubectl("create", "namespace", E2E_NAMESPACE, check=False)
    kind_cluster.kubectl(
        "label", "--overwrite", "namespace", E2E_NAMESPACE, "pod-security.kubernetes.io/enforce=restricted"
    )
    try:
        yield E2E_NAMESPACE
    finally:
        kind_cluster.kubectl(
            "delete", "namespace", E2E_NAMESPACE, "--wait=true", "--timeout=180s", check=False, timeout=200
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failed kind test, attach the cluster's objects, events and logs to the report."""
    outcome = yield
    report = outcome.get_result()
    cluster = _active.get("cluster")
    if report.failed and cluster is not None and "kind" in item.keywords:
        try:
            text = cluster.diagnostics([E2E_NAMESPACE, OPERATOR_NAMESPACE, MONITORING_NAMESPACE])
        except Exception as exc:  # diagnostics must never hide the real failure
            text = f"could not collect diagnostics: {exc}"
        report.sections.append(("kind cluster diagnostics", text[-60000:]))
