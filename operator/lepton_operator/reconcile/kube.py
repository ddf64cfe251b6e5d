"""The only code that calls the Kubernetes API; it turns ApiException into domain errors.

It speaks plain JSON dicts over the client's REST layer (`param_serialize` + `call_api`)
rather than the typed API classes: the builders produce wire-form dicts, and a round
trip through the client's generated models could drop or reshape fields it does not
know. Calls are synchronous; the handlers run them with `asyncio.to_thread`.

Error mapping (docs/style.md, house rule 4):
- 409 AlreadyExists on a create of a deterministic name: success ("exists") when the
  object holding the name has our owner (the job's uid), else "taken" (NameTaken).
- 404 on a delete: success (already gone); 409 on a delete with a uid precondition:
  success too (the name now belongs to another object, ours is gone).
- 409 Conflict on the status write (resourceVersion precondition): `Conflict`, redo the pass.
- 400/403/422: `PermanentApiError` with the server's message (RBAC, admission, schema).
- 429 Too Many Requests (API Priority and Fairness, max-in-flight): retried here, after the
  server's `Retry-After` (the header, else the Status body's `details.retryAfterSeconds`,
  else 1 s; at most 30 s), at most 3 times; then `TransientApiError` like any other.
- anything else (5xx, connection trouble, timeouts): `TransientApiError`.

Client-side rate limit: every request `Kube` sends, each 429 retry included, first takes a
token from its limiter (`ratelimit.TokenBucket`, `--api-qps`/`--api-burst`), one limiter for
the whole process. urllib3's own handling of `Retry-After` is turned off
(`api_client_for`), so a 429 always comes back here and no retry goes out without a token;
urllib3 still retries a broken connection of an idempotent request (as before), without one.
kopf's own requests (watches, its annotation and finalizer patches, `kopf.event` posts) go
through kopf's aiohttp session and are not limited (docs/architecture.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import datetime, timezone
from typing import Callable, Optional
from urllib.parse import quote

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException
from urllib3.util.retry import Retry

from lepton_operator.api.models import API_VERSION, GROUP, KIND, PLURAL, VERSION
from lepton_operator.reconcile.ratelimit import TokenBucket

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (5, 30)  # (connect, read) seconds: a stuck call must not stall a job's loop
# Concurrent API calls: the sync client runs in threads (asyncio.to_thread), and asyncio's
# default executor has only min(32, cores + 4) of them, which serialised many jobs'
# passes behind each other (benchmarks/RESULTS.md).
DEFAULT_API_THREADS = 32
# The client-side rate limit (`--api-qps`, `--api-burst`; README "Install on a real cluster").
# A settled job costs ~0.6 requests a minute (a pod re-list, the autoscaler's measurement
# and the allocator's refresh, each every 5 minutes; passes read kopf's body, no GET), so
# 50/s leaves most of the budget to starts: 1,000 elastic jobs created at once (~29 requests
# each while they start) had every pod within 9 minutes, paced by this limit
# (benchmarks/RESULTS.md). A burst of 100 lets a few jobs start without any wait; like
# kube-controller-manager's --kube-api-qps, and kube-scheduler's defaults are the same.
DEFAULT_API_QPS = 50.0
DEFAULT_API_BURST = 100
# 429 Too Many Requests: retries after the server's Retry-After, then TransientApiError.
RETRIES_ON_429 = 3
DEFAULT_RETRY_AFTER = 1.0  # seconds, when the server names none
MAX_RETRY_AFTER = 30.0  # seconds: a longer wait is the pass's backoff's business
# urllib3's default (3 retries of a broken connection, idempotent methods only) without its
# own status retries and Retry-After sleeps: a 429 must come back to `Kube.request`, which
# takes a token for every attempt.
URLLIB3_RETRIES = Retry(3, status_forcelist=None, respect_retry_after_header=False)

_PATHS = {
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "Service": "/api/v1/namespaces/{ns}/services",
    "PersistentVolumeClaim": "/api/v1/namespaces/{ns}/persistentvolumeclaims",
    "Event": "/api/v1/namespaces/{ns}/events",
    KIND: f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{PLURAL}",
    "PodDisruptionBudget": "/apis/{policy}/namespaces/{ns}/poddisruptionbudgets",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
}


class ApiError(Exception):
    """A failed API call; `status` is the HTTP status (0 for connection trouble)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class TransientApiError(ApiError):
    """Worth retrying soon: the server or the network had trouble."""


