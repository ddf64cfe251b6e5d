"""A small Prometheus query client for the autoscaler (stdlib only, no kopf, no k8s client).

Queries are built here and nowhere else, so that every one of them quotes label values
as PromQL string literals, matches with `=` (never `=~`) and pins `namespace`.

Labels the scrape configuration must give the trainer's series (see
`lepton_operator.scaling.scrape.scrape_config`, which the Helm chart docs reuse):

- `namespace`: the pod's namespace (`__meta_kubernetes_namespace`);
- `pod`: the pod's name (`__meta_kubernetes_pod_name`);
- `job_name`: the pod label `lepton.ai/job-name`;
- `generation`: the pod label `lepton.ai/generation`.

Every failure comes back as a `MetricsError` with a `kind` (http, redirect, timeout,
connection, too_large, malformed, status, empty, nan, many_series, stale), never as a
number: the autoscaler holds on all of them (docs/reliability.md, row 12).

Redirects are refused, never followed: urllib's redirect handler copies the request's
headers, bearer token included, to whatever host the `Location` names, and it turns the
POSTed query into a bodyless GET anyway. Prometheus itself never redirects
`/api/v1/query`, so a redirect means the configured URL is wrong (http for https, a
login proxy): the error names the `Location` so the admin can fix the URL.

Answers are read up to `MAX_RESPONSE_BYTES`: the instant queries here return one series,
so a bigger answer is a broken or hostile endpoint, not data, and must not cost memory.
"""

from __future__ import annotations

import json
import math
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Optional, Union

SAMPLES_METRIC = "lepton_trainer_samples_total"
WORLD_SIZE_METRIC = "lepton_trainer_world_size"
TRAINED_SAMPLES_METRIC = "lepton_trainer_trained_samples"
TARGET_SAMPLES_METRIC = "lepton_trainer_target_samples"
# Histograms: the queries read their `_sum` series (seconds).
STEP_SECONDS_METRIC = "lepton_trainer_step_seconds"
COMM_SECONDS_METRIC = "lepton_trainer_comm_seconds"
MAX_RESPONSE_BYTES = 1024 * 1024


