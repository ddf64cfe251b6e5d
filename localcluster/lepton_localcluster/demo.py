"""`lepton-local demo`: the whole loop on one machine, no cluster needed.

Starts the local control plane (real apiserver, etcd, scheduler, controller-manager) with
simulated GPU nodes (2 x 8 `nvidia.com/gpu`) whose kubelet runs pods as local processes,
Debian's Prometheus scraping the worker processes, and the operator with its cluster
allocator. Then it applies example LeptonJobs that really train (a small GPT on CPU), one
every `--stagger` seconds, so the jobs compete for the simulated GPUs: the first grows
into idle GPUs, gives some back when the next arrives, and takes them again when that one
finishes. It shows live progress until every job finishes (one line per job: phase,
workers, samples/s, step, loss, progress bar) and prints every allocator decision that
changes a job's size or admission. At the end it prints a summary per job and writes a
PNG plot of each job's workers (and the GPUs in use) and throughput, rescales marked.
Ctrl-C stops everything: every process lives in the cluster's process group.
"""

from __future__ import annotations

import argparse
import json
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

from lepton_operator.api.models import API_VERSION, GROUP, PLURAL, VERSION, LeptonJobStatus, parse_status

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXAMPLES = (REPO_ROOT / "examples" / "local-demo.yaml", REPO_ROOT / "examples" / "local-demo-b.yaml")
RECORDING_RULES = REPO_ROOT / "monitoring" / "rules" / "recording.yaml"
DASHBOARD = REPO_ROOT / "monitoring" / "dashboards" / "lepton-jobs.json"
ALLOCATOR_INTERVAL_SECONDS = 10  # the operator's default is 30: a demo should not make people wait
PRINT_EVERY_SECONDS = 5  # without a terminal (CI, a pipe): one block of lines this often
MESSAGE_MAX = 300  # allocator messages are long; the live output shows this much
GPU = "nvidia.com/gpu"
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
STEP_LINE = re.compile(r"step=(\d+)(?:/(\d+))?\s+loss=([0-9.naninf]+)")
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


@dataclass
class Sample:
    """One row of a job's time series."""

    t: float
    world_size: int
    throughput: float | None  # live, from Prometheus (short window)
    measured: float | None  # what the autoscaler recorded in status (after warm-up)
    step: int | None
    loss: float | None
    phase: str
    dashboard: float | None = None  # the Grafana dashboard's Throughput panel (recording rule, 5 min rate)


@dataclass
class Progress:
    """What the demo has seen of a job's training so far."""

    samples: list[Sample] = field(default_factory=list)
    last_step: int | None = None
    total_steps: int | None = None
    last_loss: float | None = None
    first_loss: float | None = None


@dataclass
class JobTrace:
    """One job of the demo: its manifest, when it is applied, and what was seen of it."""

    name: str
    example: Path | None = None
    manifest: dict = field(default_factory=dict)
    apply_at: float = 0.0  # seconds after the first job was applied
    gpus_per_worker: int = 0
    applied_at: float | None = None
    progress: Progress = field(default_factory=Progress)
    rescales: list[dict] = field(default_factory=list)  # {"t", "from", "to", "reason"}: completed rescales
    status: dict = field(default_factory=dict)
    last_decision: tuple | None = None  # (admitted, target) last printed
    finished_at: float | None = None

    @property
    def phase(self) -> str:
        return parse_status(self.status).phase or "-"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run LeptonJobs end to end on the local control plane, sharing its GPUs"
    )
    parser.add_argument(
        "--example",
        type=Path,
        action="append",
        default=None,
        help="LeptonJob manifest to apply (repeat for several jobs; default: examples/local-demo.yaml "
        "and examples/local-demo-b.yaml)",
    )
    parser.add_argument(
        "--stagger",
        type=float,
        default=120,
        help="seconds between applying one job and the next (the i-th job is applied i x this after the first; "
        "default 120: the first job is measured and has grown into the idle GPUs by then)",
    )
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


def _reason_text(reason: str, message: str | None, limit: int | None = None) -> str:
    """`Reason: message`, without the reason twice when the message starts with it."""
    message = message or ""
    text = message if message.startswith(reason) else f"{reason}: {message}".rstrip(": ")
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def _bar(fraction: float | None, width: int = 20) -> str:
    if fraction is None:
        return "[" + " " * width + "]"
    fraction = min(1.0, max(0.0, fraction))
    filled = int(width * fraction)
    return "[" + "#" * filled + "." * (width - filled) + f"] {100 * fraction:5.1f}%"


