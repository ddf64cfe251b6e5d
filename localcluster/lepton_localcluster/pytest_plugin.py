"""pytest fixtures for the local control plane.

Register with ``pytest_plugins = ["lepton_localcluster.pytest_plugin"]``.

How a test says what it needs: a test that only talks to the API server (CRDs, schema
validation, defaulting, RBAC; pods stay Pending) requests ``api_cluster``, which runs
etcd and kube-apiserver only, so it also runs from setup-envtest's ``KUBEBUILDER_ASSETS``.
Everything else (``local_cluster``, ``process_cluster``, ``k8s_binaries``, and ``cluster``,
``namespace``, ``k8s``, ``run_operator`` when the test requests no ``api_cluster``) needs
the scheduler and controller-manager too.

Fixtures:

``k8s_binaries`` (session)
    Directory with the four binaries (built into the cache on first use).
``k8s_api_binaries`` (session)
    Directory with etcd and kube-apiserver (the same as ``k8s_binaries`` unless
    ``KUBEBUILDER_ASSETS`` holds these two only).
``api_cluster`` (session)
    An API-only :class:`LocalCluster` (etcd + kube-apiserver; no nodes, no kubelet).
``local_cluster`` (session)
    A :class:`LocalCluster` in default kubelet mode (2 nodes x 8 GPUs).
``process_cluster`` (session)
    A :class:`LocalCluster` in process mode; the trainer image
    (``lepton-ai/lepton-trainer:0.1.0`` and ``lepton-trainer``) runs
    ``python -m lepton_trainer``.
``module_cluster`` (module)
    A module's own :class:`LocalCluster` (nodes or apiserver flags of its own, or faults
    the shared cluster must not see), for a module marked
    ``pytest.mark.own_cluster(**kwargs)``: the keyword arguments of :func:`own_cluster`.
``cluster`` (function)
    The cluster the test uses: ``module_cluster`` in a module marked ``own_cluster``, else
    ``process_cluster`` when the test requests it, else ``api_cluster`` when it requests
    that, else ``local_cluster``. ``namespace``, ``k8s`` and ``run_operator`` follow it.
``namespace`` (function)
    A fresh namespace, deleted after the test.
``k8s`` (function)
    :class:`K8s`: typed API objects (``core``, ``apps``, ``custom``, ``apiext``, ``rbac``,
    ``coordination``, ``api_client``) plus ``wait_for`` and small helpers.
``run_operator`` (function)
    Factory: ``run_operator(*extra_args, env=None, namespace=None)`` starts
    ``python -m lepton_operator.cli run --namespace <ns> ...`` with ``KUBECONFIG`` set, in
    its own process group, logging to a file; returns an
    :class:`~lepton_localcluster.operator_process.OperatorProcess` (``stop()``,
    ``kill()``, ``restart()``, ``log_text()``, ``wait_for_log()``). Every operator started
    is stopped after the test.

When the control-plane binaries cannot be had (e.g. ``KUBEBUILDER_ASSETS`` has no
scheduler for a test that needs one), the cluster fixtures fail with the reason if ``CI``
is set to a true value, and skip with the reason otherwise. Set ``LEPTON_K8S_NO_BUILD=1``
to forbid building them from source during a test run.

At the end of the session the plugin checks that no process of a cluster it started
(control plane, pods, operators) is still alive; if one is, it is killed and the session
fails.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from . import procs
from .binaries import BinariesUnavailable, SchedulerUnavailable, ensure_binaries
from .controlplane import LocalCluster
from .crds import install_crds
from .operator_process import OperatorProcess

_started_clusters: list[str] = []


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str):
    if _truthy(os.environ.get("CI")):
        pytest.fail(f"local control plane unavailable (CI=true, so this fails): {reason}", pytrace=False)
    pytest.skip(f"local control plane unavailable: {reason}")


def _progress(config):
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")

    def progress(line: str) -> None:
        # Building takes minutes the first time: show it even with output captured.
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"[localcluster] {line}")

    return progress


def _binaries(request, api_only: bool) -> Path:
    try:
        return ensure_binaries(
            progress=_progress(request.config),
            build=not _truthy(os.environ.get("LEPTON_K8S_NO_BUILD")),
            api_only=api_only,
        )
    except SchedulerUnavailable as e:
        reason = f"{e}: this test needs them"
    except BinariesUnavailable as e:
        reason = str(e)
    _unavailable(reason)  # outside the handler: the report shows the reason, not a chain


@pytest.fixture(scope="session")
def k8s_binaries(request) -> Path:
    """Directory with the four control-plane binaries (built once if needed); fails under
    CI=true, skips otherwise, when they cannot be had. Use it for extra LocalClusters."""
    return _binaries(request, api_only=False)


@pytest.fixture(scope="session")
def k8s_api_binaries(request) -> Path:
    """Directory with etcd and kube-apiserver, for extra API-only LocalClusters."""
    return _binaries(request, api_only=True)


def _start_cluster(request, api_only: bool = False, **kwargs) -> LocalCluster:
    binaries = request.getfixturevalue("k8s_api_binaries" if api_only else "k8s_binaries")
    cluster = LocalCluster(binaries=binaries, progress=_progress(request.config), api_only=api_only, **kwargs)
    _started_clusters.append(cluster.cluster_id)
    try:
        cluster.start()
    except Exception as e:
        cluster.stop()
        _unavailable(f"the cluster did not start: {e}")
    return cluster


@contextmanager
def own_cluster(request, crds: bool = True, **kwargs) -> Iterator[LocalCluster]:
    """A LocalCluster of the calling module's own (for a module-scoped fixture: nodes or
    apiserver flags of its own, or faults the shared cluster must not see), with the CRDs
    installed unless `crds=False`; stopped afterwards, failing if it left a process behind."""
    cluster = _start_cluster(request, **kwargs)
    try:
        if crds:
            install_crds(cluster.api_client())
        yield cluster
    finally:
        cluster.stop()
        assert cluster.leftover_processes() == [], f"cluster {cluster.cluster_id} left processes behind"


@pytest.fixture(scope="session")
def api_cluster(request):
    """Session-wide API-only cluster: etcd + kube-apiserver, no scheduler or nodes."""
    cluster = _start_cluster(request, api_only=True)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def local_cluster(request):
    """Session-wide local cluster, default kubelet mode."""
    cluster = _start_cluster(request)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def process_cluster(request):
    """Session-wide local cluster whose pods run as local processes."""
    cluster = _start_cluster(request, kubelet_mode="process")
    yield cluster
    cluster.stop()


OWN_CLUSTER = "own_cluster"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{OWN_CLUSTER}(**kwargs): the module runs on a LocalCluster of its own (own_cluster's arguments)"
    )


@pytest.fixture(scope="module")
def module_cluster(request) -> Iterator[LocalCluster]:
    """The LocalCluster of a module marked own_cluster, started with the marker's arguments."""
    marker = request.node.get_closest_marker(OWN_CLUSTER)
    if marker is None:
        raise pytest.UsageError(
            f"module_cluster needs `pytestmark = pytest.mark.{OWN_CLUSTER}(...)` in {request.module.__name__}"
        )
    with own_cluster(request, **marker.kwargs) as cluster:
        yield cluster


