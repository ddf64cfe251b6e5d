"""`lepton-operator run`: start the operator (kopf) with liveness and metrics endpoints.

    lepton-operator run [--namespace NS ...] [--all-namespaces]
                        [--liveness-port 8080] [--metrics-port 8081]
                        [--prometheus-url URL] [--standalone] [--peering NAME] [--verbose]
                        [--no-network-policies] [--prometheus-namespaces NS,KEY=VALUE,...]
                        [--policy-file PATH] [--no-allocator] [--allocator-interval-seconds S]
                        [--gpu-budget N] [--api-threads N] [--api-qps QPS] [--api-burst N]

Credentials: in a pod, the ServiceAccount; elsewhere `KUBECONFIG` (or ~/.kube/config),
through the Kubernetes client, for kopf and for the operator's own calls alike.

Admin policy: `--policy-file` names a YAML or JSON file of `api.policy.AdminPolicy`
settings (the chart renders its `policy:` values into one); without it the defaults
apply. An unreadable or invalid file stops the command with exit status 2.

API load: the operator's own requests (`reconcile/kube.py`) share one client-side rate limit,
`--api-qps` per second with bursts of `--api-burst` (like kube-controller-manager's
`--kube-api-qps`/`--kube-api-burst`; 0 QPS: unlimited), and a 429 is retried after its
Retry-After. kopf's watches and bookkeeping patches are outside it (docs/architecture.md).

Peering (docs/reliability.md, row 6): unless `--standalone`, replicas elect one active operator
through kopf's peering objects (`crds/kopf-peering.yaml`): a `KopfPeering` named
`--peering` (default `lepton-operator`) in each watched namespace, or a
`ClusterKopfPeering` with `--all-namespaces`. The operator creates the peering object when
it is missing (best effort: with RBAC that only allows patch, install it beforehand). With
no peering CRD installed, kopf warns and runs standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from lepton_operator.api.models import FINALIZER
from lepton_operator.api.policy import DEFAULT_POLICY, AdminPolicy, InvalidPolicy, parse_policy
from lepton_operator.reconcile.isolation import namespace_list
from lepton_operator.reconcile.kube import DEFAULT_API_BURST, DEFAULT_API_QPS, DEFAULT_API_THREADS

DEFAULT_PEERING = "lepton-operator"


def _at_least(minimum: float, kind=float):
    """An argparse type: a number >= minimum, with a clear error otherwise."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value

    return parse


