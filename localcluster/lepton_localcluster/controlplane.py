"""A real Kubernetes 1.20 control plane on loopback: etcd, kube-apiserver,
kube-scheduler and kube-controller-manager, plus simulated nodes, kubelet and storage.

Usage::

    with LocalCluster() as cluster:          # 2 nodes x 8 nvidia.com/gpu
        api = cluster.api_client()
        ...                                  # or KUBECONFIG=cluster.kubeconfig kubectl ...

``LocalCluster(api_only=True)`` starts etcd and kube-apiserver only (no scheduler,
controller-manager, nodes or kubelet): enough for what the API server alone does (CRDs,
schema validation, defaulting, RBAC), and all that setup-envtest's binaries run. Flags
are chosen by each binary's version (:mod:`.flags`), so newer binaries from
``$KUBEBUILDER_ASSETS`` start too.

Nothing outlives the cluster: the control plane runs in one process group, every child
gets ``PR_SET_PDEATHSIG`` (SIGKILL when the owning thread dies), and a small watchdog
process kills everything carrying the cluster's environment marker (pods' children
included) when the owner exits without ``stop()``, even by SIGKILL. ``stop()`` also runs
at interpreter exit and, when no other handler is installed, on SIGTERM. Because the
parent-death signal follows the *thread* that started a process, call ``start()`` from a
thread that outlives the cluster (normally the main thread). Components that exit while
the cluster runs are restarted (the 1.20 controller-manager exits when it loses the
apiserver); :meth:`LocalCluster.restart_component` kills and restarts one on purpose.

Nodes send heartbeats (the simulated kubelet renews their Leases) and the node lifecycle
controller runs, so node loss happens as in a real cluster: :meth:`LocalCluster.stop_node`
cuts a node off (Ready=Unknown and ``node.kubernetes.io/unreachable`` taints after
:data:`.flags.NODE_MONITOR_GRACE_SECONDS`), :meth:`LocalCluster.start_node` brings it
back. :meth:`~LocalCluster.cordon`, :meth:`~LocalCluster.uncordon`,
:meth:`~LocalCluster.evict` (the Eviction API) and :meth:`~LocalCluster.node_ready_condition`
are the node and disruption helpers tests need.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml
from kubernetes import client, config

from lepton_operator.api.models import DEFAULT_TRAINER_IMAGE

from . import flags, hostsfile, procs
from .binaries import ensure_binaries, require_binaries
from .kubelet import SimulatedKubelet
from .nodes import SimulatedNode, create_node, default_nodes, delete_node
from .storage import SimulatedProvisioner

_MERGE = "application/merge-patch+json"


class ClusterStartError(RuntimeError):
    """A control-plane component did not come up; the message holds its log tail."""


# Process mode: the trainer image's entrypoint, run from this interpreter (the venv).
TRAINER_IMAGE_COMMANDS = {
    image: [sys.executable, "-m", "lepton_trainer"] for image in (DEFAULT_TRAINER_IMAGE, "lepton-trainer")
}


class LocalCluster:
    """A local Kubernetes control plane with simulated GPU nodes (see module docstring).

    Args:
        workdir: directory for data, certificates, logs and pod files; a temporary
            directory (removed on stop) when None.
        nodes: simulated nodes; default two nodes with 8 GPUs each.
        kubelet_mode: ``"default"`` (pods are marked Running, nothing runs) or
            ``"process"`` (each pod's container runs as a local process).
        image_commands: process mode: image -> command used when a container has no
            ``command`` (its ``args`` are appended).
        binaries: directory with the four binaries (etcd and kube-apiserver with
            ``api_only``); :func:`ensure_binaries` when None.
        deletion_grace_cap: default mode: the most seconds a deleted pod waits before it
            is removed (min(grace period, cap)).
        progress: receives human-readable progress lines.
        api_only: start etcd and kube-apiserver only: no scheduler, controller-manager,
            nodes, kubelet or provisioner (pods stay Pending).
        extra_args: component name (``kube-apiserver``, ...) -> flags appended to its
            command line (e.g. audit logging); kept when the component restarts.
    """

    def __init__(
        self,
        workdir: str | os.PathLike | None = None,
        nodes: list[SimulatedNode] | None = None,
        kubelet_mode: str = "default",
        image_commands: dict[str, list[str]] | None = None,
        binaries: str | os.PathLike | None = None,
        deletion_grace_cap: float = 2.0,
        progress=None,
        api_only: bool = False,
        extra_args: dict[str, list[str]] | None = None,
    ) -> None:
        if kubelet_mode not in ("default", "process"):
            raise ValueError(f"kubelet_mode must be 'default' or 'process', not {kubelet_mode!r}")
        if api_only and (nodes or kubelet_mode != "default"):
            raise ValueError("an API-only cluster has no scheduler: nodes and a kubelet mode would run nothing")
        self.api_only = api_only
        self.extra_args = {name: list(args) for name, args in (extra_args or {}).items()}
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else None
        self.nodes = [] if api_only else list(nodes) if nodes is not None else default_nodes()
        self.kubelet_mode = kubelet_mode
        self.image_commands = dict(TRAINER_IMAGE_COMMANDS if image_commands is None else image_commands)
        self.binaries = Path(binaries) if binaries else None
        self.deletion_grace_cap = deletion_grace_cap
        self.progress = progress or (lambda line: None)
        self.cluster_id = f"lc{os.getpid()}-{secrets.token_hex(3)}"
        self.token = secrets.token_hex(16)
        self.server: str = ""
        self.kubeconfig: Path | None = None
        self.kubelet: SimulatedKubelet | None = None
        self.provisioner: SimulatedProvisioner | None = None
        self.start_seconds: float | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._args: dict[str, list[str]] = {}
        self._paused: set[str] = set()  # components restart_component() is handling
        self._stopping = threading.Event()
        self._pgid: int | None = None
        self._watchdog: subprocess.Popen | None = None
        self._started = False
        self._lock = threading.Lock()
        self._helper_api: client.ApiClient | None = None
        self._eviction_version: str | None = None

    # ----------------------------------------------------------------- paths
    @property
    def logs_dir(self) -> Path:
        """Directory with the control-plane logs and (process mode) pod logs."""
        return self.workdir / "logs"

    @property
    def ca_file(self) -> Path:
        """CA certificate of the apiserver's serving certificate (self-signed)."""
        return self.workdir / "pki" / "apiserver.crt"

    def pod_log_path(self, namespace: str, pod_name: str) -> Path:
        """Log file of a pod's process (process mode)."""
        return self.logs_dir / f"{namespace}_{pod_name}.log"

    def env(self) -> dict[str, str]:
        """Environment variables that point clients (kubectl, the operator) here."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def api_client(self) -> client.ApiClient:
        """A fresh ApiClient authenticated as cluster admin."""
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalCluster":
        """Start the control plane, create the nodes and start the simulators."""
        if self._started:
            return self
        began = time.monotonic()
        # Before anything starts: a directory without what this cluster runs says so.
        if self.binaries is None:
            self.binaries = ensure_binaries(progress=self.progress, api_only=self.api_only)
        require_binaries(self.binaries, self.api_only)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="lepton-k8s-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        self._started = True
        atexit.register(self.stop)
        self._install_sigterm_handler()
        try:
            hostsfile.remove_stale_blocks()
        except OSError:
            pass
        try:
            self._start_watchdog()
            self._start_etcd()
            self._start_apiserver()
            self._write_kubeconfig()
            self._wait_apiserver()
            if not self.api_only:
                self._start_scheduling()
            threading.Thread(target=self._supervise, name="lepton-supervisor", daemon=True).start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        self.progress(f"local cluster up at {self.server} in {self.start_seconds:.1f} s")
        return self

    def _start_scheduling(self) -> None:
        # What makes pods run: scheduler, controller-manager, nodes and their simulators.
        self._start_scheduler()
        self._start_controller_manager()
        api = self.api_client()
        for node in self.nodes:
            create_node(api, node)
        self.kubelet = SimulatedKubelet(
            self.api_client,
            node_names={n.name for n in self.nodes},
            mode=self.kubelet_mode,
            workdir=self.workdir,
            cluster_id=self.cluster_id,
            image_commands=self.image_commands,
            deletion_grace_cap=self.deletion_grace_cap,
        )
        self.kubelet.start()
        self.provisioner = SimulatedProvisioner(self.api_client, self.workdir / "volumes")
        self.provisioner.start()

    def stop(self) -> None:
        """Stop the simulators and the control plane; remove the temp workdir."""
        with self._lock:
            if not self._started:
                return
            self._started = False
        self._stopping.set()
        for sim in (self.provisioner, self.kubelet):
            if sim is not None:
                try:
                    sim.stop()
                except Exception as e:  # keep tearing down whatever happens
                    self.progress(f"error stopping {type(sim).__name__}: {e}")
        # SIGKILL: the store is throwaway, and a SIGTERM'd apiserver spends ~10 s draining.
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs.values():
            proc.wait()
        if self._pgid is not None:
            procs.signal_group(self._pgid, signal.SIGKILL)
        procs.kill_marked(self.cluster_id)
        try:
            hostsfile.remove_block(self.cluster_id)
        except OSError:
            pass
        if self._watchdog is not None:
            self._watchdog.stdin.close()  # tells the watchdog we are done
            try:
                self._watchdog.wait(5)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def add_node(self, node: SimulatedNode) -> None:
        """Add a simulated node to the running cluster."""
        create_node(self.api_client(), node)
        self.nodes.append(node)
        if self.kubelet:
            self.kubelet.node_names.add(node.name)

    def remove_node(self, name: str) -> None:
        """Delete a simulated node (pods bound to it are no longer simulated)."""
        delete_node(self.api_client(), name)
        self.nodes = [n for n in self.nodes if n.name != name]
        if self.kubelet:
            self.kubelet.node_names.discard(name)

    # ------------------------------------------------- node loss and disruption
    def stop_node(self, name: str, processes: str = "keep") -> None:
        """Simulate losing a node: its heartbeats stop and its kubelet does nothing for
        its pods (no status, graceful deletes stay unfinished). ``processes`` says what
        its pods' containers do: ``"keep"`` running (a network partition), ``"freeze"``
        (SIGSTOP: a hung machine), ``"kill"`` (power loss). The node lifecycle controller
        marks it Ready=Unknown and taints it unreachable after the grace period
        (:data:`.flags.NODE_MONITOR_GRACE_SECONDS`). Keep one node running: when every
        node is down the controller assumes the fault is its own and removes the taints.
        See :mod:`.kubelet` for the details."""
        self._require_kubelet().stop_node(name, processes)

    def start_node(self, name: str) -> None:
        """Bring a stopped node back: its kubelet reconciles its pods (processes of pods
        deleted meanwhile are killed; lost containers are reported terminated, exit 137,
        reason NodeRestarted) and posts the node Ready before this returns; the node
        lifecycle controller then removes the unreachable taints."""
        self._require_kubelet().start_node(name)

    def cordon(self, name: str) -> None:
        """Mark the node unschedulable, as ``kubectl cordon`` does."""
        client.CoreV1Api(self._api()).patch_node(name, {"spec": {"unschedulable": True}}, _content_type=_MERGE)

    def uncordon(self, name: str) -> None:
        """Make the node schedulable again, as ``kubectl uncordon`` does."""
        client.CoreV1Api(self._api()).patch_node(name, {"spec": {"unschedulable": None}}, _content_type=_MERGE)

    def evict(self, namespace: str, pod: str) -> int:
        """Evict a pod through the Eviction API (what ``kubectl drain`` does), which
        honours PodDisruptionBudgets; not to be confused with ``kubelet.evict`` (a
        kubelet's eviction under node pressure). Returns the HTTP status: 201 (or 200)
        when the pod is being deleted, 429 when a disruption budget refuses it; any
        other error raises."""
        version = self._eviction_api_version()
        body = {"apiVersion": version, "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
        try:
            resp = client.CoreV1Api(self._api()).create_namespaced_pod_eviction(
                pod, namespace, body, _preload_content=False
            )
        except client.ApiException as e:
            if e.status == 429:
                return 429
            raise
        return resp.status

    def node_ready_condition(self, name: str) -> client.V1NodeCondition | None:
        """The node's Ready condition (status ``"True"``, ``"False"`` or ``"Unknown"``,
        reason, lastHeartbeatTime, lastTransitionTime), or None when it has none."""
        node = client.CoreV1Api(self._api()).read_node(name)
        return next((c for c in node.status.conditions or () if c.type == "Ready"), None)

    def _api(self) -> client.ApiClient:
        if self._helper_api is None:
            self._helper_api = self.api_client()
        return self._helper_api

    def _require_kubelet(self) -> SimulatedKubelet:
        if self.kubelet is None:
            raise RuntimeError("this cluster has no simulated kubelet (not started, or API-only)")
        return self.kubelet

    def _eviction_api_version(self) -> str:
        # The Eviction kind's version, by discovery: pods/eviction takes policy/v1beta1
        # up to 1.21 and policy/v1 from 1.22 (1.21 serves policy/v1 for budgets only).
        if self._eviction_version is None:
            resources = client.CoreV1Api(self._api()).get_api_resources().resources
            sub = next(r for r in resources if r.name == "pods/eviction")
            self._eviction_version = f"{sub.group or 'policy'}/{sub.version or 'v1beta1'}"
        return self._eviction_version

    def restart_component(self, name: str, downtime: float = 0.0) -> None:
        """SIGKILL a control-plane component (``etcd``, ``kube-apiserver``,
        ``kube-scheduler``, ``kube-controller-manager``), wait ``downtime`` seconds, start
        it again with the same flags and ports, and wait until the apiserver is ready.
        For fault tests: watches break, clients must reconnect."""
        self._paused.add(name)
        try:
            proc = self._procs[name]
            proc.kill()
            proc.wait()
            time.sleep(downtime)
            self._spawn(name, self._args[name])
            self._wait_apiserver(watch=(name, "kube-apiserver"))
        finally:
            self._paused.discard(name)

    def _supervise(self) -> None:
        # Like a kubelet restarting static pods: the 1.20 controller-manager and scheduler
        # exit when they lose the apiserver, so restart whatever exits while we run.
        while not self._stopping.wait(0.5):
            for name, proc in list(self._procs.items()):
                if proc.poll() is not None and name not in self._paused and not self._stopping.is_set():
                    self.progress(f"{name} exited with {proc.returncode}; restarting it")
                    self._spawn(name, self._args[name])

    def process_ids(self) -> dict[str, int]:
        """Pids of the control-plane processes by component name."""
        return {name: p.pid for name, p in self._procs.items()}

    def leftover_processes(self) -> list[int]:
        """Pids of processes of this cluster still alive (empty after a clean stop)."""
        return procs.marked_processes(self.cluster_id)

    # -------------------------------------------------------------- internals
    def _install_sigterm_handler(self) -> None:
        # SIGTERM's default action skips atexit; turn it into SystemExit (only when
        # nobody else handles SIGTERM, and only from the main thread, where it is allowed).
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

            def _exit(signum, frame):
                raise SystemExit(128 + signum)

            signal.signal(signal.SIGTERM, _exit)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[procs.MARKER_ENV] = self.cluster_id
        env.pop("KUBECONFIG", None)
        return env

    def _start_watchdog(self) -> None:
        script = Path(__file__).with_name("watchdog.py")
        env = {k: v for k, v in os.environ.items() if k != procs.MARKER_ENV}
        self._watchdog = subprocess.Popen(
            [sys.executable, "-S", str(script), self.cluster_id] + ([str(self.workdir)] if self._own_workdir else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            close_fds=True,
        )

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [str(self.binaries / args[0]), *args[1:], *self.extra_args.get(name, ())],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._child_env(),
            cwd=self.workdir,
            preexec_fn=procs.child_setup(pgid=self._pgid or 0),
        )
        log.close()
        self._args[name] = args
        if self._pgid is None:
            self._pgid = proc.pid  # the first child leads the cluster's process group
        self._procs[name] = proc
        return proc

    def _log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.logs_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _check_alive(self, names=None) -> None:
        for name, proc in self._procs.items():
            if (names is None or name in names) and proc.poll() is not None:
                raise ClusterStartError(f"{name} exited with {proc.returncode}; log tail:\n{self._log_tail(name)}")

    def _command(self, build, name: str, **kwargs) -> list[str]:
        """The command line ``build`` gives for the version of binary ``name``."""
        try:
            return build(flags.binary_version(self.binaries / name), **kwargs)
        except (OSError, ValueError, subprocess.SubprocessError) as e:  # unreadable or too old
            raise ClusterStartError(f"{self.binaries / name}: {e}") from e

    def _start_etcd(self) -> None:
        client_port, peer_port = procs.free_port(), procs.free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        self._spawn("etcd", flags.etcd_args(self.workdir / "etcd", self.etcd_url, f"http://127.0.0.1:{peer_port}"))

    def _start_apiserver(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        sa_key = pki / "sa.key"
        rc = subprocess.run(
            ["openssl", "genrsa", "-out", str(sa_key), "2048"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if rc.returncode != 0:
            raise ClusterStartError(f"openssl genrsa failed: {rc.stderr.decode(errors='replace')}")
        tokens = pki / "tokens.csv"
        tokens.write_text(f'{self.token},admin,admin,"system:masters"\n')
        self.apiserver_port = procs.free_port()
        self.server = f"https://127.0.0.1:{self.apiserver_port}"
        self._spawn(
            "kube-apiserver",
            self._command(
                flags.apiserver_args,
                "kube-apiserver",
                etcd_url=self.etcd_url,
                cert_dir=pki,
                port=self.apiserver_port,
                sa_key=sa_key,
                token_file=tokens,
            ),
        )

    def _write_kubeconfig(self) -> None:
        self.kubeconfig = self.workdir / "kubeconfig"
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "lepton-local",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "lepton-local", "context": {"cluster": "lepton-local", "user": "admin"}}],
            "current-context": "lepton-local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def _wait_apiserver(self, timeout: float = 90.0, watch=None) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # only a readiness probe; clients verify the cert
        req = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(watch)
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except Exception as e:  # not listening yet, or 500 while hooks finish
                last = str(e)
            time.sleep(0.2)
        raise ClusterStartError(
            f"kube-apiserver not ready after {timeout} s ({last}):\n{self._log_tail('kube-apiserver')}"
        )

    def _start_scheduler(self) -> None:
        self._spawn("kube-scheduler", self._command(flags.scheduler_args, "kube-scheduler", kubeconfig=self.kubeconfig))

    def _start_controller_manager(self) -> None:
        self._spawn(
            "kube-controller-manager",
            self._command(
                flags.controller_manager_args,
                "kube-controller-manager",
                kubeconfig=self.kubeconfig,
                sa_key=self.workdir / "pki" / "sa.key",
            ),
        )

    def describe(self) -> dict:
        """A JSON-friendly summary (used by the CLI)."""
        return {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "workdir": str(self.workdir),
            "kubelet_mode": self.kubelet_mode,
            "api_only": self.api_only,
            "nodes": [n.name for n in self.nodes],
            "stopped_nodes": self.kubelet.stopped_nodes() if self.kubelet else {},
            "start_seconds": self.start_seconds,
            "pids": self.process_ids(),
            "cluster_id": self.cluster_id,
        }
