"""The local control plane itself: real apiserver, scheduler, controller-manager, simulated
nodes, kubelet (default and process mode) and storage."""

from __future__ import annotations

import socket
import ssl
import sys
import textwrap
import time
import urllib.request

import pytest
from kubernetes import client

from lepton_localcluster import LocalCluster, SimulatedNode, marked_processes
from lepton_localcluster.procs import free_port, pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _pod(name, *, gpus=None, command=None, grace=None, owner=None, env=None, mounts=None, **spec):
    container = {"name": "main", "image": "busybox"}
    if env is not None:
        container["env"] = env
    if mounts is not None:
        container["volumeMounts"] = mounts
    if gpus is not None:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    if command is not None:
        container["command"] = command
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }
    if grace is not None:
        body["spec"]["terminationGracePeriodSeconds"] = grace
    if owner is not None:
        body["metadata"]["ownerReferences"] = [owner]
    return body


def _phase(k8s, ns, name):
    pod = k8s.pod(ns, name)
    return pod.status.phase if pod else None


def _wait_phase(k8s, ns, name, phase, timeout=30):
    return k8s.wait_for(
        lambda: _phase(k8s, ns, name) == phase and k8s.pod(ns, name), timeout, message=f"pod {ns}/{name} to be {phase}"
    )


def _wait_gone(k8s, ns, name, timeout=30):
    k8s.wait_for(lambda: k8s.pod(ns, name) is None, timeout, message=f"pod {ns}/{name} to be deleted")


def _python(code: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(code)]


# ---------------------------------------------------------------------------- API
def test_version_and_core_api_with_generated_kubeconfig(local_cluster, namespace):
    # /version over HTTPS with the kubeconfig's token and CA, no client library magic
    ctx = ssl.create_default_context(cafile=str(local_cluster.workdir / "pki" / "apiserver.crt"))
    ctx.check_hostname = False  # the self-signed cert names 127.0.0.1 as an IP SAN only
    req = urllib.request.Request(
        f"{local_cluster.server}/version", headers={"Authorization": f"Bearer {local_cluster.token}"}
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        assert b'"gitVersion": "v1.20.2"' in resp.read()

    api = local_cluster.api_client()  # built from local_cluster.kubeconfig
    assert client.VersionApi(api).get_code().git_version == "v1.20.2"
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cm"}, "data": {"k": "v"}})
    assert core.read_namespaced_config_map("cm", namespace).data == {"k": "v"}
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert set(nodes) >= {"gpu-node-0", "gpu-node-1"}
    for node in nodes.values():
        assert node.status.allocatable["nvidia.com/gpu"] == "8"
        assert not node.spec.taints
        assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    assert local_cluster.env()["KUBECONFIG"] == str(local_cluster.kubeconfig)
    assert local_cluster.start_seconds < 30, f"warm start took {local_cluster.start_seconds:.1f} s"


# --------------------------------------------------------------------- scheduling
def test_gpu_aware_scheduling(k8s, namespace):
    k8s.core.create_namespaced_pod(namespace, _pod("too-big", gpus=9))
    k8s.core.create_namespaced_pod(namespace, _pod("fits", gpus=8))
    pod = _wait_phase(k8s, namespace, "fits", "Running")
    assert pod.spec.node_name in ("gpu-node-0", "gpu-node-1")
    assert pod.status.pod_ip
    assert any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)
    (cs,) = pod.status.container_statuses
    assert cs.ready and cs.started and cs.restart_count == 0 and cs.state.running

    events = k8s.wait_for(
        lambda: k8s.events(namespace, "too-big", "FailedScheduling"), 30, message="FailedScheduling event"
    )
    assert "nvidia.com/gpu" in events[0].message
    big = k8s.pod(namespace, "too-big")
    assert big.status.phase == "Pending" and not big.spec.node_name


# -------------------------------------------------------------- garbage collection
def test_garbage_collection_deletes_owned_pods(k8s, namespace):
    owner = k8s.core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    for i in range(2):
        k8s.core.create_namespaced_pod(namespace, _pod(f"owned-{i}", owner=ref))
    _wait_phase(k8s, namespace, "owned-1", "Running")
    k8s.core.delete_namespaced_config_map("owner", namespace)
    for i in range(2):
        _wait_gone(k8s, namespace, f"owned-{i}", timeout=45)


