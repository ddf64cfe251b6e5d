"""A real Prometheus (Debian's `/usr/bin/prometheus`, 2.42) for the local control plane.

`LocalPrometheus` discovers pods through the local kube-apiserver and scrapes those
annotated `prometheus.io/scrape: "true"` at `<podIP>:<prometheus.io/port>` (in process
mode every pod has its own loopback address).

Debian builds Prometheus without Kubernetes service discovery (`kubernetes_sd_configs`
is rejected as an unknown field), so the local setup bridges it: a small HTTP service
discovery endpoint in this process lists the pods from the apiserver and hands them to
Prometheus' `http_sd_configs` with the very `__meta_kubernetes_pod_*` labels Kubernetes
SD would produce. The relabelling rules are therefore the same ones a cluster's
Prometheus uses with `kubernetes_sd_configs` (`lepton_operator.scaling.scrape`, which
yields the labels the autoscaler's queries use: `namespace`, `pod`, `job_name` and
`generation`). It runs on a free loopback port, in its own process group, with
PR_SET_PDEATHSIG, and is stopped on exit.

    with LocalPrometheus(cluster.server, cluster.token, ca_file, workdir) as prom:
        PrometheusClient(prom.url).throughput(...)

Optionally it loads rule files (`rule_files=[...]`, evaluated every `evaluation_interval`,
by default the scrape interval) and scrapes more targets (`extra_scrape_configs=[...]`,
e.g. `static_scrape_config("lepton-operator-metrics", ["127.0.0.1:8081"])` for the
operator's own /metrics, under the job name monitoring/rules/alerts.yaml matches).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Sequence, Union

import yaml

from lepton_localcluster.procs import MARKER_ENV, child_setup, free_port
from lepton_operator.scaling.scrape import SCRAPE_JOB, relabel_configs, scrape_timeout

PROMETHEUS_BINARY = os.environ.get("LEPTON_PROMETHEUS_BINARY", "/usr/bin/prometheus")


def prometheus_binary() -> Optional[str]:
    """The Prometheus binary, or None when it is not installed (scripts/setup.sh installs it)."""
    if os.path.isfile(PROMETHEUS_BINARY) and os.access(PROMETHEUS_BINARY, os.X_OK):
        return PROMETHEUS_BINARY
    return shutil.which("prometheus")


def _meta_name(key: str) -> str:
    """Kubernetes SD's label-name sanitising: every character outside [a-zA-Z0-9_] becomes `_`."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def pod_target_groups(pods: list[dict]) -> list[dict]:
    """http_sd target groups for pods, labelled like Kubernetes SD's role=pod."""
    groups = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ip = status.get("podIP")
        if not ip or meta.get("deletionTimestamp"):
            continue
        labels = {
            "__meta_kubernetes_namespace": meta.get("namespace", ""),
            "__meta_kubernetes_pod_name": meta.get("name", ""),
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
        }
        for key, value in (meta.get("labels") or {}).items():
            labels[f"__meta_kubernetes_pod_label_{_meta_name(key)}"] = str(value)
        for key, value in (meta.get("annotations") or {}).items():
            labels[f"__meta_kubernetes_pod_annotation_{_meta_name(key)}"] = str(value)
        port = (meta.get("annotations") or {}).get("prometheus.io/port", "80")
        groups.append({"targets": [f"{ip}:{port}"], "labels": labels})
    return groups


def static_scrape_config(
    job_name: str, targets: list[str], scrape_interval: str = "1s", honor_labels: bool = True
) -> dict:
    """A scrape job of fixed `host:port` targets (for `LocalPrometheus(extra_scrape_configs=...)`).
    `honor_labels` keeps the target's own `namespace` and `job_name` labels, as the README's
    example for the operator's metrics does."""
    return {
        "job_name": job_name,
        "honor_labels": honor_labels,
        "scrape_interval": scrape_interval,
        "scrape_timeout": scrape_timeout(scrape_interval),
        "static_configs": [{"targets": list(targets)}],
    }