@pytest.fixture
def cluster(request) -> LocalCluster:
    """The cluster of this test: the module's own if it is marked own_cluster, else
    process_cluster or api_cluster if requested, else local_cluster."""
    if request.node.get_closest_marker(OWN_CLUSTER) is not None:
        return request.getfixturevalue("module_cluster")
    for name in ("process_cluster", "api_cluster"):
        if name in request.fixturenames:
            return request.getfixturevalue(name)
    return request.getfixturevalue("local_cluster")


class K8s:
    """Typed API objects on one cluster, plus helpers tests keep needing."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.api_client = cluster.api_client()
        self.core = client.CoreV1Api(self.api_client)
        self.apps = client.AppsV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.apiext = client.ApiextensionsV1Api(self.api_client)
        self.rbac = client.RbacAuthorizationV1Api(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)

    @staticmethod
    def wait_for(predicate, timeout: float = 30, interval: float = 0.2, message="condition"):
        """Poll ``predicate`` until it returns a truthy value; return it or fail the test.

        ``message`` is a string, or a callable that builds one at the timeout (to report the
        state the test was waiting on)."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except ApiException as e:
                last_error = e
            time.sleep(interval)
        pytest.fail(
            f"timed out after {timeout} s waiting for {message() if callable(message) else message}"
            + (f" (last error: {last_error})" if last_error else "")
        )

    def pod(self, namespace: str, name: str):
        """The pod, or None if it does not exist."""
        try:
            return self.core.read_namespaced_pod(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def events(self, namespace: str, involved_name: str | None = None, reason: str | None = None) -> list:
        """Events in a namespace, optionally for one object and one reason."""
        items = self.core.list_namespaced_event(namespace).items
        return [
            e
            for e in items
            if (involved_name is None or e.involved_object.name == involved_name)
            and (reason is None or e.reason == reason)
        ]


def require_prometheus() -> None:
    """Skip the test without Debian's prometheus (fail under CI=true, where setup installs it)."""
    from .prometheus import prometheus_binary

    if prometheus_binary() is None:
        reason = "Debian's prometheus is not installed (scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def wait_for_idle_gpus(k8s: K8s, timeout: float = 120) -> None:
    """Wait until no live pod of the cluster requests GPUs (an earlier test's namespace is
    deleted without waiting: its pods may still hold GPUs for a while)."""

    def idle():
        pods = k8s.core.list_pod_for_all_namespaces().items
        return not [
            p
            for p in pods
            if p.status.phase not in ("Succeeded", "Failed")
            and any((c.resources.limits or {}).get("nvidia.com/gpu") for c in p.spec.containers)
        ]

    k8s.wait_for(idle, timeout, 1.0, "pods of earlier tests to release their GPUs")


class GpuSampler:
    """Samples a namespace's pods in a thread while in its `with` block: the GPUs requested
    by live pods (terminating ones included) against `capacity`, and any pod the scheduler
    found unschedulable. `violations` lists every breach seen; `peak` the most GPUs."""

    def __init__(self, k8s: K8s, namespace: str, capacity: int, interval: float = 0.5) -> None:
        self.k8s, self.namespace, self.capacity, self.interval = k8s, namespace, capacity, interval
        self.peak = 0
        self.samples = 0
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                pods = self.k8s.core.list_namespaced_pod(self.namespace).items
            except Exception:  # an apiserver hiccup: sample again
                continue
            live = [p for p in pods if p.status.phase not in ("Succeeded", "Failed")]
            gpus = sum(
                int((c.resources.limits or {}).get("nvidia.com/gpu", 0)) for p in live for c in p.spec.containers
            )
            self.samples += 1
            self.peak = max(self.peak, gpus)
            if gpus > self.capacity:
                self.violations.append(f"{gpus} GPUs requested > {self.capacity}")
            for p in live:
                for c in p.status.conditions or []:
                    if c.type == "PodScheduled" and c.reason == "Unschedulable":
                        self.violations.append(f"{p.metadata.name} unschedulable: {c.message}")


@pytest.fixture
def k8s(cluster) -> K8s:
    """API objects for the test's cluster."""
    return K8s(cluster)


@pytest.fixture
def namespace(cluster, request):
    """A fresh namespace (deleted after the test, without waiting for it to go)."""
    name = f"t-{request.node.name[:30].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    name = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name)
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespace({"metadata": {"name": name, "labels": {"lepton.ai/test": "true"}}})
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as e:
        if e.status != 404:
            raise


@pytest.fixture
def run_operator(cluster, namespace, request):
    """Factory starting the operator against the test's cluster and namespace."""
    started: list[OperatorProcess] = []

    def _run(*args: str, env: dict | None = None, namespace: str | None = None) -> OperatorProcess:
        ns = namespace or request.getfixturevalue("namespace")
        log = cluster.logs_dir / f"operator-{ns}-{len(started)}.log"
        op = OperatorProcess(cluster, ns, list(args), env, log)
        started.append(op)
        return op

    yield _run
    for op in started:
        op.stop()
    if getattr(request.node, "rep_call_failed", False):
        for op in started:
            sys.stderr.write(f"\n--- operator log {op.log_path}\n{op.log_text()[-5000:]}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember whether a test's call phase failed (to print operator logs then)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call_failed = rep.failed


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if a cluster started here left a process behind."""
    leftovers = {}
    for cluster_id in _started_clusters:
        pids = procs.marked_processes(cluster_id)
        if pids:
            leftovers[cluster_id] = pids
            procs.kill_marked(cluster_id)
    if leftovers:
        reporter = session.config.pluginmanager.getplugin("terminalreporter")
        msg = f"local cluster processes left running after the session (now killed): {leftovers}"
        if reporter:
            reporter.write_line(msg, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
