"""Fixtures of the integration tier: the LeptonJob CRD on the session's local cluster and
API access for tests (helpers in jobs.py)."""

from __future__ import annotations

import pytest

from lepton_localcluster.crds import install_crds
from lepton_operator.reconcile.kube import Kube


@pytest.fixture(scope="session")
def crds(local_cluster):
    """The LeptonJob CRD (as for this server's version) and kopf's peering CRDs."""
    api = local_cluster.api_client()
    install_crds(api)
    return api


@pytest.fixture
def kube(crds, local_cluster) -> Kube:
    return Kube(local_cluster.api_client())