class _PodDiscovery:
    """An HTTP SD endpoint on loopback that lists pods from the apiserver on every request."""

    def __init__(self, api_server_url: str, token: str, ca_file: Optional[str]):
        self.api_server_url = api_server_url.rstrip("/")
        self.token = token
        self.context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl._create_unverified_context()
        discovery = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                try:
                    body = json.dumps(pod_target_groups(discovery.list_pods())).encode()
                    code = 200
                except Exception as exc:  # Prometheus keeps the last targets on an error
                    body, code = str(exc).encode(), 503
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/targets"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, name="prometheus-pod-sd", daemon=True
        )
        self.thread.start()

    def list_pods(self) -> list[dict]:
        request = urllib.request.Request(
            f"{self.api_server_url}/api/v1/pods", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, context=self.context, timeout=5) as response:
            return json.load(response).get("items", [])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LocalPrometheus:
    """Debian's Prometheus, scraping pods found through a (local) kube-apiserver."""

    def __init__(
        self,
        api_server_url: str,
        token: str,
        ca_or_insecure: Optional[str],
        workdir,
        scrape_interval: str = "1s",
        *,
        evaluation_interval: Optional[str] = None,
        rule_files: Sequence[Union[str, Path]] = (),
        extra_scrape_configs: Sequence[dict] = (),
    ):
        """`ca_or_insecure`: the apiserver's CA file, or None to skip TLS verification.
        `rule_files`: Prometheus rule files to load (read where they are), evaluated every
        `evaluation_interval` (default: the scrape interval); `extra_scrape_configs`: scrape
        jobs besides the pods' (see `static_scrape_config`)."""
        self.api_server_url = api_server_url
        self.token = token
        self.ca_file = ca_or_insecure
        self.workdir = Path(workdir)
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval or scrape_interval
        self.rule_files = [Path(path).resolve() for path in rule_files]
        self.extra_scrape_configs = [dict(config) for config in extra_scrape_configs]
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self._log = None
        self._discovery: Optional[_PodDiscovery] = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalPrometheus is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._discovery is None:
            self._discovery = _PodDiscovery(self.api_server_url, self.token, self.ca_file)
        job = {
            "job_name": SCRAPE_JOB,
            "scrape_interval": self.scrape_interval,
            "scrape_timeout": scrape_timeout(self.scrape_interval),
            # Debian's build has no kubernetes_sd_configs: the bridge serves the same labels.
            "http_sd_configs": [{"url": self._discovery.url, "refresh_interval": self.scrape_interval}],
            "relabel_configs": relabel_configs(),
        }
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.evaluation_interval},
        }
        if self.rule_files:
            config["rule_files"] = [str(path) for path in self.rule_files]
        config["scrape_configs"] = [job, *self.extra_scrape_configs]
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, timeout: float = 60.0) -> "LocalPrometheus":
        """Start Prometheus and wait until /-/ready answers; raise with its log otherwise."""
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError(f"{PROMETHEUS_BINARY} not found: install Debian's prometheus (scripts/setup.sh)")
        config = self.write_config()
        if self.port is None:  # keep the port across restarts: clients hold the URL
            self.port = free_port()
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = dict(os.environ)
        env.setdefault(MARKER_ENV, "prometheus")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=2h",
                "--web.enable-lifecycle",
                "--log.level=info",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=child_setup(None),
            env=env,
            cwd=str(self.workdir),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"prometheus not ready within {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Prometheus (SIGTERM to its process group, SIGKILL after `timeout`)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop Prometheus and the pod discovery bridge."""
        self.stop()
        if self._discovery is not None:
            self._discovery.close()
            self._discovery = None

    def restart(self) -> "LocalPrometheus":
        """Stop and start again on the same port (the TSDB survives)."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "LocalPrometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
