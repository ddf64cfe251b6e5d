"""Keep kopf's reactor running through a lost API (docs/reliability.md, row 7).

After an apiserver restart, a LIST or watch of the LeptonJob resource that reaches the
server before it serves the CRDs again gets `404 page not found`; kopf treats any such
error on a watch as fatal and stops, and a controller is expected to ride this out
(client-go's reflectors retry a failed LIST with a backoff). Three layers:

1. `tolerate_unserved_resources()`: a 404 (or a watch ERROR event other than 410) on a
   watch ends that one stream after a backoff, and kopf's own loop lists and watches
   again, as a reflector does. The reactor never stops for it.
2. `wait_until_served()`, before each start of the reactor: kopf discovers resources once
   at its start, and a group that answers 404 then is taken as having none, for good.
3. `run_until_stopped()`: should the reactor still stop on an API error, it is started
   again, with a fresh OperatorContext (its asyncio objects belong to the old event loop;
   the jobs' state lives in their status, as after a pod restart), after a backoff that
   grows while it keeps dying at once. kopf's shutdown after such an error has been seen
   to hang (its watchers waiting on a closed session; 6 of 13 runs of the fault test before
   layer 1 existed); then only a restart of the pod helps (the liveness probe when the job
   watches lag, else the alert LeptonOperatorReconcileStalled): that is why layer 1 comes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from lepton_operator.api.models import KIND

log = logging.getLogger("lepton_operator")


def api_errors() -> tuple[type[BaseException], ...]:
    """kopf's exceptions for an API call or watch the apiserver refused or broke. They live
    in kopf's private modules (kopf exports none of them): kept here, in one place."""
    from kopf._cogs.clients.errors import APIError
    from kopf._cogs.clients.watching import WatchingError

    return (APIError, WatchingError)


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait before restart number `n` (1, 2, 4, ... up to `cap`); a run that
    lasted `healthy_after` seconds counts as healthy and starts the series again."""

    first: float = 1.0
    cap: float = 30.0
    healthy_after: float = 60.0

    def delay(self, n: int) -> float:
        return min(self.cap, self.first * 2 ** (n - 1))


def run_until_stopped(
    start: Callable[[], None],
    recoverable: tuple[type[BaseException], ...],
    on_restart: Callable[[BaseException], None] = lambda e: None,
    backoff: Backoff = Backoff(),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Call `start` (it blocks until the operator is stopped) again each time it raises one
    of `recoverable`; return when it returns (a signal stopped it). Any other exception
    propagates: a bug is not retried."""
    failures = 0
    while True:
        began = clock()
        try:
            start()
            return
        except recoverable as e:
            failures = 1 if clock() - began >= backoff.healthy_after else failures + 1
            delay = backoff.delay(failures)
            log.error(f"the operator lost the API ({type(e).__name__}: {e}); starting it again in {delay:g} s")
            on_restart(e)
            sleep(delay)


WATCH_RETRY_SECONDS = 5.0


def tolerate_unserved_resources(retry_seconds: float = WATCH_RETRY_SECONDS) -> None:
    """Make a 404 or a failed watch end one watch stream instead of the reactor: kopf's
    `infinite_watch` then lists and watches again after `settings.watching.reconnect_backoff`.
    It wraps kopf's private `continuous_watch` (kopf has no setting for this); calling it
    twice wraps once."""
    from kopf._cogs.clients import watching
    from kopf._cogs.clients.errors import APINotFoundError

    original = watching.continuous_watch
    if getattr(original, "lepton_tolerant", False):
        return

    async def continuous_watch(*, resource, namespace, **kwargs):
        try:
            async for event in original(resource=resource, namespace=namespace, **kwargs):
                yield event
        except (APINotFoundError, watching.WatchingError) as e:
            where = f" in {namespace}" if namespace else ""
            log.warning(
                f"watching {resource.plural}{where}: {type(e).__name__}: {e}; the API may not serve it yet "
                f"(an apiserver restart); listing again in {retry_seconds:g} s"
            )
            await asyncio.sleep(retry_seconds)

    continuous_watch.lepton_tolerant = True
    watching.continuous_watch = continuous_watch


def limit_kopf_requests(limiter) -> None:
    """Make each request kopf sends itself (its LISTs and watch starts, finalizer and
    annotation patches, `kopf.event` posts, peering) take a token from `limiter`, the
    operator's one rate limit (`--api-qps`), as `kube.py`'s requests do. kopf has no hook
    for a limiter: this wraps its private `api.request`, which all its requests go through
    (a retry inside it reuses the token). The wait is short: the operator's own requests
    hold at most `--api-threads` tokens ahead of it. Calling it again replaces the limiter."""
    from kopf._cogs.clients import api

    original = getattr(api.request, "lepton_original", api.request)

    async def request(*args, **kwargs):
        wait = limiter.reserve()
        if wait > 0:
            await asyncio.sleep(wait)
        return await original(*args, **kwargs)

    request.lepton_original = original
    api.request = request


def report_kopf_job_patches(on_body: Callable[[dict], object]) -> None:
    """Pass each LeptonJob body that kopf's own patches return (its finalizer, added as a
    job is first seen) to `on_body` (`Kube.saw_job`): a pass that starts before the watch
    delivers that version then decides on it, not on the older body, whose write would get
    a Conflict and cost a GET. kopf has no hook for it: this wraps its private `api.patch`,
    which its patches go through. Calling it again replaces `on_body`."""
    from kopf._cogs.clients import api

    original = getattr(api.patch, "lepton_original", api.patch)

    async def patch(*args, **kwargs):
        body = await original(*args, **kwargs)
        if isinstance(body, dict) and body.get("kind") == KIND:
            on_body(body)
        return body

    patch.lepton_original = original
    api.patch = patch


def wait_until_served(
    is_served: Callable[[], Optional[str]],
    what: str,
    backoff: Backoff = Backoff(),
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Block until `is_served()` returns None (otherwise it returns why not); log when the
    reason changes. Returns how many times it waited."""
    waits, last = 0, None
    while True:
        why = is_served()
        if why is None:
            if waits:
                log.info(f"the API serves {what} again")
            return waits
        waits += 1
        delay = backoff.delay(waits)
        if why != last:
            log.warning(f"waiting until the API serves {what} ({why}); asking again in {delay:g} s")
            last = why
        sleep(delay)


def unserved_reason(kube) -> Optional[str]:
    """None when the API lists the LeptonJob resource in its group version, else why not
    (a `Kube`; an unreachable or refusing API is a reason too)."""
    from lepton_operator.api.models import GROUP, PLURAL, VERSION
    from lepton_operator.reconcile.kube import ApiError

    try:
        served = kube.served_resources(f"{GROUP}/{VERSION}")
    except ApiError as e:
        return str(e)
    return None if PLURAL in served else f"{GROUP}/{VERSION} has no {PLURAL}"
