"""The Prometheus client against a stub HTTP server in every failure mode (docs/reliability.md, row 12),
and the PromQL it builds for hostile names (row 13)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest

from lepton_operator.scaling.prometheus import (
    MetricsError,
    Progress,
    PrometheusClient,
    promql_string,
    target_samples_query,
    throughput_query,
    trained_samples_query,
    world_size_query,
)

pytestmark = pytest.mark.unit


class Stub:
    """A Prometheus stand-in on 127.0.0.1: answers every query with `self.reply`."""

    def __init__(self):
        self.reply = (200, b"{}")
        self.replies: dict[str, tuple[int, bytes]] = {}  # per query text, else `reply`
        self.delay = 0.0
        self.redirect: tuple[int, str] | None = None  # (code, Location)
        self.flood: tuple[int, bool] | None = None  # (bytes, announce Content-Length)
        self.flood_sent = 0
        self.flood_done = threading.Event()
        self.queries: list[str] = []
        self.headers: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # a followed 301/302/303 arrives as a GET: record it too
                stub.headers.append(dict(self.headers))
                self.send_error(405)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                form = parse_qs(self.rfile.read(length).decode())
                query = form.get("query", [""])[0]
                stub.queries.append(query)
                stub.headers.append(dict(self.headers))
                time.sleep(stub.delay)
                code, body = stub.replies.get(query, stub.reply)
                try:
                    if stub.redirect:
                        self.send_response(stub.redirect[0])
                        self.send_header("Location", stub.redirect[1])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    elif stub.flood:
                        self.send_flood(*stub.flood)
                    else:
                        self.send_response(code)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    stub.flood_done.set()

            def send_flood(self, total, announce):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if announce:
                    self.send_header("Content-Length", str(total))
                self.end_headers()  # without a length, HTTP/1.0: the body ends when we close
                chunk = b" " * 65536
                while stub.flood_sent < total:
                    self.wfile.write(chunk)
                    stub.flood_sent += len(chunk)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def vector(self, *values, ts=None):
        self.reply = self.vector_reply(*values, ts=ts)

    def answer(self, query, *values, ts=None):
        """Answer `query` (exact text) with a vector of `values`."""
        self.replies[query] = self.vector_reply(*values, ts=ts)

    @staticmethod
    def vector_reply(*values, ts=None):
        ts = time.time() if ts is None else ts
        result = [{"metric": {"i": str(i)}, "value": [ts, v]} for i, v in enumerate(values)]
        return (
            200,
            json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode(),
        )

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    try:
        yield s
    finally:
        s.close()


def client(url, **kw):
    return PrometheusClient(url, timeout=kw.pop("timeout", 2.0), **kw)


def test_throughput_ok_and_the_query_pins_namespace_and_job(stub):
    stub.vector("123.5")
    sample = client(stub.url).throughput("team-a", "llm", 60, now=time.time(), generation=3)
    assert sample.value == 123.5
    assert stub.queries == [
        'sum(rate(lepton_trainer_samples_total{namespace="team-a", job_name="llm", generation="3"}[60s]))'
    ]


def test_reporting_workers(stub):
    stub.vector("4")
    assert client(stub.url).reporting_workers("ns", "j", now=time.time()) == 4
    assert stub.queries[-1] == 'count(lepton_trainer_world_size{namespace="ns", job_name="j"})'


@pytest.mark.parametrize(
    "reply, kind",
    [
        ((500, b"internal error"), "http"),
        ((503, b'{"status":"error","errorType":"unavailable","error":"shutting down"}'), "http"),
        ((400, b'{"status":"error","errorType":"bad_data","error":"parse error"}'), "http"),
        ((200, b"<html>not json"), "malformed"),
        ((200, b"[1, 2]"), "malformed"),
        ((200, b'{"status":"success","data":{"resultType":"matrix","result":[]}}'), "malformed"),
        ((200, b'{"status":"success","data":{}}'), "malformed"),
        ((200, b'{"status":"error","errorType":"execution","error":"query timed out"}'), "status"),
        (
            (200, b'{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":["x"]}]}}'),
            "malformed",
        ),
    ],
)
def test_bad_answers_are_typed_errors(stub, reply, kind):
    stub.reply = reply
    with pytest.raises(MetricsError) as err:
        client(stub.url).throughput("ns", "j", 60, now=time.time())
    assert err.value.kind == kind


@pytest.mark.parametrize(
    "values, kind",
    [
        ((), "empty"),
        (("NaN",), "nan"),
        (("+Inf",), "nan"),
        (("-Inf",), "nan"),
        (("1", "2"), "many_series"),
        (("-5",), "malformed"),
    ],
)
def test_unusable_values_are_typed_errors(stub, values, kind):
    stub.vector(*values)
    with pytest.raises(MetricsError) as err:
        client(stub.url).throughput("ns", "j", 60, now=time.time())
    assert err.value.kind == kind


def test_stale_sample(stub):
    stub.vector("100", ts=time.time() - 3600)
    with pytest.raises(MetricsError) as err:
        client(stub.url, max_age_seconds=120).throughput("ns", "j", 60, now=time.time())
    assert err.value.kind == "stale"


def test_timeout(stub):
    stub.vector("1")
    stub.delay = 1.5
    started = time.monotonic()
    with pytest.raises(MetricsError) as err:
        client(stub.url, timeout=0.3).throughput("ns", "j", 60, now=time.time())
    assert err.value.kind == "timeout"
    assert time.monotonic() - started < 1.4


def test_connection_refused():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MetricsError) as err:
        client(f"http://127.0.0.1:{port}").throughput("ns", "j", 60, now=time.time())
    assert err.value.kind == "connection"


def test_bearer_token_is_read_from_the_file(stub, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    stub.vector("1")
    client(stub.url, token_file=str(token)).throughput("ns", "j", 60, now=time.time())
    assert stub.headers[-1]["Authorization"] == "Bearer s3cret"
    token.write_text("rotated")
    client(stub.url, token_file=str(token)).throughput("ns", "j", 60, now=time.time())
    assert stub.headers[-1]["Authorization"] == "Bearer rotated"


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_refused_and_the_token_stays_home(stub, tmp_path, code):
    token = tmp_path / "token"
    token.write_text("s3cret")
    elsewhere = Stub()  # another port: another origin
    try:
        elsewhere.vector("1")
        stub.redirect = (code, f"{elsewhere.url}/api/v1/query")
        with pytest.raises(MetricsError) as err:
            client(stub.url, token_file=str(token)).throughput("ns", "j", 60, now=time.time())
        assert stub.headers[-1]["Authorization"] == "Bearer s3cret"
        assert not any("Authorization" in h for h in elsewhere.headers)
        assert elsewhere.headers == []  # not even contacted
        assert err.value.kind == "redirect"
        assert elsewhere.url in err.value.message
    finally:
        elsewhere.close()


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "no-length"])
def test_an_oversized_answer_is_refused_without_reading_it_all(stub, announce):
    total = 64 * 1024 * 1024
    stub.flood = (total, announce)
    started = time.monotonic()
    with pytest.raises(MetricsError) as err:
        client(stub.url).throughput("ns", "j", 60, now=time.time())
    assert err.value.kind == "too_large"
    assert "1048576" in err.value.message
    assert stub.flood_done.wait(5)  # the client hung up: the server's writes failed
    assert stub.flood_sent < total // 4  # socket buffers hold a few MiB, not the whole answer
    assert time.monotonic() - started < 5


def test_an_answer_at_the_limit_is_read(stub):
    stub.vector("7")
    size = len(stub.reply[1])
    assert client(stub.url, max_response_bytes=size).throughput("ns", "j", 60, now=time.time()).value == 7
    with pytest.raises(MetricsError) as err:
        client(stub.url, max_response_bytes=size - 1).throughput("ns", "j", 60, now=time.time())
    assert err.value.kind == "too_large"


@pytest.mark.parametrize(
    "name, literal",
    [
        ('a"} or vector(1e9) #', r'"a\"} or vector(1e9) #"'),
        ("x\\", r'"x\\"'),
        ("a\nb", r'"a\nb"'),
        (".*", '".*"'),
    ],
)
def test_hostile_names_stay_inside_string_literals(name, literal):
    assert promql_string(name) == literal
    q = throughput_query("ns", name, 30)
    assert f"job_name={literal}" in q and "=~" not in q
    assert q.startswith('sum(rate(lepton_trainer_samples_total{namespace="ns", ')
    assert world_size_query(name, "j").startswith(f"count(lepton_trainer_world_size{{namespace={literal}")


def test_namespace_is_always_pinned():
    with pytest.raises(ValueError):
        throughput_query("", "j", 30)
    with pytest.raises(ValueError):
        throughput_query("ns", "j", 0)


def test_hostile_name_is_sent_verbatim_as_a_literal(stub):
    stub.vector("1")
    client(stub.url).throughput('ns"}', 'j"} or up{', 60, now=time.time())
    assert stub.queries[-1] == (
        'sum(rate(lepton_trainer_samples_total{namespace="ns\\"}", job_name="j\\"} or up{"}[60s]))'
    )


TRAINED = 'max(lepton_trainer_trained_samples{namespace="team-a", job_name="llm"})'
TARGET = 'max(lepton_trainer_target_samples{namespace="team-a", job_name="llm"})'


def test_run_progress_queries_and_parses_both_gauges(stub):
    assert (trained_samples_query("team-a", "llm"), target_samples_query("team-a", "llm")) == (TRAINED, TARGET)
    stub.answer(TRAINED, "2500")
    stub.answer(TARGET, "10000")
    progress = client(stub.url).run_progress("team-a", "llm", now=time.time())
    assert progress == Progress(done=2500.0, target=10000.0)
    assert (progress.remaining, progress.fraction) == (7500.0, 0.25)
    assert sorted(stub.queries) == sorted([TRAINED, TARGET])  # no generation filter, no regex
    with pytest.raises(AttributeError):
        progress.done = 0  # frozen


def test_run_progress_past_the_target_has_nothing_remaining(stub):
    stub.answer(TRAINED, "10400")  # a resume with a smaller --max-steps, or a last partial step
    stub.answer(TARGET, "10000")
    progress = client(stub.url).run_progress("team-a", "llm", now=time.time())
    assert (progress.remaining, progress.fraction) == (0.0, 1.0)
    assert Progress(done=0, target=0).fraction == 1.0


@pytest.mark.parametrize("trained, target", [((), ()), (("5",), ()), ((), ("10",))])
def test_run_progress_is_none_when_the_trainer_does_not_export_it(stub, trained, target):
    stub.answer(TRAINED, *trained)
    stub.answer(TARGET, *target)
    assert client(stub.url).run_progress("team-a", "llm", now=time.time()) is None


@pytest.mark.parametrize(
    "trained, target, kind",
    [
        (("-1",), ("10",), "malformed"),
        (("1",), ("0",), "malformed"),
        (("x",), ("10",), "malformed"),
        (("NaN",), ("10",), "nan"),
        (("1",), ("+Inf",), "nan"),
        (("1", "2"), ("10",), "many_series"),
    ],
)
def test_run_progress_unusable_values_are_typed_errors(stub, trained, target, kind):
    stub.answer(TRAINED, *trained)
    stub.answer(TARGET, *target)
    with pytest.raises(MetricsError) as err:
        client(stub.url).run_progress("team-a", "llm", now=time.time())
    assert err.value.kind == kind


def test_run_progress_outages_are_errors_not_none(stub):
    stub.reply = (503, b'{"status":"error","errorType":"unavailable","error":"shutting down"}')
    with pytest.raises(MetricsError) as err:
        client(stub.url).run_progress("team-a", "llm", now=time.time())
    assert err.value.kind == "http"
    stub.reply = (200, b"<html>not json")
    with pytest.raises(MetricsError) as err:
        client(stub.url).run_progress("team-a", "llm", now=time.time())
    assert err.value.kind == "malformed"
    stub.answer(TRAINED, "5", ts=time.time() - 3600)
    stub.answer(TARGET, "10", ts=time.time() - 3600)
    with pytest.raises(MetricsError) as err:
        client(stub.url, max_age_seconds=120).run_progress("team-a", "llm", now=time.time())
    assert err.value.kind == "stale"


def test_run_progress_queries_keep_hostile_names_inside_literals():
    q = trained_samples_query('ns"}', 'j"} or vector(1e9) #')
    assert q == 'max(lepton_trainer_trained_samples{namespace="ns\\"}", job_name="j\\"} or vector(1e9) #"})'
    assert "=~" not in target_samples_query("ns", ".*")
    with pytest.raises(ValueError):
        target_samples_query("", "j")
