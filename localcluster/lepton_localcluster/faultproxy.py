"""A fault-injecting HTTPS reverse proxy in front of a :class:`LocalCluster`'s kube-apiserver.

Some faults of the API are too short to hit on purpose: after an apiserver restart, a
LIST that arrives before the CustomResourceDefinitions are served again gets ``404 page
not found`` for a moment. Put this proxy between a client (the operator) and the
apiserver, and such a fault happens when the test says::

    with FaultProxy(cluster) as proxy:
        op = run_operator(*args, env=proxy.env())        # the operator talks to the proxy
        proxy.fail(r"^/apis/lepton\\.ai/", 404, seconds=5)  # the group is not served for 5 s
        proxy.break_streams()                              # its watches break, as in a restart
        ...
        proxy.requests                                     # (time, method, path, status) of each

It forwards every request (method, path and query, headers, body) upstream with the
cluster kubeconfig's credentials and streams each response back chunk by chunk, so
watches (long-lived streaming GETs) work through it. It serves on 127.0.0.1 with the
apiserver's own serving certificate when that covers 127.0.0.1 (it does: kube-apiserver
generates it with 127.0.0.1 among its SANs), so the proxy's kubeconfig trusts it with the
cluster's CA file. kube-apiserver keeps no CA key on disk, so there is nothing to sign a
certificate of our own with: otherwise the proxy makes a self-signed one and its
kubeconfig trusts that.

It runs an asyncio loop (aiohttp, server and client) in a thread of its own; use it as a
context manager, or call :meth:`FaultProxy.start` and :meth:`FaultProxy.stop`. Protocol
upgrades (``kubectl exec``, port-forward) are not proxied.
"""

from __future__ import annotations

import asyncio
import copy
import http
import json
import re
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import aiohttp
import yaml
from aiohttp import web

from . import procs
from .controlplane import LocalCluster

# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
_STATUS_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ProxiedRequest(NamedTuple):
    """One request the proxy answered: when it arrived (``time.monotonic()``), its method,
    its path with the query (``/apis/...?watch=true``), and the status sent back (0 when
    the apiserver could not be reached and the client's connection was dropped)."""

    time: float
    method: str
    path: str
    status: int


class Fault(NamedTuple):
    """An answer the proxy gives instead of the apiserver's, until ``until`` (monotonic)."""

    pattern: re.Pattern
    status: int
    until: float
    body: bytes
    headers: dict[str, str]


def default_fault_body(status: int) -> tuple[bytes, dict[str, str]]:
    """What kube-apiserver answers with ``status``: for 404, Go's ``404 page not found``
    (its answer for a group or version it does not serve); otherwise a ``metav1.Status``."""
    if status == 404:
        return b"404 page not found\n", {
            "Content-Type": "text/plain; charset=utf-8",
            "X-Content-Type-Options": "nosniff",
        }
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = f"status {status}"
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"{phrase} (injected by the fault proxy)",
        "reason": _STATUS_REASONS.get(status, phrase.replace(" ", "")),
        "code": status,
    }
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


class _Stream:
    """A response being streamed to a client; :meth:`FaultProxy.break_streams` breaks it."""

    def __init__(self, pump: asyncio.Task) -> None:
        self.pump = pump
        self.broken = False
        self.abort = True


