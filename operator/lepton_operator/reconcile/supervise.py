"""Keep kopf's reactor running through a lost API (docs/reliability.md, row 7).

kopf treats an error on a watch request as fatal: after the apiserver restarts, a LIST
that reaches it before the CustomResourceDefinitions are served again gets `404 page not
found`, and `kopf.run` raises. A Deployment would restart the pod, but a controller is
expected to ride out a restart of the API (client-go's informers retry forever), and a
crash loop costs every job its liveness. So `lepton-operator run` starts the reactor
again, with a fresh OperatorContext (its asyncio objects belong to the old event loop; the
jobs' state lives in their status, as after a pod restart), after a backoff that grows
while the reactor keeps dying at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

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
