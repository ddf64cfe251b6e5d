"""The simulated kubelet: plays the node agent for pods bound to simulated nodes.

It watches all pods; pods whose ``spec.nodeName`` is a simulated node are "run" in one
of two modes. Pods behave as with ``restartPolicy: Never`` whatever their spec says:
a container that ends is never restarted and the pod becomes Succeeded or Failed.

Default mode
    A bound pod is marked Running at once: pod IP (``10.244.x.y``), Ready condition,
    container statuses (running, started, ready, restartCount 0). Nothing executes.
    ``inject_exit(ns, pod, code, after_seconds)`` terminates its containers with that exit
    code (phase Succeeded for 0, else Failed); ``evict(ns, pod)`` sets phase Failed with
    ``status.reason = "Evicted"`` and a message (Kubernetes 1.20 has no DisruptionTarget
    condition). Deletion is honoured like a kubelet: once ``deletionTimestamp`` is set it
    waits ``min(deletionGracePeriodSeconds, deletion_grace_cap)`` and then deletes the pod
    with grace period 0, so owners, garbage collection and the operator see the real
    sequence (Terminating, then gone).

Process mode
    The first container of a bound pod runs as a local process:

    * **Command**: ``command`` + ``args``; with no ``command``, ``image_commands[image]``
      (also tried without the tag, and by the image's last path element) + ``args``.
      ``$(VAR)`` references are expanded as Kubernetes does. A first word ``python`` or
      ``python3`` becomes ``sys.executable``, so the project's virtualenv runs it.
    * **Pod IP**: every pod gets its own loopback address, ``127.0.0.2``, ``127.0.0.3``,
      ... (all of 127.0.0.0/8 answers on Linux). Each process-mode cluster claims its own
      second octet through an flock in ``$TMPDIR/lepton-localcluster-ip-blocks/`` (the
      first gets ``127.0.x.y``, a concurrent second one ``127.1.x.y``, ...). It is assigned when the kubelet first
      sees the pod (before it is even scheduled), so a whole job's addresses are known
      early. Processes bind their ports to it (``status.podIP`` through the downward API).
    * **Environment**: a small base (PATH, HOME, LANG, LC_ALL, TZ, TMPDIR, PYTHONPATH,
      VIRTUAL_ENV from the host; ``HOSTNAME`` = the pod's host name;
      ``PYTHONUNBUFFERED=1`` so logs are live), then ``envFrom`` and ``env``: ``value``;
      ``valueFrom.fieldRef`` for ``metadata.name``, ``metadata.namespace``,
      ``metadata.uid``, ``metadata.labels['k']``, ``metadata.annotations['k']``,
      ``status.podIP``, ``status.hostIP``, ``spec.nodeName``,
      ``spec.serviceAccountName``; ``resourceFieldRef`` (the raw quantity);
      ``configMapKeyRef`` / ``secretKeyRef`` read through the API.
    * **Volumes**: a ``persistentVolumeClaim`` volume is the directory
      ``<workdir>/volumes/<ns>/<claim>`` (the one the simulated provisioner's PV points
      to); ``emptyDir`` and any other volume is ``<workdir>/pods/<ns>/<pod>/<volume>``;
      ``configMap``/``secret`` volumes are written there as files; ``hostPath`` is used
      as is. There is no mount namespace, so paths are rewritten instead: every env value
      and every argument that equals a ``volumeMounts[].mountPath`` or starts with
      ``mountPath/`` (also ``--flag=mountPath/...``) gets the host directory substituted.
    * **Working directory**: ``<workdir>/pods/<ns>/<pod>/``. **Logs**: stdout and stderr
      go to ``<workdir>/logs/<ns>_<pod>.log``.
    * **Exit**: exit code 0 -> Succeeded, else Failed, with
      ``containerStatuses[0].state.terminated.exitCode`` (death by signal N reports
      128+N, as container runtimes do). Whatever the main process left in its process
      group is killed, as when a container's PID 1 exits.
    * **Deletion**: SIGTERM to the pod's process group, SIGKILL after
      ``deletionGracePeriodSeconds``; when the process is gone the pod's status records
      the exit and the pod is deleted with grace period 0.
    * ``inject_exit`` kills the process (SIGKILL) and reports the given code;
      ``evict`` kills it and reports an eviction.

    **DNS.** There is no cluster DNS. For a pod with ``spec.hostname`` and
    ``spec.subdomain`` (what a headless Service gives StatefulSet-like pods), the names
    ``<hostname>.<subdomain>``, ``<hostname>.<subdomain>.<ns>``,
    ``<hostname>.<subdomain>.<ns>.svc`` and ``<hostname>.<subdomain>.<ns>.svc.cluster.local``
    map to the pod's loopback IP:

    1. When ``/etc/hosts`` is writable (root, or ``$LEPTON_HOSTS_FILE``), the kubelet keeps
       a block between ``# >>> lepton-localcluster <cluster id> pid=<pid> >>>`` and
       ``# <<< lepton-localcluster <cluster id> <<<`` with one line per pod IP. glibc reads
       the file on every lookup, so names registered after a process started resolve
       too. The block is removed on ``stop()``, by the cluster's watchdog if the owner
       dies, and blocks of dead owners are removed when any cluster starts. Because the
       short form ``<hostname>.<subdomain>`` is the same in every namespace, env values
       and arguments that contain the short form of a pod of the same namespace are
       rewritten to the full ``...<ns>.svc.cluster.local`` name, as a resolver search
       path would.
    2. Otherwise, the names of pods known when a process starts are replaced by their
       IPs inside its env values and arguments (short forms resolved in the pod's own
       namespace). Names of pods the kubelet has not seen yet stay unresolved.

    ``kubelet.hosts_mode`` says which one is in use (``"etc-hosts"`` or ``"env"``).

Heartbeats
    As a kubelet with node leases does, a thread renews each node's Lease in
    ``kube-node-lease`` every :data:`LEASE_RENEW_SECONDS` and posts the node's conditions
    (fresh ``lastHeartbeatTime``, Ready=True) every :data:`NODE_STATUS_SECONDS`. The node
    lifecycle controller marks a node whose heartbeats stop Ready=Unknown after its grace
    period (:data:`.flags.NODE_MONITOR_GRACE_SECONDS`) and taints it unreachable.

Node loss (``stop_node`` / ``start_node``)
    ``stop_node(name, processes)`` plays a node that is cut off or dead: its heartbeats
    stop and the kubelet does nothing for its pods: no status updates, no starts, and
    deletions are not completed (a graceful delete leaves the pod Terminating; only a
    force delete, grace period 0, removes it). ``inject_exit``/``evict`` are ignored for
    them. What happens to the pods' containers is ``processes``:

    * ``"keep"`` (default): a network partition. Process-mode processes keep running,
      even those of pods force-deleted meanwhile, as a partitioned node's containers do.
    * ``"freeze"``: a hung machine. Process-mode processes are SIGSTOPped (and SIGCONTed
      by ``start_node``).
    * ``"kill"``: power loss. Process-mode processes are SIGKILLed at once; in both modes
      the pods' containers count as lost.

    ``start_node(name)`` is the kubelet coming back: heartbeats resume (the node is posted
    Ready before it returns; the controller then removes the taints), processes of pods
    deleted from the API meanwhile are killed, and the pods still there are reconciled: a
    container that is still running is reported Running and Ready again (the node
    controller had marked the pod not ready), an exit that happened meanwhile is reported,
    a lost container (``"kill"``) is reported as terminated with exit code 137 and reason
    ``NodeRestarted`` (phase Failed; no pod-level reason, as a real kubelet sets none),
    pending deletions are carried out and pods bound meanwhile are started.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import heapq
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from . import hostsfile, procs
from .nodes import post_node_status, renew_lease
from .storage import volume_dir

MERGE = "application/merge-patch+json"
_PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
_IP_BLOCK_DIR = Path(tempfile.gettempdir()) / "lepton-localcluster-ip-blocks"

#: How often each node's Lease is renewed. A kubelet renews every 10 s (a quarter of its
#: 40 s lease); the local controller's grace period is 16 s, so 2 s leaves 8 renewals of
#: slack on a loaded machine. Two requests a second for two nodes: cheap.
LEASE_RENEW_SECONDS = 2.0
#: How often each node's conditions are posted with a fresh lastHeartbeatTime (a
#: kubelet's nodeStatusUpdateFrequency; with leases it posts less often still).
NODE_STATUS_SECONDS = 10.0
#: ``stop_node``'s choices for what happens to the node's containers (module docstring).
NODE_LOSS_PROCESSES = ("keep", "freeze", "kill")
_LOST_CONTAINER = {
    "code": 137,
    "reason": "NodeRestarted",
    "evict": False,
    "message": "simulated node restart: the container was lost",
}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Pod:
    """What the kubelet tracks about one pod."""

    namespace: str
    name: str
    uid: str
    ip: str
    names: list[str] = field(default_factory=list)  # DNS names mapped to ip
    started_at: str | None = None
    terminal: bool = False
    deleting: bool = False
    proc: subprocess.Popen | None = None
    forced: dict | None = None  # exit injected by a test: {"code", "reason", "evict"}
    spec: dict = field(default_factory=dict)


class SimulatedKubelet:
    """Runs pods bound to the simulated nodes (see the module docstring)."""

    def __init__(
        self,
        api_factory,
        node_names: set[str],
        mode: str = "default",
        workdir: Path | None = None,
        cluster_id: str = "",
        image_commands: dict[str, list[str]] | None = None,
        deletion_grace_cap: float = 2.0,
    ) -> None:
        self.api_factory = api_factory
        self.node_names = set(node_names)
        self.mode = mode
        self.workdir = Path(workdir) if workdir else Path(".")
        self.cluster_id = cluster_id
        self.image_commands = dict(image_commands or {})
        self.deletion_grace_cap = deletion_grace_cap
        self.core = client.CoreV1Api(api_factory())
        self._pods: dict[tuple[str, str], _Pod] = {}
        self._queue: queue.Queue = queue.Queue()
        self._timers: list = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._block_lock = None
        self._down: dict[str, str] = {}  # stopped node -> what happened to its processes
        self._orphans: list[_Pod] = []  # pods deleted from the API while their node was down
        if mode == "process":
            block = self._claim_ip_block()
            self._ips = (
                f"127.{block % 256}.{(n >> 8) & 255}.{n & 255}" for n in itertools.count(2) if 0 < n & 255 < 255
            )
            self.hosts_mode = "etc-hosts" if hostsfile.writable() else "env"
        else:
            self._ips = (f"10.244.{(n >> 8) & 255}.{n & 255}" for n in itertools.count(2) if 0 < n & 255 < 255)
            self.hosts_mode = "none"
        self._worker = threading.Thread(target=self._run, name="lepton-kubelet", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="lepton-kubelet-watch", daemon=True)
        self._heart = threading.Thread(target=self._heartbeats, name="lepton-kubelet-heartbeat", daemon=True)

    def _claim_ip_block(self) -> int:
        """Claim a second octet N (pod IPs 127.N.x.y) no other live cluster on this host uses.

        The claim is an flock on a file, held until this process exits or stop(): two
        process-mode clusters (two test sessions, `local up` and a test) never share IPs."""
        _IP_BLOCK_DIR.mkdir(parents=True, exist_ok=True)
        for block in range(256):
            f = open(_IP_BLOCK_DIR / f"{block}.lock", "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            self._block_lock = f
            return block
        raise RuntimeError(f"all 256 loopback IP blocks are in use ({_IP_BLOCK_DIR})")

    # ------------------------------------------------------------ public API
    def start(self) -> None:
        """Start watching pods."""
        self._worker.start()
        self._watcher.start()
        self._heart.start()

    def stop(self) -> None:
        """Kill every pod process and stop the threads."""
        self._stop.set()
        self._queue.put(("stop",))
        self._worker.join(10)
        self._heart.join(10)
        for pod in list(self._pods.values()) + self._orphans:
            self._kill(pod)  # SIGKILL ends frozen processes too
        if self.hosts_mode == "etc-hosts":
            try:
                hostsfile.remove_block(self.cluster_id)
            except OSError:
                pass
        if self._block_lock is not None:
            self._block_lock.close()  # releases the IP block
            self._block_lock = None

    def inject_exit(self, namespace: str, pod_name: str, exit_code: int, after_seconds: float = 0) -> None:
        """Make the pod's container exit with ``exit_code`` after ``after_seconds``."""
        reason = "Completed" if exit_code == 0 else "Error"
        self._call(
            after_seconds,
            self._force_exit,
            namespace,
            pod_name,
            {"code": int(exit_code), "reason": reason, "evict": False},
        )

    def evict(self, namespace: str, pod_name: str, message: str | None = None) -> None:
        """Evict the pod as a kubelet under node pressure would (phase Failed, reason Evicted)."""
        msg = message or "The node was low on resource: simulated eviction by the lepton local kubelet."
        self._call(
            0, self._force_exit, namespace, pod_name, {"code": 137, "reason": "Evicted", "evict": True, "message": msg}
        )

    def stop_node(self, name: str, processes: str = "keep") -> None:
        """Stop the node's heartbeats and the kubelet's work for its pods (module
        docstring); ``processes`` is ``"keep"``, ``"freeze"`` or ``"kill"``."""
        if name not in self.node_names:
            raise ValueError(f"{name!r} is not a simulated node")
        if processes not in NODE_LOSS_PROCESSES:
            raise ValueError(f"processes must be one of {NODE_LOSS_PROCESSES}, not {processes!r}")
        if name in self._down:
            raise ValueError(f"node {name!r} is already stopped")
        self._down[name] = processes  # from now on the heartbeat and the worker skip it
        self._call_and_wait(self._node_down, name, processes)

    def start_node(self, name: str) -> None:
        """Resume a stopped node: reconcile its pods, then post it Ready (module docstring)."""
        if name not in self._down:
            raise ValueError(f"node {name!r} is not stopped")
        self._call_and_wait(self._node_up, name)
        api = self.api_factory()
        renew_lease(api, name)
        for attempt in range(5):
            try:
                post_node_status(api, name)
                return
            except ApiException as e:  # 409: the node controller wrote meanwhile
                if e.status != 409 or attempt == 4:
                    raise

    def stopped_nodes(self) -> dict[str, str]:
        """Stopped nodes and what ``processes`` each was stopped with."""
        return dict(self._down)

    def pod_ip(self, namespace: str, pod_name: str) -> str | None:
        """The IP given to a pod, or None if the kubelet has not seen it."""
        pod = self._pods.get((namespace, pod_name))
        return pod.ip if pod else None

    # -------------------------------------------------------- event plumbing
    def _call(self, delay: float, fn, *args) -> None:
        self._queue.put(("call", time.monotonic() + max(0.0, delay), fn, args))

    def _call_and_wait(self, fn, *args, timeout: float = 30) -> None:
        """Run ``fn`` on the worker thread (which owns the pods) and wait for it."""
        done, failure = threading.Event(), []

        def run():
            try:
                fn(*args)
            except Exception as e:
                failure.append(e)
            finally:
                done.set()

        self._call(0, run)
        if not done.wait(timeout):
            raise TimeoutError(f"the simulated kubelet did not run {fn.__name__} within {timeout} s")
        if failure:
            raise failure[0]

    def _heartbeats(self) -> None:
        """Renew the leases of the running nodes, and post their status less often."""
        api = self.api_factory()
        next_status = time.monotonic() + NODE_STATUS_SECONDS  # create_node just posted it
        while not self._stop.is_set():
            post_status = time.monotonic() >= next_status
            if post_status:
                next_status = time.monotonic() + NODE_STATUS_SECONDS
            for name in sorted(self.node_names):
                if name in self._down:
                    continue
                try:
                    renew_lease(api, name)
                    if post_status:
                        post_node_status(api, name)
                except Exception:  # apiserver restarting, node removed, a conflict: next beat
                    pass
            self._stop.wait(LEASE_RENEW_SECONDS)

    def _watch(self) -> None:
        """Feed pod events into the queue; relist after errors or expired versions."""
        core = client.CoreV1Api(self.api_factory())
        rv = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    resp = core.list_pod_for_all_namespaces(_preload_content=False)
                    listing = json.loads(resp.data)
                    rv = listing["metadata"]["resourceVersion"]
                    self._queue.put(("sync", listing["items"]))
                w = watch.Watch()
                for event in w.stream(
                    core.list_pod_for_all_namespaces,
                    resource_version=rv,
                    timeout_seconds=10,
                    allow_watch_bookmarks=True,
                    deserialize=False,
                    _request_timeout=30,
                ):
                    if self._stop.is_set():
                        w.stop()
                        break
                    obj = event["object"]
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._queue.put(("event", event["type"], obj))
            except ApiException as e:
                if e.status == 410:  # our resourceVersion is too old: start over
                    rv = None
                else:
                    self._stop.wait(0.5)
            except Exception:  # connection refused/reset (apiserver restart, shutdown)
                rv = None
                self._stop.wait(0.5)

    def _run(self) -> None:
        """The kubelet's single worker: handles events, timers and process exits."""
        while not self._stop.is_set():
            timeout = 0.1
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    self._dispatch(item)
                while self._timers and self._timers[0][0] <= time.monotonic():
                    _, _, fn, args = heapq.heappop(self._timers)
                    fn(*args)
                self._reap()
            except Exception as e:  # never let one bad pod stop the kubelet
                print(f"[lepton kubelet] error: {e!r}", file=sys.stderr)

    def _dispatch(self, item) -> None:
        kind = item[0]
        if kind == "call":
            _, when, fn, args = item
            heapq.heappush(self._timers, (when, next(self._seq), fn, args))
        elif kind == "event":
            _, etype, obj = item
            if etype == "DELETED":
                self._forget(obj)
            else:
                self._observe(obj)
        elif kind == "sync":
            seen = set()
            for obj in item[1]:
                seen.add((obj["metadata"]["namespace"], obj["metadata"]["name"]))
                self._observe(obj)
            for key in [k for k in self._pods if k not in seen]:
                self._drop(self._pods[key])

    # ------------------------------------------------------------ pod logic
    def _observe(self, obj: dict) -> None:
        meta, spec = obj["metadata"], obj.get("spec", {})
        key = (meta["namespace"], meta["name"])
        pod = self._pods.get(key)
        if pod is not None and pod.uid != meta["uid"]:  # same name, new pod
            self._drop(pod)
            pod = None
        if pod is None:
            pod = _Pod(meta["namespace"], meta["name"], meta["uid"], next(self._ips), spec=spec)
            self._pods[key] = pod
            self._register_names(pod, spec)
        pod.spec = spec
        if spec.get("nodeName") not in self.node_names:
            return  # not scheduled yet, or on a node we do not simulate
        if self._is_down(pod):
            return  # its kubelet is gone: start_node catches up
        phase = obj.get("status", {}).get("phase")
        if meta.get("deletionTimestamp"):
            self._begin_delete(pod, obj)
            return
        if pod.started_at is None and not pod.terminal:
            if phase in ("Succeeded", "Failed"):
                pod.terminal = True  # finished before we (re)started watching
                return
            self._start(pod, obj)

    def _start(self, pod: _Pod, obj: dict) -> None:
        pod.started_at = _now()
        if self.mode == "process":
            try:
                self._spawn(pod, obj)
            except Exception as e:
                self._patch_terminated(pod, 127, "StartError", message=f"simulated kubelet: {e}")
                return
        self._patch_status(pod, self._running_status(pod))

    def _begin_delete(self, pod: _Pod, obj: dict) -> None:
        if pod.deleting:
            return
        pod.deleting = True
        grace = obj["metadata"].get("deletionGracePeriodSeconds")
        grace = 30 if grace is None else int(grace)
        if pod.proc is not None and pod.proc.poll() is None:
            procs.signal_group(pod.proc.pid, signal.SIGTERM)
            heapq.heappush(self._timers, (time.monotonic() + grace, next(self._seq), self._sigkill, (pod,)))
            return  # _reap deletes the pod when the process is gone
        wait = (
            0
            if pod.terminal or pod.started_at is None or self.mode == "process"
            else min(grace, self.deletion_grace_cap)
        )
        heapq.heappush(self._timers, (time.monotonic() + wait, next(self._seq), self._delete_now, (pod,)))

    def _sigkill(self, pod: _Pod) -> None:
        if pod.proc is not None and pod.proc.poll() is None and not self._is_down(pod):
            procs.signal_group(pod.proc.pid, signal.SIGKILL)

    def _delete_now(self, pod: _Pod) -> None:
        if self._is_down(pod):
            return  # the deletion stays unfinished: Terminating until forced or start_node
        try:
            self.core.delete_namespaced_pod(
                pod.name,
                pod.namespace,
                grace_period_seconds=0,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": pod.uid}},
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    def _force_exit(self, namespace: str, name: str, how: dict) -> None:
        pod = self._pods.get((namespace, name))
        if pod is None or pod.terminal or self._is_down(pod):
            return
        if pod.proc is not None and pod.proc.poll() is None:
            pod.forced = how  # _reap reports it once the process is gone
            procs.signal_group(pod.proc.pid, signal.SIGKILL)
            return
        self._report_forced(pod, how)

    def _report_forced(self, pod: _Pod, how: dict) -> None:
        if how["evict"]:
            self._patch_terminated(pod, how["code"], how["reason"], evicted_message=how["message"])
        else:
            self._patch_terminated(pod, how["code"], how["reason"], message=how.get("message"))

    def _reap(self) -> None:
        for pod in list(self._pods.values()):
            if pod.proc is None or pod.proc.returncode is not None or self._is_down(pod):
                continue
            rc = pod.proc.poll()
            if rc is None:
                continue
            procs.signal_group(pod.proc.pid, signal.SIGKILL)  # what PID 1 left behind
            code = rc if rc >= 0 else 128 - rc
            if pod.forced:
                self._report_forced(pod, pod.forced)
            elif not pod.terminal:
                self._patch_terminated(pod, code, "Completed" if code == 0 else "Error")
            if pod.deleting:
                self._delete_now(pod)

    def _forget(self, obj: dict) -> None:
        meta = obj["metadata"]
        pod = self._pods.get((meta["namespace"], meta["name"]))
        if pod is not None and pod.uid == meta["uid"]:
            self._drop(pod)

    def _drop(self, pod: _Pod) -> None:
        if self._is_down(pod):
            self._orphans.append(pod)  # nobody on the node knows: start_node kills it
        else:
            self._kill(pod)
        self._pods.pop((pod.namespace, pod.name), None)
        if pod.names:
            self._write_hosts()

    # ------------------------------------------------------------ node loss
    def _is_down(self, pod: _Pod) -> bool:
        return pod.spec.get("nodeName") in self._down

    def _node_down(self, name: str, processes: str) -> None:
        if processes == "keep":
            return
        for pod in self._pods.values():
            if pod.spec.get("nodeName") != name or pod.terminal or pod.started_at is None:
                continue
            alive = pod.proc is not None and pod.proc.poll() is None
            if processes == "kill":
                pod.forced = _LOST_CONTAINER  # reported by start_node (process mode: _reap)
                if alive:
                    procs.signal_group(pod.proc.pid, signal.SIGKILL)
            elif alive:
                procs.signal_group(pod.proc.pid, signal.SIGSTOP)

    def _node_up(self, name: str) -> None:
        processes = self._down.pop(name)
        for pod in [o for o in self._orphans if o.spec.get("nodeName") == name]:
            self._orphans.remove(pod)
            self._kill(pod)
        listing = json.loads(
            self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}", _preload_content=False).data
        )
        current = []
        for obj in listing["items"]:
            meta = obj["metadata"]
            pod = self._pods.get((meta["namespace"], meta["name"]))
            if pod is None or pod.uid != meta["uid"]:
                continue  # new to us: _observe below starts it
            current.append(pod)
            pod.deleting = False  # a deletion the dead kubelet left is redone below
            if processes == "freeze" and pod.proc is not None and pod.proc.poll() is None:
                procs.signal_group(pod.proc.pid, signal.SIGCONT)
        self._reap()  # exits that happened while the node was down (process mode)
        for pod in current:
            if pod.terminal or pod.started_at is None:
                continue
            if pod.proc is None and pod.forced is not None:
                self._report_forced(pod, pod.forced)  # default mode: the container was lost
            elif pod.proc is None or pod.proc.poll() is None:
                self._patch_status(pod, self._running_status(pod))  # Ready again
        for obj in listing["items"]:
            self._observe(obj)

    def _kill(self, pod: _Pod) -> None:
        if pod.proc is not None:
            procs.signal_group(pod.proc.pid, signal.SIGKILL)
            try:
                pod.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    # --------------------------------------------------------------- status
    def _containers(self, pod: _Pod) -> list[dict]:
        return pod.spec.get("containers", [])

    def _conditions(self, ready: bool, reason: str | None = None) -> list[dict]:
        now = _now()
        out = []
        for ctype, status in (
            ("Initialized", True),
            ("Ready", ready),
            ("ContainersReady", ready),
            ("PodScheduled", True),
        ):
            cond = {
                "type": ctype,
                "status": "True" if status else "False",
                "lastProbeTime": None,
                "lastTransitionTime": now,
            }
            if not status and reason:
                cond["reason"] = reason
            out.append(cond)
        return out

    def _running_status(self, pod: _Pod) -> dict:
        statuses = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": f"simulated://{c.get('image', '')}",
                "containerID": f"simulated://{pod.uid}/{c['name']}",
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": pod.started_at}},
            }
            for c in self._containers(pod)
        ]
        return {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "startTime": pod.started_at,
            "conditions": self._conditions(True),
            "containerStatuses": statuses,
        }

    def _patch_terminated(
        self, pod: _Pod, code: int, reason: str, message: str | None = None, evicted_message: str | None = None
    ) -> None:
        pod.terminal = True
        now = _now()
        statuses = []
        for c in self._containers(pod):
            term = {
                "exitCode": int(code),
                "reason": reason,
                "startedAt": pod.started_at or now,
                "finishedAt": now,
                "containerID": f"simulated://{pod.uid}/{c['name']}",
            }
            if message:
                term["message"] = message
            statuses.append(
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": f"simulated://{c.get('image', '')}",
                    "containerID": term["containerID"],
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"terminated": term},
                }
            )
        status = {
            "phase": "Succeeded" if code == 0 and not evicted_message else "Failed",
            "hostIP": "127.0.0.1",
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "startTime": pod.started_at or now,
            "conditions": self._conditions(False, "PodCompleted" if code == 0 else "ContainersNotReady"),
            "containerStatuses": statuses,
        }
        if evicted_message:
            status["reason"] = "Evicted"
            status["message"] = evicted_message
        self._patch_status(pod, status)

    def _patch_status(self, pod: _Pod, status: dict) -> None:
        try:
            self.core.patch_namespaced_pod_status(
                pod.name, pod.namespace, {"metadata": {"uid": pod.uid}, "status": status}, _content_type=MERGE
            )
        except ApiException as e:
            if e.status not in (404, 409):  # gone or replaced meanwhile: nothing to report
                raise

    # ------------------------------------------------------------------ DNS
    def _register_names(self, pod: _Pod, spec: dict) -> None:
        host, sub = spec.get("hostname"), spec.get("subdomain")
        if self.mode != "process" or not host or not sub:
            return
        base = f"{host}.{sub}"
        pod.names = [
            base,
            f"{base}.{pod.namespace}",
            f"{base}.{pod.namespace}.svc",
            f"{base}.{pod.namespace}.svc.cluster.local",
        ]
        self._write_hosts()

    def _write_hosts(self) -> None:
        if self.hosts_mode != "etc-hosts":
            return
        entries = {p.ip: p.names for p in self._pods.values() if p.names}
        try:
            hostsfile.set_block(self.cluster_id, entries)
        except OSError as e:
            print(f"[lepton kubelet] cannot write /etc/hosts ({e}); using env substitution", file=sys.stderr)
            self.hosts_mode = "env"

    def _rewrite_names(self, text: str, namespace: str) -> str:
        """Qualify (etc-hosts mode) or resolve (env mode) known pod names in ``text``."""
        table: dict[str, str] = {}
        for p in self._pods.values():
            if not p.names:
                continue
            fqdn = p.names[-1]
            if self.hosts_mode == "env":
                for n in p.names[1:]:
                    table[n] = p.ip
            if p.namespace == namespace:
                table[p.names[0]] = p.ip if self.hosts_mode == "env" else fqdn
        if not table:
            return text
        names = sorted(table, key=len, reverse=True)
        # a name must not be glued to more name characters on either side
        pattern = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])(?!\.\w)")
        return pattern.sub(lambda m: table[m.group(1)], text)

    # -------------------------------------------------------- process mode
    def _spawn(self, pod: _Pod, obj: dict) -> None:
        spec = obj["spec"]
        container = spec["containers"][0]
        command = container.get("command") or self._image_command(container.get("image", ""))
        if not command:
            raise RuntimeError(
                f"container {container['name']!r} has no command and image {container.get('image')!r} "
                "is not in image_commands"
            )
        pod_dir = self.workdir / "pods" / pod.namespace / pod.name
        pod_dir.mkdir(parents=True, exist_ok=True)
        mounts = self._mounts(pod, spec, container, pod_dir)
        env = self._environment(pod, obj, container)
        argv = [_expand(a, env) for a in list(command) + list(container.get("args") or [])]
        argv = [self._rewrite_names(_map_paths(a, mounts, arg=True), pod.namespace) for a in argv]
        for k, v in list(env.items()):
            env[k] = self._rewrite_names(_map_paths(v, mounts), pod.namespace)
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        env[procs.MARKER_ENV] = self.cluster_id
        log_path = self.workdir / "logs" / f"{pod.namespace}_{pod.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            pod.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=pod_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=procs.child_setup(None),  # own session = own process group
            )

    def _image_command(self, image: str) -> list[str] | None:
        no_tag = image.split("@")[0]
        if ":" in no_tag.rsplit("/", 1)[-1]:
            no_tag = no_tag.rsplit(":", 1)[0]
        for candidate in (image, no_tag, no_tag.rsplit("/", 1)[-1]):
            if candidate in self.image_commands:
                return list(self.image_commands[candidate])
        return None

    def _mounts(self, pod: _Pod, spec: dict, container: dict, pod_dir: Path) -> list[tuple[str, str]]:
        """Create the pod's volume directories; return (mountPath, host path) pairs."""
        volumes = {}
        for vol in spec.get("volumes") or []:
            name = vol["name"]
            if "persistentVolumeClaim" in vol:
                path = volume_dir(self.workdir / "volumes", pod.namespace, vol["persistentVolumeClaim"]["claimName"])
            elif "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
            else:
                path = pod_dir / name
            path.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                self._write_items(path, self._read_data("configmap", pod.namespace, vol["configMap"]["name"]))
            elif "secret" in vol:
                self._write_items(path, self._read_data("secret", pod.namespace, vol["secret"]["secretName"]))
            volumes[name] = path
        pairs = []
        for m in container.get("volumeMounts") or []:
            host = volumes.get(m["name"])
            if host is not None:
                if m.get("subPath"):
                    host = host / m["subPath"]
                    host.mkdir(parents=True, exist_ok=True)
                pairs.append((m["mountPath"].rstrip("/") or "/", str(host)))
        # longest mount path first, so /data/sub wins over /data
        return sorted(pairs, key=lambda p: len(p[0]), reverse=True)

    @staticmethod
    def _write_items(path: Path, data: dict[str, str]) -> None:
        for key, value in data.items():
            (path / key).write_text(value)

    def _read_data(self, kind: str, namespace: str, name: str) -> dict[str, str]:
        if kind == "configmap":
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        raw = self.core.read_namespaced_secret(name, namespace).data or {}
        return {k: base64.b64decode(v).decode() for k, v in raw.items()}

    def _environment(self, pod: _Pod, obj: dict, container: dict) -> dict[str, str]:
        meta, spec = obj["metadata"], obj["spec"]
        env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        env["HOSTNAME"] = spec.get("hostname") or meta["name"]
        env["PYTHONUNBUFFERED"] = "1"
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            ref = src.get("configMapRef") or src.get("secretRef")
            kind = "configmap" if "configMapRef" in src else "secret"
            try:
                data = self._read_data(kind, pod.namespace, ref["name"])
            except ApiException:
                if ref.get("optional"):
                    continue
                raise
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            if "valueFrom" in var:
                value = self._value_from(pod, obj, container, var["valueFrom"])
                if value is None:
                    continue
            else:
                value = _expand(var.get("value", ""), env)
            env[var["name"]] = value
        return env

    def _value_from(self, pod: _Pod, obj: dict, container: dict, src: dict) -> str | None:
        meta, spec = obj["metadata"], obj["spec"]
        if "fieldRef" in src:
            path = src["fieldRef"]["fieldPath"]
            simple = {
                "metadata.name": meta["name"],
                "metadata.namespace": meta["namespace"],
                "metadata.uid": meta["uid"],
                "status.podIP": pod.ip,
                "status.podIPs": pod.ip,
                "status.hostIP": "127.0.0.1",
                "spec.nodeName": spec.get("nodeName", ""),
                "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            }
            if path in simple:
                return simple[path]
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if m:
                return (meta.get(m.group(1)) or {}).get(m.group(2), "")
            raise RuntimeError(f"unsupported fieldRef {path!r}")
        if "resourceFieldRef" in src:
            res = src["resourceFieldRef"]["resource"]  # e.g. limits.cpu
            part, _, name = res.partition(".")
            return str((container.get("resources", {}).get(part) or {}).get(name, "0"))
        for key, kind in (("configMapKeyRef", "configmap"), ("secretKeyRef", "secret")):
            if key in src:
                ref = src[key]
                try:
                    data = self._read_data(kind, pod.namespace, ref["name"])
                except ApiException:
                    if ref.get("optional"):
                        return None
                    raise
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise RuntimeError(f"{kind} {ref['name']} has no key {ref['key']!r}")
                return data[ref["key"]]
        raise RuntimeError(f"unsupported valueFrom {src!r}")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known variables replaced, ``$$`` escapes ``$``."""

    def repl(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", repl, text)


def _map_paths(text: str, mounts: list[tuple[str, str]], arg: bool = False) -> str:
    """Replace a leading mount path (whole value, or after ``--flag=`` for arguments)."""
    prefix, value = "", text
    if arg and text.startswith("-") and "=" in text:
        prefix, _, value = text.partition("=")
        prefix += "="
    for mount, host in mounts:
        if value == mount or value.startswith(mount + "/") or (mount == "/" and value.startswith("/")):
            return prefix + host + value[len(mount) :] if mount != "/" else prefix + host + value
    return text
