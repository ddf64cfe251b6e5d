"""`lepton-local demo`: the whole loop on one machine, no cluster needed.

Starts the local control plane (real apiserver, etcd, scheduler, controller-manager) with
simulated GPU nodes whose kubelet runs pods as local processes, Debian's Prometheus
scraping the worker processes, and the operator. Then it applies an example LeptonJob
that really trains (a small GPT on CPU) and shows live progress until the job finishes:
phase, world size, samples/s, step, loss and a progress bar. At the end it prints a
summary and writes a PNG plot of throughput and world size with the rescales marked.
Ctrl-C stops everything: every process lives in the cluster's process group.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lepton_operator.api.models import API_VERSION, GROUP, PLURAL, VERSION, parse_status

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXAMPLE = REPO_ROOT / "examples" / "local-demo.yaml"
STEP_LINE = re.compile(r"step=(\d+)(?:/(\d+))?\s+loss=([0-9.naninf]+)")


@dataclass
class Sample:
    """One row of the demo's time series."""

    t: float
    world_size: int
    throughput: float | None  # live, from Prometheus (short window)
    measured: float | None  # what the autoscaler recorded in status (after warm-up)
    step: int | None
    loss: float | None
    phase: str


@dataclass
class Progress:
    """What the demo has seen of the job so far."""

    samples: list[Sample] = field(default_factory=list)
    last_step: int | None = None
    total_steps: int | None = None
    last_loss: float | None = None
    first_loss: float | None = None


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run a LeptonJob end to end on the local control plane")
    parser.add_argument("--example", type=Path, default=DEFAULT_EXAMPLE, help="LeptonJob manifest to apply")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--plot", type=Path, default=Path("lepton-demo.png"), help="where to write the PNG plot")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the cluster's files here")
    parser.set_defaults(func=run_demo)