def _fraction(st: LeptonJobStatus, progress: Progress) -> float | None:
    """The run's progress: step / total from worker 0's log (fresh), else the trainer's
    own as the operator last read it (status.progress, up to intervalSeconds old)."""
    if progress.last_step and progress.total_steps:
        return progress.last_step / progress.total_steps
    return st.progress


def render_line(trace: JobTrace, elapsed: float, width: int) -> str:
    """One job's live line."""
    name = trace.name.ljust(width)
    if trace.applied_at is None:
        return f"{elapsed:6.0f}s {name} not applied yet (in {max(0.0, trace.apply_at - elapsed):.0f}s)"
    st = parse_status(trace.status)
    progress = trace.progress
    live = progress.samples[-1].throughput if progress.samples and trace.finished_at is None else None
    tput = f"{live:6.1f}" if live is not None else "     -"
    step = f"{progress.last_step}/{progress.total_steps}" if progress.last_step is not None else "-"
    loss = f"{progress.last_loss:.3f}" if progress.last_loss is not None else "-"
    return (
        f"{elapsed:6.0f}s {name} {st.phase or '-':9s} workers={st.workers.ready}/{st.world_size} "
        f"gen={st.worker_generation} samples/s={tput} step={step} loss={loss} {_bar(_fraction(st, progress))}"
    )


def _admitted(st: LeptonJobStatus) -> bool | None:
    for c in st.conditions:
        if c.type == "Admitted":
            return c.status == "True"
    return None


def decision_lines(trace: JobTrace, elapsed: float) -> list[str]:
    """The allocator decisions in the job's status not printed yet (admission, size), and
    the rescales completed since the last look; records them in `trace`."""
    st = parse_status(trace.status)
    lines = []
    alloc = st.allocation
    admitted = _admitted(st)
    if alloc is not None and admitted is not None:
        key = (admitted, alloc.target if admitted else 0)
        last = trace.last_decision
        text = _reason_text(alloc.reason, alloc.message, MESSAGE_MAX)
        if key != last:
            if not admitted:
                place = alloc.queue_position
                where = f" (place {place} in the queue)" if place and "in the queue" not in alloc.message else ""
                lines.append(f"** {trace.name} queued{where}: {text}")
            elif last is None or not last[0]:
                lines.append(f"** {trace.name} admitted at {alloc.target} worker(s): {text}")
            else:
                lines.append(f"** {trace.name} {last[1]} -> {alloc.target}: {text}")
            trace.last_decision = key
    for record in st.rescale_history[len(trace.rescales) :]:
        trace.rescales.append({"t": elapsed, "from": record.from_, "to": record.to, "reason": record.reason})
        downtime = f", downtime {record.downtime_seconds:.1f}s" if record.downtime_seconds is not None else ""
        # An allocator decision was printed when it was made (the ** line above).
        why = "" if record.reason.startswith("Allocator") else f": {_reason_text(record.reason, record.message, 160)}"
        lines.append(f"   {trace.name} now runs {record.to} worker(s) (was {record.from_}{downtime}){why}")
    return lines