class PermanentApiError(ApiError):
    """Retrying the same request will fail the same way (RBAC, admission, invalid object)."""


class Conflict(TransientApiError):
    """The object changed since it was read: read again and redo the pass."""


def api_client_for(configuration: client.Configuration, pool_size: int = DEFAULT_API_THREADS) -> client.ApiClient:
    """An ApiClient for `Kube`: a connection pool as large as the number of threads using it,
    and urllib3 leaving 429s to `Kube.request` (URLLIB3_RETRIES)."""
    configuration.connection_pool_maxsize = pool_size
    configuration.retries = URLLIB3_RETRIES
    return client.ApiClient(configuration)


def api_client_from_environment(pool_size: int = DEFAULT_API_THREADS) -> client.ApiClient:
    """A Kubernetes ApiClient from the in-cluster ServiceAccount or KUBECONFIG (or
    ~/.kube/config), made by `api_client_for`."""
    from kubernetes import config

    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    return api_client_for(configuration, pool_size)


def _server_message(e: ApiException) -> str:
    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(e.reason or e)


def _not_found_name(e: ApiException) -> Optional[str]:
    """The object name in a NotFound Status body (absent when the resource type is unknown)."""
    try:
        return (json.loads(e.body).get("details") or {}).get("name")
    except (TypeError, ValueError, AttributeError):
        return None