def _latest_step(log_path: Path) -> tuple[int | None, int | None, float | None]:
    """The last `step=N/M loss=L` line of a worker log."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None, None, None
    for line in reversed(tail.splitlines()):
        match = STEP_LINE.search(line)
        if match:
            total = int(match.group(2)) if match.group(2) else None
            return int(match.group(1)), total, float(match.group(3))
    return None, None, None


def _reason_text(record) -> str:
    """`Reason: message`, without the reason twice when the message starts with it."""
    message = record.message or ""
    return message if message.startswith(record.reason) else f"{record.reason}: {message}".rstrip(": ")


def _bar(done: int | None, total: int | None, width: int = 30) -> str:
    if not done or not total:
        return "[" + " " * width + "]"
    filled = min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + f"] {100 * done / total:5.1f}%"


def _render(job_name: str, status: dict, progress: Progress, elapsed: float) -> str:
    st = parse_status(status)
    live = progress.samples[-1].throughput if progress.samples else None
    tput = f"{live:7.1f}" if live is not None else "      -"
    step = f"{progress.last_step}/{progress.total_steps}" if progress.last_step is not None else "-"
    loss = f"{progress.last_loss:.3f}" if progress.last_loss is not None else "-"
    return (
        f"{elapsed:6.0f}s {job_name} phase={st.phase or '-':9s} workers={st.workers.ready}/{st.world_size} "
        f"gen={st.worker_generation} samples/s={tput} step={step} loss={loss} "
        f"{_bar(progress.last_step, progress.total_steps)}"
    )


def write_plot(progress: Progress, rescales: list[dict], path: Path, title: str) -> None:
    """Throughput and world size over time, rescales marked with their reasons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [s.t for s in progress.samples]
    fig, ax1 = plt.subplots(figsize=(10, 5))
    nan = float("nan")
    ax1.plot(
        ts,
        [s.throughput if s.throughput is not None else nan for s in progress.samples],
        color="tab:blue",
        label="throughput, live (samples/s)",
    )
    ax1.plot(
        ts,
        [s.measured if s.measured is not None else nan for s in progress.samples],
        color="tab:green",
        linestyle=":",
        label="throughput the autoscaler measured",
    )
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_xlabel("seconds since the job was applied")
    ax1.set_ylabel("samples/s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.step(ts, [s.world_size for s in progress.samples], where="post", color="tab:orange", label="workers")
    ax2.set_ylabel("workers (world size)", color="tab:orange")
    ax2.set_ylim(0, max([s.world_size for s in progress.samples] + [1]) + 1)
    for r in rescales:
        ax1.axvline(r["t"], color="grey", linestyle="--", linewidth=0.8)
        ax1.annotate(
            f"{r['from']}->{r['to']} {r['reason']}",
            (r["t"], 0),
            rotation=90,
            fontsize=7,
            xytext=(3, 6),
            textcoords="offset points",
            va="bottom",
            ha="left",
        )
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; Ctrl-C (or SIGTERM) stops it, and everything it started, at any point."""
    # A shell that starts us in the background ignores SIGINT for us: take it back, and
    # treat SIGTERM the same way, so the `with` blocks below always tear down.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run_demo(args)
    except KeyboardInterrupt:
        print("\n==> interrupted: everything the demo started has been stopped", flush=True)
        return 130


def _run_demo(args: argparse.Namespace) -> int:
    from lepton_localcluster import LocalCluster, ensure_binaries
    from lepton_localcluster.crds import install_crds
    from lepton_localcluster.prometheus import LocalPrometheus

    manifest = yaml.safe_load(args.example.read_text())
    job_name = manifest["metadata"]["name"]
    print("==> control plane binaries", flush=True)
    ensure_binaries(progress=lambda msg: print(f"    {msg}", flush=True))

    with LocalCluster(workdir=args.workdir, kubelet_mode="process") as cluster:
        print(f"==> local control plane up at {cluster.server} (kubeconfig {cluster.kubeconfig})", flush=True)
        api = cluster.api_client()
        install_crds(api)
        prom_dir = Path(cluster.workdir) / "prometheus"
        with LocalPrometheus(cluster.server, cluster.token, str(cluster.ca_file), prom_dir) as prom:
            print(f"==> Prometheus at {prom.url}", flush=True)
            operator = _start_operator(cluster, prom.url)
            try:
                return _apply_and_watch(args, cluster, api, manifest, job_name, operator, prom)
            finally:
                _stop(operator)
                print("==> stopping the operator, Prometheus and the control plane", flush=True)


def _start_operator(cluster, prometheus_url: str) -> subprocess.Popen:
    log = open(Path(cluster.logs_dir) / "operator.log", "ab")
    env = {**os.environ, **cluster.env()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lepton_operator.cli",
            "run",
            "--all-namespaces",
            "--standalone",
            "--prometheus-url",
            prometheus_url,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    print(f"==> operator running (pid {proc.pid}, log {log.name})", flush=True)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _live_throughput(prom_client, namespace: str, job_name: str) -> float | None:
    """Whole-job samples/s over the last 10 s, or None while Prometheus has no data."""
    from lepton_operator.scaling.prometheus import MetricsError

    try:
        return prom_client.throughput(namespace, job_name, 10, now=time.time()).value
    except MetricsError:
        return None


def _apply_and_watch(args, cluster, api, manifest, job_name, operator, prom) -> int:
    from kubernetes import client

    from lepton_localcluster.procs import free_port_pair
    from lepton_operator.scaling.prometheus import PrometheusClient

    prom_client = PrometheusClient(prom.url, timeout=2)

    custom = client.CustomObjectsApi(api)
    manifest.setdefault("metadata", {})["namespace"] = args.namespace
    # Pods are local processes here and torch's TCPStore binds every interface, so a
    # fixed rendezvous port would clash with any other process-mode job on this machine.
    manifest["spec"].setdefault("rendezvousPort", free_port_pair())  # generations use it and the next
    custom.create_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, manifest)
    print(f"==> applied {args.example} ({API_VERSION} LeptonJob {job_name}); watching (Ctrl-C stops)", flush=True)

    progress = Progress()
    seen_rescales: list[dict] = []
    start = time.monotonic()
    interactive = sys.stdout.isatty()
    last_print = 0.0
    status: dict = {}
    while time.monotonic() - start < args.timeout:
        if operator.poll() is not None:
            print(f"\n!! the operator exited with {operator.returncode}; see {Path(cluster.logs_dir) / 'operator.log'}")
            return 1
        job = custom.get_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, job_name)
        status = job.get("status") or {}
        st = parse_status(status)
        elapsed = time.monotonic() - start
        step, total, loss = _latest_step(cluster.pod_log_path(args.namespace, f"{job_name}-worker-0"))
        if step is not None:
            progress.last_step, progress.last_loss = step, loss
            progress.total_steps = total or progress.total_steps
            if progress.first_loss is None:
                progress.first_loss = loss
        live = _live_throughput(prom_client, args.namespace, job_name)
        progress.samples.append(Sample(elapsed, st.world_size, live, st.throughput, step, loss, st.phase or "-"))
        for record in st.rescale_history[len(seen_rescales) :]:
            seen_rescales.append({"t": elapsed, "from": record.from_, "to": record.to, "reason": record.reason})
            print(f"\n** rescale {record.from_} -> {record.to}: {_reason_text(record)}", flush=True)
        line = _render(job_name, status, progress, elapsed)
        if interactive:
            print("\r" + line[: shutil.get_terminal_size().columns - 1].ljust(0), end="", flush=True)
        elif elapsed - last_print >= 5:
            print(line, flush=True)
            last_print = elapsed
        if st.phase in ("Succeeded", "Failed"):
            print()
            break
        time.sleep(1)
    else:
        print(f"\n!! the job did not finish within {args.timeout:.0f}s")

    st = parse_status(status)
    duration = time.monotonic() - start
    print("==> summary")
    print(f"    job {job_name}: {st.phase} after {duration:.0f}s ({st.message or ''})")
    print(f"    final world size {st.world_size}, generations {st.worker_generation}, restarts {st.restarts}")
    for record in st.rescale_history:
        downtime = f"{record.downtime_seconds:.1f}s" if record.downtime_seconds is not None else "?"
        print(
            f"    rescale {record.from_} -> {record.to} at {record.time:%H:%M:%S}, downtime {downtime}: "
            f"{_reason_text(record)}"
        )
    if progress.first_loss is not None:
        print(f"    loss {progress.first_loss:.3f} -> {progress.last_loss:.3f} at step {progress.last_step}")
    for obs in st.autoscaling.observations:
        print(f"    measured: {obs.world_size} workers -> {obs.throughput:.1f} samples/s")
    if progress.samples:
        write_plot(progress, seen_rescales, args.plot, f"LeptonJob {job_name}: throughput and workers")
        print(f"    plot: {args.plot.resolve()}")
    print(f"    logs: {cluster.logs_dir}")
    return 0 if st.phase == "Succeeded" else 1
