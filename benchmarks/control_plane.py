"""Control-plane benchmark: the LeptonJob operator next to Kubernetes' own Job controller.

    .venv/bin/python benchmarks/control_plane.py [--ks 1,10,100] [--workers 8]
        [--idle-seconds 40] [--api-jobs 5] [--churn-seconds 600] [--churn-jobs 10]
        [--one-job N] [--api-threads N] [--api-qps QPS] [--api-burst N]
        [--operator-only] [--[no-]elastic] [--profile-memory] [--quick]
        [--json out.json] [--markdown out.md] [--artifacts DIR]

One local control plane (real etcd, kube-apiserver 1.20.2, scheduler and
controller-manager; `lepton_localcluster`) with enough simulated 8-GPU nodes for
the largest K, the simulated kubelet in default mode (a bound pod is marked Running at
once; nothing executes), and the operator (`python -m lepton_operator.cli run`) as a
subprocess. What it measures:

1. Latency, for each K: K `batch/v1` Jobs (`parallelism = completions = W`, the same
   worker pod the operator builds) in namespace `bench-job`, then K LeptonJobs of W
   workers (1 GPU each) in namespace `bench-lj`. The phases run one after the other, never
   at once, so both controllers get the scheduler and the simulated kubelet to
   themselves; each phase is cleaned up (all pods gone) before the next. A watch on the
   namespace's pods stamps, on this machine's monotonic clock, when each pod is first
   seen and first seen Running. Per job: create request -> all W pods exist, and -> all W
   pods Running; p50/p99/max over jobs, and the total (first create -> last job done).
2. Footprint: RSS and CPU time of the operator process (from /proc) sampled every
   second; after each LeptonJob phase the K jobs are held idle for `--idle-seconds`
   (RSS, CPU %); then `--churn-seconds` of create/delete cycles of `--churn-jobs` jobs:
   RSS at the start/middle/end of the churn, measured at cycle boundaries (same state:
   no jobs), and the least-squares slope.
3. API cost: the operator runs as its own ServiceAccount (bound to cluster-admin) so the
   apiserver's audit log (level Metadata, only that user) attributes every request it
   sends. `--api-jobs` lifecycles of one job each (create -> all Running -> delete ->
   gone), one after the other; requests per lifecycle by verb/resource, against the
   protocol minimum (`minimum_requests()`). The apiserver's `apiserver_request_total`
   (which has no client label in 1.20) is diffed over the same window as a cross-check
   for `leptonjobs`, the one resource only the operator and this harness touch. Watches
   are per connection, not per job, and are reported apart.
4. One job at the schema's maximum (`--one-job N`, N <= 1000; after the K phases, before
   the API phase; `--ks ''` or `--ks 0` runs no K phase): one LeptonJob of N 1-GPU
   workers (`workers.min = max = replicas = N`; with `--elastic`, min N/2 and autoscaling
   like every job of the run), on nodes sized for it: apply -> all N pods created, -> all
   N Running (pod-watch stamps), the operator's requests for it (audit log: apply -> its
   writes settle, and delete -> all pods gone), and the stored size of the object and of
   its status once Running (compact JSON of a GET; etcd's limit is 1.5 MiB).
5. The client-side rate limit (`--api-qps`, `--api-burst`, the operator's defaults unless
   given), checked on the audit log over the whole run: every request of the operator's
   identity by the apiserver's receive time (watches, long-running connections, counted
   apart): the most requests in any 1 s (bound burst + qps), in any 10 s / 10 (bound
   qps + burst/10), and a token bucket (qps, burst + max(1, qps x 0.05) tokens: slack for
   50 ms of send -> receive jitter) replayed over them, whose largest overdraft is 0 when the limit
   was honoured; all requests (one bucket covers both of the operator's clients), then per
   client (the operator's own, and kopf's). `--api-qps 0`: the figures, no verdict.
6. Memory, with `--profile-memory`: tracemalloc profiles of the operator (SIGUSR1) once
   warm, at each K, with the one job, and at the churn's start, middle and end (cycle
   boundaries, no jobs): each report's growth section is what happened since the one
   before; the report shows the head of each and what grew most during the churn.

Everything started here (cluster, operator) is stopped on exit, on an error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from lepton_localcluster import LocalCluster, OperatorProcess, SimulatedNode
from lepton_localcluster.procs import free_port
from lepton_operator.api.crd import crd_for_server
from lepton_operator.api.models import API_VERSION, GROUP, KIND, MAX_WORKERS, PLURAL, VERSION, parse_job
from lepton_operator.desired import LABEL_JOB_NAME, JobRef, build_worker_pod
from lepton_operator.reconcile.kube import DEFAULT_API_BURST, DEFAULT_API_QPS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stubprom import StubPrometheus  # noqa: E402  (a module next to this script)

NS_LJ = "bench-lj"
NS_JOB = "bench-job"
NS_SYSTEM = "bench-system"
OPERATOR_SA = "lepton-operator"
OPERATOR_USER = f"system:serviceaccount:{NS_SYSTEM}:{OPERATOR_SA}"
GPUS_PER_NODE = 8
BATCH_JOB_LABEL = "job-name"  # set by the Job controller on its pods
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the cluster


class AuditedCluster(LocalCluster):
    """A LocalCluster whose apiserver writes an audit log of one user's requests.

    The audit flags go through LocalCluster's `extra_args`; the policy logs only
    `audit_user`, at level Metadata, once per request (ResponseComplete), so other clients
    pay nothing for it. Policy and log live in a directory of their own, removed on stop.
    """

    def __init__(self, *args, audit_user: str, admin_user: str = "admin", **kwargs):
        self.audit_dir = Path(tempfile.mkdtemp(prefix="bench-audit-"))
        self.audit_log = self.audit_dir / "audit.log"
        policy = self.audit_dir / "audit-policy.yaml"
        policy.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived", "ResponseStarted"],
                    "rules": [
                        {"level": "Metadata", "users": [audit_user]},
                        # Creates by the admin user (this harness, and the controller-manager,
                        # which runs on the admin kubeconfig): the apiserver's own timestamps
                        # for job create -> pod creates, for both controllers.
                        # Pods at level Request: the Job controller's have generateName, and
                        # only the body (ownerReferences) says which Job a pod belongs to.
                        {
                            "level": "Request",
                            "users": [admin_user],
                            "verbs": ["create"],
                            "resources": [{"group": "", "resources": ["pods"]}],
                        },
                        {
                            "level": "Metadata",
                            "users": [admin_user],
                            "verbs": ["create"],
                            "resources": [
                                {"group": "batch", "resources": ["jobs"]},
                                {"group": GROUP, "resources": [PLURAL]},
                            ],
                        },
                        {"level": "None"},
                    ],
                }
            )
        )
        audit = [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-maxsize=0",
            "--audit-log-format=json",
        ]
        super().__init__(*args, extra_args={"kube-apiserver": audit}, **kwargs)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.audit_dir, ignore_errors=True)


def raw(
    api: client.ApiClient,
    method: str,
    path: str,
    body=None,
    query=None,
    content_type=None,
    timeout=(5, 60),
    stream: bool = False,
):
    """One request through the client's REST layer; JSON dict, or the raw response if `stream`."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type or "application/json"
    params = api.param_serialize(
        method=method,
        resource_path=path,
        query_params=list((query or {}).items()),
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = api.call_api(*params, _request_timeout=timeout)
    if stream:
        return resp.response
    resp.read()
    if not 200 <= resp.status < 300:
        raise ApiException(http_resp=resp)
    if not resp.data:
        return {}
    try:
        return json.loads(resp.data)
    except ValueError:
        return resp.data.decode(errors="replace")


def install_crd(api: client.ApiClient) -> None:
    """The LeptonJob CRD as generated for this server's version; wait until it is served."""
    version = client.VersionApi(api).get_code().git_version
    try:
        client.ApiextensionsV1Api(api).create_custom_resource_definition(crd_for_server(version))
    except ApiException as e:
        if e.status != 409:
            raise
    deadline = time.monotonic() + 60
    while True:
        try:
            raw(api, "GET", f"/apis/{GROUP}/{VERSION}/{PLURAL}")
            return
        except ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def operator_kubeconfig(cluster: LocalCluster, api: client.ApiClient, path: Path) -> Path:
    """A kubeconfig for the operator's own identity (ServiceAccount, cluster-admin)."""
    core = client.CoreV1Api(api)
    for ns in (NS_SYSTEM, NS_LJ, NS_JOB):
        try:
            core.create_namespace({"metadata": {"name": ns}})
        except ApiException as e:
            if e.status != 409:
                raise
    try:
        core.create_namespaced_service_account(NS_SYSTEM, {"metadata": {"name": OPERATOR_SA}})
    except ApiException as e:
        if e.status != 409:
            raise
    try:
        client.RbacAuthorizationV1Api(api).create_cluster_role_binding(
            {
                "metadata": {"name": "bench-lepton-operator"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": NS_SYSTEM}],
            }
        )
    except ApiException as e:
        if e.status != 409:
            raise
    token = core.create_namespaced_service_account_token(
        OPERATOR_SA, NS_SYSTEM, {"spec": {"expirationSeconds": 86400}}
    ).status.token
    cfg = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    cfg["users"] = [{"name": OPERATOR_SA, "user": {"token": token}}]
    for ctx in cfg["contexts"]:
        ctx["context"]["user"] = OPERATOR_SA
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------ workloads


def lepton_spec(workers: int, elastic: bool = False) -> dict:
    """A LeptonJob spec of `workers` 1-GPU workers: fixed size, or (`elastic`) between
    workers/2 and workers, starting at workers, with autoscaling on (the stub Prometheus
    answers its queries; the cluster allocator decides its size)."""
    spec = {
        "image": "lepton-ai/lepton-trainer:0.1.0",
        "workers": {"min": workers, "max": workers, "initial": workers},
        "resources": {"gpus": 1},
        "terminationGracePeriodSeconds": 1,
    }
    if elastic:
        spec["workers"]["min"] = max(1, workers // 2)
        # The spec's defaults, but a short warm-up: the stub answers at once, and the queries
        # (the load this measures) start within the idle window.
        spec["autoscaling"] = {"enabled": True, "intervalSeconds": 30, "windowSeconds": 60, "warmupSeconds": 10}
    return spec


def lepton_job(name: str, workers: int, elastic: bool = False) -> dict:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": lepton_spec(workers, elastic)}


def batch_job(name: str, workers: int) -> dict:
    """A batch/v1 Job running the same worker pod the operator builds (same container,
    resources, env, security), `parallelism = completions = workers`."""
    spec = parse_job(name, lepton_spec(workers))
    pod = build_worker_pod(
        JobRef(name=name, namespace=NS_JOB, uid="00000000-0000-0000-0000-000000000000"), spec, 0, 1, workers
    )
    pod_spec = dict(pod["spec"])
    for field in ("hostname", "subdomain"):  # one Service identity per LeptonJob pod; none here
        pod_spec.pop(field, None)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "parallelism": workers,
            "completions": workers,
            "backoffLimit": 0,
            "template": {"metadata": {"labels": {"lepton.ai/bench": "job"}}, "spec": pod_spec},
        },
    }


class Workload:
    """How to create, list and delete one kind of job."""

    def __init__(self, kind: str, namespace: str, pod_label: str, path: str, build):
        self.kind, self.namespace, self.pod_label, self.path, self.build = kind, namespace, pod_label, path, build
        self.options: dict = {}  # keyword arguments for `build` (LeptonJobs: elastic)

    def create(self, api, name: str, workers: int) -> None:
        raw(api, "POST", self.path, body=self.build(name, workers, **self.options))

    def delete_all(self, api) -> None:
        raw(
            api,
            "DELETE",
            self.path,
            body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
        )

    def count(self, api) -> int:
        return len(raw(api, "GET", self.path, query={"limit": "5000"}).get("items", []))


LEPTON = Workload(
    "LeptonJob", NS_LJ, LABEL_JOB_NAME, f"/apis/{GROUP}/{VERSION}/namespaces/{NS_LJ}/{PLURAL}", lepton_job
)
BATCH = Workload("Job", NS_JOB, BATCH_JOB_LABEL, f"/apis/batch/v1/namespaces/{NS_JOB}/jobs", batch_job)


# ------------------------------------------------------------------ observation


class PodWatch(threading.Thread):
    """Watches one namespace's pods; stamps first-seen and first-Running times per pod.

    Reads the watch stream as raw JSON lines: deserializing into the client's models
    would make this thread, not the controllers, the bottleneck at 1000s of pods.
    """

    def __init__(self, api: client.ApiClient, namespace: str, job_label: str):
        super().__init__(daemon=True, name=f"podwatch-{namespace}")
        self.api, self.namespace, self.job_label = api, namespace, job_label
        self.lock = threading.Lock()
        self.pods: dict[str, dict] = {}  # uid -> {job, added, running}
        self.live: set[str] = set()
        self.ready = threading.Event()
        self._halt = threading.Event()

    def _see(self, type_: str, pod: dict, now: float) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self.lock:
            if type_ == "DELETED":
                self.live.discard(uid)
                return
            self.live.add(uid)
            rec = self.pods.get(uid)
            if rec is None:
                rec = self.pods[uid] = {
                    "job": (meta.get("labels") or {}).get(self.job_label),
                    "added": now,
                    "running": None,
                }
            if rec["running"] is None and (pod.get("status") or {}).get("phase") == "Running":
                rec["running"] = now

    def run(self) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        rv = None
        while not self._halt.is_set():
            try:
                if rv is None:
                    listing = raw(self.api, "GET", path)
                    now = time.monotonic()
                    with self.lock:
                        self.live.clear()
                    for pod in listing.get("items", []):
                        self._see("ADDED", pod, now)
                    rv = listing["metadata"]["resourceVersion"]
                    self.ready.set()
                resp = raw(
                    self.api,
                    "GET",
                    path,
                    stream=True,
                    timeout=(5, 60),
                    query={"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true", "timeoutSeconds": "30"},
                )
                if resp.status != 200:
                    rv = None
                    time.sleep(0.5)
                    continue
                buf = b""
                for chunk in resp.stream(65536, decode_content=True):
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        now = time.monotonic()
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            rv = None  # 410 Gone: list again
                            break
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        if event.get("type") != "BOOKMARK":
                            self._see(event["type"], obj, now)
                    if self._halt.is_set() or rv is None:
                        break
                resp.release_conn()
            except Exception as e:  # connection trouble: list again
                if not self._halt.is_set():
                    log(f"pod watch {self.namespace}: {type(e).__name__}: {e}; relisting")
                    rv = None
                    time.sleep(0.5)

    def stop(self) -> None:
        self._halt.set()

    def snapshot(self) -> dict[str, list[dict]]:
        """Pods seen so far, by job name."""
        out: dict[str, list[dict]] = defaultdict(list)
        with self.lock:
            for rec in self.pods.values():
                out[rec["job"]].append(dict(rec))
        return out

    def live_count(self) -> int:
        with self.lock:
            return len(self.live)


class ProcSampler(threading.Thread):
    """Samples a process's RSS (MiB) and CPU time (s) from /proc every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True, name="procsampler")
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, rss MiB, cpu s)
        self.load: list[tuple[float, float]] = []  # (monotonic, 1-minute load average), every 10 s
        self._halt = threading.Event()

    @staticmethod
    def read(pid: int) -> tuple[float, float]:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
        with open(f"/proc/{pid}/statm") as f:
            rss_pages = int(f.read().split()[1])
        return rss_pages * PAGE_KB / 1024.0, cpu

    def sample(self) -> tuple[float, float, float] | None:
        try:
            rss, cpu = self.read(self.pid)
        except (OSError, IndexError, ValueError):
            return None
        s = (time.monotonic(), rss, cpu)
        self.samples.append(s)
        return s

    def run(self) -> None:
        n = 0
        while not self._halt.wait(self.interval):
            self.sample()
            if n % 10 == 0:
                self.load.append((time.monotonic(), os.getloadavg()[0]))
            n += 1

    def stop(self) -> None:
        self._halt.set()

    def window(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]


def audit_offset(cluster: AuditedCluster) -> int:
    try:
        return cluster.audit_log.stat().st_size
    except OSError:
        return 0


def audit_events(
    cluster: AuditedCluster, start: int, end: int | None = None, user: str | None = OPERATOR_USER
) -> list[dict]:
    """Audited requests of `user` (None: anyone) logged between two byte offsets of the audit log."""
    try:
        with open(cluster.audit_log, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
    except OSError:
        return []
    out = []
    for line in data.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if (user is None or (ev.get("user") or {}).get("username") == user) and ev.get("stage") in (
            "ResponseComplete",
            "Panic",
        ):
            out.append(ev)
    return out


def per_job_request(ev: dict) -> bool:
    """Whether a request counts towards the operator's per-job cost: everything but kopf's
    watches and the lists that open them (per connection, shared by every job). The
    operator's own lists (a job's pod re-list, the shared node list) count."""
    if ev.get("verb") == "watch":
        return False
    return not (ev.get("verb") == "list" and (ev.get("userAgent") or "").startswith("kopf"))


WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")


def request_key(ev: dict) -> str:
    """`verb resource[/subresource]`, with ` (409)` for a create that found the name taken."""
    ref = ev.get("objectRef") or {}
    resource = ref.get("resource") or ev.get("requestURI", "?").split("?")[0]
    if ref.get("subresource"):
        resource += "/" + ref["subresource"]
    code = (ev.get("responseStatus") or {}).get("code")
    return f"{ev.get('verb')} {resource}" + (f" ({code})" if code == 409 else "")


def _ts(stamp: str) -> float:
    """Seconds since the epoch of an audit timestamp (RFC 3339 with microseconds)."""
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def stage_breakdown(events: list[dict], workers: int) -> dict:
    """Median seconds of each step from job create to its W-th pod create, by the
    apiserver's clock (audit log): where a controller spends its time."""
    per_job: dict[str, dict] = defaultdict(lambda: {"pods": []})
    for ev in events:
        ref = ev.get("objectRef") or {}
        verb, res, sub, name = ev.get("verb"), ref.get("resource"), ref.get("subresource"), ref.get("name") or ""
        t_in, t_out = _ts(ev["requestReceivedTimestamp"]), _ts(ev["stageTimestamp"])
        if verb == "create" and res in (PLURAL, "jobs") and not sub:
            per_job[name]["create"] = t_in
        elif verb == "create" and res == "pods" and not sub:
            if "-worker-" in name:  # LeptonJob worker: <job>-worker-<i>
                job = name.rsplit("-worker-", 1)[0]
            else:  # Job controller: generateName, the owner is in the body
                owners = ((ev.get("requestObject") or {}).get("metadata") or {}).get("ownerReferences") or []
                job = owners[0].get("name") if owners else None
            if job:
                per_job[job]["pods"].append(t_out)
        elif res == PLURAL and verb == "patch" and not sub:
            per_job[name].setdefault("finalizer", t_out)
        elif res == PLURAL and verb == "get":
            per_job[name].setdefault("first_get", t_in)
        elif res == PLURAL and verb == "patch" and sub == "status":
            per_job[name].setdefault("first_status", t_out)
            if (ev.get("responseStatus") or {}).get("code") == 200:
                per_job[name].setdefault("first_status_ok", t_out)
        elif res == "services" and verb == "create" and name.endswith("-workers"):
            per_job[name[: -len("-workers")]].setdefault("service", t_out)
    steps: dict[str, list[float]] = defaultdict(list)
    for job in per_job.values():
        pods = sorted(job["pods"])
        t0 = job.get("create")
        if t0 is None or len(pods) < workers:
            continue
        for key in ("finalizer", "first_get", "first_status", "first_status_ok", "service"):
            if key in job:
                steps[f"create->{key}"].append(job[key] - t0)
        steps["create->first pod"].append(pods[0] - t0)
        steps["first pod->last pod"].append(pods[workers - 1] - pods[0])
        steps["create->last pod"].append(pods[workers - 1] - t0)
    return {k: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for k, v in steps.items()}


