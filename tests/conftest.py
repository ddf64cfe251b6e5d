"""Shared pytest configuration: the local control-plane fixtures (local_cluster,
process_cluster, cluster, namespace, k8s, run_operator) come from the plugin below;
`helm` is the pinned helm binary (scripts/helm.py installs it from PyPI)."""

import importlib.util
import os
from pathlib import Path

import pytest

pytest_plugins = ["lepton_localcluster.pytest_plugin"]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of helm; fails in CI and skips elsewhere (with the reason) when it cannot be had."""
    spec = importlib.util.spec_from_file_location("lepton_helm_installer", ROOT / "scripts" / "helm.py")
    installer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installer)
    try:
        return installer.ensure_helm()
    except installer.HelmUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"helm is required in CI and could not be installed: {exc}")
        pytest.skip(f"helm unavailable: {exc}")
