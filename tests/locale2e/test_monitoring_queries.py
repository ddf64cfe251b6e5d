"""Every query of monitoring/ against a real Prometheus (issue 16).

promtool (tests/unit/test_monitoring_rules.py, tests/unit/test_dashboard.py) proves the
rules and the dashboard's queries parse and do what their unit tests say on made-up
series. This proves them on the real thing: the local control plane in process mode, one
LeptonJob (2 workers x 1 GPU, fixed size) that really trains (torchrun, DDP on CPU, the
trainer's own model and data), the operator with its cluster allocator, and Debian's
Prometheus scraping the workers (pod discovery) and the operator's /metrics (a static
target under the job name `lepton-operator-metrics`, `honor_labels: true`: the README's
set-up without the Prometheus operator), loading recording.yaml and alerts.yaml, evaluated
every 2 s (the rules' windows as written).

While the job trains:

(a) every expression of recording.yaml and alerts.yaml, and every query of the dashboard
    (panel targets, annotations, and the variables' label_values() selectors) with
    `$namespace`, `$job` and Grafana's built-ins put in as tests/unit/test_dashboard.py
    puts them (one job, two, All), answers `success` without warnings from the query API
    (instant, and for the dashboard also over a range as Grafana asks), and Prometheus
    reports every loaded rule healthy;
(b) the per-job series are there for this job, with the values the cluster has:
    throughput, steps/s, world size, generation, progress, GPUs held, the allocator's
    target, samples per GPU-second, the cluster's GPUs; the dashboard's Throughput and
    World size panels and its variables list this job;
(c) no alert fires. None is expected to: every alert but LeptonWorkerRestartsFrequent
    waits 1 minute or more (`for:`) and the healthy job gives the latter no restarts.
    During start-up some are pending for a moment, all of them held 10 minutes or more
    before they fire: LeptonOperatorDown (before the operator's first scrape),
    LeptonOperatorReconcileStalled and LeptonJobMetricsMissing (before a rate has two
    samples) were seen; LeptonJobNoProgress (before the first step) and
    LeptonJobsWaitingForCapacity (workers Pending) may be. Once the job trains, none is
    even pending.

Prometheus missing: the test fails in CI (CI=true) and skips locally, with the reason.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

from lepton_localcluster.crds import install_crds
from lepton_localcluster.procs import free_port, free_port_pair
from lepton_localcluster.prometheus import LocalPrometheus, static_scrape_config
from lepton_localcluster.pytest_plugin import require_prometheus, wait_for_idle_gpus
from lepton_operator.api.models import API_VERSION, GROUP, KIND, PLURAL, VERSION

pytestmark = [pytest.mark.locale2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "rules"
RULE_FILES = [RULES / "recording.yaml", RULES / "alerts.yaml"]
# alerts.yaml matches the operator's scrape job by `job=~".*lepton-operator-metrics"`.
OPERATOR_SCRAPE_JOB = "lepton-operator-metrics"
EVALUATION_INTERVAL = "2s"
JOB = "qtrain"
WORKERS = 2
GPUS_PER_WORKER = 1
GPU = "nvidia.com/gpu"


def _settled() -> float:
    """A moment 3 s back: the rule evaluation (every 2 s) before it has written every rule."""
    return time.time() - 3


def _unit_test_module(name: str):
    """A module of tests/unit (its helpers, not its tests): test_dashboard imports its
    siblings by their bare names, as pytest's rootdir-less import puts them on the path."""
    unit = str(ROOT / "tests" / "unit")
    if unit not in sys.path:
        sys.path.insert(0, unit)
    return importlib.import_module(name)


dashboard = _unit_test_module("test_dashboard")


def _substitute(expr: str, namespace: str, job: str) -> str:
    """Grafana's substitution as test_dashboard does it, for this namespace and job."""
    values = {"namespace": namespace, "job": job, **dashboard.BUILTINS}
    return dashboard.VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), m.group(0)), expr)


def _rule_expressions() -> dict[str, str]:
    found = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule.get("alert")
                found[f"{path.name} {group['name']} {name}"] = rule["expr"]
    return found


