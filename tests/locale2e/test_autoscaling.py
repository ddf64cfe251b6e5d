"""Autoscaling against real components: the local control plane in process mode, Debian's
Prometheus discovering pods through the local apiserver, and (when the operator's `run`
subcommand is registered) the operator rescaling a job whose workers run the trainer in
synthetic mode with a throughput curve.

Prometheus missing: the tests fail in CI (CI=true) and skip locally, with the reason.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest

from lepton_localcluster.crds import install_crds
from lepton_localcluster.procs import free_port_pair
from lepton_localcluster.prometheus import LocalPrometheus
from lepton_localcluster.pytest_plugin import require_prometheus
from lepton_operator.api.conditions import CONDITION_METRICS_UNAVAILABLE
from lepton_operator.api.models import API_VERSION, GROUP, KIND, PLURAL, VERSION
from lepton_operator.scaling.prometheus import MetricsError, PrometheusClient

pytestmark = [pytest.mark.locale2e, pytest.mark.timeout(600)]

DOWNWARD_ENV = [
    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
]

# A stand-in worker: serves the trainer's metric names, samples growing at RATE/s.
EXPORTER = textwrap.dedent("""
    import os, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    RATE = float(os.environ["RATE"]); T0 = time.time()
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = (f"lepton_trainer_samples_total {RATE * (time.time() - T0)}\\n"
                    f"lepton_trainer_world_size {os.environ['WORLD']}\\n").encode()
            self.send_response(200); self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    HTTPServer((os.environ["POD_IP"], 9400), H).serve_forever()
""")


def _exporter_pod(name, job, generation, rate, world):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"lepton.ai/job-name": job, "lepton.ai/generation": str(generation)},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9400"},
        },
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["python", "-c", EXPORTER],
                    "env": [
                        *DOWNWARD_ENV,
                        {"name": "RATE", "value": str(rate)},
                        {"name": "WORLD", "value": str(world)},
                    ],
                }
            ],
        },
    }


def _poll(fn, timeout, interval=1.0, message="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except MetricsError as exc:
            last = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {message} (last: {last})")


def test_prometheus_scrapes_workers_with_the_labels_the_autoscaler_queries(process_cluster, k8s, namespace, tmp_path):
    require_prometheus()
    for i in range(2):
        k8s.core.create_namespaced_pod(namespace, _exporter_pod(f"demo-worker-{i}", "demo", 1, 50, 2))
    k8s.core.create_namespaced_pod(namespace, _exporter_pod("other-worker-0", "other", 1, 1000, 1))
    prom = LocalPrometheus(
        process_cluster.server, process_cluster.token, str(process_cluster.ca_file), tmp_path / "prom"
    )
    try:
        prom.start()
        client = PrometheusClient(prom.url, timeout=3)
        _poll(
            lambda: client.reporting_workers(namespace, "demo", now=time.time(), generation=1) == 2,
            90,
            message=f"both workers scraped\n{prom.log_tail()}",
        )
        time.sleep(6)  # a full rate window of both
        sample = client.throughput(namespace, "demo", 5, now=time.time(), generation=1)
        assert 80 <= sample.value <= 120, sample  # 2 workers x 50 samples/s, the other job excluded
        with pytest.raises(MetricsError) as err:  # another generation: nothing
            client.throughput(namespace, "demo", 5, now=time.time(), generation=2)
        assert err.value.kind == "empty"
        with pytest.raises(MetricsError) as err:  # injection stays a literal: no match
            client.throughput(namespace, 'demo"} or vector(1) or x{a="', 5, now=time.time())
        assert err.value.kind == "empty"
        with pytest.raises(MetricsError) as err:  # namespace pinned
            client.throughput("elsewhere", "demo", 5, now=time.time())
        assert err.value.kind == "empty"

        prom.stop()
        with pytest.raises(MetricsError) as err:
            client.throughput(namespace, "demo", 5, now=time.time())
        assert err.value.kind == "connection"
        prom.start()
        _poll(
            lambda: client.throughput(namespace, "demo", 5, now=time.time(), generation=1),
            90,
            message="throughput after a Prometheus restart",
        )
    finally:
        prom.close()


# --------------------------------------------------------------- with the operator

# Knee at 4 (threshold 0.5): the 5th and 6th workers add almost nothing.
PACE_CURVE = {"1": 40, "2": 78, "3": 115, "4": 150, "5": 152, "6": 153}
KNEE = 4


@pytest.fixture(scope="session")
def crds(process_cluster):
    """The LeptonJob CRD as for this server's version, installed once."""
    install_crds(process_cluster.api_client())


def _job(name, lo, hi, curve, gpus=0, rendezvous_port=None):
    # torch's TCPStore binds every interface: a fixed port would clash with any other
    # process-mode job on this machine (another test session, the demo).
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "args": ["--synthetic", "--pace-curve", json.dumps(curve)],
            "env": [{"name": "LEPTON_MAX_STEPS", "value": "1000000"}],
            "workers": {"min": lo, "max": hi},
            "resources": {"gpus": gpus},
            "nprocPerNode": 1,
            "rendezvousPort": rendezvous_port or free_port_pair(),
            "terminationGracePeriodSeconds": 10,
            "autoscaling": {
                "enabled": True,
                "intervalSeconds": 5,
                "windowSeconds": 10,
                "warmupSeconds": 15,
                "cooldownSeconds": 10,
                "efficiencyThreshold": 0.5,
                "maxRescalesPerHour": 20,
                "capacityTimeoutSeconds": 15,
                "capacityBackoffSeconds": 600,
            },
        },
    }