def _qps(text: str) -> float:
    """An argparse type: requests per second, a finite number >= 0 (0: unlimited)."""
    value = _at_least(0.0)(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_parser(subparsers) -> None:
    """Register `run` with the top-level CLI."""
    p = subparsers.add_parser(
        "run", help="run the operator (kopf)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; globs allowed as in kopf)",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch the whole cluster")
    p.add_argument(
        "--liveness-port", type=int, default=8080, help="port of the /healthz liveness endpoint (0: none; default 8080)"
    )
    p.add_argument(
        "--metrics-port", type=int, default=8081, help="port of the operator's own /metrics (0: none; default 8081)"
    )
    p.add_argument("--bind-address", default="0.0.0.0", help="address the endpoints listen on")
    p.add_argument(
        "--prometheus-url",
        default=os.environ.get("LEPTON_PROMETHEUS_URL"),
        help="Prometheus HTTP API base URL for autoscaling (env LEPTON_PROMETHEUS_URL)",
    )
    p.add_argument("--prometheus-timeout", type=float, default=5.0, help="seconds per Prometheus query")
    p.add_argument("--prometheus-token-file", default=None, help="bearer token file for Prometheus")
    p.add_argument("--prometheus-ca-file", default=None, help="CA bundle for Prometheus TLS")
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=30.0,
        help="reconcile each job at least this often (safety net; default 30)",
    )
    p.add_argument(
        "--relist-seconds",
        type=float,
        default=60.0,
        help="re-list each job's pods this often, so a stale watch cache heals (default 60)",
    )
    p.add_argument(
        "--settled-relist-seconds",
        type=float,
        default=300.0,
        help="... and this often while nothing waits on a job's pods: it runs with no rescale "
        "under way, is queued or has finished (default 300; never more often than --relist-seconds)",
    )
    p.add_argument(
        "--policy-file",
        default=None,
        metavar="PATH",
        help="admin policy, YAML or JSON (api/policy.py); the operator refuses to start on an invalid one "
        "(default: the built-in policy)",
    )
    p.add_argument(
        "--network-policies",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep a NetworkPolicy per job: only its own pods reach its workers (default on)",
    )
    p.add_argument(
        "--prometheus-namespaces",
        type=namespace_list,
        default=("monitoring",),
        metavar="NS,KEY=VALUE,...",
        help="namespaces (names, or key=value namespace labels) whose pods may scrape the workers (default monitoring)",
    )
    p.add_argument(
        "--allocator",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the cluster allocator admits jobs (gang admission) and decides every elastic job's size from "
        "measured throughput across all jobs (default on); off: each job is scaled on its own and starts at once",
    )
    p.add_argument(
        "--allocator-interval-seconds",
        type=_at_least(1.0),
        default=30.0,
        metavar="S",
        help="how often the allocator runs; it also runs within seconds of a job arriving or finishing (default 30)",
    )
    p.add_argument(
        "--gpu-budget",
        type=_at_least(0, int),
        default=None,
        metavar="N",
        help="namespaced installs, where nodes cannot be read: the GPUs the allocator may hand out "
        "(default: read from the nodes)",
    )
    peering = p.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone", action="store_true", help="no peering: this replica acts alone (single-replica installs, tests)"
    )
    peering.add_argument(
        "--peering",
        default=DEFAULT_PEERING,
        metavar="NAME",
        help=f"kopf peering object name (default {DEFAULT_PEERING})",
    )
    p.add_argument("--priority", type=int, default=0, help="peering priority (highest active replica acts)")
    p.add_argument(
        "--api-threads",
        type=int,
        default=DEFAULT_API_THREADS,
        help="threads (and pooled connections) for API and Prometheus calls",
    )
    p.add_argument(
        "--api-qps",
        type=_qps,
        default=DEFAULT_API_QPS,
        metavar="QPS",
        help="the operator's own API requests per second, averaged (0: unlimited; default "
        f"{DEFAULT_API_QPS:g}: a settled job costs ~0.6 requests a minute, a starting one ~29; 1,000 elastic "
        "jobs created at once had all their pods within 9 minutes, benchmarks/RESULTS.md; like "
        "kube-controller-manager's --kube-api-qps)",
    )
    p.add_argument(
        "--api-burst",
        type=_at_least(1, int),
        default=DEFAULT_API_BURST,
        metavar="N",
        help="the most API requests sent at once after a quiet spell, the bucket's size (at least 1; default "
        f"{DEFAULT_API_BURST}: a few jobs' start, ~25 requests each; like --kube-api-burst)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.set_defaults(func=run)


def make_settings(args):
    """kopf settings: our own annotations/finalizer names, bounded watches, no log events."""
    import kopf

    settings = kopf.OperatorSettings()
    # kopf's bookkeeping lives in lepton.ai annotations, never in our status.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="lepton.ai")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="lepton.ai", key="last-handled-configuration"
    )
    # Handlers' log lines stay logs (the reconciler posts its own, deduplicated events);
    # explicit kopf.event() calls (the autoscaler's) are still posted.
    settings.posting.loggers = False
    # A watch that stalls silently is cut and reconnected (docs/reliability.md, row 7).
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 75
    settings.watching.connect_timeout = 10
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = 30
    # Daemons are our per-job loops: cancel them quickly when a job goes.
    settings.background.cancellation_polling = 5
    return settings


def ensure_peering_objects(api_client, name: str, namespaces: list[str], clusterwide: bool) -> bool:
    """Create the kopf peering object(s) if missing; False when peering is unavailable.

    Unavailable means the peering CRDs are not installed; RBAC that forbids creating
    the object is tolerated (it may have been installed beforehand).
    """
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(api_client)
    log = logging.getLogger("lepton_operator.peering")
    targets = [(None, "clusterkopfpeerings", "ClusterKopfPeering")] if clusterwide else []
    # A glob names no single namespace: nothing to create there.
    targets += [(ns, "kopfpeerings", "KopfPeering") for ns in namespaces if not any(ch in ns for ch in "*?[!")]
    for namespace, plural, kind in targets:
        # Read before creating: with the chart's RBAC the object exists and the operator
        # may not create it, and the apiserver checks `create` before it notices a 409.
        try:
            if namespace is None:
                custom.get_cluster_custom_object("kopf.dev", "v1", plural, name)
            else:
                custom.get_namespaced_custom_object("kopf.dev", "v1", namespace, plural, name)
            continue
        except ApiException as e:
            if e.status != 404:
                log.warning(f"could not read {kind} {name!r}: HTTP {e.status} {e.reason}")
                continue
        body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}}
        try:
            if namespace is None:
                custom.create_cluster_custom_object("kopf.dev", "v1", plural, body)
            else:
                custom.create_namespaced_custom_object("kopf.dev", "v1", namespace, plural, body)
        except ApiException as e:
            if e.status == 404:
                log.warning("kopf peering CRDs are not installed (crds/kopf-peering.yaml): running standalone")
                return False
            if e.status != 409:
                log.warning(f"could not create {kind} {name!r}: HTTP {e.status} {e.reason}")
    return True


def read_policy(path: Optional[str]) -> AdminPolicy:
    """The admin policy in the file at `path` (the defaults without one); InvalidPolicy when
    it cannot be read or is not a valid policy."""
    if path is None:
        return DEFAULT_POLICY
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidPolicy(f"cannot read it: {e}") from None
    return parse_policy(text)