def _alert_names() -> set[str]:
    groups = yaml.safe_load((RULES / "alerts.yaml").read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"]}


class PromAPI:
    """The bits of Prometheus' HTTP API this test reads (answers with their errors kept)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:  # 400/422/503 carry the error as JSON
            body = err.read().decode(errors="replace")
            try:
                return json.loads(body)
            except ValueError:
                return {"status": "error", "errorType": f"HTTP {err.code}", "error": body}

    def query(self, expr: str, at: float | None = None) -> dict:
        return self.get("/api/v1/query", query=expr, **({} if at is None else {"time": at}))

    def query_range(self, expr: str, seconds: int = 60, step: int = 5) -> dict:
        end = time.time()
        return self.get("/api/v1/query_range", query=expr, start=end - seconds, end=end, step=step)

    def vector(self, expr: str, at: float | None = None) -> list[dict]:
        answer = self.query(expr, at)
        assert answer.get("status") == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single sample's value, or None when there is none (two fail the test)."""
        result = self.vector(expr, at)
        assert len(result) <= 1, f"{expr}: more than one series: {result}"
        return float(result[0]["value"][1]) if result else None

    def label_values(self, label: str, selector: str) -> list[str]:
        answer = self.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
        assert answer.get("status") == "success", f"label_values({selector}, {label}): {answer}"
        return answer["data"]

    def alerts(self) -> list[dict]:
        answer = self.get("/api/v1/alerts")
        assert answer.get("status") == "success", answer
        return answer["data"]["alerts"]


def _job_body() -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": JOB},
        "spec": {
            "image": "lepton-ai/lepton-trainer:0.1.0",
            "workers": {"min": WORKERS, "max": WORKERS},
            "nprocPerNode": 1,
            "resources": {"gpus": GPUS_PER_WORKER, "cpu": "1", "memory": "2Gi"},
            "env": [
                # Trains for as long as the test looks; the test deletes it.
                {"name": "LEPTON_MAX_STEPS", "value": "1000000"},
                {"name": "LEPTON_LOG_EVERY_SECONDS", "value": "5"},
                {"name": "OMP_NUM_THREADS", "value": "1"},
            ],
            # 3 (the default), said here: at 1 LeptonJobRestartsNearlyExhausted would fire.
            "restart": {"maxRestarts": 3},
            # torch's TCPStore binds every interface: no fixed port in process mode.
            "rendezvousPort": free_port_pair(),
            "terminationGracePeriodSeconds": 10,
        },
    }


def _cluster_gpus(k8s) -> int:
    """What the allocator hands out: allocatable GPUs of Ready, schedulable nodes."""
    total = 0
    for node in k8s.core.list_node().items:
        ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        if ready and not node.spec.unschedulable:
            total += int((node.status.allocatable or {}).get(GPU, 0))
    return total