_METRIC_LINE = re.compile(r"^apiserver_request_total\{(.*)\} ([0-9.eE+-]+)$")


def apiserver_request_totals(api: client.ApiClient) -> Counter:
    """apiserver_request_total summed by (verb, resource/subresource)."""
    text = raw(api, "GET", "/metrics")
    totals: Counter = Counter()
    for line in text.splitlines() if isinstance(text, str) else []:
        m = _METRIC_LINE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        res = labels.get("resource", "")
        if labels.get("subresource"):
            res += "/" + labels["subresource"]
        totals[f"{labels.get('verb')} {res}"] += float(m.group(2))
    return totals


# ------------------------------------------------------------------ statistics


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    return v[max(0, min(len(v) - 1, math.ceil(q / 100 * len(v)) - 1))]


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per hour."""
    if len(points) < 2:
        return float("nan")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return float("nan") if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 3600


# --- the client-side rate limit, checked on the audit log (pure: lists of float seconds)

# Slack of the bucket replayed over the apiserver's receive times: the operator's bucket
# hands out tokens at send time, and requests reach the apiserver some ms apart from when
# they were sent (a thread that took its token waits for the GIL and a connection), so a
# stretch can look denser at the apiserver than it was at the client. The replayed bucket
# holds burst + max(1, qps x SEND_JITTER_SECONDS) tokens: at 50/s, 2.5 requests, 50 ms of
# jitter (the K = 1,000 run at a load of 10 on 2 cores showed 1.7 requests, 34 ms).
BUCKET_SLACK = 1.0
SEND_JITTER_SECONDS = 0.05


def jitter_slack(qps: float) -> float:
    """The replayed bucket's slack for a limit of `qps` (see SEND_JITTER_SECONDS)."""
    return max(BUCKET_SLACK, qps * SEND_JITTER_SECONDS) if qps > 0 else BUCKET_SLACK


