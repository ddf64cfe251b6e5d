"""The hang watchdog: a Running job whose trainers process no samples for
`spec.restart.hangSeconds` is hung (a stuck collective, a dead NIC), and gets a new
generation, counted as a restart (docs/reliability.md, row 22).

A kopf timer (handlers.py) runs `watchdog_pass` for every job with `hangSeconds > 0`. It
asks Prometheus how many samples the current generation processed over the last
`hangSeconds` (`sum(increase(lepton_trainer_samples_total{...}[w]))`), once the generation
has run that long after its warm-up. Exactly zero means hung: the watchdog records a
`status.hang` report (status write with a resourceVersion precondition) and the core,
which alone starts generations, restarts that generation on its next pass. Missing,
stale or failing metrics never count as a hang: the watchdog only acts on evidence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Mapping, Optional, Union

from lepton_operator.api.models import HangReport, InvalidJob, LeptonJobSpec, LeptonJobStatus, parse_job, parse_status
from lepton_operator.reconcile.autoscaling import prometheus_client, warm_from
from lepton_operator.reconcile.context import OperatorContext
from lepton_operator.reconcile.kube import Conflict, PermanentApiError, TransientApiError
from lepton_operator.reconcile.loop import read_job
from lepton_operator.scaling.prometheus import MetricsError, PrometheusClient, Sample

# How often the watchdog looks, as a fraction of hangSeconds (at least every TICK).
CHECKS_PER_WINDOW = 6


def watch_window(spec: LeptonJobSpec, status: LeptonJobStatus, now: datetime) -> Optional[int]:
    """Seconds of history to judge, or None while the job cannot be judged: not Running,
    a rescale under way, a report pending, or the generation younger than its warm-up
    plus `hangSeconds` (a window reaching before the generation would see no samples)."""
    hang = spec.restart.hang_seconds
    if hang <= 0 or spec.suspend or status.phase != "Running" or status.rescale is not None:
        return None
    if status.hang is not None or status.generation_start_time is None:
        return None
    return hang if now >= warm_from(spec, status) + timedelta(seconds=hang) else None


def judge(
    status: LeptonJobStatus, window: int, measured: Union[Sample, MetricsError], now: datetime
) -> Optional[HangReport]:
    """A hang report when the generation provably processed nothing over the window."""
    if not isinstance(measured, Sample) or measured.value > 0:
        return None
    return HangReport(
        generation=status.worker_generation,
        detected_at=now,
        message=(
            f"generation {status.worker_generation} processed no samples in the last {window}s "
            f"(lepton_trainer_samples_total did not increase; restart.hangSeconds={window})"
        ),
    )


def measure_progress(
    client: PrometheusClient, namespace: str, name: str, window: int, status: LeptonJobStatus, now: datetime
) -> Union[Sample, MetricsError]:
    try:
        return client.progress(namespace, name, window, now=now.timestamp(), generation=status.worker_generation)
    except MetricsError as exc:
        return exc


async def watchdog_pass(
    ctx: OperatorContext,
    namespace: str,
    name: str,
    hang_seconds: float,
    logger: logging.Logger,
    live: Optional[Mapping] = None,
) -> None:
    """Look at the job every `hang_seconds / CHECKS_PER_WINDOW`; record a hang if there is
    one. `live`: kopf's live body of the job (loop.read_job)."""
    client = prometheus_client(ctx.config)
    if client is None:
        return  # no Prometheus: nothing to judge by
    memory = ctx.autoscaler_memory((namespace, name))
    mono = time.monotonic()
    if memory.hang_checked is not None and mono - memory.hang_checked < hang_seconds / CHECKS_PER_WINDOW:
        return
    memory.hang_checked = mono
    try:
        body = await read_job(ctx, namespace, name, live)
        if body is None or body["metadata"].get("deletionTimestamp"):
            ctx.autoscaler.pop((namespace, name), None)  # a tick after the job's loop forgot it
            return
        try:
            spec = parse_job(name, body.get("spec") or {})
        except InvalidJob:
            return
        status = parse_status(body.get("status"))
        now = datetime.now(timezone.utc)
        window = watch_window(spec, status, now)
        if window is None:
            return
        measured = await asyncio.to_thread(measure_progress, client, namespace, name, window, status, now)
        report = judge(status, window, measured, now)
        if report is None:
            return
        version = body["metadata"]["resourceVersion"]
        await asyncio.to_thread(ctx.kube.patch_job_status, namespace, name, version, {"hang": report.to_k8s()})
        logger.warning(f"watchdog: {report.message}")
    except Conflict:
        memory.hang_checked = None  # the job changed under us: look again at the next tick
    except (TransientApiError, PermanentApiError) as e:
        logger.warning(f"watchdog: {e}")
