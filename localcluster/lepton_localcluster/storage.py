"""A tiny volume provisioner: without it a PVC stays Pending and its pods never schedule.

Every second it lists PersistentVolumeClaims; for each Pending claim with no volume it
creates a hostPath PersistentVolume under ``<workdir>/volumes/<namespace>/<claim>`` with
the requested capacity, the claim's access modes and storage class (or none), and a
``claimRef`` to the claim. The real PV controller (in kube-controller-manager) then binds
the two. Volumes are ``Retain``; when their claim is gone (``Released``) the provisioner
deletes the PV object (the directory stays until the cluster's workdir is removed).
In process mode the simulated kubelet maps a pod's claim to the same directory.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from kubernetes import client
from kubernetes.client.rest import ApiException

PROVISIONED_LABEL = "lepton.ai/simulated-provisioner"


def volume_dir(volumes_root: Path, namespace: str, claim: str) -> Path:
    """Host directory backing a claim."""
    return Path(volumes_root) / namespace / claim


class SimulatedProvisioner:
    """Creates a PersistentVolume for every pending claim (see module docstring)."""

    def __init__(self, api_factory, volumes_root: Path, interval: float = 0.5) -> None:
        self.api = client.CoreV1Api(api_factory())
        self.volumes_root = Path(volumes_root)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lepton-provisioner", daemon=True)

    def start(self) -> None:
        """Start the polling thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the polling thread."""
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception:  # apiserver restarting or gone: try again next tick
                pass
            self._stop.wait(self.interval)

    def sync_once(self) -> None:
        """Provision pending claims and drop released volumes once."""
        claims = self.api.list_persistent_volume_claim_for_all_namespaces(_preload_content=False)
        for pvc in json.loads(claims.data)["items"]:
            spec, status = pvc["spec"], pvc.get("status", {})
            if status.get("phase", "Pending") == "Pending" and not spec.get("volumeName"):
                self._provision(pvc)
        volumes = json.loads(
            self.api.list_persistent_volume(label_selector=f"{PROVISIONED_LABEL}=true", _preload_content=False).data
        )
        for pv in volumes["items"]:
            if pv.get("status", {}).get("phase") == "Released":
                try:
                    self.api.delete_persistent_volume(pv["metadata"]["name"])
                except ApiException as e:
                    if e.status != 404:
                        raise

    def _provision(self, pvc: dict) -> None:
        meta, spec = pvc["metadata"], pvc["spec"]
        ns, name = meta["namespace"], meta["name"]
        path = volume_dir(self.volumes_root, ns, name)
        path.mkdir(parents=True, exist_ok=True)
        storage = spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")
        body = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": f"pvc-{meta['uid']}",
                "labels": {PROVISIONED_LABEL: "true"},
                "annotations": {"pv.kubernetes.io/provisioned-by": "lepton.ai/simulated"},
            },
            "spec": {
                "capacity": {"storage": str(storage)},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": spec.get("storageClassName") or "",
                "volumeMode": spec.get("volumeMode") or "Filesystem",
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": ns,
                    "name": name,
                    "uid": meta["uid"],
                },
            },
        }
        try:
            self.api.create_persistent_volume(body)
        except ApiException as e:
            if e.status != 409:  # already provisioned on an earlier tick
                raise