def test_every_rule_and_dashboard_query_answers_on_a_real_prometheus_while_a_job_trains(
    process_cluster, k8s, namespace, run_operator, tmp_path
):
    require_prometheus()
    install_crds(process_cluster.api_client())
    wait_for_idle_gpus(k8s)  # a namespaced operator cannot see an earlier test's pods
    operator_port = free_port()
    prom = LocalPrometheus(
        process_cluster.server,
        process_cluster.token,
        str(process_cluster.ca_file),
        tmp_path / "prom",
        evaluation_interval=EVALUATION_INTERVAL,
        rule_files=RULE_FILES,
        extra_scrape_configs=[static_scrape_config(OPERATOR_SCRAPE_JOB, [f"127.0.0.1:{operator_port}"])],
    )
    operator = None
    job_created = False
    try:
        prom.start()
        api = PromAPI(prom.url)
        operator = run_operator(
            "--prometheus-url",
            prom.url,
            "--metrics-port",
            str(operator_port),
            "--bind-address",
            "127.0.0.1",
            "--liveness-port",
            "0",
            "--allocator-interval-seconds",
            "2",
        )
        k8s.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _job_body())
        job_created = True
        sel = f'namespace="{namespace}", job_name="{JOB}"'
        seen_states: dict[str, set[str]] = {}  # alert name -> states seen while waiting

        def watch_alerts() -> list[dict]:
            active = api.alerts()
            for alert in active:
                seen_states.setdefault(alert["labels"]["alertname"], set()).add(alert["state"])
            return active

        def status() -> dict:
            obj = k8s.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, JOB)
            return obj.get("status") or {}

        def training() -> bool:
            watch_alerts()
            return (
                status().get("phase") == "Running"
                and (api.value(f"namespace_job_name:lepton_trainer_samples:rate5m{{{sel}}}") or 0) > 0
                # 3 s back: an evaluation that has surely written all of its group's rules.
                and api.value(f"namespace_job_name:lepton_trainer_samples_per_gpu_second:rate5m{{{sel}}}", _settled())
                is not None
                and api.value(f"namespace_job_name:lepton_trainer_progress:ratio{{{sel}}}") is not None
            )

        def explain(what):
            def message():
                st = status()
                return (
                    f"{what}: job {st.get('phase')} size {st.get('worldSize')} gen {st.get('workerGeneration')} "
                    f"{st.get('message')}\nalerts seen: {seen_states}\nprometheus:\n{prom.log_tail(15)}\n"
                    f"operator:\n{operator.log_text()[-2500:]}"
                )

            return message

        k8s.wait_for(training, 180, 2, explain("the job training and its recorded series in Prometheus"))

        # ---- (a) every expression answers success on the real Prometheus.
        failures = []
        for where, expr in _rule_expressions().items():
            answer = api.query(expr)
            if answer.get("status") != "success" or answer.get("warnings"):
                failures.append(f"{where}: {expr}\n  -> {answer}")
        variants = {"one-job": JOB, "two-jobs": f"({JOB}|other)", "all-jobs": ".+"}
        for variant, job in variants.items():
            for where, expr in dashboard._expressions().items():
                concrete = _substitute(expr, namespace if variant != "all-jobs" else ".+", job)
                for kind, answer in (("instant", api.query(concrete)), ("range", api.query_range(concrete))):
                    if answer.get("status") != "success" or answer.get("warnings"):
                        failures.append(f"dashboard {where} [{variant}, {kind}]: {concrete}\n  -> {answer}")
        assert not failures, "queries Prometheus refused:\n" + "\n".join(failures)

        rules = api.get("/api/v1/rules")
        assert rules.get("status") == "success", rules
        loaded = [rule for group in rules["data"]["groups"] for rule in group["rules"]]
        assert len(loaded) == len(_rule_expressions()), [r["name"] for r in loaded]
        unhealthy = [f"{r['name']}: {r.get('health')} {r.get('lastError')}" for r in loaded if r["health"] != "ok"]
        assert not unhealthy, unhealthy

        # ---- (b) the per-job series hold this job's numbers.
        st = status()
        assert st["worldSize"] == WORKERS, st
        throughput = api.value(f"namespace_job_name:lepton_trainer_samples:rate5m{{{sel}}}")
        assert throughput and throughput > 0
        assert (api.value(f"namespace_job_name:lepton_trainer_steps:rate5m{{{sel}}}") or 0) > 0
        assert api.value(f"namespace_job_name:lepton_trainer_world_size:max{{{sel}}}") == WORKERS
        generation = api.value(f"namespace_job_name:lepton_trainer_generation:max{{{sel}}}")
        assert generation == st["workerGeneration"] >= 1, (generation, st)
        progress = api.value(f"namespace_job_name:lepton_trainer_progress:ratio{{{sel}}}")
        assert progress is not None and 0 < progress < 1, progress
        assert api.value(f"namespace_job_name:lepton_operator_job_gpus:max{{{sel}}}") == WORKERS * GPUS_PER_WORKER
        assert api.value(f"namespace_job_name:lepton_operator_job_allocated_workers:max{{{sel}}}") == WORKERS
        # Both recorded by each evaluation of one group, with its timestamp: read a few
        # seconds back (both of one evaluation surely written), per GPU is throughput / GPUs.
        per_gpu = api.value(
            f"namespace_job_name:lepton_trainer_samples_per_gpu_second:rate5m{{{sel}}}"
            f" / on (namespace, job_name) namespace_job_name:lepton_trainer_samples:rate5m{{{sel}}}",
            at=_settled(),
        )
        assert per_gpu == pytest.approx(1 / (WORKERS * GPUS_PER_WORKER)), per_gpu
        assert api.value(":lepton_operator_cluster_gpus:max") == _cluster_gpus(k8s)
        assert api.value(":lepton_operator_job_gpus:sum") == WORKERS * GPUS_PER_WORKER
        assert api.value('phase:lepton_operator_jobs:max{phase="Running"}') == 1
        assert api.value(f'up{{job="{OPERATOR_SCRAPE_JOB}"}}') == 1

        # The dashboard with this job picked: its Throughput and World size panels show
        # this job, one series per query, and its variables list it.
        panels = {p["title"]: p for p in dashboard._panels()}
        for title in ("Throughput", "World size and generation"):
            for target in panels[title]["targets"]:
                expr = _substitute(target["expr"], namespace, JOB)
                result = api.vector(expr)
                assert [(s["metric"].get("namespace"), s["metric"].get("job_name")) for s in result] == [
                    (namespace, JOB)
                ], f"{title}: {expr}: {result}"
                if "world_size" in expr:
                    assert float(result[0]["value"][1]) == WORKERS, result
        exprs = dashboard._expressions()
        for name, label in (("namespace", "namespace"), ("job", "job_name")):
            selector = _substitute(exprs[f"variable {name}"], namespace, JOB)
            listed = api.label_values(label, selector)
            assert (namespace if name == "namespace" else JOB) in listed, (selector, listed)

        # ---- (c) no alert fires; once the job trains none is even pending.
        def quiet():
            return not watch_alerts()

        k8s.wait_for(quiet, 30, 2, lambda: f"no active alert; active: {api.alerts()}")
        firing = {name for name, states in seen_states.items() if "firing" in states}
        assert not firing, seen_states
        assert set(seen_states) <= _alert_names(), seen_states
    finally:
        if job_created:
            # The operator still running: it and the garbage collector stop the workers.
            try:
                k8s.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, JOB)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and _live_pods(k8s, namespace):
                    time.sleep(1)
            except ApiException:
                pass
        if operator is not None:
            operator.stop()
        prom.close()


def _live_pods(k8s, namespace: str) -> list[str]:
    pods = k8s.core.list_namespaced_pod(namespace, label_selector=f"lepton.ai/job-name={JOB}").items
    return [p.metadata.name for p in pods if p.status.phase not in ("Succeeded", "Failed")]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