def write_plot(traces: list[JobTrace], gpus_in_use: list[tuple[float, int]], capacity: int, path: Path) -> None:
    """Top: each job's workers over time (one colour per job) and the GPUs in use against
    the capacity; bottom: each job's live throughput. Completed rescales are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = float("nan")
    fig, (ax_w, ax_t) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [1, 1]})
    gpw = max([t.gpus_per_worker for t in traces] + [0])
    most_workers = max([s.world_size for t in traces for s in t.progress.samples] + [1])
    if gpw:
        most_workers = max(most_workers, -(-capacity // gpw))
    for i, trace in enumerate(traces):
        colour = COLOURS[i % len(COLOURS)]
        samples = trace.progress.samples
        ts = [s.t for s in samples]
        ax_w.step(
            ts, [s.world_size for s in samples], where="post", color=colour, linewidth=2, label=f"{trace.name} workers"
        )
        ax_t.plot(
            ts,
            [s.throughput if s.throughput is not None else nan for s in samples],
            color=colour,
            label=f"{trace.name}, live",
        )
        ax_t.plot(
            ts,
            [s.measured if s.measured is not None else nan for s in samples],
            color=colour,
            linestyle=":",
            linewidth=1,
            label=f"{trace.name}, as measured by the operator",
        )
        ax_t.plot(
            ts,
            [s.dashboard if s.dashboard is not None else nan for s in samples],
            color=colour,
            linestyle="--",
            linewidth=1,
            label=f"{trace.name}, dashboard panel (5 min rate)",
        )
        for r in trace.rescales:
            for ax in (ax_w, ax_t):
                ax.axvline(r["t"], color=colour, linestyle="--", linewidth=0.7, alpha=0.7)
            ax_t.annotate(
                f"{trace.name} {r['from']}->{r['to']}",
                (r["t"], 0),
                rotation=90,
                fontsize=7,
                color=colour,
                xytext=(3, 6),
                textcoords="offset points",
                va="bottom",
                ha="left",
            )
    ax_w.set_ylabel("workers (world size)")
    top = most_workers * 1.45  # room for the legend above the lines
    ax_w.set_ylim(0, top)
    handles, labels = ax_w.get_legend_handles_labels()
    if gpw:
        # GPUs on a second axis scaled so that a worker's height is its GPUs', drawn behind the workers.
        ax_g = ax_w.twinx()
        ax_g.fill_between(
            [t for t, _ in gpus_in_use],
            [g for _, g in gpus_in_use],
            step="post",
            color="grey",
            alpha=0.25,
            linewidth=0,
            label="GPUs in use (all jobs' pods)",
        )
        ax_g.axhline(capacity, color="black", linestyle="--", linewidth=0.8, label=f"{capacity} GPUs available")
        ax_g.set_ylim(0, top * gpw)
        ax_g.set_yticks(range(0, int(top * gpw) + 1, gpw))  # a tick per worker's GPUs
        ax_g.set_ylabel(f"GPUs ({gpw} per worker)")
        ax_w.set_zorder(ax_g.get_zorder() + 1)
        ax_w.patch.set_visible(False)
        more_handles, more_labels = ax_g.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax_w.legend(handles, labels, loc="upper left", fontsize=8, ncol=2, framealpha=0.9)
    ax_w.set_title("LeptonJobs sharing the cluster's GPUs: workers the allocator gave each job")
    ax_t.set_ylim(0, ax_t.get_ylim()[1] * 1.35)  # room for the legend
    ax_t.set_ylabel("samples/s")
    ax_t.set_xlabel("seconds since the first job was applied")
    ax_t.set_title("throughput")
    ax_t.legend(loc="upper left", fontsize=7, ncol=2)
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


def load_traces(examples: list[Path], stagger: float) -> list[JobTrace]:
    """One JobTrace per manifest, the i-th applied i x stagger seconds after the first."""
    traces = []
    for i, path in enumerate(examples):
        manifest = yaml.safe_load(path.read_text())
        name = manifest["metadata"]["name"]
        if any(t.name == name for t in traces):
            raise SystemExit(f"lepton-local demo: two examples name the same job {name!r}")
        gpus = int(((manifest.get("spec") or {}).get("resources") or {}).get("gpus") or 0)
        traces.append(JobTrace(name=name, example=path, manifest=manifest, apply_at=i * stagger, gpus_per_worker=gpus))
    return traces


def _run_demo(args: argparse.Namespace) -> int:
    from lepton_localcluster import LocalCluster, ensure_binaries
    from lepton_localcluster.crds import install_crds
    from lepton_localcluster.prometheus import LocalPrometheus

    traces = load_traces(args.example or list(DEFAULT_EXAMPLES), args.stagger)
    print("==> control plane binaries", flush=True)
    ensure_binaries(progress=lambda msg: print(f"    {msg}", flush=True))

    with LocalCluster(workdir=args.workdir, kubelet_mode="process") as cluster:
        print(f"==> local control plane up at {cluster.server} (kubeconfig {cluster.kubeconfig})", flush=True)
        api = cluster.api_client()
        install_crds(api)
        prom_dir = Path(cluster.workdir) / "prometheus"
        # The recording rules too, so that the plot's dashboard line is the Grafana panel's numbers.
        with LocalPrometheus(
            cluster.server,
            cluster.token,
            str(cluster.ca_file),
            prom_dir,
            evaluation_interval="5s",
            rule_files=[RECORDING_RULES],
        ) as prom:
            print(f"==> Prometheus at {prom.url}", flush=True)
            operator = _start_operator(cluster, prom.url)
            try:
                return _apply_and_watch(args, cluster, api, traces, operator, prom)
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
            "--allocator-interval-seconds",
            str(ALLOCATOR_INTERVAL_SECONDS),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    print(
        f"==> operator running (pid {proc.pid}, allocator every {ALLOCATOR_INTERVAL_SECONDS}s, log {log.name})",
        flush=True,
    )
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def dashboard_query(title: str, namespace: str, job_name: str) -> str:
    """The first query of the dashboard's panel `title`, for one job: what Grafana sends
    with the namespace and job variables set to it."""
    for value in (namespace, job_name):
        # DNS labels hold no regex metacharacter: the value matches itself under `=~`.
        if not DNS_LABEL.fullmatch(value):
            raise ValueError(f"not a DNS label: {value!r}")
    panels = json.loads(DASHBOARD.read_text())["panels"]
    expr = next(p for p in panels if p.get("title") == title)["targets"][0]["expr"]
    return expr.replace("$namespace", namespace).replace("$job", job_name)


def _dashboard_throughput(prom_client, namespace: str, job_name: str) -> float | None:
    """The job's samples/s as the dashboard's Throughput panel shows it (the recording rule
    the demo's Prometheus evaluates), or None before the rule has a value."""
    from lepton_operator.scaling.prometheus import MetricsError

    try:
        return prom_client.query_scalar(dashboard_query("Throughput", namespace, job_name), time.time()).value
    except MetricsError:
        return None


def _live_throughput(prom_client, namespace: str, job_name: str) -> float | None:
    """Whole-job samples/s over the last 10 s, or None while Prometheus has no data."""
    from lepton_operator.scaling.prometheus import MetricsError

    try:
        return prom_client.throughput(namespace, job_name, 10, now=time.time()).value
    except MetricsError:
        return None


def _gpus_of(pod) -> int:
    total = 0
    for c in pod.spec.containers or []:
        resources = c.resources
        amount = ((resources.limits or {}) if resources else {}).get(GPU) or (
            ((resources.requests or {}) if resources else {}).get(GPU)
        )
        total += int(amount or 0)
    return total


def _capacity(core) -> int:
    return sum(int((n.status.allocatable or {}).get(GPU, 0) or 0) for n in core.list_node().items)


def _gpus_in_use(core, namespace: str) -> int | None:
    """GPUs requested by the namespace's live pods (terminating ones still hold theirs)."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    try:
        pods = core.list_namespaced_pod(namespace).items
    except (ApiException, HTTPError):  # an apiserver hiccup: no point this time
        return None
    return sum(_gpus_of(p) for p in pods if p.status.phase not in ("Succeeded", "Failed"))


def _rendezvous_ports(count: int) -> list[int]:
    """A distinct pair of free ports per job: pods are local processes here and torch's
    TCPStore binds every interface, so a fixed port would clash with any other
    process-mode job on this machine (and generations use the port and the next)."""
    from lepton_localcluster.procs import free_port_pair

    ports: list[int] = []
    taken: set[int] = set()
    while len(ports) < count:
        port = free_port_pair()
        if not {port, port + 1} & taken:
            ports.append(port)
            taken |= {port, port + 1}
    return ports


class Screen:
    """The live output: a block of one line per job, redrawn in place on a terminal (with
    the decisions printed above it), or printed every few seconds without one."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.drawn = 0
        self.last_print: float | None = None

    def event(self, line: str) -> None:
        if self.interactive and self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}F\x1b[J")  # to the block's first line, clear below
            self.drawn = 0
        print(line, flush=True)

    def block(self, lines: list[str], elapsed: float, force: bool = False) -> None:
        if self.interactive:
            columns = shutil.get_terminal_size().columns - 1
            if self.drawn:
                sys.stdout.write(f"\x1b[{self.drawn}F\x1b[J")
            sys.stdout.write("".join(line[:columns] + "\n" for line in lines))
            sys.stdout.flush()
            self.drawn = len(lines)
        elif force or self.last_print is None or elapsed - self.last_print >= PRINT_EVERY_SECONDS:
            print("\n".join(lines), flush=True)
            self.last_print = elapsed


def _apply_and_watch(args, cluster, api, traces: list[JobTrace], operator, prom) -> int:
    from kubernetes import client

    from lepton_operator.scaling.prometheus import PrometheusClient

    prom_client = PrometheusClient(prom.url, timeout=2)
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    capacity = _capacity(core)
    for trace, port in zip(traces, _rendezvous_ports(len(traces)), strict=True):
        trace.manifest.setdefault("metadata", {})["namespace"] = args.namespace
        trace.manifest["spec"].setdefault("rendezvousPort", port)  # generations use it and the next
    names = ", ".join(f"{t.name} at +{t.apply_at:.0f}s" for t in traces)
    print(f"==> {capacity} GPUs on the simulated nodes; applying {names}; watching (Ctrl-C stops)", flush=True)

    screen = Screen(sys.stdout.isatty())
    width = max(len(t.name) for t in traces)
    gpus_in_use: list[tuple[float, int]] = []
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= args.timeout:
            screen.event(f"!! not every job finished within {args.timeout:.0f}s")
            break
        if operator.poll() is not None:
            screen.event(f"!! the operator exited with {operator.returncode}; see {cluster.logs_dir}/operator.log")
            return 1
        for trace in traces:
            if trace.applied_at is None and elapsed >= trace.apply_at:
                custom.create_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, trace.manifest)
                trace.applied_at = elapsed
                source = trace.example or trace.name
                screen.event(f"==> {elapsed:.0f}s: applied {source} ({API_VERSION} LeptonJob {trace.name})")
        for trace in traces:
            if trace.applied_at is not None and trace.finished_at is None:
                _observe(trace, custom, cluster, prom_client, args.namespace, elapsed)
                for line in decision_lines(trace, elapsed):
                    screen.event(line)
                if trace.phase in ("Succeeded", "Failed"):
                    trace.finished_at = elapsed
                    screen.event(f"==> {elapsed:.0f}s: {trace.name} {trace.phase}")
        used = _gpus_in_use(core, args.namespace)
        if used is not None:
            gpus_in_use.append((elapsed, used))
        done = all(t.finished_at is not None for t in traces)
        screen.block([render_line(t, elapsed, width) for t in traces], elapsed, force=done)
        if done:
            break
        time.sleep(1)

    duration = time.monotonic() - start
    print("==> summary", flush=True)
    for trace in traces:
        print_summary(trace)
    peak = max((g for _, g in gpus_in_use), default=0)
    print(f"    all jobs: {duration:.0f}s from the first apply; GPUs in use peaked at {peak} of {capacity}", flush=True)
    if any(t.progress.samples for t in traces):
        write_plot(traces, gpus_in_use, capacity, args.plot)
        print(f"    plot: {args.plot.resolve()}")
    print(f"    logs: {cluster.logs_dir}")
    return 0 if all(t.phase == "Succeeded" for t in traces) else 1


