"""Command lines of the local control plane by Kubernetes version, and where the binaries
come from (the envtest layout: etcd and kube-apiserver only).

Newer binaries (setup-envtest's) refuse flags 1.20 needs: a flag passed to a version
that no longer has it stops the component at start, so each version gets exactly the
flags it knows."""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton_localcluster import binaries, flags
from lepton_localcluster.binaries import BinariesUnavailable, SchedulerUnavailable

pytestmark = pytest.mark.unit


def apiserver(version):
    return flags.apiserver_args(
        version,
        etcd_url="http://127.0.0.1:2379",
        cert_dir=Path("/w/pki"),
        port=6443,
        sa_key=Path("/w/pki/sa.key"),
        token_file=Path("/w/pki/tokens.csv"),
    )


def scheduler(version):
    return flags.scheduler_args(version, kubeconfig=Path("/w/kubeconfig"))


def controller_manager(version):
    return flags.controller_manager_args(version, kubeconfig=Path("/w/kubeconfig"), sa_key=Path("/w/pki/sa.key"))


@pytest.mark.parametrize(
    "text, version",
    [
        ("Kubernetes v1.20.2", (1, 20)),
        ("Kubernetes v1.30.0\n", (1, 30)),
        ("Kubernetes v1.28.3-rc.1+k3s1", (1, 28)),
        ("Kubernetes v1.20.2-dirty", (1, 20)),
    ],
)
def test_version_is_read_from_the_version_output(text, version):
    assert flags.parse_version(text) == version


def test_output_without_a_version_is_an_error():
    with pytest.raises(ValueError, match="no Kubernetes version"):
        flags.parse_version("Kubernetes unknown")


@pytest.mark.parametrize("version", [(1, 20), (1, 21), (1, 22), (1, 23)])
def test_until_1_23_scheduler_and_controller_manager_turn_their_insecure_port_off(version):
    # 1.20's serve plain HTTP on 10251 and 10252 unless told 0: two clusters would clash.
    assert "--port=0" in scheduler(version) and "--port=0" in controller_manager(version)


@pytest.mark.parametrize("version", [(1, 20), (1, 23), (1, 24), (1, 28), (1, 30), (1, 31)])
def test_the_apiserver_never_gets_the_insecure_port_flag(version):
    # no effect since 1.20 (insecure serving was removed then), unknown from 1.24 on
    assert not any(a.startswith(("--insecure-port", "--insecure-bind-address")) for a in apiserver(version))


@pytest.mark.parametrize("version", [(1, 24), (1, 28), (1, 30), (1, 31)])
def test_from_1_24_the_removed_port_flags_are_not_passed(version):
    for args in (scheduler(version), controller_manager(version)):
        assert not any(a.startswith(("--port=", "--address=")) for a in args), args


@pytest.mark.parametrize("version", [(1, 20), (1, 28), (1, 30)])
def test_what_every_version_gets(version):
    api = apiserver(version)
    assert api[0] == "kube-apiserver"
    assert {
        "--secure-port=6443",
        "--bind-address=127.0.0.1",
        "--authorization-mode=RBAC",
        "--etcd-servers=http://127.0.0.1:2379",
        "--token-auth-file=/w/pki/tokens.csv",
        "--service-account-signing-key-file=/w/pki/sa.key",
    } <= set(api)
    assert scheduler(version)[0] == "kube-scheduler" and "--secure-port=0" in scheduler(version)
    cm = controller_manager(version)
    assert cm[0] == "kube-controller-manager" and "--secure-port=0" in cm
    # The node lifecycle controller runs (node loss as in a real cluster), with short timings.
    assert "--controllers=*,-serviceaccount-token" in cm and "--node-monitor-grace-period=16s" in cm
    assert api == apiserver((1, 20))  # the apiserver gets the same flags everywhere


def test_versions_older_than_1_20_are_refused_with_the_reason():
    for build in (apiserver, scheduler, controller_manager):
        with pytest.raises(ValueError, match=r"v1\.19 is older than v1\.20"):
            build((1, 19))


def test_etcd_args_name_its_data_dir_and_urls():
    args = flags.etcd_args(Path("/w/etcd"), "http://127.0.0.1:1", "http://127.0.0.1:2")
    assert args[0] == "etcd" and "--data-dir=/w/etcd" in args
    assert "--listen-client-urls=http://127.0.0.1:1" in args and "--initial-cluster=default=http://127.0.0.1:2" in args


# ------------------------------------------------------------------- binaries lookup


def _bin_dir(path: Path, names) -> Path:
    path.mkdir()
    for name in names:
        (path / name).write_text("#!/bin/sh\n")
        (path / name).chmod(0o755)
    return path


@pytest.fixture
def envtest(tmp_path, monkeypatch) -> Path:
    """setup-envtest's layout in KUBEBUILDER_ASSETS; an empty cache."""
    assets = _bin_dir(tmp_path / "envtest", ["etcd", "kube-apiserver", "kubectl"])
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    monkeypatch.setenv("LEPTON_K8S_CACHE", str(tmp_path / "cache"))
    return assets


def test_envtest_assets_serve_an_api_only_cluster(envtest):
    assert binaries.find_binaries(api_only=True) == envtest
    assert binaries.ensure_binaries(build=False, api_only=True) == envtest


def test_envtest_assets_asked_for_a_full_cluster_say_what_they_lack(envtest):
    expected = (
        f"KUBEBUILDER_ASSETS={envtest} has no kube-scheduler/kube-controller-manager "
        "(setup-envtest ships etcd and kube-apiserver only)"
    )
    with pytest.raises(SchedulerUnavailable) as info:
        binaries.ensure_binaries(build=False)  # also: no build is tried in its place
    assert str(info.value) == expected
    with pytest.raises(SchedulerUnavailable):
        binaries.find_binaries()


def test_assets_without_the_apiserver_are_refused_for_both(tmp_path, monkeypatch):
    assets = _bin_dir(tmp_path / "partial", ["etcd"])
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    for api_only in (True, False):
        with pytest.raises(BinariesUnavailable, match="lacks kube-apiserver") as info:
            binaries.find_binaries(api_only=api_only)
        assert not isinstance(info.value, SchedulerUnavailable)


def test_complete_assets_serve_both(tmp_path, monkeypatch):
    assets = _bin_dir(tmp_path / "full", binaries.ALL_BINARIES)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    assert binaries.find_binaries() == assets == binaries.find_binaries(api_only=True)


def test_without_assets_the_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    cache = _bin_dir(tmp_path / "cache", binaries.ALL_BINARIES)
    monkeypatch.setenv("LEPTON_K8S_CACHE", str(cache))
    assert binaries.find_binaries() == cache == binaries.find_binaries(api_only=True)


def test_a_directory_given_directly_is_checked_the_same_way(tmp_path):
    d = _bin_dir(tmp_path / "d", binaries.API_BINARIES)
    assert binaries.require_binaries(d, api_only=True) == d
    with pytest.raises(SchedulerUnavailable, match=f"^{d} has no kube-scheduler/kube-controller-manager"):
        binaries.require_binaries(d)