class MetricsError(Exception):
    """A query that gave no usable number; `kind` says why."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Sample:
    """One instant value of a query that returned exactly one series."""

    value: float
    timestamp: float
    labels: dict
    window_seconds: Optional[int] = None
    """The rate window of a throughput query (set by the caller that chose it)."""


@dataclass(frozen=True)
class Progress:
    """Where a run stands, in samples: `done` of `target` (both from the trainer's gauges)."""

    done: float
    target: float

    @property
    def remaining(self) -> float:
        """Samples left to train (0 once `done` reaches or passes `target`)."""
        return max(0.0, self.target - self.done)

    @property
    def fraction(self) -> float:
        """`done / target` in [0, 1] (1 for a run with nothing to do)."""
        if self.target <= 0:
            return 1.0
        return min(1.0, max(0.0, self.done / self.target))


def promql_string(value: str) -> str:
    """`value` as a PromQL double-quoted string literal (backslash, quote and newline escaped)."""
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def selector(metric: str, namespace: str, job_name: str, generation: Optional[int] = None) -> str:
    """`metric{namespace="..", job_name=".."[, generation=".."]}`, exact matches only."""
    if not namespace:
        raise ValueError("every query pins a namespace")
    labels = [f"namespace={promql_string(namespace)}", f"job_name={promql_string(job_name)}"]
    if generation is not None:
        labels.append(f"generation={promql_string(str(int(generation)))}")
    return f"{metric}{{{', '.join(labels)}}}"


def _window(window_seconds: int) -> int:
    """A range query's window in whole seconds; ValueError unless positive."""
    window = int(window_seconds)
    if window <= 0:
        raise ValueError("window_seconds must be positive")
    return window


def throughput_query(namespace: str, job_name: str, window_seconds: int, generation: Optional[int] = None) -> str:
    """Whole-job samples/s: `sum(rate(lepton_trainer_samples_total{...}[<w>s]))`."""
    window = _window(window_seconds)
    return f"sum(rate({selector(SAMPLES_METRIC, namespace, job_name, generation)}[{window}s]))"


def comm_fraction_query(namespace: str, job_name: str, window_seconds: int, generation: Optional[int] = None) -> str:
    """The fraction of the job's step time spent on exposed communication over the window:
    `sum(rate(lepton_trainer_comm_seconds_sum{...}[<w>s])) / sum(rate(lepton_trainer_step_seconds_sum{...}[<w>s]))`.

    Empty when the trainer exports no split (another image, a synthetic or paced run)."""
    window = _window(window_seconds)
    comm = selector(COMM_SECONDS_METRIC + "_sum", namespace, job_name, generation)
    step = selector(STEP_SECONDS_METRIC + "_sum", namespace, job_name, generation)
    return f"sum(rate({comm}[{window}s])) / sum(rate({step}[{window}s]))"


def progress_query(namespace: str, job_name: str, window_seconds: int, generation: int) -> str:
    """Samples processed by the whole job over the window (the hang watchdog's measure):
    `sum(increase(lepton_trainer_samples_total{...}[<w>s]))`."""
    window = _window(window_seconds)
    return f"sum(increase({selector(SAMPLES_METRIC, namespace, job_name, generation)}[{window}s]))"


def world_size_query(namespace: str, job_name: str, generation: Optional[int] = None) -> str:
    """Workers reporting metrics (one series per worker pod): `count(lepton_trainer_world_size{...})`."""
    return f"count({selector(WORLD_SIZE_METRIC, namespace, job_name, generation)})"


def trained_samples_query(namespace: str, job_name: str) -> str:
    """The run's position in samples: `max(lepton_trainer_trained_samples{...})`.

    Every pod exports the same gauge, restored from the checkpoint on resume, so no
    generation filter: the max over the pods Prometheus still sees is the position (unlike
    `lepton_trainer_samples_total`, which starts at 0 in every new pod).
    """
    return f"max({selector(TRAINED_SAMPLES_METRIC, namespace, job_name)})"


def target_samples_query(namespace: str, job_name: str) -> str:
    """The run's total in samples (`--max-steps` x global batch): `max(lepton_trainer_target_samples{...})`."""
    return f"max({selector(TARGET_SAMPLES_METRIC, namespace, job_name)})"


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: the 3xx then surfaces as an HTTPError (see the module docstring)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class PrometheusClient:
    """Instant queries against Prometheus' HTTP API (`/api/v1/query`)."""

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        token_file: Optional[str] = None,
        ca_file: Optional[str] = None,
        max_age_seconds: float = 120.0,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token_file = token_file
        self.ca_file = ca_file
        self.max_age_seconds = max_age_seconds
        self.max_response_bytes = max_response_bytes

    def _headers(self) -> dict:
        headers = {"Accept": "application/json"}
        if self.token_file:
            # Read each time: projected service-account tokens rotate.
            with open(self.token_file) as f:
                headers["Authorization"] = f"Bearer {f.read().strip()}"
        return headers

    def _opener(self) -> urllib.request.OpenerDirector:
        handlers: list = [_RefuseRedirects()]
        if self.url.startswith("https://"):
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=self.ca_file)))
        return urllib.request.build_opener(*handlers)

    def _read(self, response) -> bytes:
        """The body, or MetricsError("too_large") without reading past the limit."""
        limit = self.max_response_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise MetricsError("too_large", f"{self.url} announced {declared} bytes, the limit is {limit}")
        raw = response.read(limit + 1)
        if len(raw) > limit:
            raise MetricsError("too_large", f"{self.url} sent more than {limit} bytes")
        return raw

    def query_raw(self, promql: str, at: Optional[float] = None) -> list:
        """The `data.result` vector of an instant query, or a MetricsError."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        body = urllib.parse.urlencode(params).encode()
        request = urllib.request.Request(f"{self.url}/api/v1/query", data=body, headers=self._headers(), method="POST")
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with self._opener().open(request, timeout=self.timeout) as response:
                raw = self._read(response)
        except urllib.error.HTTPError as exc:
            with exc:
                if 300 <= exc.code < 400:
                    location = exc.headers.get("Location", "?")
                    raise MetricsError(
                        "redirect", f"HTTP {exc.code} from {self.url} to {location}: refused, set the final URL"
                    ) from None
                # Prometheus answers 400/422/503 with a JSON error body: keep its message.
                detail = exc.read(500).decode("utf-8", "replace")
            raise MetricsError("http", f"HTTP {exc.code} from {self.url}: {detail}") from None
        except (socket.timeout, TimeoutError) as exc:
            raise MetricsError("timeout", f"no answer from {self.url} within {self.timeout} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                raise MetricsError("timeout", f"no answer from {self.url} within {self.timeout} s") from None
            raise MetricsError("connection", f"cannot reach {self.url}: {exc.reason}") from None
        except (ConnectionError, OSError) as exc:
            raise MetricsError("connection", f"cannot reach {self.url}: {exc}") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise MetricsError("malformed", f"not JSON: {raw[:200]!r}") from None
        if not isinstance(doc, dict):
            raise MetricsError("malformed", "the answer is not a JSON object")
        if doc.get("status") != "success":
            raise MetricsError("status", f"status {doc.get('status')!r}: {doc.get('errorType')} {doc.get('error')}")
        data = doc.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("result"), list):
            raise MetricsError("malformed", "no data.result list")
        if data.get("resultType") not in ("vector", None):
            raise MetricsError("malformed", f"expected a vector, got {data.get('resultType')!r}")
        return data["result"]

    def query_scalar(self, promql: str, now: float) -> Sample:
        """The single finite, fresh value of an instant query; MetricsError otherwise.

        `now` (Unix seconds) is when the query is made: a sample older than
        `max_age_seconds` is stale.
        """
        result = self.query_raw(promql)
        if not result:
            raise MetricsError("empty", f"no series for {promql}")
        if len(result) > 1:
            raise MetricsError("many_series", f"{len(result)} series for {promql}, expected one")
        series = result[0]
        try:
            ts, text = series["value"]
            ts, value = float(ts), float(text)
        except (KeyError, TypeError, ValueError):
            raise MetricsError("malformed", f"bad sample {str(series)[:200]}") from None
        if not math.isfinite(value):
            raise MetricsError("nan", f"{text} for {promql}")
        if now - ts > self.max_age_seconds:
            raise MetricsError("stale", f"sample is {now - ts:.0f} s old (limit {self.max_age_seconds:.0f} s)")
        return Sample(value=value, timestamp=ts, labels=dict(series.get("metric") or {}))

    def _scalar_or_none(self, promql: str, now: float) -> Optional[Sample]:
        """`query_scalar`, but None for an empty answer (a series nobody exports)."""
        try:
            return self.query_scalar(promql, now)
        except MetricsError as exc:
            if exc.kind == "empty":
                return None
            raise

    def run_progress(self, namespace: str, job_name: str, now: float) -> Optional[Progress]:
        """The run's position and total in samples (remaining work = target - done).

        None when the job's trainer exports neither gauge (another image, or no pod
        running); a MetricsError on every other failure, as for the other queries. A
        negative position or a target that is not positive is malformed.
        """
        target = self._scalar_or_none(target_samples_query(namespace, job_name), now)
        if target is None:
            return None
        done = self._scalar_or_none(trained_samples_query(namespace, job_name), now)
        if done is None:
            return None
        if target.value <= 0:
            raise MetricsError("malformed", f"target of {target.value} samples for {namespace}/{job_name}")
        if done.value < 0:
            raise MetricsError("malformed", f"negative position {done.value} for {namespace}/{job_name}")
        return Progress(done=done.value, target=target.value)

    def progress(self, namespace: str, job_name: str, window_seconds: int, now: float, generation: int) -> Sample:
        """Samples the job's workers processed over the last `window_seconds`."""
        return self.query_scalar(progress_query(namespace, job_name, window_seconds, generation), now)

    def throughput(
        self, namespace: str, job_name: str, window_seconds: int, now: float, generation: Optional[int] = None
    ) -> Sample:
        """Whole-job samples/s over the window (negative rates are malformed)."""
        sample = self.query_scalar(throughput_query(namespace, job_name, window_seconds, generation), now)
        if sample.value < 0:
            raise MetricsError("malformed", f"negative throughput {sample.value}")
        return sample

    def comm_fraction(
        self, namespace: str, job_name: str, window_seconds: int, now: float, generation: Optional[int] = None
    ) -> Optional[Sample]:
        """The job's communication fraction of step time over the window, in [0, 1];
        None when the trainer exports no communication split. A value outside [0, 1] is
        malformed (communication is a part of the step); no step time in the window is
        `nan`."""
        sample = self._scalar_or_none(comm_fraction_query(namespace, job_name, window_seconds, generation), now)
        if sample is None:
            return None
        if not 0.0 <= sample.value <= 1.0:
            raise MetricsError("malformed", f"communication fraction {sample.value} outside [0, 1]")
        return sample

    def reporting_workers(self, namespace: str, job_name: str, now: float, generation: Optional[int] = None) -> int:
        """How many worker pods report metrics (for the given generation)."""
        return int(self.query_scalar(world_size_query(namespace, job_name, generation), now).value)


MetricsResult = Union[Sample, MetricsError]