def _observe(trace: JobTrace, custom, cluster, prom_client, namespace: str, elapsed: float) -> None:
    """Read the job's status, its worker-0 log and its live throughput into `trace`."""
    job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, trace.name)
    trace.status = job.get("status") or {}
    st = parse_status(trace.status)
    progress = trace.progress
    step, total, loss = _latest_step(cluster.pod_log_path(namespace, f"{trace.name}-worker-0"))
    if step is not None:
        progress.last_step, progress.last_loss = step, loss
        progress.total_steps = total or progress.total_steps
        if progress.first_loss is None:
            progress.first_loss = loss
    live = _live_throughput(prom_client, namespace, trace.name) if st.world_size else None
    dashboard = _dashboard_throughput(prom_client, namespace, trace.name) if st.world_size else None
    running = st.phase in ("Running", "Rescaling", "Pending")
    progress.samples.append(
        Sample(elapsed, st.world_size if running else 0, live, st.throughput, step, loss, st.phase or "-", dashboard)
    )


def print_summary(trace: JobTrace) -> None:
    """The job's outcome, rescales, loss and measurements."""
    st = parse_status(trace.status)
    took = (trace.finished_at if trace.finished_at is not None else trace.progress.samples[-1].t) - (
        trace.applied_at or 0.0
    )
    print(f"    job {trace.name}: {st.phase} after {took:.0f}s ({st.message or ''})")
    sizes = [trace.rescales[0]["from"]] if trace.rescales else [st.world_size]
    sizes += [r["to"] for r in trace.rescales]
    print(
        f"      final world size {st.world_size}, generations {st.worker_generation}, restarts {st.restarts}; "
        f"sizes {' -> '.join(str(n) for n in sizes)}"
    )
    for record in st.rescale_history:
        downtime = f"{record.downtime_seconds:.1f}s" if record.downtime_seconds is not None else "?"
        why = _reason_text(record.reason, record.message, 160)
        print(f"      rescale {record.from_} -> {record.to} at {record.time:%H:%M:%S}, downtime {downtime}: {why}")
    progress = trace.progress
    if progress.first_loss is not None:
        print(f"      loss {progress.first_loss:.3f} -> {progress.last_loss:.3f} at step {progress.last_step}")
    latest: dict[int, float] = {}
    for obs in st.autoscaling.observations:
        latest[obs.world_size] = obs.throughput
    for size in sorted(latest):
        print(f"      measured: {size} workers -> {latest[size]:.1f} samples/s")
    shown = [s.dashboard for s in progress.samples if s.dashboard is not None]
    if shown:
        print(f"      dashboard Throughput panel (5 min rate): last {shown[-1]:.1f}, peak {max(shown):.1f} samples/s")
