"""The envtest convention for real: ``KUBEBUILDER_ASSETS`` pointing at setup-envtest's
layout, a directory with etcd and kube-apiserver only (here: links to the real binaries).

An API-only cluster runs from it and serves the LeptonJob API; asking it for a full
cluster says, before starting anything, that the scheduler and controller-manager are
missing; and the pytest fixtures run API-only tests from it while skipping (failing
under CI=true) those that need a scheduler, with that reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kubernetes import client

from lepton_localcluster import LocalCluster, SchedulerUnavailable, ensure_binaries, marked_processes
from lepton_localcluster.crds import install_crd
from lepton_operator.api.crd import crd_for_server
from lepton_operator.api.models import API_VERSION, GROUP, KIND, PLURAL, VERSION, parse_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MISSING = "has no kube-scheduler/kube-controller-manager (setup-envtest ships etcd and kube-apiserver only)"


@pytest.fixture
def envtest_assets(k8s_api_binaries, tmp_path, monkeypatch) -> Path:
    """A setup-envtest-like directory (etcd, kube-apiserver) as KUBEBUILDER_ASSETS."""
    assets = tmp_path / "envtest"
    assets.mkdir()
    for name in ("etcd", "kube-apiserver"):
        (assets / name).symlink_to((k8s_api_binaries / name).resolve())
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    return assets


def test_api_only_cluster_runs_from_envtest_assets_and_serves_leptonjobs(envtest_assets):
    assert ensure_binaries(build=False, api_only=True) == envtest_assets
    with LocalCluster(api_only=True) as cluster:  # binaries found through KUBEBUILDER_ASSETS
        assert cluster.binaries == envtest_assets
        assert set(cluster.process_ids()) == {"etcd", "kube-apiserver"}
        api = cluster.api_client()
        install_crd(api, crd_for_server(client.VersionApi(api).get_code().git_version))
        client.CoreV1Api(api).create_namespace({"metadata": {"name": "envtest"}})
        custom = client.CustomObjectsApi(api)
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": "train"},
            "spec": {"workers": {"min": 1, "max": 4}},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, "envtest", PLURAL, body)
        stored = custom.get_namespaced_custom_object(GROUP, VERSION, "envtest", PLURAL, "train")
        assert stored["spec"]["workers"] == {"min": 1, "max": 4, "replicas": 0}  # defaulted by the server
        assert parse_job("train", stored["spec"]).workers.max == 4
        assert client.CoreV1Api(api).list_node().items == []  # no nodes: nothing would run pods
        cluster_id = cluster.cluster_id
    assert marked_processes(cluster_id) == []


def test_full_cluster_from_envtest_assets_says_it_needs_scheduler_and_controller_manager(envtest_assets):
    expected = f"KUBEBUILDER_ASSETS={envtest_assets} {MISSING}"
    with pytest.raises(SchedulerUnavailable) as info:
        ensure_binaries(build=False)
    assert str(info.value) == expected

    cluster = LocalCluster()
    with pytest.raises(SchedulerUnavailable) as info:
        cluster.start()
    assert str(info.value) == expected
    assert cluster.process_ids() == {} and marked_processes(cluster.cluster_id) == []  # nothing started

    with pytest.raises(SchedulerUnavailable) as info:
        LocalCluster(binaries=envtest_assets).start()  # the same check for a directory given directly
    assert str(info.value) == f"{envtest_assets} {MISSING}"


PLUGIN_TESTS = """
def test_api(api_cluster, k8s, namespace):
    k8s.core.create_namespaced_config_map(namespace, {"metadata": {"name": "cm"}, "data": {"k": "v"}})
    assert k8s.core.read_namespaced_config_map("cm", namespace).data == {"k": "v"}

def test_needs_scheduler(local_cluster):
    pass
"""


def _run_pytest(tmp_path: Path, assets: Path, *args: str, ci: str = "") -> subprocess.CompletedProcess:
    (tmp_path / "test_plugin_envtest.py").write_text(textwrap.dedent(PLUGIN_TESTS))
    env = dict(os.environ, KUBEBUILDER_ASSETS=str(assets), CI=ci)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "lepton_localcluster.pytest_plugin",
            "-p",
            "no:cacheprovider",
            "-rs",
            "-q",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_plugin_envtest.py"),
            *args,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_fixtures_run_api_tests_from_envtest_assets_and_skip_the_rest_with_the_reason(envtest_assets, tmp_path):
    run = _run_pytest(tmp_path, envtest_assets)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "1 passed, 1 skipped" in out, out
    assert f"KUBEBUILDER_ASSETS={envtest_assets} {MISSING}: this test needs them" in out, out


def test_under_ci_a_test_that_needs_the_scheduler_fails_instead(envtest_assets, tmp_path):
    run = _run_pytest(tmp_path, envtest_assets, "-k", "needs_scheduler", ci="true")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "1 error" in out and "CI=true, so this fails" in out, out
    assert f"{MISSING}: this test needs them" in out, out
