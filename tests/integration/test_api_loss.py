"""Row 7 of docs/reliability.md: the operator rides out an API that stops serving its
resource for a while, and acts on what changed meanwhile.

After an apiserver restart, a LIST or watch that arrives before the CRDs are served again
gets `404 page not found`, which a bare kopf treats as fatal (reconcile/supervise.py);
that race is too short to hit on purpose, and deleting the CRD does not reproduce it
(kopf observes CRDs and stops its watcher gracefully). So the operator talks to the
apiserver through a fault-injecting proxy (`lepton_localcluster.faultproxy.FaultProxy`)
that answers the LeptonJob group with that 404 for a while and breaks the open watches, as
a restart does. The module runs
on a cluster of its own, so that nothing else shares its operator's faults and metrics.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest
from jobs import FAST, create_job, job_body, running, wait
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

from lepton_localcluster.faultproxy import FaultProxy
from lepton_localcluster.procs import free_port
from lepton_operator.api.models import GROUP, PLURAL, VERSION

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster()]

_MERGE = "application/merge-patch+json"


@pytest.fixture
def proxy(module_cluster):
    with FaultProxy(module_cluster) as proxy:
        yield proxy


def _metric(port: int, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def _operator_through(proxy, run_operator):
    """The operator with its requests through the proxy, metrics on a port of its own."""
    metrics_port = free_port()
    fast = list(FAST)
    fast[fast.index("--metrics-port") + 1] = str(metrics_port)
    return run_operator(*fast, "--bind-address", "127.0.0.1", env=proxy.env()), metrics_port


def test_the_operator_rides_out_its_resource_unserved_and_acts_on_changes_made_meanwhile(
    kube, k8s, namespace, run_operator, proxy
):
    op, metrics_port = _operator_through(proxy, run_operator)
    create_job(kube, namespace, job_body("survivor"))
    wait(k8s, running(kube, namespace, "survivor", 2, 1), 40, "Running with 2 workers", op)
    assert any(r.path.startswith(f"/apis/{GROUP}/") for r in proxy.requests), "the operator bypassed the proxy"

    # The LeptonJob group answers 404 for 15 s and every watch breaks, as after an apiserver
    # restart: kopf's watch of LeptonJobs reconnects into the 404 (fatal to a bare kopf).
    fault = proxy.fail(rf"^/apis/{re.escape(GROUP)}/", 404, seconds=15)
    assert proxy.break_streams() >= 1
    op.wait_for_log(f"watching {PLURAL}", timeout=30)
    # A change made during the fault, straight on the cluster.
    scale = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/survivor/scale"
    kube.request("PATCH", scale, body={"spec": {"replicas": 3}}, content_type=_MERGE)
    time.sleep(max(0.0, fault.until - time.monotonic()))
    assert any(r.status == 404 and r.path.startswith(f"/apis/{GROUP}/") for r in proxy.requests)
    assert op.running(), op.log_text()[-3000:]

    wait(k8s, running(kube, namespace, "survivor", 3, 2), 90, "3 workers in generation 2 after the fault", op)
    create_job(kube, namespace, job_body("after"))
    wait(k8s, running(kube, namespace, "after", 2), 60, "a job created after the fault Running", op)
    assert op.running(), op.log_text()[-3000:]
    # The watch recovered by itself: the reactor never stopped.
    assert _metric(metrics_port, "lepton_operator_reactor_restarts_total") == 0.0
    assert "the operator lost the API" not in op.log_text()


def test_an_operator_started_while_its_resource_is_unserved_waits_then_serves_it(
    kube, k8s, namespace, run_operator, proxy
):
    # kopf discovers resources once, at its start: a group answering 404 then would be
    # taken as empty for good. The operator waits until the API serves LeptonJobs.
    fault = proxy.fail(rf"^/apis/{re.escape(GROUP)}/", 404, seconds=10)
    op, _ = _operator_through(proxy, run_operator)
    op.wait_for_log(f"waiting until the API serves {PLURAL}.{GROUP}", timeout=30)
    create_job(kube, namespace, job_body("early"))  # straight on the cluster, during the fault
    time.sleep(max(0.0, fault.until - time.monotonic()))
    wait(k8s, running(kube, namespace, "early", 2), 90, "the job created during the fault Running", op)
    assert op.running(), op.log_text()[-3000:]


def _watch(api: client.CoreV1Api, resource_version: str, events: list, ended: dict) -> None:
    """Read a namespace watch through the proxy line by line until it ends."""
    resp = api.list_namespace(
        watch=True, resource_version=resource_version, timeout_seconds=120, _preload_content=False
    )
    buffer = b""
    try:
        for chunk in resp.stream(4096, decode_content=True):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            events.extend(json.loads(line) for line in lines if line.strip())
        ended["how"] = "eof"
    except Urllib3Error as e:  # the connection was cut mid-stream
        ended["how"] = type(e).__name__
    finally:
        resp.release_conn()


def test_the_fault_proxy_forwards_fails_on_demand_breaks_watches_and_records(module_cluster, proxy):
    api = client.CoreV1Api(config.new_client_from_config(config_file=str(proxy.kubeconfig)))
    listed = api.list_namespace()
    assert "default" in {ns.metadata.name for ns in listed.items}

    fault = proxy.fail(r"^/api/v1/namespaces(\?|$)", 404, seconds=2)
    with pytest.raises(ApiException) as refused:
        api.list_namespace()
    assert refused.value.status == 404
    assert refused.value.body == "404 page not found\n"
    assert api.read_namespace("default").metadata.name == "default"  # another path is not failed
    time.sleep(max(0.0, fault.until - time.monotonic()) + 0.1)
    assert "default" in {ns.metadata.name for ns in api.list_namespace().items}

    proxy.fail(r"^/api/v1/namespaces(\?|$)", 503, seconds=30)
    with pytest.raises(ApiException) as unavailable:
        api.list_namespace()
    assert unavailable.value.status == 503
    assert json.loads(unavailable.value.body)["reason"] == "ServiceUnavailable"
    proxy.clear_faults()

    # Watches stream through the proxy, and break_streams() ends them: cut (default) or clean.
    direct = client.CoreV1Api(module_cluster.api_client())
    for abort, how in ((True, {"ProtocolError"}), (False, {"eof"})):
        events: list = []
        ended: dict = {}
        rv = api.list_namespace().metadata.resource_version
        reader = threading.Thread(target=_watch, args=(api, rv, events, ended), daemon=True)
        reader.start()
        name = f"proxy-watch-{int(abort)}-{time.monotonic_ns() % 100000}"
        direct.create_namespace({"metadata": {"name": name}})
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(e["object"]["metadata"]["name"] == name for e in events):
                time.sleep(0.1)
            assert any(e["type"] == "ADDED" and e["object"]["metadata"]["name"] == name for e in events), events
            assert proxy.break_streams(abort=abort) >= 1
            reader.join(10)
            assert not reader.is_alive(), "the watch did not end when its stream was broken"
            assert ended.get("how") in how, ended
        finally:
            direct.delete_namespace(name)

    paths = [(r.method, r.path.split("?")[0], r.status) for r in proxy.requests]
    assert ("GET", "/api/v1/namespaces", 200) in paths
    assert ("GET", "/api/v1/namespaces", 404) in paths
    assert ("GET", "/api/v1/namespaces", 503) in paths
    assert ("GET", "/api/v1/namespaces/default", 200) in paths
    watches = [r for r in proxy.requests if "watch=true" in r.path]
    assert len(watches) == 2 and all(r.status == 200 for r in watches), watches
    times = [r.time for r in proxy.requests]
    assert times == sorted(times) and times[-1] <= time.monotonic()