def max_in_window(times: list[float], window: float) -> int:
    """The most timestamps in any half-open window [t, t + window) (sliding; times in seconds;
    a nanosecond of rounding is forgiven at the window's end: the audit log has microseconds)."""
    ts = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ts):
        while t - ts[lo] >= window - 1e-9:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def bucket_overdraft(times: list[float], qps: float, burst: float, slack: float = BUCKET_SLACK) -> float:
    """Replay a token bucket (capacity burst + slack, full at the first request, refilled at
    `qps` per second, one token per request) over the timestamps; the most it was overdrawn,
    in requests: 0 when every request found a token (the limit was honoured)."""
    if qps <= 0:
        raise ValueError("no bucket to replay: qps <= 0 is no limit")
    ts = sorted(times)
    if not ts:
        return 0.0
    cap = burst + slack
    tokens, last, worst = cap, ts[0], 0.0
    for t in ts:
        tokens = min(cap, tokens + (t - last) * qps)
        last = t
        tokens -= 1.0
        worst = max(worst, -tokens)
    return worst


def rate_limit_figures(times: list[float], qps: float, burst: int, slack: float = BUCKET_SLACK) -> dict:
    """The figures of the QPS check for one set of request timestamps: most requests in any
    1 s, most in any 10 s / 10, and the bucket's overdraft (None, and `honoured` None, when
    qps <= 0: no limit to check)."""
    limited = qps > 0 and not math.isinf(qps)
    overdraft = bucket_overdraft(times, qps, burst, slack) if limited else None
    return {
        "requests": len(times),
        "max_per_second": max_in_window(times, 1.0),
        "max_per_10s_rate": max_in_window(times, 10.0) / 10.0,
        "overdraft": overdraft,
        "honoured": (overdraft <= 1e-9) if limited else None,
    }


def qps_audit(events: list[tuple[float, str, str]], qps: float, burst: int, slack: float | None = None) -> dict:
    """The QPS check over (requestReceived seconds, verb, client) of every request of the
    operator's identity: watches (long-running connections) are counted apart, the rest
    checked together and per client (the user agent's first word: the operator's own
    Kubernetes client and kopf's; one bucket covers both). `slack`: default
    `jitter_slack(qps)`."""
    slack = jitter_slack(qps) if slack is None else slack
    reqs = [(t, c) for t, verb, c in events if verb != "watch"]
    res = {
        "qps": qps,
        "burst": burst,
        "bucket_slack": slack,
        "watches": sum(1 for _, verb, _ in events if verb == "watch"),
        "bound_per_second": burst + qps if qps > 0 else None,
        "bound_per_10s_rate": qps + burst / 10.0 if qps > 0 else None,
        **rate_limit_figures([t for t, _ in reqs], qps, burst, slack),
    }
    if reqs:
        res["seconds"] = max(t for t, _ in reqs) - min(t for t, _ in reqs)
    res["by_client"] = {
        client_: rate_limit_figures([t for t, c in reqs if c == client_], qps, burst, slack)
        for client_ in sorted({c for _, c in reqs})
    }
    return res


def operator_request_log(path: Path, user: str = OPERATOR_USER) -> list[tuple[float, str, str]]:
    """(requestReceived seconds, verb, client) of each request of `user` in an audit log,
    read line by line (a K = 1,000 run's log is large; only that user's lines are parsed)."""
    out = []
    needle = user.encode()
    try:
        f = open(path, "rb")
    except OSError:
        return out
    with f:
        for line in f:
            if needle not in line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if (ev.get("user") or {}).get("username") != user or ev.get("stage") not in ("ResponseComplete", "Panic"):
                continue
            client_ = (ev.get("userAgent") or "?").split(" ")[0].split("/")[0]
            out.append((_ts(ev["requestReceivedTimestamp"]), ev.get("verb") or "?", client_))
    return out


def minimum_requests(workers: int) -> dict[str, int]:
    """The fewest requests one job's lifecycle (create -> Running -> delete) needs.

    - 1 Service create (the headless Service the rendezvous names need);
    - `workers` pod creates;
    - 2 status writes: the first pass records the generation it started (intent before
      action, so a restarted operator neither duplicates pods nor double-counts), and one
      when every worker runs (phase Running);
    - nothing on delete: children carry ownerReferences, the garbage collector removes
      them; reads come from watches (shared by all jobs, not per job).
    Events and kopf's finalizer are useful but not required, so they count against the 2x.
    """
    return {"create services": 1, "create pods": workers, "patch leptonjobs/status": 2}


# ------------------------------------------------------------------ the benchmark


