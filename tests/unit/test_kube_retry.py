"""`Kube.request` against a real (tiny, plain-http) server: every attempt takes a token from
the rate limit, and a 429 is retried after the server's Retry-After, at most 3 times, then
becomes TransientApiError. The ApiClient is built the way the operator builds it
(`api_client_for`), so urllib3 does not retry the 429 behind Kube's back."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from lepton_operator.reconcile.kube import (
    MAX_RETRY_AFTER,
    RETRIES_ON_429,
    Kube,
    TransientApiError,
    api_client_for,
)
from lepton_operator.reconcile.ratelimit import TokenBucket

pytestmark = pytest.mark.unit

JOB_PATH = "/apis/lepton.ai/v1alpha1/namespaces/ns/leptonjobs/job"


class Server:
    """Answers each request with the next scripted (status, headers, body); the last one repeats."""

    def __init__(self, script: list[tuple[int, dict, dict]]):
        self.script = script
        self.hits: list[tuple[float, str, str]] = []  # (monotonic time, method, path)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                server.hits.append((time.monotonic(), self.command, self.path))
                status, headers, body = server.script[min(len(server.hits), len(server.script)) - 1]
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_POST = do_DELETE = _answer

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


class CountingBucket(TokenBucket):
    """The real bucket (unlimited here), counting the tokens taken."""

    def __init__(self):
        super().__init__(qps=0, burst=1)
        self.taken = 0

    def acquire(self) -> float:
        self.taken += 1
        return super().acquire()


def too_many(retry_after: str | None = None, body_seconds: int | None = None) -> tuple[int, dict, dict]:
    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "TooManyRequests", "code": 429}
    status["message"] = "Too many requests, please try again later."
    if body_seconds is not None:
        status["details"] = {"retryAfterSeconds": body_seconds}
    return 429, ({"Retry-After": retry_after} if retry_after is not None else {}), status


OK = (200, {}, {"kind": "LeptonJob", "metadata": {"name": "job", "resourceVersion": "7"}})


def kube_for(server: Server, limiter=None, sleep=time.sleep) -> Kube:
    configuration = client.Configuration(host=server.url)
    return Kube(api_client_for(configuration, pool_size=4), limiter, sleep=sleep)


def test_a_429_is_retried_after_its_retry_after_and_then_succeeds():
    limiter = CountingBucket()
    with Server([too_many("1"), OK]) as server:
        job = kube_for(server, limiter).get_job("ns", "job")
    assert job["metadata"]["resourceVersion"] == "7"
    assert [(m, p) for _, m, p in server.hits] == [("GET", JOB_PATH)] * 2
    assert server.hits[1][0] - server.hits[0][0] >= 1.0
    assert limiter.taken == 2  # one token per attempt


def test_a_429_on_a_write_is_retried_too():
    limiter = CountingBucket()
    with Server([too_many("0"), too_many("0"), OK]) as server:
        kube_for(server, limiter).patch_job_status("ns", "job", "6", {"phase": "Running"})
    assert [m for _, m, _ in server.hits] == ["PATCH"] * 3
    assert limiter.taken == 3


def test_a_429_forever_is_a_transient_error_after_three_retries_each_with_its_token():
    limiter = CountingBucket()
    with Server([too_many("0")]) as server:
        with pytest.raises(TransientApiError) as caught:
            kube_for(server, limiter).get_job("ns", "job")
    assert caught.value.status == 429
    assert "HTTP 429" in str(caught.value)
    assert len(server.hits) == RETRIES_ON_429 + 1 == 4
    assert limiter.taken == len(server.hits)


def test_the_wait_comes_from_the_status_body_without_a_header_and_is_capped():
    waits: list[float] = []
    with Server([too_many(body_seconds=2), too_many("3600"), too_many(), OK]) as server:
        kube_for(server, sleep=waits.append).list_nodes()
    assert waits == [2.0, MAX_RETRY_AFTER, 1.0]  # body, capped header, the default
    assert len(server.hits) == 4


def test_each_request_waits_for_the_rate_limit():
    limiter = TokenBucket(qps=10, burst=2)
    with Server([OK]) as server:
        kube = kube_for(server, limiter)
        for _ in range(5):
            kube.get_job("ns", "job")
    first, last = server.hits[0][0], server.hits[-1][0]
    assert last - first >= (5 - 2) / 10 - 0.02  # 2 at once, then one per 0.1 s