class FaultProxy:
    """HTTPS reverse proxy for ``cluster``'s kube-apiserver with injectable faults (see
    the module docstring).

    Args:
        cluster: a started :class:`LocalCluster`.
        host: the address to listen on (a free port is picked).
        workdir: where its kubeconfig (and a certificate, if it has to make one) go; a
            temporary directory, removed on stop, when None.
    """

    def __init__(self, cluster: LocalCluster, host: str = "127.0.0.1", workdir: str | Path | None = None) -> None:
        if not cluster.kubeconfig or not cluster.server:
            raise ValueError("the cluster is not started")
        self.cluster = cluster
        self.host = host
        self.port = 0
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else None
        self.kubeconfig: Path | None = None
        self._upstream_cfg = _current_context(yaml.safe_load(Path(cluster.kubeconfig).read_text()))
        self._faults: list[Fault] = []
        self._requests: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._streams: set[_Stream] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._server_ssl: ssl.SSLContext | None = None
        self._ca_file = Path(cluster.ca_file)  # what the proxy trusts upstream
        self._ca_file_for_clients = self._ca_file  # what its kubeconfig trusts

    # ------------------------------------------------------------- interface
    @property
    def url(self) -> str:
        """The proxy's address: ``https://127.0.0.1:<port>``."""
        return f"https://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point a client (the operator) at the proxy."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    @property
    def requests(self) -> list[ProxiedRequest]:
        """A snapshot of the requests answered so far, in the order they were answered."""
        with self._lock:
            return list(self._requests)

    def fail(
        self,
        path_pattern: str,
        status: int,
        seconds: float,
        body: bytes | str | dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> Fault:
        """Answer every request whose path and query match ``path_pattern`` (``re.search``
        on ``/apis/...?watch=true``) with ``status`` for ``seconds``, without asking the
        apiserver. ``body`` (bytes, text, or a dict sent as JSON) and ``headers`` default
        to what kube-apiserver sends with that status (:func:`default_fault_body`). The
        latest fault that matches wins."""
        default_body, default_headers = default_fault_body(status)
        if body is None:
            data = default_body
        elif isinstance(body, dict):
            data = json.dumps(body).encode()
            default_headers = {"Content-Type": "application/json"}
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = bytes(body)
        fault = Fault(
            re.compile(path_pattern), status, time.monotonic() + seconds, data, {**default_headers, **(headers or {})}
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """End every fault now."""
        with self._lock:
            self._faults.clear()

    def break_streams(self, abort: bool = True) -> int:
        """Break every response being streamed (watches above all): drop its connection
        (``abort``, what a restarted apiserver does to its watches) or end it cleanly (as
        a watch's timeout does). Returns how many were broken."""
        return self._call(self._break_streams(abort))

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> "FaultProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> "FaultProxy":
        """Start serving (returns once the proxy listens)."""
        if self._thread is not None:
            return self
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="lepton-faultproxy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._server_ssl = self._serving_context()
        self.port = procs.free_port(self.host)
        self._write_kubeconfig()
        self._thread = threading.Thread(target=self._run, name="lepton-faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"the fault proxy did not start in {timeout} s")
        if self._error is not None:
            error = self._error
            self.stop()
            raise RuntimeError(f"the fault proxy did not start: {error}") from error
        return self

    def stop(self, timeout: float = 10) -> None:
        """Break open streams, stop the server and its loop, join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and thread.is_alive() and self._ready.is_set() and self._error is None:
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            except Exception:  # keep tearing down: the loop stops below whatever happened
                pass
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------- internals
    def _call(self, coro, timeout: float = 10):
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the fault proxy is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self._serve())
            except BaseException as e:  # reported by start()
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self) -> None:
        upstream_ssl = ssl.create_default_context(cafile=str(self._ca_file))
        user = self._upstream_cfg["user"]
        if user.get("client-certificate") and user.get("client-key"):
            upstream_ssl.load_cert_chain(user["client-certificate"], user["client-key"])
        # Watches last long: no read timeout; raw bytes, so Content-Encoding passes through.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream_ssl, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=256 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self._server_ssl).start()

    async def _shutdown(self) -> None:
        await self._break_streams(abort=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _break_streams(self, abort: bool) -> int:
        streams = list(self._streams)
        for stream in streams:
            stream.broken, stream.abort = True, abort
            stream.pump.cancel()
        return len(streams)

    def _active_fault(self, path: str) -> Fault | None:
        now = time.monotonic()
        with self._lock:
            self._faults = [f for f in self._faults if f.until > now]
            return next((f for f in reversed(self._faults) if f.pattern.search(path)), None)

    def _record(self, began: float, request: web.Request, status: int) -> None:
        with self._lock:
            self._requests.append(ProxiedRequest(began, request.method, request.raw_path, status))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        began = time.monotonic()
        fault = self._active_fault(request.raw_path)
        if fault is not None:
            await request.read()  # leave the connection clean for the next request
            self._record(began, request, fault.status)
            return web.Response(status=fault.status, body=fault.body, headers=fault.headers)

        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        if "authorization" not in {k.lower() for k in headers} and self._upstream_cfg["user"].get("token"):
            headers["Authorization"] = f"Bearer {self._upstream_cfg['user']['token']}"
        if "accept-encoding" not in {k.lower() for k in headers}:
            headers["Accept-Encoding"] = "identity"  # else aiohttp asks for gzip on the client's behalf
        body = await request.read() if request.body_exists else None
        try:
            upstream = await self._session.request(
                request.method,
                self._upstream_cfg["server"] + request.raw_path,
                headers=headers,
                data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            # The apiserver is away: the client sees its connection dropped, as without a proxy.
            self._record(began, request, 0)
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=502)
        try:
            self._record(began, request, upstream.status)
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    resp.headers.add(key, value)
            if upstream.content_length is not None:
                resp.content_length = upstream.content_length
            try:
                await resp.prepare(request)
            except ConnectionError:  # the client left before the answer came
                return resp
            pump = asyncio.ensure_future(self._pump(upstream, resp))
            stream = _Stream(pump)
            self._streams.add(stream)
            try:
                await pump
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling() or not stream.broken:
                    raise  # the handler itself is being cancelled
            except (ConnectionError, aiohttp.ClientError, asyncio.TimeoutError):
                # The client or the apiserver went away mid-stream: drop the other side too.
                stream.broken, stream.abort = True, True
            finally:
                self._streams.discard(stream)
                pump.cancel()
            if stream.broken and stream.abort and request.transport is not None:
                request.transport.abort()  # no final chunk: the client sees the stream cut
            return resp
        finally:
            upstream.close()

    @staticmethod
    async def _pump(upstream: aiohttp.ClientResponse, resp: web.StreamResponse) -> None:
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)

    # ------------------------------------------------------------- set-up
    def _serving_context(self) -> ssl.SSLContext:
        """Serve with the apiserver's certificate when its SANs cover our host (the
        kubeconfig then trusts the cluster's CA file); otherwise make a self-signed one."""
        pki = Path(self.cluster.workdir) / "pki"
        cert, key = pki / "apiserver.crt", pki / "apiserver.key"
        if not (cert.exists() and key.exists() and self.host in _ip_sans(cert)):
            cert, key = self.workdir / "proxy.crt", self.workdir / "proxy.key"
            _self_signed(cert, key, self.host)
            self._ca_file_for_clients = cert
        else:
            self._ca_file_for_clients = self._ca_file
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def _write_kubeconfig(self) -> None:
        cfg = yaml.safe_load(Path(self.cluster.kubeconfig).read_text())
        cfg = copy.deepcopy(cfg)
        name = self._upstream_cfg["cluster_name"]
        for entry in cfg["clusters"]:
            if entry["name"] == name:
                entry["cluster"]["server"] = self.url
                entry["cluster"].pop("certificate-authority-data", None)
                entry["cluster"]["certificate-authority"] = str(self._ca_file_for_clients)
        self.kubeconfig = self.workdir / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.kubeconfig.chmod(0o600)


def _current_context(cfg: dict) -> dict:
    """The current context's cluster (server) and user of a kubeconfig."""
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == cfg["current-context"])
    cluster = next(c for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    user = next((u["user"] for u in cfg.get("users", []) if u["name"] == ctx.get("user")), {})
    return {"server": cluster["cluster"]["server"].rstrip("/"), "cluster_name": cluster["name"], "user": user}


def _ip_sans(cert: Path) -> set[str]:
    """The IP addresses among a certificate's subject alternative names."""
    rc = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
    )
    return set(re.findall(r"IP Address:([0-9A-Fa-f.:]+)", rc.stdout)) if rc.returncode == 0 else set()


def _self_signed(cert: Path, key: Path, host: str) -> None:
    rc = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=lepton-faultproxy",
            "-addext",
            f"subjectAltName=IP:{host}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        text=True,
    )
    if rc.returncode != 0:
        raise RuntimeError(f"openssl req failed: {rc.stderr}")
