"""Fixtures of the integration tier: the LeptonJob CRD on the session's local cluster and
API access for tests (helpers in jobs.py)."""

from __future__ import annotations

import pytest

from lepton_localcluster.crds import install_crds
from lepton_localcluster.pytest_plugin import OWN_CLUSTER
from lepton_operator.reconcile.kube import Kube


@pytest.fixture(scope="session")
def crds(local_cluster):
    """The LeptonJob CRD (as for this server's version) and kopf's peering CRDs."""
    api = local_cluster.api_client()
    install_crds(api)
    return api


@pytest.fixture
def kube(request, cluster) -> Kube:
    """API access to the test's cluster, straight to its apiserver; a module's own cluster
    (`own_cluster`) has the CRDs from its start, the session's gets them here."""
    if request.node.get_closest_marker(OWN_CLUSTER) is None:
        request.getfixturevalue("crds")
    return Kube(cluster.api_client())