class Bench:
    def __init__(self, args):
        self.args = args
        self.W = args.workers
        self.cluster: AuditedCluster | None = None
        self.operator: OperatorProcess | None = None
        self.sampler: ProcSampler | None = None
        self.watches: dict[str, PodWatch] = {}
        self.prometheus: StubPrometheus | None = None
        self.profiles = 0
        self.results: dict = {
            "args": vars(args),
            "latency": [],
            "idle": [],
            "api": {},
            "churn": {},
            "create_phase_requests": [],
            "memory_profiles": [],
        }

    def workloads(self) -> tuple[Workload, ...]:
        """The controllers compared: the Job controller's phase is skipped with --operator-only."""
        return (LEPTON,) if self.args.operator_only else (BATCH, LEPTON)

    # --- setup / teardown --------------------------------------------------------

    def start(self) -> None:
        a = self.args
        gpus = a.gpus_per_node
        # GPUs for the largest K, the one job (--one-job) and the warm-up job, 1 per worker.
        nodes_needed = math.ceil(max([*a.ks, 1]) * self.W / gpus) + 1
        nodes_needed = max(nodes_needed, math.ceil(a.one_job / gpus) + 1)
        nodes = [SimulatedNode(name=f"gpu-node-{i:04d}", gpus=gpus, pods=110) for i in range(nodes_needed)]
        log(f"starting the local control plane with {nodes_needed} simulated nodes x {gpus} GPUs")
        self.cluster = AuditedCluster(nodes=nodes, kubelet_mode="default", audit_user=OPERATOR_USER, progress=log)
        self.cluster.start()
        self.api = self.cluster.api_client()
        install_crd(self.api)
        kubeconfig = operator_kubeconfig(self.cluster, self.api, self.cluster.workdir / "operator.kubeconfig")
        for wl in self.workloads():
            w = PodWatch(self.cluster.api_client(), wl.namespace, wl.pod_label)
            w.start()
            w.ready.wait(30)
            self.watches[wl.namespace] = w
        self.metrics_port = free_port()
        env = {"KUBECONFIG": str(kubeconfig), **dict(a.operator_env)}
        if a.operator_env:
            log(f"operator environment: {' '.join(f'{k}={v}' for k, v in a.operator_env)}")
        op_args = ["--standalone", "--liveness-port", "0", "--metrics-port", str(self.metrics_port)]
        if a.api_threads:
            op_args += ["--api-threads", str(a.api_threads)]
            log(f"operator API calls on {a.api_threads} threads")
        if a.api_qps is not None:
            op_args += ["--api-qps", str(a.api_qps)]
        if a.api_burst is not None:
            op_args += ["--api-burst", str(a.api_burst)]
        if a.elastic:
            # Every job elastic, the allocator on (the operator's default) and every query
            # answered: the operator's whole per-job load, as in a cluster with Prometheus.
            LEPTON.options = {"elastic": True}
            self.prometheus = StubPrometheus(workers=lambda ns, job: self.W)
            op_args += ["--prometheus-url", self.prometheus.url, "--allocator"]
            log(f"elastic jobs: autoscaler and allocator on, stub Prometheus at {self.prometheus.url}")
        if a.profile_memory:
            self.profile_dir = self.cluster.workdir / "memprofile"
            self.profile_dir.mkdir(exist_ok=True)
            env["LEPTON_TRACEMALLOC"] = str(a.profile_frames)
            env["LEPTON_TRACEMALLOC_PATH"] = str(self.profile_dir / "memprofile-{n}.txt")
            log(f"operator under tracemalloc ({a.profile_frames} frames): its RSS is inflated, compare runs without it")
        self.operator = OperatorProcess(self.cluster, NS_LJ, op_args, env, self.cluster.logs_dir / "operator.log")
        self.sampler = ProcSampler(self.operator.pid, interval=1.0)
        self.sampler.start()
        # Warm-up (not measured): the controllers have their watches open and caches full.
        for wl in self.workloads():
            self.run_batch(wl, ["warmup"], timeout=120)
            self.cleanup(wl)
        time.sleep(2.0)
        self.results["operator_rss_at_start_mib"] = self.sampler.sample()[1]  # warm, no jobs
        self.profile(0)

    def profile(self, k: int | str) -> None:
        """With --profile-memory: the operator's tracemalloc report (SIGUSR1) holding K jobs
        (`k` an int), or at a named point (a str: "churn-start", "one-job-1000", ...)."""
        if not self.args.profile_memory or not self.operator.running():
            return
        import signal

        self.profiles += 1
        path = self.profile_dir / f"memprofile-{self.profiles}.txt"
        t0 = time.monotonic()
        os.kill(self.operator.pid, signal.SIGUSR1)
        while not path.exists() and time.monotonic() - t0 < 600:
            time.sleep(0.5)
        if not path.exists():
            log(f"no memory profile from the operator after {time.monotonic() - t0:.0f} s")
            return
        text = path.read_text()
        self.results["memory_profiles"].append({"k": k, "seconds": time.monotonic() - t0, "text": text})
        if self.args.artifacts:
            dest = Path(self.args.artifacts)
            dest.mkdir(parents=True, exist_ok=True)
            (dest / (f"memprofile-k{k}.txt" if isinstance(k, int) else f"memprofile-{k}.txt")).write_text(text)
        log(f"memory profile at {profile_label(k)} in {time.monotonic() - t0:.0f} s: {text.splitlines()[1:3]}")

    def stop(self) -> None:
        if self.sampler:
            self.sampler.stop()
        for w in self.watches.values():
            w.stop()
        if self.operator:
            self.operator.stop()
        if self.prometheus:
            self.prometheus.stop()
        if self.cluster and self.args.artifacts:
            dest = Path(self.args.artifacts)
            dest.mkdir(parents=True, exist_ok=True)
            for src in (self.cluster.logs_dir / "operator.log", self.cluster.audit_log):
                if src.exists():
                    (dest / src.name).write_bytes(src.read_bytes())
        if self.cluster:
            self.cluster.stop()

    # --- phases --------------------------------------------------------------------

    def run_batch(self, wl: Workload, names: list[str], timeout: float) -> dict:
        """Create jobs `names` of kind `wl`; wait until all their pods run; per-job timings."""
        watch = self.watches[wl.namespace]
        created: dict[str, float] = {}
        for name in names:
            created[name] = time.monotonic()
            wl.create(self.api, name, self.W)
        deadline = time.monotonic() + timeout
        while True:
            snap = watch.snapshot()
            done = sum(1 for n in names if sum(1 for p in snap.get(n, []) if p["running"]) >= self.W)
            if done == len(names) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        per_job = []
        for name in names:
            pods = snap.get(name, [])
            added = sorted(p["added"] for p in pods)
            running = sorted(p["running"] for p in pods if p["running"])
            per_job.append(
                {
                    "job": name,
                    "created_s": added[self.W - 1] - created[name] if len(added) >= self.W else None,
                    "running_s": running[self.W - 1] - created[name] if len(running) >= self.W else None,
                    "first_pod_s": added[0] - created[name] if added else None,
                    "t_create": created[name],
                    "t_all_created": added[self.W - 1] if len(added) >= self.W else None,
                    "t_all_running": running[self.W - 1] if len(running) >= self.W else None,
                }
            )
        return {"jobs": per_job, "complete": done, "total": len(names)}

    def cleanup(self, wl: Workload, timeout: float = 600) -> float:
        """Delete every job of `wl` and wait until its pods and jobs are gone; seconds taken."""
        t0 = time.monotonic()
        wl.delete_all(self.api)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.watches[wl.namespace].live_count() == 0 and wl.count(self.api) == 0:
                break
            time.sleep(0.25)
        else:
            log(f"cleanup of {wl.kind}s not finished after {timeout} s")
        return time.monotonic() - t0

    def latency_phase(self, wl: Workload, k: int) -> dict:
        names = [f"{'lj' if wl is LEPTON else 'job'}-k{k}-{i:04d}" for i in range(k)]
        timeout = 120 + 2.0 * k
        log(f"{wl.kind}: creating {k} jobs of {self.W} workers")
        load0 = os.getloadavg()[0]
        a0 = audit_offset(self.cluster)
        t_phase = time.monotonic()
        run = self.run_batch(wl, names, timeout)
        jobs = run["jobs"]
        created = [j["created_s"] for j in jobs if j["created_s"] is not None]
        running = [j["running_s"] for j in jobs if j["running_s"] is not None]
        t_first = min(j["t_create"] for j in jobs)
        t_all_created = [j["t_all_created"] for j in jobs if j["t_all_created"] is not None]
        t_all_running = [j["t_all_running"] for j in jobs if j["t_all_running"] is not None]
        row = {
            "kind": wl.kind,
            "k": k,
            "workers": self.W,
            "complete": run["complete"],
            "created_p50": pct(created, 50),
            "created_p99": pct(created, 99),
            "created_max": pct(created, 100),
            "running_p50": pct(running, 50),
            "running_p99": pct(running, 99),
            "running_max": pct(running, 100),
            "total_created": (max(t_all_created) - t_first) if len(t_all_created) == k else None,
            "total_running": (max(t_all_running) - t_first) if len(t_all_running) == k else None,
            "create_calls_s": max(j["t_create"] for j in jobs) - t_first,
            "loadavg_1m": load0,
        }
        time.sleep(0.5)
        try:
            row["apiserver_steps"] = stage_breakdown(audit_events(self.cluster, a0, user=None), self.W)
        except Exception as e:  # a diagnostic: never lose the run's figures over it
            log(f"step breakdown failed: {type(e).__name__}: {e}")
            row["apiserver_steps"] = {}
        log(
            f"{wl.kind} K={k}: {run['complete']}/{k} complete; all pods created p50 {row['created_p50']:.2f}s "
            f"p99 {row['created_p99']:.2f}s; running p50 {row['running_p50']:.2f}s p99 {row['running_p99']:.2f}s"
        )
        if wl is LEPTON:
            q0 = self.prometheus.counts()["total"] if self.prometheus else 0
            row["settle_s"] = self.wait_settled()
            t_settled = time.monotonic()
            evs = audit_events(self.cluster, a0)
            per = Counter(request_key(e) for e in evs if per_job_request(e))
            self.results["create_phase_requests"].append(
                {"k": k, "requests": sum(per.values()), "per_job": sum(per.values()) / k, "by_kind": dict(per)}
            )
            window = self.sampler.window(t_phase, t_settled)
            if len(window) >= 2:
                row["operator_cpu_percent_create"] = (
                    100.0 * (window[-1][2] - window[0][2]) / max(1e-9, window[-1][0] - window[0][0])
                )
                row["operator_rss_peak_create_mib"] = max(w[1] for w in window)
            row["phase_s"] = t_settled - t_phase
            row["loadavg_1m_end"] = os.getloadavg()[0]
            if self.prometheus:
                row["prometheus_queries_create"] = self.prometheus.counts()["total"] - q0
            self.idle_phase(k, t_phase)
            self.profile(k)
        if self.last_phase(k):
            # Nothing runs after this one: stopping the cluster removes the jobs (deleting
            # 8,000 pods through the garbage collector would take longer than the run).
            row["cleanup_s"] = None
        else:
            row["cleanup_s"] = self.cleanup(wl)
        return row

    def last_phase(self, k: int) -> bool:
        a = self.args
        return k == a.ks[-1] and a.one_job <= 0 and a.api_jobs <= 0 and a.churn_seconds <= 0

    def wait_settled(self, quiet: float = 5.0, timeout: float = 300.0) -> float:
        """Wait until the operator has sent no write for `quiet` seconds (reads are its
        periodic resync); return the seconds it kept writing after this call.

        Elastic jobs: the autoscaler writes each job's status every interval for as long as
        it runs, so only writes other than status patches count (creates, deletes, spec
        patches such as the allocator's replicas)."""
        t0 = time.monotonic()
        offset = audit_offset(self.cluster)
        last_write = t0

        def counts(e: dict) -> bool:
            if e.get("verb") not in WRITE_VERBS:
                return False
            return not (self.args.elastic and (e.get("objectRef") or {}).get("subresource") == "status")

        while time.monotonic() - t0 < timeout:
            time.sleep(0.5)
            end = audit_offset(self.cluster)
            if any(counts(e) for e in audit_events(self.cluster, offset, end)):
                last_write = time.monotonic()
            offset = end
            if time.monotonic() - last_write >= quiet:
                break
        else:
            log(f"the operator still writes after {timeout} s")
        return last_write - t0

    def idle_phase(self, k: int, t_phase: float) -> None:
        """Hold K running jobs for `--idle-seconds`: RSS, CPU %, requests per job per minute."""
        secs = self.args.idle_seconds
        if secs <= 0:
            return
        a0 = audit_offset(self.cluster)
        q0 = self.prometheus.counts() if self.prometheus else None
        s0 = self.sampler.sample()
        load0 = os.getloadavg()
        time.sleep(secs)
        s1 = self.sampler.sample()
        evs = audit_events(self.cluster, a0)
        reqs = [e for e in evs if per_job_request(e)]
        minutes = (s1[0] - s0[0]) / 60.0
        row = {
            "k": k,
            "seconds": s1[0] - s0[0],
            "rss_mib": s1[1],
            "rss_max_mib": max(s[1] for s in self.sampler.window(s0[0], s1[0])),
            "rss_peak_phase_mib": max(s[1] for s in self.sampler.window(t_phase, s1[0])),
            "cpu_percent": 100.0 * (s1[2] - s0[2]) / (s1[0] - s0[0]),
            "requests_per_job_per_min": len(reqs) / k / minutes,
            "by_kind": dict(Counter(request_key(e) for e in reqs)),
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
        }
        if self.prometheus:
            q1 = self.prometheus.counts()
            row["prometheus_queries_per_job_per_min"] = (q1["total"] - q0["total"]) / k / minutes
            row["prometheus_queries_by_kind"] = {
                kind: n - q0["by_kind"].get(kind, 0) for kind, n in q1["by_kind"].items()
            }
        self.results["idle"].append(row)
        log(
            f"idle K={k}: RSS {row['rss_mib']:.1f} MiB, CPU {row['cpu_percent']:.1f} %, "
            f"{row['requests_per_job_per_min']:.2f} requests/job/min"
            + (
                f", {row['prometheus_queries_per_job_per_min']:.2f} Prometheus queries/job/min"
                if self.prometheus
                else ""
            )
        )

    def one_job_phase(self) -> None:
        """`--one-job N`: one LeptonJob of N workers (min = max = replicas = N; with --elastic,
        min = N/2 and autoscaling on, like every job of the run). Apply -> all N pods created
        and -> all N Running (pod-watch stamps), the operator's requests for it (audit, apply
        -> its writes settle, then delete -> all pods gone), and the stored size of the object
        and of its status once Running (compact JSON of a GET, as etcd holds it)."""
        n = self.args.one_job
        if n <= 0:
            return
        name = f"one-job-{n}"
        body = lepton_job(name, n, **LEPTON.options)
        body["spec"]["workers"]["replicas"] = n
        watch = self.watches[NS_LJ]
        log(f"one job of {n} workers ({'elastic' if LEPTON.options.get('elastic') else 'fixed size'})")
        time.sleep(1.0)
        a0 = audit_offset(self.cluster)
        t_apply = time.monotonic()
        raw(self.api, "POST", LEPTON.path, body=body)
        stored = raw(self.api, "GET", f"{LEPTON.path}/{name}")
        timeout = 120 + 1.0 * n
        deadline = t_apply + timeout
        while True:
            pods = watch.snapshot().get(name, [])
            if sum(1 for p in pods if p["running"]) >= n or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        added = sorted(p["added"] for p in pods)
        running = sorted(p["running"] for p in pods if p["running"])
        settle_s = self.wait_settled()
        time.sleep(1.0)  # the last requests land in the log
        a1 = audit_offset(self.cluster)
        job = raw(self.api, "GET", f"{LEPTON.path}/{name}")
        status = job.get("status") or {}
        row = {
            "workers": n,
            "elastic": bool(LEPTON.options.get("elastic")),
            "pods_created": len(added),
            "pods_running": len(running),
            "first_pod_s": added[0] - t_apply if added else None,
            "created_s": added[n - 1] - t_apply if len(added) >= n else None,
            "running_s": running[n - 1] - t_apply if len(running) >= n else None,
            "settle_s": settle_s,
            "object_bytes_applied": len(json.dumps(stored, separators=(",", ":"))),
            "object_bytes_running": len(json.dumps(job, separators=(",", ":"))),
            "status_bytes_running": len(json.dumps(status, separators=(",", ":"))),
            "status_phase": status.get("phase"),
        }
        evs = [e for e in audit_events(self.cluster, a0, a1) if e.get("verb") != "watch"]
        by_kind = Counter(request_key(e) for e in evs)
        row["requests_create"] = sum(by_kind.values())
        row["requests_create_by_kind"] = dict(sorted(by_kind.items()))
        if self.sampler:
            window = self.sampler.window(t_apply, time.monotonic())
            row["operator_rss_peak_mib"] = max((w[1] for w in window), default=None)
        self.profile(name)
        log(
            f"one job of {n}: {len(added)} pods created in {fmt(row['created_s'])} s, {len(running)} Running in "
            f"{fmt(row['running_s'])} s; {row['requests_create']} operator requests; object "
            f"{row['object_bytes_running']} B, status {row['status_bytes_running']} B ({row['status_phase']})"
        )
        a2 = audit_offset(self.cluster)
        row["cleanup_s"] = self.cleanup(LEPTON, timeout=120 + 1.0 * n)
        row["pods_left"] = watch.live_count()
        time.sleep(1.0)
        evs = [e for e in audit_events(self.cluster, a2) if e.get("verb") != "watch"]
        by_kind = Counter(request_key(e) for e in evs)
        row["requests_delete"] = sum(by_kind.values())
        row["requests_delete_by_kind"] = dict(sorted(by_kind.items()))
        self.results["one_job"] = row

    def api_phase(self) -> None:
        """`--api-jobs` sequential lifecycles of one job; operator requests per lifecycle."""
        n = self.args.api_jobs
        if n <= 0:
            return
        log(f"API cost: {n} lifecycles (create -> Running -> delete -> gone)")
        time.sleep(2.0)
        m0 = apiserver_request_totals(self.api)
        a0 = audit_offset(self.cluster)
        t0 = time.monotonic()
        for i in range(n):
            self.run_batch(LEPTON, [f"api-{i}"], timeout=120)
            self.cleanup(LEPTON)
        time.sleep(2.0)  # requests in flight land in the log
        elapsed = time.monotonic() - t0
        a1 = audit_offset(self.cluster)
        m1 = apiserver_request_totals(self.api)
        evs = audit_events(self.cluster, a0, a1)
        # kopf's lists and watches are per connection (shared by every job), not per job.
        per_job = [e for e in evs if per_job_request(e)]
        per = Counter(request_key(e) for e in per_job)
        by_agent = Counter((e.get("userAgent") or "?").split(" ")[0] for e in per_job)
        codes = Counter(str((e.get("responseStatus") or {}).get("code")) for e in per_job)
        connection_level = Counter(request_key(e) for e in evs if not per_job_request(e))
        delta = {k: m1[k] - m0[k] for k in m1 if m1[k] - m0[k] > 0}
        # The harness itself sends per lifecycle: 1 create, 1 deletecollection, and its
        # cleanup polls (list) of leptonjobs; the rest of `leptonjobs` traffic is the operator's.
        self.results["api"] = {
            "lifecycles": n,
            "seconds": elapsed,
            "per_lifecycle": {k: v / n for k, v in sorted(per.items())},
            "total_per_lifecycle": sum(per.values()) / n,
            "by_user_agent": {k: v / n for k, v in by_agent.items()},
            "response_codes": dict(codes),
            "connection_level_in_window": dict(connection_level),
            "minimum": minimum_requests(self.W),
            "apiserver_request_total_delta_leptonjobs": {k: v for k, v in sorted(delta.items()) if "leptonjobs" in k},
            "apiserver_request_total_delta_all": dict(sorted(delta.items())),
        }
        log(
            f"API cost: {sum(per.values()) / n:.1f} operator requests per lifecycle "
            f"(minimum {sum(minimum_requests(self.W).values())})"
        )

    def churn_phase(self) -> None:
        """Create/delete cycles for `--churn-seconds`; RSS at cycle boundaries. With
        --profile-memory, tracemalloc profiles at its start, middle and end (cycle boundaries:
        no jobs), "churn-start", "churn-mid", "churn-end": each report's growth section is
        what the half of the churn before it left behind. Time spent profiling does not
        count against --churn-seconds."""
        secs, c = self.args.churn_seconds, self.args.churn_jobs
        if secs <= 0:
            return
        log(f"churn: cycles of {c} jobs for {secs} s")
        self.profile("churn-start")
        t0 = time.monotonic()
        paused = 0.0  # seconds spent on the middle profile

        def elapsed() -> float:
            return time.monotonic() - t0 - paused

        boundary = [self.sampler.sample()]
        cycles, incomplete = 0, 0
        cycle_s = []
        mid_profiled = False
        while elapsed() < secs:
            tc = time.monotonic()
            run = self.run_batch(LEPTON, [f"churn-{cycles}-{i}" for i in range(c)], timeout=120)
            incomplete += run["total"] - run["complete"]
            self.cleanup(LEPTON)
            cycles += 1
            cycle_s.append(time.monotonic() - tc)
            boundary.append(self.sampler.sample())
            if self.args.profile_memory and not mid_profiled and secs / 2 <= elapsed() < secs:
                tp = time.monotonic()
                self.profile("churn-mid")
                paused += time.monotonic() - tp
                mid_profiled = True
        self.profile("churn-end")
        boundary = [b for b in boundary if b]
        pts = [(b[0] - t0, b[1]) for b in boundary]
        mid = boundary[len(boundary) // 2]
        all_pts = [(s[0] - t0, s[1]) for s in self.sampler.window(t0, boundary[-1][0])]
        self.results["churn"] = {
            "seconds": boundary[-1][0] - t0,
            "cycles": cycles,
            "jobs_per_cycle": c,
            "incomplete_jobs": incomplete,
            "cycle_p50_s": pct(cycle_s, 50),
            "profile_pause_s": paused,
            "rss_start_mib": boundary[0][1],
            "rss_mid_mib": mid[1],
            "rss_end_mib": boundary[-1][1],
            "rss_max_mib": max(p[1] for p in all_pts) if all_pts else None,
            "slope_boundaries_mib_per_h": slope_per_hour(pts),
            "slope_all_samples_mib_per_h": slope_per_hour(all_pts),
            "slope_second_half_mib_per_h": slope_per_hour(pts[len(pts) // 2 :]),
            "cpu_seconds": boundary[-1][2] - boundary[0][2],
            "cpu_percent": 100.0 * (boundary[-1][2] - boundary[0][2]) / max(1e-9, boundary[-1][0] - boundary[0][0]),
        }
        ch = self.results["churn"]
        log(
            f"churn: {cycles} cycles, RSS {ch['rss_start_mib']:.1f} -> {ch['rss_mid_mib']:.1f} -> "
            f"{ch['rss_end_mib']:.1f} MiB, slope {ch['slope_boundaries_mib_per_h']:+.1f} MiB/h"
        )

    def reconcile_histogram(self) -> dict:
        """The operator's own reconcile-duration histogram (sum, count) from its /metrics."""
        import urllib.request

        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        except Exception as e:
            return {"error": str(e)}
        out = {}
        for line in text.splitlines():
            if line.startswith("lepton_operator_reconcile_duration_seconds_sum") or line.startswith(
                "lepton_operator_reconcile_duration_seconds_count"
            ):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def audit_rate_limit(self) -> dict:
        """The client-side rate limit checked on the audit log, over the whole run: every
        request of the operator's identity (watches counted apart), by the apiserver's
        receive time. See `qps_audit()` (the function) for the figures."""
        time.sleep(1.0)  # requests in flight land in the log
        qps = self.args.api_qps if self.args.api_qps is not None else DEFAULT_API_QPS
        burst = self.args.api_burst if self.args.api_burst is not None else DEFAULT_API_BURST
        res = qps_audit(operator_request_log(self.cluster.audit_log), qps, burst)
        log(
            f"QPS audit (qps {qps:g}, burst {burst}): {res['requests']} requests, {res['watches']} watches; "
            f"max {res['max_per_second']} in 1 s, {res['max_per_10s_rate']:.1f}/s over 10 s, "
            f"bucket overdraft {fmt(res['overdraft'], 1)}: honoured {res['honoured']}"
        )
        return res

    def run(self) -> dict:
        self.results["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.results["machine"] = {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
        self.results["operator_version"] = operator_version()
        self.results["operator_env"] = dict(self.args.operator_env)
        t0 = time.monotonic()
        self.start()
        for k in self.args.ks:
            for wl in self.workloads():
                self.results["latency"].append(self.latency_phase(wl, k))
            if not self.operator.running():
                raise RuntimeError("the operator exited:\n" + self.operator.log_text()[-3000:])
        self.one_job_phase()
        if not self.operator.running():
            raise RuntimeError("the operator exited:\n" + self.operator.log_text()[-3000:])
        self.api_phase()
        self.churn_phase()
        self.results["qps_audit"] = self.audit_rate_limit()
        self.results["reconcile_histogram"] = self.reconcile_histogram()
        self.results["operator_log_errors"] = [
            line for line in self.operator.log_text().splitlines() if " ERROR " in line or "Traceback" in line
        ][:20]
        if self.prometheus:
            self.results["prometheus_queries"] = self.prometheus.counts()
        self.results["machine"]["loadavg_at_end"] = os.getloadavg()
        loads = [v for _, v in self.sampler.load]
        self.results["machine"]["loadavg_1m_max"] = max(loads) if loads else None
        self.results["machine"]["loadavg_1m_mean"] = statistics.fmean(loads) if loads else None
        self.results["wall_seconds"] = time.monotonic() - t0
        return self.results


def profile_growth(text: str, n: int = 5) -> list[str]:
    """The first `n` rows of a memory profile's "growth since the previous dump" table,
    without the code column."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## ") and "growth since the previous dump" in line:
            rows = [r for r in lines[i + 2 :] if r.strip()]
            out = []
            for r in rows[:n]:
                if r.startswith("## "):
                    break
                out.append(" | ".join(c.strip() for c in r.split(" | ")[:4]))
            return out
    return []


def profile_label(k: int | str) -> str:
    """How a memory profile's point is named in the log and the report."""
    return f"K = {k}" if isinstance(k, int) else str(k)


def operator_version() -> str:
    """The commit the operator runs from, and whether its code differs from it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "operator/"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes in operator/" if dirty else "")


# ------------------------------------------------------------------ report


def fmt(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}"


def latency_tables(lat: list[dict]) -> list[str]:
    """The report's latency tables: per K and controller, the LeptonJob / Job ratio (when
    both ran) and the apiserver-clock steps."""
    lines: list[str] = []
    lines.append("### Latency: create -> all W pods created / all W pods Running (seconds)\n")
    lines.append(
        "| K | controller | done | created p50 | created p99 | created total | running p50 | running p99 | running total | operator writes on after all Running (s) | delete all -> all gone (s) | load 1m |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in lat:
        lines.append(
            f"| {r['k']} | {r['kind']} | {r['complete']}/{r['k']} | {fmt(r['created_p50'])} | "
            f"{fmt(r['created_p99'])} | {fmt(r['total_created'])} | {fmt(r['running_p50'])} | "
            f"{fmt(r['running_p99'])} | {fmt(r['total_running'])} | {fmt(r.get('settle_s'), 1)} | {fmt(r.get('cleanup_s'), 1)} | {fmt(r['loadavg_1m'], 1)} |"
        )
    if any(r["kind"] == "Job" for r in lat):  # both controllers ran (not --operator-only)
        lines.append(
            "\n### Ratio LeptonJob / Job (lower is better for the operator; target created p50 & total <= 1.5 at K=100)\n"
        )
        lines.append("| K | created p50 | created p99 | created total | running p50 | running p99 | running total |")
        lines.append("|---|---|---|---|---|---|---|")
        by = {(r["kind"], r["k"]): r for r in lat}
        for k in sorted({r["k"] for r in lat}):
            lj, jb = by.get(("LeptonJob", k)), by.get(("Job", k))
            if not lj or not jb:
                continue

            def ratio(key, lj=lj, jb=jb):
                a, b = lj.get(key), jb.get(key)
                return fmt(a / b) if a is not None and b and not math.isnan(a) and not math.isnan(b) else "-"

            lines.append(
                f"| {k} | {ratio('created_p50')} | {ratio('created_p99')} | {ratio('total_created')} | "
                f"{ratio('running_p50')} | {ratio('running_p99')} | {ratio('total_running')} |"
            )
    lines.append(
        "\n### Where the time goes: steps from job create to its W-th pod create, apiserver clock (audit log), p50 / p99 seconds\n"
    )
    order = [
        "create->finalizer",
        "create->first_get",
        "create->first_status",
        "create->first_status_ok",
        "create->service",
        "create->first pod",
        "first pod->last pod",
        "create->last pod",
    ]
    present = {k for r in lat for k in (r.get("apiserver_steps") or {})}
    steps = [k for k in order if k in present]
    lines.append("| K | controller | " + " | ".join(steps) + " |")
    lines.append("|---|---|" + "---|" * len(steps))
    for r in lat:
        st = r.get("apiserver_steps") or {}
        cells = [f"{fmt(st[k]['p50'])} / {fmt(st[k]['p99'])}" if k in st else "-" for k in steps]
        lines.append(f"| {r['k']} | {r['kind']} | " + " | ".join(cells) + " |")
    return lines


def report(res: dict) -> str:
    lines = []
    lat = res["latency"]
    if lat:
        lines += latency_tables(lat)
    creates = [r for r in lat if r["kind"] == "LeptonJob" and r.get("phase_s") is not None]
    if creates:
        lines.append("\n### Operator while K LeptonJobs start (create -> all Running -> no more creates)\n")
        lines.append(
            "| K | phase s | RSS peak MiB | CPU % (1 core = 100) | Prometheus queries | load 1m at start / end |"
        )
        lines.append("|---|---|---|---|---|---|")
        for r in creates:
            lines.append(
                f"| {r['k']} | {fmt(r['phase_s'], 0)} | {fmt(r.get('operator_rss_peak_create_mib'), 1)} | "
                f"{fmt(r.get('operator_cpu_percent_create'), 1)} | {r.get('prometheus_queries_create', '-')} | "
                f"{fmt(r['loadavg_1m'], 1)} / {fmt(r.get('loadavg_1m_end'), 1)} |"
            )
    if res["idle"]:
        lines.append("\n### Operator footprint holding K jobs idle\n")
        lines.append(
            "| K | RSS MiB (idle) | RSS max MiB (idle) | RSS peak MiB (create + idle) | CPU % idle (1 core = 100) | requests/job/min idle | Prometheus queries/job/min | window s | load 1m |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in res["idle"]:
            lines.append(
                f"| {r['k']} | {fmt(r['rss_mib'], 1)} | {fmt(r['rss_max_mib'], 1)} | {fmt(r.get('rss_peak_phase_mib'), 1)} | {fmt(r['cpu_percent'], 1)} | "
                f"{fmt(r['requests_per_job_per_min'], 2)} | {fmt(r.get('prometheus_queries_per_job_per_min'), 2)} | {fmt(r['seconds'], 0)} | "
                f"{fmt((r.get('loadavg_end') or [None])[0], 1)} |"
            )
        pts = [(r["k"], r.get("rss_peak_phase_mib", r["rss_max_mib"])) for r in res["idle"]]
        if len(pts) >= 2:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
            a = my - b * mx
            lines.append(
                f"\nLinear fit of peak RSS: RSS(K) = {a:.1f} MiB + {b * 1024:.1f} KiB x K -> "
                f"K=1000: {a + b * 1000:.0f} MiB (operator RSS at start: {fmt(res.get('operator_rss_at_start_mib'), 1)} MiB)"
            )
    if res["create_phase_requests"]:
        lines.append(
            "\n### Operator requests per job while K jobs start (create -> all Running -> operator quiet; audit log; (409) = create of a pod that already existed)\n"
        )
        lines.append("| K | requests/job | by kind (total) |")
        lines.append("|---|---|---|")
        for r in res["create_phase_requests"]:
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(r["by_kind"].items()))
            lines.append(f"| {r['k']} | {fmt(r['per_job'], 1)} | {kinds} |")
    one = res.get("one_job") or {}
    if one:
        n = one["workers"]
        lines.append(
            f"\n### One job of {n} workers ({'elastic' if one['elastic'] else 'fixed size'}; apply -> pods, "
            "operator requests from the audit log, stored sizes as compact JSON)\n"
        )
        lines.append(
            "| pods created | pods Running | apply -> first pod s | apply -> all created s | apply -> all Running s "
            "| operator requests (apply -> settled) | object B (applied) | object B (Running) | status B (Running) "
            "| delete -> all pods gone s | operator requests (delete) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        lines.append(
            f"| {one['pods_created']}/{n} | {one['pods_running']}/{n} | {fmt(one['first_pod_s'])} | "
            f"{fmt(one['created_s'])} | {fmt(one['running_s'])} | {one['requests_create']} | "
            f"{one['object_bytes_applied']} | {one['object_bytes_running']} | {one['status_bytes_running']} | "
            f"{fmt(one.get('cleanup_s'), 1)} | {one.get('requests_delete', '-')} |"
        )
        kinds = ", ".join(f"{k}: {v}" for k, v in one["requests_create_by_kind"].items())
        lines.append(f"\nRequests apply -> settled by kind: {kinds}; status phase once Running: {one['status_phase']}.")
    api = res.get("api") or {}
    if api:
        minimum = sum(api["minimum"].values())
        lines.append(
            f"\n### API cost per job lifecycle (create -> Running -> delete -> gone; {api['lifecycles']} lifecycles; audit log, operator's identity)\n"
        )
        lines.append("| request | per lifecycle | protocol minimum |")
        lines.append("|---|---|---|")
        keys = sorted(set(api["per_lifecycle"]) | set(api["minimum"]))
        for k in keys:
            lines.append(f"| {k} | {fmt(api['per_lifecycle'].get(k, 0.0), 1)} | {api['minimum'].get(k, 0)} |")
        total = api["total_per_lifecycle"]
        lines.append(f"| **total** | **{fmt(total, 1)}** | **{minimum}** (ratio {fmt(total / minimum)}; target <= 2) |")
        lines.append(
            f"\nBy client: {', '.join(f'{k}: {fmt(v, 1)}' for k, v in api['by_user_agent'].items())}; "
            f"response codes: {api['response_codes']}."
        )
        lines.append(
            f"apiserver_request_total delta for leptonjobs over the window (all clients, harness included): "
            f"{ {k: int(v) for k, v in api['apiserver_request_total_delta_leptonjobs'].items()} }"
        )
    ch = res.get("churn") or {}
    if ch:
        lines.append(
            f"\n### Churn: {ch['cycles']} cycles of {ch['jobs_per_cycle']} jobs in {fmt(ch['seconds'], 0)} s "
            f"(cycle p50 {fmt(ch['cycle_p50_s'], 1)} s, incomplete jobs {ch['incomplete_jobs']})\n"
        )
        lines.append(
            "| RSS start MiB | RSS middle MiB | RSS end MiB | RSS max MiB | slope (cycle ends) MiB/h | slope (2nd half) MiB/h | slope (all samples) MiB/h | CPU % |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        lines.append(
            f"| {fmt(ch['rss_start_mib'], 1)} | {fmt(ch['rss_mid_mib'], 1)} | {fmt(ch['rss_end_mib'], 1)} | "
            f"{fmt(ch['rss_max_mib'], 1)} | {fmt(ch['slope_boundaries_mib_per_h'], 1)} | "
            f"{fmt(ch['slope_second_half_mib_per_h'], 1)} | {fmt(ch['slope_all_samples_mib_per_h'], 1)} | {fmt(ch['cpu_percent'], 1)} |"
        )
    qa = res.get("qps_audit") or {}
    if qa:
        limit = f"{qa['qps']:g}/s, burst {qa['burst']}" if qa["qps"] > 0 else "none (--api-qps 0)"
        lines.append(
            f"\n### Client-side rate limit on the audit log (limit {limit}; every request of the operator's "
            f"identity over the whole run, by the apiserver's receive time; {qa['watches']} watches apart)\n"
        )
        lines.append(
            f"| requests | most in any 1 s (bound {fmt(qa['bound_per_second'], 0)}) | most in any 10 s / 10 "
            f"(bound {fmt(qa['bound_per_10s_rate'], 1)}) | bucket overdraft (requests) | honoured |"
        )
        lines.append("|---|---|---|---|---|")
        rows = [("all", qa)] + [(f"{c} only", r) for c, r in (qa.get("by_client") or {}).items()]
        for who, r in rows:
            lines.append(
                f"| {who}: {r['requests']} | {r['max_per_second']} | {fmt(r['max_per_10s_rate'], 1)} | "
                f"{fmt(r['overdraft'], 1)} | {'-' if r['honoured'] is None else ('yes' if r['honoured'] else '**no**')} |"
            )
        if qa["qps"] > 0:
            lines.append(
                f"\nThe bucket replayed over the receive times holds burst + {fmt(qa['bucket_slack'], 1)} tokens (requests "
                f"reach the apiserver up to ~{SEND_JITTER_SECONDS * 1000:.0f} ms apart from when the operator's bucket let "
                "them go); it is full at the first "
                "request and overdrawn by the most requests that found it empty (0: the limit was honoured). One bucket "
                "covers both of the operator's clients: its own (OpenAPI-Generator) and kopf's (watch starts, "
                "finalizer patches; supervise.limit_kopf_requests)."
            )
    hist = res.get("reconcile_histogram") or {}
    if hist:
        lines.append(f"\nOperator reconcile passes: {hist}")
    if res.get("prometheus_queries"):
        lines.append(f"\nStub Prometheus queries over the run: {res['prometheus_queries']}")
    for prof in res.get("memory_profiles") or []:
        head = "\n".join(prof["text"].splitlines()[:4])  # title, RSS, C heap, traced
        lines.append(
            f"\nMemory profile at {profile_label(prof['k'])} (tracemalloc, {fmt(prof['seconds'], 0)} s): {head}"
        )
        if str(prof["k"]).startswith("churn-") and prof["k"] != "churn-start":
            growth = profile_growth(prof["text"])
            if growth:
                lines.append("Changed most since the previous profile (KiB now | KiB growth | blocks growth | where):")
                lines.append("```\n" + "\n".join(growth) + "\n```")
    m = res.get("machine", {})
    lines.append(f"\nOperator code: {res.get('operator_version', 'unknown')}.")
    if res.get("operator_env"):
        lines.append(f"Operator environment: {', '.join(f'{k}={v}' for k, v in res['operator_env'].items())}.")
    lines.append(
        f"\nMachine: {m.get('cpus')} CPUs, load average at start {m.get('loadavg_at_start')}, "
        f"at end {m.get('loadavg_at_end')}, 1-minute load over the run: mean {fmt(m.get('loadavg_1m_mean'), 1)}, "
        f"max {fmt(m.get('loadavg_1m_max'), 1)}; wall time {fmt(res.get('wall_seconds'), 0)} s."
    )
    if res.get("operator_log_errors"):
        lines.append("\nOperator log errors (first 20):\n```\n" + "\n".join(res["operator_log_errors"]) + "\n```")
    return "\n".join(lines)


def env_assignment(text: str) -> tuple[str, str]:
    """--operator-env's NAME=VALUE."""
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"NAME=VALUE, got {text!r}")
    return name, value


def one_job_size(text: str) -> int:
    """--one-job's N: 0 (none) up to the schema's workers.max bound."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer, got {text!r}") from None
    if not 0 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"{n} workers: a LeptonJob has at most {MAX_WORKERS} (the schema's workers.max bound)"
        )
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ks",
        default="1,10,100",
        help="comma-separated job counts (default 1,10,100; '' or 0: no K phases, e.g. only --one-job)",
    )
    p.add_argument("--workers", type=int, default=8, help="workers (pods, 1 GPU each) per job (default 8)")
    p.add_argument(
        "--idle-seconds", type=float, default=40, help="hold each K idle this long (default 40; > the 30 s resync)"
    )
    p.add_argument("--api-jobs", type=int, default=5, help="lifecycles for the API-cost phase (default 5; 0 skips)")
    p.add_argument(
        "--churn-seconds", type=float, default=600, help="create/delete churn duration (default 600; 0 skips)"
    )
    p.add_argument("--churn-jobs", type=int, default=10, help="jobs per churn cycle (default 10)")
    p.add_argument(
        "--api-threads",
        type=int,
        default=0,
        help="the operator's --api-threads (threads and pooled connections for its API calls; "
        "default: the operator's own)",
    )
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=GPUS_PER_NODE,
        help=f"GPUs of each simulated node (default {GPUS_PER_NODE}; the simulated kubelet renews every node's "
        "lease every 2 s, so K = 1,000 on 8-GPU nodes is 1,001 nodes of background load)",
    )
    p.add_argument(
        "--api-qps",
        type=float,
        default=None,
        help=f"the operator's --api-qps (its client-side rate limit; 0: none; default: the operator's own, "
        f"{DEFAULT_API_QPS:g}); the run's audit log is checked against it",
    )
    p.add_argument(
        "--operator-env",
        type=env_assignment,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a variable in the operator's environment only (repeatable), e.g. to compare allocators: "
        "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 or MALLOC_MMAP_THRESHOLD_=131072",
    )
    p.add_argument(
        "--api-burst",
        type=int,
        default=None,
        help=f"the operator's --api-burst (its rate limit's bucket size; default: the operator's own, "
        f"{DEFAULT_API_BURST})",
    )
    p.add_argument(
        "--one-job",
        type=one_job_size,
        default=0,
        metavar="N",
        help=f"after the K phases, one LeptonJob of N workers (at most {MAX_WORKERS}, the schema's workers.max "
        "bound): apply -> N pods created / Running, its requests, its stored size; then deleted (default 0: none)",
    )
    p.add_argument(
        "--operator-only",
        action="store_true",
        help="skip the Job-controller phases: LeptonJobs only (implies --elastic unless --no-elastic)",
    )
    p.add_argument(
        "--elastic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="every LeptonJob elastic with autoscaling on, the operator's allocator on and --prometheus-url "
        "at a stub Prometheus the harness runs (default: on with --operator-only, off otherwise)",
    )
    p.add_argument(
        "--profile-memory",
        action="store_true",
        help="run the operator under tracemalloc (LEPTON_TRACEMALLOC) and take a profile (SIGUSR1) at start, at "
        "each K, with the one job (--one-job) and at the churn's start, middle and end; RSS figures are then "
        "inflated by tracemalloc itself",
    )
    p.add_argument("--profile-frames", type=int, default=4, help="tracemalloc frames per allocation (default 4)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes, for CI: K = 20, operator only (elastic), 35 s idle (> the 30 s resync), 1 API lifecycle, 30 s churn "
        "of 5 jobs (explicit options override none of these)",
    )
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--markdown", help="write the tables here")
    p.add_argument("--artifacts", help="copy the operator log and the audit log here before the cluster goes")
    args = p.parse_args(argv)
    if args.quick:
        args.ks, args.operator_only, args.idle_seconds = "20", True, 35.0
        args.api_jobs, args.churn_seconds, args.churn_jobs = 1, 30.0, 5
    if args.elastic is None:
        args.elastic = args.operator_only
    try:
        ks = [int(k) for k in str(args.ks).split(",") if k.strip()]
        args.ks = [k for k in ks if k > 0]
    except ValueError:
        p.error(f"--ks: comma-separated integers, got {args.ks!r}")
    if args.api_burst is not None and args.api_burst < 1:
        p.error("--api-burst: at least 1")
    import signal

    def terminated(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")  # so that `finally` stops the cluster and the operator

    signal.signal(signal.SIGTERM, terminated)
    bench = Bench(args)
    try:
        res = bench.run()
    finally:
        bench.stop()
    text = report(res)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
