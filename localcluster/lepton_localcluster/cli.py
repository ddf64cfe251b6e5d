"""``lepton-local``: the local control plane for people, the demo and the tests.

Development only: the operator never imports this package, and its image does not hold it.

``lepton-local up`` starts a detached supervisor process that owns a :class:`LocalCluster` and
records it in ``<state dir>/state.json`` (state dir: ``$LEPTON_LOCAL_DIR`` or
``~/.lepton/local``); ``env`` prints the ``KUBECONFIG`` export for kubectl;
``status`` shows it; ``down`` stops it (SIGTERM to the supervisor, which
stops every process of the cluster). ``binaries`` builds or reuses the binaries; ``demo``
runs a LeptonJob end to end (``lepton_localcluster.demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import procs
from .binaries import BinariesUnavailable, ensure_binaries, import_binaries


def default_state_dir() -> Path:
    """Where ``lepton-local up`` keeps its state, kubeconfig and logs."""
    return Path(os.environ.get("LEPTON_LOCAL_DIR", Path.home() / ".lepton" / "local")).expanduser()


def build_parser() -> argparse.ArgumentParser:
    """``lepton-local`` and its subcommands."""
    from . import demo

    parser = argparse.ArgumentParser(
        prog="lepton-local", description="Local Kubernetes control plane with simulated GPU nodes (development only)."
    )
    parser.add_argument("--state-dir", type=Path, default=None, help="default: $LEPTON_LOCAL_DIR or ~/.lepton/local")
    sub = parser.add_subparsers(dest="local_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    up = sub.add_parser("up", help="start the local cluster in the background")
    up.add_argument("--nodes", type=int, default=2, help="simulated nodes (default 2)")
    up.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu per node (default 8)")
    up.add_argument(
        "--mode",
        choices=("default", "process"),
        default="process",
        help="kubelet mode: process (pods run as local processes; default) or default",
    )
    up.add_argument("--foreground", action="store_true", help="run in the foreground until Ctrl-C")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for the cluster (incl. a build)")
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help=argparse.SUPPRESS)  # the supervisor behind `up`
    serve.add_argument("--nodes", type=int, default=2)
    serve.add_argument("--gpus", type=int, default=8)
    serve.add_argument("--mode", choices=("default", "process"), default="process")
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("down", help="stop the local cluster").set_defaults(func=cmd_down)
    sub.add_parser("status", help="show the local cluster and its nodes").set_defaults(func=cmd_status)
    sub.add_parser("env", help='print the KUBECONFIG export (eval "$(lepton-local env)")').set_defaults(func=cmd_env)

    binaries = sub.add_parser("binaries", help="build or reuse the control-plane binaries; print their directory")
    binaries.add_argument("--from", dest="source", type=Path, help="import already built kube binaries from DIR")
    binaries.add_argument("--no-build", action="store_true", help="fail instead of building")
    binaries.set_defaults(func=cmd_binaries)
    demo.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lepton-local`` script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def _state_dir(args) -> Path:
    return Path(args.state_dir) if args.state_dir else default_state_dir()


def _read_state(state_dir: Path) -> dict | None:
    try:
        state = json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if procs.pid_alive(int(state.get("pid", 0))) else None


def _progress(line: str) -> None:
    print(line, flush=True)


def cmd_binaries(args) -> int:
    """Print the directory with the binaries, building them if needed."""
    try:
        if args.source:
            path = import_binaries(args.source, progress=_progress)
        else:
            path = ensure_binaries(progress=_progress, build=not args.no_build)
    except BinariesUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_up(args) -> int:
    """Start the cluster (detached unless --foreground) and print how to use it."""
    state_dir = _state_dir(args)
    state = _read_state(state_dir)
    if state:
        print(f"local cluster already running (pid {state['pid']}) at {state['server']}")
        print(f"export KUBECONFIG={state['kubeconfig']}")
        return 0
    try:
        ensure_binaries(progress=_progress)  # in the foreground, so build progress shows
    except BinariesUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.foreground:
        return cmd_serve(args)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "state.json").unlink(missing_ok=True)
    log_path = state_dir / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "lepton_localcluster.cli",
        "--state-dir",
        str(state_dir),
        "serve",
        "--nodes",
        str(args.nodes),
        "--gpus",
        str(args.gpus),
        "--mode",
        args.mode,
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )  # survives this command and Ctrl-C
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        state = _read_state(state_dir)
        if state:
            print(
                f"local cluster up at {state['server']} in {state['start_seconds']:.1f} s "
                f"({len(state['nodes'])} nodes x {args.gpus} nvidia.com/gpu, kubelet mode {args.mode})"
            )
            print(f"logs: {state['workdir']}/logs")
            print(f"export KUBECONFIG={state['kubeconfig']}")
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    if proc.poll() is None:
        proc.terminate()
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    print(f"error: the local cluster did not start; {log_path}:\n{tail}", file=sys.stderr)
    return 1


def cmd_serve(args) -> int:
    """Own a LocalCluster until SIGTERM/SIGINT (the process behind `local up`)."""
    from .controlplane import LocalCluster
    from .crds import install_crds
    from .nodes import default_nodes

    state_dir = _state_dir(args)
    workdir = state_dir / "cluster"
    shutil.rmtree(workdir, ignore_errors=True)  # a crashed run's etcd data would come back
    state_dir.mkdir(parents=True, exist_ok=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: done.set())
    cluster = LocalCluster(
        workdir=workdir,
        nodes=default_nodes(args.nodes, args.gpus),
        kubelet_mode=args.mode,
        progress=_progress,
    )
    try:
        cluster.start()
        # Ready for `kubectl apply -f examples/...`: the LeptonJob CRD as this 1.20 server
        # takes it (kubectl's own check rejects the CEL rules there) and kopf's peering CRDs.
        install_crds(cluster.api_client())
        state = {"pid": os.getpid(), **cluster.describe()}
        tmp = state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.rename(state_dir / "state.json")
        if args.__dict__.get("foreground"):
            print(f"export KUBECONFIG={cluster.kubeconfig}\n(Ctrl-C stops the cluster)", flush=True)
        while not done.wait(1):
            pass
    finally:
        (state_dir / "state.json").unlink(missing_ok=True)
        cluster.stop()
    return 0


def cmd_down(args) -> int:
    """Stop the cluster started by `local up`."""
    state_dir = _state_dir(args)
    state = _read_state(state_dir)
    if not state:
        print("no local cluster is running")
        (state_dir / "state.json").unlink(missing_ok=True)
        return 0
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while procs.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if procs.pid_alive(pid):
        os.kill(pid, signal.SIGKILL)  # its watchdog then kills the cluster's processes
    procs.kill_marked(state["cluster_id"])
    (state_dir / "state.json").unlink(missing_ok=True)
    print("local cluster stopped")
    return 0


def cmd_env(args) -> int:
    """Print the KUBECONFIG export for the running cluster."""
    state = _read_state(_state_dir(args))
    if not state:
        print("no local cluster is running (start one with `lepton-local up`)", file=sys.stderr)
        return 1
    print(f"export KUBECONFIG={state['kubeconfig']}")
    return 0


def cmd_status(args) -> int:
    """Show the cluster's server, processes and nodes; exit 1 when it is not running."""
    state = _read_state(_state_dir(args))
    if not state:
        print("local cluster: not running")
        return 1
    from kubernetes import client, config

    print(f"local cluster: running (supervisor pid {state['pid']}, kubelet mode {state['kubelet_mode']})")
    print(f"server: {state['server']}\nkubeconfig: {state['kubeconfig']}\nworkdir: {state['workdir']}")
    for name, pid in state["pids"].items():
        print(f"  {name:<24} pid {pid:<8} {'alive' if procs.pid_alive(pid) else 'DEAD'}")
    try:
        api = config.new_client_from_config(config_file=state["kubeconfig"])
        version = client.VersionApi(api).get_code().git_version
        print(f"version: {version}")
        for node in client.CoreV1Api(api).list_node().items:
            alloc = node.status.allocatable or {}
            ready = next((c.status for c in node.status.conditions or [] if c.type == "Ready"), "?")
            print(
                f"  node {node.metadata.name:<16} Ready={ready} cpu={alloc.get('cpu')} "
                f"memory={alloc.get('memory')} nvidia.com/gpu={alloc.get('nvidia.com/gpu', '0')}"
            )
    except Exception as e:
        print(f"apiserver not answering: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
