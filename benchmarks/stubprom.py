"""A stub Prometheus for the control-plane benchmark: answers the operator's queries for any job.

The benchmark's pods run nothing (the simulated kubelet's default mode), so no trainer
exports metrics; this server answers `/api/v1/query` (GET or POST, as
`scaling.prometheus.PrometheusClient` sends it) for every job with a plausible vector, so
the autoscaler, the hang watchdog and the cluster allocator do the work they would do in a
real cluster (queries, status writes, allocator passes). It is a load generator for the
operator's queries: every query is counted, by kind.

Answers (one sample, stamped now; `n` = `workers(job)`, the job's world size):

| query (`scaling/prometheus.py`) | answer |
|---|---|
| `count(lepton_trainer_world_size{...})` | n |
| `sum(rate(lepton_trainer_samples_total{...}[w]))` | throughput(n) = 100 * n^0.9 samples/s |
| `... comm_seconds_sum ... / ... step_seconds_sum ...` | 0.1 |
| `sum(increase(lepton_trainer_samples_total{...}[w]))` | throughput(n) * w (never 0: no job is hung) |
| `max(lepton_trainer_trained_samples{...})` | throughput(n) * seconds since the job's first query |
| `max(lepton_trainer_target_samples{...})` | 1e9 |
| anything else | an empty vector |
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

TARGET_SAMPLES = 1e9
_JOB = re.compile(r'job_name="((?:[^"\\]|\\.)*)"')
_NAMESPACE = re.compile(r'namespace="((?:[^"\\]|\\.)*)"')
_WINDOW = re.compile(r"\[(\d+)s\]")


def throughput(n: int) -> float:
    """Samples/s at world size n: sublinear, so more workers always help a little."""
    return 100.0 * max(1, n) ** 0.9


def kind_of(query: str) -> str:
    if "comm_seconds" in query:
        return "comm_fraction"
    if "lepton_trainer_world_size" in query:
        return "world_size"
    if "increase(lepton_trainer_samples_total" in query:
        return "progress"
    if "rate(lepton_trainer_samples_total" in query:
        return "throughput"
    if "lepton_trainer_trained_samples" in query:
        return "trained_samples"
    if "lepton_trainer_target_samples" in query:
        return "target_samples"
    return "other"


class StubPrometheus:
    """`/api/v1/query` on 127.0.0.1:`port` in a thread; `stop()` closes it."""

    def __init__(self, workers: Callable[[str, str], int], port: int = 0):
        self.workers = workers
        self.lock = threading.Lock()
        self.queries: Counter = Counter()  # kind -> count
        self.jobs_seen: set[tuple[str, str]] = set()
        self.first_seen: dict[tuple[str, str], float] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, query: str) -> None:
                if not self.path.startswith("/api/v1/query"):
                    self.send_error(404)
                    return
                body = json.dumps(stub.answer(query)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                qs = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                self._answer((qs.get("query") or [""])[0])

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                self._answer((form.get("query") or [""])[0])

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that gave up waiting: not news
                pass

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="stub-prometheus", daemon=True)
        self.thread.start()

    def answer(self, query: str) -> dict:
        kind = kind_of(query)
        job = _JOB.search(query)
        ns = _NAMESPACE.search(query)
        key = (ns.group(1) if ns else "", job.group(1) if job else "")
        now = time.time()
        with self.lock:
            self.queries[kind] += 1
            self.jobs_seen.add(key)
            first = self.first_seen.setdefault(key, now)
        n = self.workers(*key) if job else 0
        value: float | None
        if kind == "world_size":
            value = float(n)
        elif kind == "throughput":
            value = throughput(n)
        elif kind == "comm_fraction":
            value = 0.1
        elif kind == "progress":
            w = _WINDOW.search(query)
            value = throughput(n) * (int(w.group(1)) if w else 60)
        elif kind == "trained_samples":
            value = min(TARGET_SAMPLES - 1, throughput(n) * max(1.0, now - first))
        elif kind == "target_samples":
            value = TARGET_SAMPLES
        else:
            value = None
        result = [] if value is None or not job else [{"metric": {}, "value": [now, repr(float(value))]}]
        return {"status": "success", "data": {"resultType": "vector", "result": result}}

    def counts(self) -> dict:
        with self.lock:
            return {"total": sum(self.queries.values()), "by_kind": dict(self.queries), "jobs": len(self.jobs_seen)}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
