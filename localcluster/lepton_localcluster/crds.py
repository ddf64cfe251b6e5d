"""Install the project's CRDs on a cluster (tests, the demo, `local up`).

One place for what every caller needs: the LeptonJob CRD as this server takes it
(`crd_for_server`: no CEL rules before 1.25) and kopf's peering CRDs, created or replaced,
then waited for until the API serves them (discovery lags `Established` a moment).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from lepton_operator.api.crd import crd_for_server

PEERING_CRDS = Path(__file__).resolve().parents[2] / "crds" / "kopf-peering.yaml"  # the repository root


def install_crd(api_client: client.ApiClient, crd: dict, timeout: float = 30.0) -> None:
    """Create or replace one CRD and wait until its resource is served."""
    ext = client.ApiextensionsV1Api(api_client)
    name = crd["metadata"]["name"]
    try:
        ext.create_custom_resource_definition(crd)
    except ApiException as e:
        if e.status != 409:
            raise
        body = copy.deepcopy(crd)
        body["metadata"]["resourceVersion"] = ext.read_custom_resource_definition(name).metadata.resource_version
        ext.replace_custom_resource_definition(name, body)
    group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
    version = crd["spec"]["versions"][0]["name"]
    custom = client.CustomObjectsApi(api_client)
    deadline = time.monotonic() + timeout
    while True:
        try:
            custom.list_cluster_custom_object(group, version, plural, limit=1)
            return
        except ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def install_crds(api_client: client.ApiClient) -> None:
    """The LeptonJob CRD for this server's version and kopf's peering CRDs."""
    version = client.VersionApi(api_client).get_code().git_version
    install_crd(api_client, crd_for_server(version))
    for crd in yaml.safe_load_all(PEERING_CRDS.read_text()):
        install_crd(api_client, crd)