def without_routine_successes(record: logging.LogRecord) -> bool:
    """A logging filter: drop kopf's "Handler 'x' succeeded." / "Timer 'tick' succeeded."
    lines (kept with --verbose). Every watch event and every 5 s tick of every job makes
    one: 140 lines a second at 1,000 jobs, with nothing to say. Failures and retries are
    logged at WARNING and ERROR and stay."""
    return not (record.levelno == logging.INFO and str(record.msg).endswith("' succeeded."))


def run(args) -> int:
    """Start the operator and block until it stops (SIGTERM/SIGINT)."""
    import lepton_operator.reconcile.memprofile  # noqa: F401  (LEPTON_TRACEMALLOC=1: tracemalloc, dump on SIGUSR1)
    from lepton_operator.reconcile import malloc

    malloc.cap_malloc_arenas()
    malloc.trim_malloc_heap_periodically()

    try:
        policy = read_policy(args.policy_file)
    except InvalidPolicy as e:
        print(f"lepton-operator run: refusing to start: --policy-file {args.policy_file}: {e}", file=sys.stderr)
        return 2

    import kopf

    from lepton_operator import metrics
    from lepton_operator.api.models import GROUP, PLURAL, VERSION
    from lepton_operator.reconcile import (
        handlers,  # noqa: F401  (registers the kopf handlers)
        supervise,
    )
    from lepton_operator.reconcile.config import OperatorConfig
    from lepton_operator.reconcile.context import OperatorContext
    from lepton_operator.reconcile.kube import Kube, api_client_from_environment
    from lepton_operator.reconcile.ratelimit import TokenBucket

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("kubernetes").setLevel(logging.WARNING)
        logging.getLogger("aiohttp").setLevel(logging.WARNING)
        logging.getLogger("kopf.objects").addFilter(without_routine_successes)
    logging.getLogger("lepton_operator").info(f"memory allocator: {malloc.allocator()}")
    config = OperatorConfig(
        prometheus_url=args.prometheus_url,
        prometheus_timeout=args.prometheus_timeout,
        prometheus_token_file=args.prometheus_token_file,
        prometheus_ca_file=args.prometheus_ca_file,
        resync_seconds=args.resync_seconds,
        relist_seconds=args.relist_seconds,
        settled_relist_seconds=args.settled_relist_seconds,
        policy=policy,
        network_policies=args.network_policies,
        prometheus_namespaces=args.prometheus_namespaces,
        allocator=args.allocator,
        allocator_interval_seconds=args.allocator_interval_seconds,
        gpu_budget=args.gpu_budget,
        namespaces=tuple(args.namespace),
    )
    if config.network_policies:
        handlers.watch_network_policies()
    clusterwide = bool(args.all_namespaces or not args.namespace)
    api_client = api_client_from_environment(args.api_threads)
    # One rate limit for the process, shared by every reactor start (supervise restarts).
    limiter = TokenBucket(args.api_qps, args.api_burst)

    @kopf.on.startup()
    async def api_threads(**_) -> None:
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=args.api_threads, thread_name_prefix="lepton-api")
        )

    @kopf.on.login()
    def login(**kwargs) -> Optional[kopf.ConnectionInfo]:
        return kopf.login_via_client(**kwargs)

    standalone = args.standalone or not ensure_peering_objects(api_client, args.peering, args.namespace, clusterwide)
    metrics.serve(args.metrics_port, args.bind_address)
    liveness = f"http://{args.bind_address}:{args.liveness_port}/healthz" if args.liveness_port else None
    logging.getLogger("lepton_operator").info(
        f"starting: {'all namespaces' if clusterwide else 'namespaces ' + ', '.join(args.namespace)}, "
        f"{'standalone' if standalone else 'peering ' + args.peering}, liveness {liveness}, "
        f"metrics port {args.metrics_port}, API requests "
        f"{'unlimited' if limiter.unlimited else f'{args.api_qps:g}/s, burst {args.api_burst}'}"
    )
    logging.getLogger("lepton_operator").info(f"admin policy: {policy.model_dump_json(by_alias=True)}")
    logging.getLogger("lepton_operator").info(
        f"cluster allocator: every {args.allocator_interval_seconds:g} s, capacity "
        f"{'from the nodes' if args.gpu_budget is None else f'budget {args.gpu_budget} GPUs'}"
        if args.allocator
        else "cluster allocator off: each job is scaled on its own"
    )

    supervise.tolerate_unserved_resources()
    supervise.limit_kopf_requests(limiter)

    def start_reactor() -> None:
        kube = Kube(api_client, limiter)
        supervise.report_kopf_job_patches(kube.saw_job)
        supervise.wait_until_served(lambda: supervise.unserved_reason(kube), f"{PLURAL}.{GROUP}/{VERSION}")
        kopf.run(
            settings=make_settings(args),
            standalone=standalone,
            peering_name=None if standalone else args.peering,
            priority=args.priority,
            liveness_endpoint=liveness,
            clusterwide=clusterwide,
            namespaces=args.namespace,
            memo=OperatorContext(kube=kube, config=config),
        )

    supervise.run_until_stopped(
        start_reactor, supervise.api_errors(), on_restart=lambda _: metrics.count_reactor_restart()
    )
    return 0