def retry_after(e: ApiException) -> float:
    """Seconds a 429 asks the client to wait: the `Retry-After` header (seconds), else the
    Status body's `details.retryAfterSeconds`, else DEFAULT_RETRY_AFTER; at most MAX_RETRY_AFTER."""
    seconds = None
    header = (e.headers or {}).get("Retry-After")
    try:
        seconds = float(header) if header is not None else None
    except (TypeError, ValueError):
        pass  # an HTTP-date: the apiserver sends seconds, so the body or the default will do
    if seconds is None:
        try:
            seconds = float((json.loads(e.body).get("details") or {})["retryAfterSeconds"])
        except (TypeError, ValueError, AttributeError, KeyError):
            pass
    if seconds is None or not math.isfinite(seconds):
        seconds = DEFAULT_RETRY_AFTER
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _error(e: Exception, what: str) -> ApiError:
    if isinstance(e, ApiException):
        message = f"{what}: HTTP {e.status}: {_server_message(e)}"
        if e.status == 409:
            return Conflict(message, 409)
        if e.status in (400, 403, 422):
            return PermanentApiError(message, e.status)
        return TransientApiError(message, e.status or 0)
    return TransientApiError(f"{what}: {type(e).__name__}: {e}", 0)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kube:
    """JSON-in, JSON-out access to what the operator reads and writes."""

    def __init__(
        self,
        api_client: client.ApiClient,
        limiter: Optional[TokenBucket] = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        """`limiter`: the process's one client-side rate limit (None: unlimited); build the
        ApiClient with `api_client_for`. `sleep` waits out a 429's Retry-After (tests)."""
        self.api = api_client
        self.limiter = limiter
        self._sleep = sleep
        self._policy_version: Optional[str] = None
        self.job_seen: Optional[Callable[[tuple[str, str], Optional[str], dict], None]] = None
        """Told every job read or written, with its resourceVersion (OperatorContext wires
        it to WatchHealth.known: passes then know when kopf's body is older, and what is
        newer)."""

    def saw_job(self, body: Optional[dict]) -> Optional[dict]:
        """Report a job body the API answered with (this client's or kopf's) to `job_seen`."""
        if body and self.job_seen is not None:
            meta = body.get("metadata") or {}
            self.job_seen((meta.get("namespace"), meta.get("name")), meta.get("resourceVersion"), body)
        return body

    def policy_version(self) -> str:
        """`policy/v1` where the server has it (>= 1.21), else `policy/v1beta1` (asked once)."""
        if self._policy_version is None:
            group = self._call("discover the policy API group", "GET", "/apis/policy")
            served = [v.get("groupVersion") for v in group.get("versions") or []]
            self._policy_version = "policy/v1" if "policy/v1" in served else "policy/v1beta1"
        return self._policy_version

    def _path(self, kind: str, namespace: str) -> str:
        template = _PATHS[kind]
        if "{policy}" in template:
            return template.format(ns=quote(namespace), policy=self.policy_version())
        return template.format(ns=quote(namespace))

    def request(self, method: str, path: str, body=None, query=None, content_type: Optional[str] = None) -> dict:
        """One API call: a token from the limiter before each attempt, a 429 retried after its
        Retry-After (at most RETRIES_ON_429 times); raises ApiException on any other failure
        status, or on a 429 once the retries are spent."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        for attempt in range(RETRIES_ON_429 + 1):
            params = self.api.param_serialize(
                method=method,
                resource_path=path,
                query_params=list((query or {}).items()),
                header_params=dict(headers),
                body=body,
                auth_settings=["BearerToken"],
            )
            if self.limiter is not None:
                self.limiter.acquire()
            response = self.api.call_api(*params, _request_timeout=REQUEST_TIMEOUT)
            response.read()
            if 200 <= response.status < 300:
                return json.loads(response.data) if response.data else {}
            error = ApiException(http_resp=response)
            if response.status != 429 or attempt == RETRIES_ON_429:
                raise error
            wait = retry_after(error)
            log.debug(f"{method} {path}: 429 Too Many Requests, retry {attempt + 1} in {wait:g} s")
            self._sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _call(self, what: str, method: str, path: str, **kwargs) -> dict:
        try:
            return self.request(method, path, **kwargs)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            raise _error(e, what) from e

    # --- jobs --------------------------------------------------------------------

    def get_job(self, namespace: str, name: str) -> Optional[dict]:
        """The job as stored now (None when it is gone)."""
        path = _PATHS[KIND].format(ns=quote(namespace)) + "/" + quote(name)
        try:
            return self.saw_job(self.request("GET", path))
        except ApiException as e:
            # A 404 means "gone" only when it names the object: a restarting apiserver
            # answers 404 for the whole resource until it has loaded the CRDs again.
            if e.status == 404 and _not_found_name(e) == name:
                return None
            raise _error(e, f"get {KIND} {namespace}/{name}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise _error(e, f"get {KIND} {namespace}/{name}") from e

    def patch_job_status(self, namespace: str, name: str, resource_version: str, status_patch: dict) -> dict:
        """Merge-patch the status subresource, only if the job is still at `resource_version`.

        The precondition makes the pass's decision stick only when it was made on the
        latest state: a concurrent write (a user's scale, the autoscaler) gives Conflict,
        and the pass is redone on fresh data.
        """
        path = _PATHS[KIND].format(ns=quote(namespace)) + "/" + quote(name) + "/status"
        body = {"metadata": {"resourceVersion": resource_version}, "status": status_patch}
        written = self._call(
            f"patch {KIND} {namespace}/{name} status",
            "PATCH",
            path,
            body=body,
            content_type="application/merge-patch+json",
        )
        return self.saw_job(written)

    def patch_job_replicas(self, namespace: str, name: str, resource_version: str, replicas: int) -> dict:
        """Set `spec.workers.replicas` (what an HPA writes through /scale), only if the job
        is still at `resource_version`."""
        path = _PATHS[KIND].format(ns=quote(namespace)) + "/" + quote(name)
        body = {"metadata": {"resourceVersion": resource_version}, "spec": {"workers": {"replicas": replicas}}}
        written = self._call(
            f"patch {KIND} {namespace}/{name} replicas",
            "PATCH",
            path,
            body=body,
            content_type="application/merge-patch+json",
        )
        return self.saw_job(written)

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """Delete the job itself (TTL after finish); children follow by garbage collection."""
        path = _PATHS[KIND].format(ns=quote(namespace)) + "/" + quote(name)
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
            "preconditions": {"uid": uid},
        }
        try:
            self._call(f"delete {KIND} {namespace}/{name}", "DELETE", path, body=body)
        except ApiError as e:
            if e.status not in (404, 409):  # gone, or a different job of that name now
                raise

    # --- children ------------------------------------------------------------------

    def create(self, obj: dict) -> str:
        """Create a child; returns "created", "exists" when an object of the same owner
        already holds the name (ours: an earlier pass made it), or "taken" when an object
        the job does not own holds it (409, then one GET to tell the two apart)."""
        kind, meta = obj["kind"], obj["metadata"]
        what = f"{kind} {meta['namespace']}/{meta['name']}"
        path = self._path(kind, meta["namespace"])
        if kind == "PodDisruptionBudget":
            obj = {**obj, "apiVersion": self.policy_version()}  # same shape in both versions
        try:
            self._call(f"create {what}", "POST", path, body=obj)
        except Conflict:
            try:
                holder = self._call(f"get {what}", "GET", path + "/" + quote(meta["name"]))
            except ApiError as e:
                if e.status == 404:
                    return "exists"  # gone since the 409: the next pass creates it
                raise
            owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
            held_by = {ref.get("uid") for ref in (holder.get("metadata") or {}).get("ownerReferences") or []}
            return "exists" if owners & held_by else "taken"
        return "created"

    def delete(self, namespace: str, kind: str, name: str, grace: Optional[int], uid: Optional[str] = None) -> bool:
        """Delete a child, only the object with `uid` when given; False when it was
        already gone (404, or 409: the uid precondition failed, another object holds the name)."""
        path = self._path(kind, namespace) + "/" + quote(name)
        body: dict = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace is not None:
            body["gracePeriodSeconds"] = int(grace)
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            self._call(f"delete {kind} {namespace}/{name}", "DELETE", path, body=body)
        except ApiError as e:
            if e.status == 404 or (e.status == 409 and uid is not None):
                return False
            raise
        return True

    def patch(self, namespace: str, kind: str, name: str, patch: dict) -> None:
        """Merge-patch a child (a 404 is left to the next pass, which creates it)."""
        path = self._path(kind, namespace) + "/" + quote(name)
        try:
            self._call(
                f"patch {kind} {namespace}/{name}",
                "PATCH",
                path,
                body=patch,
                content_type="application/merge-patch+json",
            )
        except ApiError as e:
            if e.status != 404:
                raise

    def served_resources(self, group_version: str) -> list[str]:
        """Plural names of the resources the API serves in `group_version` (e.g.
        `lepton.ai/v1alpha1`); [] when it serves nothing there (404)."""
        try:
            found = self._call(f"discover {group_version}", "GET", f"/apis/{group_version}")
        except ApiError as e:
            if e.status == 404:
                return []
            raise
        return [r.get("name") for r in found.get("resources") or [] if "/" not in (r.get("name") or "/")]

    def list_pods(self, namespace: str, label_selector: str) -> list[dict]:
        """Pods of a namespace matching a label selector, from the apiserver's watch cache
        (`resourceVersion=0`, as informers list). Without it every list is a quorum read
        of every pod of the namespace from etcd, filtered by label afterwards: at 1,000
        jobs of 8 workers, 8,000 pods decoded for each job's re-list (benchmarks/RESULTS.md).
        The cache follows etcd within moments, and a re-list only has to find pods kopf's
        watch missed for long (`PodCache`)."""
        path = _PATHS["Pod"].format(ns=quote(namespace))
        query = {"labelSelector": label_selector, "resourceVersion": "0"}
        items = self._call(f"list pods {namespace} {label_selector}", "GET", path, query=query).get("items") or []
        for item in items:  # a list's items carry no kind
            item.setdefault("kind", "Pod")
        return items

    def list_nodes(self) -> list[dict]:
        """Every node (cluster-scoped, read-only: capacity, node loss and drains), from the
        apiserver's watch cache (`resourceVersion=0`, as `list_pods`)."""
        return self._call("list nodes", "GET", "/api/v1/nodes", query={"resourceVersion": "0"}).get("items") or []

    def list_priority_classes(self) -> list[dict]:
        """Every PriorityClass (read-only: a LeptonJob's priorityClassName gives its priority)."""
        path = "/apis/scheduling.k8s.io/v1/priorityclasses"
        return self._call("list priorityclasses", "GET", path).get("items") or []

    def exists(self, namespace: str, kind: str, name: str) -> bool:
        path = _PATHS[kind].format(ns=quote(namespace)) + "/" + quote(name)
        try:
            self._call(f"get {kind} {namespace}/{name}", "GET", path)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    # --- events --------------------------------------------------------------------

    def post_event(self, job: dict, type_: str, reason: str, message: str, component: str = "lepton-operator") -> None:
        """A core/v1 Event about the job (what `kubectl describe lj` shows)."""
        meta = job["metadata"]
        now = _now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason[:128],
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._call(
            f"post event {reason} for {meta['namespace']}/{meta['name']}",
            "POST",
            _PATHS["Event"].format(ns=quote(meta["namespace"])),
            body=event,
        )