def _status(k8s, namespace, name) -> dict:
    obj = k8s.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return obj.get("status") or {}


def _condition(status, type_):
    return next((c for c in status.get("conditions", []) if c["type"] == type_), None)


def test_operator_converges_to_the_knee_holds_and_survives_prometheus_outage(
    process_cluster, crds, k8s, namespace, run_operator, tmp_path
):
    require_prometheus()
    prom = LocalPrometheus(
        process_cluster.server, process_cluster.token, str(process_cluster.ca_file), tmp_path / "prom"
    )
    prom.start()
    operator = None
    try:
        operator = run_operator(
            "--prometheus-url", prom.url, "--metrics-port", "0", "--liveness-port", "0", "--no-allocator"
        )
        k8s.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _job("knee", 1, 6, PACE_CURVE))

        def at_knee():
            st = _status(k8s, namespace, "knee")
            decision = (st.get("autoscaling") or {}).get("lastDecision") or {}
            return (
                st.get("phase") == "Running"
                and st.get("worldSize") == KNEE
                and decision.get("reason", "").startswith("AtKnee")
                and st
            )

        _poll(at_knee, 420, 2, message=f"the job to settle at {KNEE} workers\n{operator.log_text()[-3000:]}")
        # Holds there: no new generation for a while.
        generation = _status(k8s, namespace, "knee")["workerGeneration"]
        time.sleep(30)
        st = _status(k8s, namespace, "knee")
        assert st["worldSize"] == KNEE and st["workerGeneration"] == generation, st.get("autoscaling")
        assert st["autoscaling"]["lastDecision"]["target"] == KNEE

        prom.stop()
        _poll(
            lambda: (
                (_condition(_status(k8s, namespace, "knee"), CONDITION_METRICS_UNAVAILABLE) or {}).get("status")
                == "True"
            ),
            60,
            2,
            message="MetricsUnavailable=True",
        )
        st = _status(k8s, namespace, "knee")
        assert st["worldSize"] == KNEE and st["workerGeneration"] == generation  # held, not scaled down
        prom.start()
        _poll(
            lambda: (
                (_condition(_status(k8s, namespace, "knee"), CONDITION_METRICS_UNAVAILABLE) or {}).get("status")
                == "False"
            ),
            90,
            2,
            message="MetricsUnavailable=False after Prometheus returned",
        )
        assert _status(k8s, namespace, "knee")["worldSize"] == KNEE
    finally:
        if operator is not None:
            operator.stop()
        prom.close()


def test_scale_up_without_capacity_keeps_the_running_generation(
    process_cluster, crds, k8s, namespace, run_operator, tmp_path
):
    """GPUs for 3 workers, a curve that wants 6: the job stays at 3, untouched, and says why."""
    require_prometheus()
    from lepton_localcluster import SimulatedNode

    # A node of its own with GPUs for exactly 3 one-GPU workers; the job may run nowhere else.
    node = SimulatedNode(name=f"cap3-{namespace}"[:63], gpus=3, labels={"lepton.ai/test-pool": namespace})
    process_cluster.add_node(node)
    linear = {str(n): 40 * n for n in range(1, 7)}
    prom = LocalPrometheus(
        process_cluster.server, process_cluster.token, str(process_cluster.ca_file), tmp_path / "prom"
    )
    prom.start()
    operator = None
    try:
        operator = run_operator(
            "--prometheus-url", prom.url, "--metrics-port", "0", "--liveness-port", "0", "--no-allocator"
        )
        body = _job("capped", 1, 6, linear, gpus=1)
        body["spec"]["workers"]["initial"] = 3
        body["spec"]["nodeSelector"] = {"lepton.ai/test-pool": namespace}
        k8s.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        _poll(lambda: _status(k8s, namespace, "capped").get("phase") == "Running", 180, 2, message="Running at 3")
        generation = _status(k8s, namespace, "capped")["workerGeneration"]

        def refused():
            st = _status(k8s, namespace, "capped")
            cond = _condition(st, "Rescaling") or {}
            return cond.get("reason") == "InsufficientCapacity" and st

        st = _poll(refused, 240, 2, message=f"InsufficientCapacity\n{operator.log_text()[-3000:]}")
        assert st["worldSize"] == 3 and st["workerGeneration"] == generation
        assert st["autoscaling"].get("backoffUntil")
        time.sleep(20)  # in backoff: the running generation stays untouched
        st = _status(k8s, namespace, "capped")
        assert st["worldSize"] == 3 and st["workerGeneration"] == generation and st["phase"] == "Running"
        assert k8s.events(namespace, "capped", "InsufficientCapacity")
    finally:
        if operator is not None:
            operator.stop()
        prom.close()
        process_cluster.remove_node(node.name)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