# --------------------------------------------------------------- default kubelet
def test_default_mode_inject_exit_and_evict(local_cluster, k8s, namespace):
    for name in ("ok", "crash", "evicted"):
        k8s.core.create_namespaced_pod(namespace, _pod(name))
    for name in ("ok", "crash", "evicted"):
        _wait_phase(k8s, namespace, name, "Running")
    local_cluster.kubelet.inject_exit(namespace, "ok", 0)
    local_cluster.kubelet.inject_exit(namespace, "crash", 137, after_seconds=0.5)
    local_cluster.kubelet.evict(namespace, "evicted")

    ok = _wait_phase(k8s, namespace, "ok", "Succeeded")
    assert ok.status.container_statuses[0].state.terminated.exit_code == 0
    crash = _wait_phase(k8s, namespace, "crash", "Failed")
    term = crash.status.container_statuses[0].state.terminated
    assert term.exit_code == 137 and term.reason == "Error"
    evicted = _wait_phase(k8s, namespace, "evicted", "Failed")
    assert evicted.status.reason == "Evicted" and evicted.status.message


def test_default_mode_deletion_waits_for_grace_then_removes(local_cluster, k8s, namespace):
    k8s.core.create_namespaced_pod(namespace, _pod("graceful", grace=1))
    _wait_phase(k8s, namespace, "graceful", "Running")
    began = time.monotonic()
    k8s.core.delete_namespaced_pod("graceful", namespace)
    terminating = k8s.pod(namespace, "graceful")
    assert terminating is not None and terminating.metadata.deletion_timestamp  # Terminating first
    _wait_gone(k8s, namespace, "graceful")
    assert time.monotonic() - began >= 0.9


# --------------------------------------------------------------------- storage
def test_pvc_is_provisioned_and_bound(local_cluster, k8s, namespace):
    k8s.core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}},
        },
    )
    pvc = k8s.wait_for(
        lambda: (
            (c := k8s.core.read_namespaced_persistent_volume_claim("data", namespace)).status.phase == "Bound" and c
        ),
        45,
        message="PVC bound",
    )
    pv = k8s.core.read_persistent_volume(pvc.spec.volume_name)
    assert pv.spec.capacity["storage"] == "2Gi"
    assert pv.spec.host_path.path == str(local_cluster.workdir / "volumes" / namespace / "data")
    # a pod using the claim schedules
    k8s.core.create_namespaced_pod(
        namespace, _pod("user", volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}])
    )
    _wait_phase(k8s, namespace, "user", "Running")


# ------------------------------------------------------------------ process mode
DOWNWARD_ENV = [
    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    {"name": "GREETING", "value": "hello"},
]


def test_process_mode_exit_codes_env_and_logs(process_cluster, k8s, namespace):
    k8s.core.create_namespaced_pod(
        namespace,
        _pod(
            "hello",
            env=DOWNWARD_ENV,
            command=_python("""
        import os, sys
        e = os.environ
        print(e["GREETING"], e["POD_NAME"], e["NS"], e["POD_IP"], sys.executable)
    """),
        ),
    )
    k8s.core.create_namespaced_pod(namespace, _pod("three", command=_python("raise SystemExit(3)")))
    hello = _wait_phase(k8s, namespace, "hello", "Succeeded")
    assert hello.status.container_statuses[0].state.terminated.exit_code == 0
    three = _wait_phase(k8s, namespace, "three", "Failed")
    term = three.status.container_statuses[0].state.terminated
    assert term.exit_code == 3 and term.reason == "Error"
    assert hello.status.pod_ip.startswith("127.")
    log = process_cluster.pod_log_path(namespace, "hello").read_text()
    assert f"hello hello {namespace} {hello.status.pod_ip} {sys.executable}" in log


SIGTERM_MARKER = """
    import os, signal, sys, time
    def on_term(signum, frame):
        open(os.environ["MARK"], "w").write("sigterm")
        if os.environ["IGNORE"] == "1":
            return  # keep running: only SIGKILL ends us
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
"""


@pytest.mark.parametrize("ignore", [False, True], ids=["exits-on-sigterm", "ignores-sigterm"])
def test_process_mode_deletion_sigterm_then_sigkill(process_cluster, k8s, namespace, tmp_path, ignore):
    mark = tmp_path / "marker"
    env = [{"name": "MARK", "value": str(mark)}, {"name": "IGNORE", "value": "1" if ignore else "0"}]
    k8s.core.create_namespaced_pod(namespace, _pod("victim", grace=2, env=env, command=_python(SIGTERM_MARKER)))
    _wait_phase(k8s, namespace, "victim", "Running")
    log = process_cluster.pod_log_path(namespace, "victim")
    k8s.wait_for(lambda: log.exists() and "ready" in log.read_text(), 15, message="process ready")
    began = time.monotonic()
    k8s.core.delete_namespaced_pod("victim", namespace)
    _wait_gone(k8s, namespace, "victim")
    took = time.monotonic() - began
    assert mark.read_text() == "sigterm"
    if ignore:
        assert 1.8 <= took < 10, f"SIGKILL should come after the 2 s grace period, came after {took:.1f} s"
    else:
        assert took < 1.8, f"a process that exits on SIGTERM should go at once, took {took:.1f} s"


