"""Helpers of the kind end-to-end suite: find the tools, run them, create or reuse a cluster.

Nothing here is a fixture; tests/e2e/conftest.py wires these into pytest. Every command
runs with a timeout and its output captured, so a hung docker or kubectl fails a test
with the command and its output instead of stalling the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIND_CONFIG = ROOT / "kind-config.yaml"
PROMETHEUS_MANIFEST = Path(__file__).resolve().parent / "prometheus.yaml"
CHART = ROOT / "charts" / "lepton-operator"
VERSION = "0.1.0"
OPERATOR_IMAGE = f"lepton-ai/lepton-operator:{VERSION}"
TRAINER_IMAGE = f"lepton-ai/lepton-trainer:{VERSION}"  # api.models.DEFAULT_TRAINER_IMAGE
OPERATOR_DOCKERFILE = ROOT / "operator" / "Dockerfile"
TRAINER_DOCKERFILE = ROOT / "trainer_image" / "Dockerfile"
OPERATOR_NAMESPACE = "lepton-system"
MONITORING_NAMESPACE = "lepton-monitoring"
PROMETHEUS_URL = f"http://prometheus.{MONITORING_NAMESPACE}.svc:9090"
RELEASE = "lepton-operator"


class CommandFailed(AssertionError):
    """A command exited non-zero; the message carries the command and its output."""


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


def run(
    cmd: list[str], *, timeout: float = 300, check: bool = True, input: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command, capture its output, fail with both when it fails."""
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(
            f"timed out after {timeout}s: {' '.join(cmd)}\n{exc.stdout or ''}{exc.stderr or ''}"
        ) from None
    if check and proc.returncode != 0:
        raise CommandFailed(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def missing_prerequisite() -> str | None:
    """Why the kind tier cannot run here (every reason, joined), or None when it can."""
    reasons = [f"`{tool}` is not on PATH" for tool in ("docker", "kind", "kubectl") if shutil.which(tool) is None]
    if shutil.which("docker") is not None:
        try:
            info = subprocess.run(
                ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
            )
        except subprocess.TimeoutExpired:
            reasons.append("`docker info` timed out (no reachable Docker daemon)")
        else:
            if info.returncode != 0:
                detail = [line for line in (info.stderr or info.stdout).strip().splitlines() if line.strip()]
                reasons.append(f"`docker info` failed: {detail[-1] if detail else 'no Docker daemon'}")
    return "; ".join(reasons) or None


def ensure_helm() -> str:
    """The pinned helm from scripts/helm.py (installed on first use)."""
    spec = importlib.util.spec_from_file_location("lepton_helm_installer", ROOT / "scripts" / "helm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ensure_helm()


@dataclass
class KindCluster:
    """A kind cluster this suite created (and deletes) or reuses (and leaves)."""

    name: str
    kubeconfig: Path
    created: bool
    helm: str = ""
    log: list[str] = field(default_factory=list)

    @classmethod
    def create_or_reuse(cls, workdir: Path) -> "KindCluster":
        """Reuse `$LEPTON_KIND_CLUSTER` if set (it must exist), else create one from kind-config.yaml."""
        kubeconfig = workdir / "kubeconfig"
        reuse = os.environ.get("LEPTON_KIND_CLUSTER")
        existing = run(["kind", "get", "clusters"], timeout=60).stdout.split()
        if reuse:
            if reuse not in existing:
                raise CommandFailed(f"LEPTON_KIND_CLUSTER={reuse} but kind has only: {existing}")
            name, created = reuse, False
        else:
            name, created = f"lepton-e2e-{uuid.uuid4().hex[:6]}", True
            run(
                [
                    "kind",
                    "create",
                    "cluster",
                    "--name",
                    name,
                    "--config",
                    str(KIND_CONFIG),
                    "--kubeconfig",
                    str(kubeconfig),
                    "--wait",
                    "180s",
                ],
                timeout=600,
            )
        kubeconfig.write_text(run(["kind", "get", "kubeconfig", "--name", name], timeout=60).stdout)
        return cls(name=name, kubeconfig=kubeconfig, created=created)

    def delete(self) -> None:
        if self.created and not truthy(os.environ.get("LEPTON_KIND_KEEP")):
            run(["kind", "delete", "cluster", "--name", self.name], timeout=300, check=False)

    # -- tools bound to this cluster

    def kubectl(self, *args: str, timeout: float = 120, check: bool = True, input: str | None = None) -> str:
        return run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args], timeout=timeout, check=check, input=input
        ).stdout

    def kubectl_json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def helm_cmd(self, *args: str, timeout: float = 600) -> str:
        return run([self.helm, "--kubeconfig", str(self.kubeconfig), *args], timeout=timeout).stdout

    def load_image(self, image: str) -> None:
        run(["kind", "load", "docker-image", image, "--name", self.name], timeout=900)

    def prometheus_query(self, promql: str) -> list[dict]:
        """Instant query through the API server's service proxy (no port-forward needed)."""
        from urllib.parse import quote

        path = (
            f"/api/v1/namespaces/{MONITORING_NAMESPACE}/services/prometheus:9090/proxy"
            f"/api/v1/query?query={quote(promql, safe='')}"
        )
        body = json.loads(self.kubectl("get", "--raw", path))
        assert body.get("status") == "success", body
        return body["data"]["result"]

    def diagnostics(self, namespaces: list[str]) -> str:
        """Everything worth reading after a failure: objects, events, descriptions, pod logs."""
        parts = []

        def section(title: str, *args: str) -> None:
            out = run(["kubectl", "--kubeconfig", str(self.kubeconfig), *args], timeout=60, check=False)
            parts.append(f"===== {title}\n{out.stdout}{out.stderr}")

        section("nodes", "get", "nodes", "-o", "wide")
        section("leptonjobs", "get", "leptonjobs", "-A", "-o", "yaml")
        for ns in namespaces:
            section(f"{ns}: objects", "-n", ns, "get", "all,pvc,leptonjobs", "-o", "wide")
            section(f"{ns}: events", "-n", ns, "get", "events", "--sort-by=.lastTimestamp")
            section(f"{ns}: pods described", "-n", ns, "describe", "pods")
            pods = run(
                [
                    "kubectl",
                    "--kubeconfig",
                    str(self.kubeconfig),
                    "-n",
                    ns,
                    "get",
                    "pods",
                    "-o",
                    "jsonpath={.items[*].metadata.name}",
                ],
                timeout=60,
                check=False,
            ).stdout.split()
            for pod in pods:
                section(f"{ns}/{pod}: logs", "-n", ns, "logs", pod, "--all-containers", "--tail=200")
                section(
                    f"{ns}/{pod}: previous logs", "-n", ns, "logs", pod, "--all-containers", "--previous", "--tail=100"
                )
        return "\n".join(parts)


def wait_until(predicate, *, timeout: float, interval: float = 3.0, what: str):
    """Poll `predicate` until it returns something truthy; fail with `what` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except CommandFailed as exc:  # transient: a pod not yet there, a proxy not yet ready
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last}")