def test_process_mode_peer_host_names_resolve_to_pod_ips(process_cluster, k8s, namespace):
    server_code = """
        import os, socket
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: no TIME_WAIT clash
        s.bind((os.environ["POD_IP"], int(os.environ["PORT"])))
        s.listen()
        conn, _ = s.accept()
        conn.sendall(b"hi from " + os.environ["POD_IP"].encode())
        conn.close()
    """
    client_code = """
        import os, socket, time
        host = os.environ["PEER"]
        print("peer", host, flush=True)
        for _ in range(100):
            try:
                with socket.create_connection((host, int(os.environ["PORT"])), timeout=1) as c:
                    print("resolved", socket.gethostbyname(host) if not host[0].isdigit() else host,
                          c.recv(100).decode())
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit(5)
    """
    svc = {"hostname": "worker-0", "subdomain": "job-workers"}
    # Not a fixed port: the pods are processes of this machine, where others may listen.
    port_env = DOWNWARD_ENV + [{"name": "PORT", "value": str(free_port())}]
    k8s.core.create_namespaced_pod(namespace, _pod("job-worker-0", env=port_env, command=_python(server_code), **svc))
    # the short form, as a pod in the namespace would use it through its resolver search path
    peer_env = port_env + [{"name": "PEER", "value": "worker-0.job-workers"}]
    k8s.core.create_namespaced_pod(
        namespace,
        _pod("job-worker-1", env=peer_env, command=_python(client_code), hostname="worker-1", subdomain="job-workers"),
    )
    server = _wait_phase(k8s, namespace, "job-worker-0", "Succeeded")
    _wait_phase(k8s, namespace, "job-worker-1", "Succeeded")
    log = process_cluster.pod_log_path(namespace, "job-worker-1").read_text()
    ip = server.status.pod_ip
    assert f"resolved {ip} hi from {ip}" in log
    if process_cluster.kubelet.hosts_mode == "etc-hosts":
        # the short name was qualified for this namespace; /etc/hosts resolves every form
        assert f"peer worker-0.job-workers.{namespace}.svc.cluster.local" in log
        for name in (f"worker-0.job-workers.{namespace}", f"worker-0.job-workers.{namespace}.svc"):
            assert socket.gethostbyname(name) == ip
    else:
        assert f"peer {ip}" in log  # no writable /etc/hosts: the name was replaced by the IP


def test_process_mode_volumes_map_to_host_dirs(process_cluster, k8s, namespace):
    k8s.core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "ckpt"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    code = """
        import os, sys
        open(os.path.join(os.environ["CKPT_DIR"], "step-1"), "w").write("ok")
        open(os.path.join(sys.argv[1], "scratch"), "w").write("ok")
    """
    body = _pod(
        "writer",
        command=_python(code) + ["/scratch"],
        env=[{"name": "CKPT_DIR", "value": "/ckpt/run"}],
        mounts=[{"name": "ckpt", "mountPath": "/ckpt"}, {"name": "tmp", "mountPath": "/scratch"}],
        volumes=[{"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}}, {"name": "tmp", "emptyDir": {}}],
    )
    (process_cluster.workdir / "volumes" / namespace / "ckpt" / "run").mkdir(parents=True)
    k8s.core.create_namespaced_pod(namespace, body)
    _wait_phase(k8s, namespace, "writer", "Succeeded")
    assert (process_cluster.workdir / "volumes" / namespace / "ckpt" / "run" / "step-1").read_text() == "ok"
    assert (process_cluster.workdir / "pods" / namespace / "writer" / "tmp" / "scratch").read_text() == "ok"


# ------------------------------------------------------------- nothing left behind
def test_stop_leaves_no_process_behind(k8s_binaries):
    with LocalCluster(nodes=[SimulatedNode("solo", gpus=1)], kubelet_mode="process", binaries=k8s_binaries) as cluster:
        core = client.CoreV1Api(cluster.api_client())
        core.create_namespace({"metadata": {"name": "leftovers"}})
        # a pod whose process starts a grandchild in a new session: only the marker finds it
        code = """
            import subprocess, sys, time
            subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(300)"])
            time.sleep(300)
        """
        core.create_namespaced_pod("leftovers", _pod("sleeper", command=_python(code)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(marked_processes(cluster.cluster_id)) < 6:
            time.sleep(0.2)
        pids = marked_processes(cluster.cluster_id)
        assert len(pids) >= 6, pids  # etcd, apiserver, scheduler, controller-manager, pod, grandchild
        cluster_id = cluster.cluster_id
    assert marked_processes(cluster_id) == []
    assert not [pid for pid in pids if pid_alive(pid)]
