"""The autoscaler pass, run by a kopf timer per LeptonJob (handlers.py): it measures every
job's throughput and progress; with `--no-allocator` it also decides the size of each job
with `spec.autoscaling.enabled` (the cluster allocator decides sizes otherwise).

On every tick the pass checks whether `spec.autoscaling.intervalSeconds` have passed for
the job; if so, and the job is Running with no rescale under way, it

1. measures the job's throughput in Prometheus (in a thread, with the client's timeout):
   `sum(rate(lepton_trainer_samples_total{namespace, job_name, generation}[w]))`, where
   `w` covers the current generation after its warm-up and after all its workers began
   reporting (so the value is the generation's mean, less noisy the longer it runs),
   once at least `windowSeconds` have passed;
2. records it, with its rate window, in `status.autoscaling.observations` (the latest per
   world size and the most recent ones: the allocator fits its model to all of them) and
   in `status.throughput`, when it says something new (`worth_recording`: a new size or
   generation, a move of over 2%, or the last one is old: two intervals with the per-job
   policy, 5 minutes with the allocator), so that a steady job costs few status writes;
   with it, when the trainer exports the split, the fraction of the step time spent on
   communication over the same window
   (`sum(rate(lepton_trainer_comm_seconds_sum)) / sum(rate(lepton_trainer_step_seconds_sum))`)
   in the observation and in `status.autoscaling.commFraction` (`kubectl get lj -o wide`,
   COMM); records the trainer's progress (`status.progress`,
   `remainingSamples`, `estimatedCompletionTime`) with a measurement or when it moved by a
   percentage point; sets the condition
   `MetricsUnavailable` (True with the error while data is missing, False with the first
   measurement after it, whose window starts once Prometheus answers again);
3. with `--no-allocator`, for an elastic job: calls the pure per-job policy
   (`scaling.policy.decide`), records `status.autoscaling.lastDecision`, and when the
   target differs from the current size writes `spec.workers.replicas` (as an HPA writes
   /scale) and posts an event with the reason.

The operator core carries the rescale out (capacity-confirmed scale-up, new generation)
and sets `status.autoscaling.backoffUntil` after a capacity failure; the policy honours
it. This module writes only the status fields it owns: `autoscaling.observations`,
`autoscaling.lastDecision`, `autoscaling.commFraction`, `throughput`, the progress fields, and the
`MetricsUnavailable` condition (the conditions list is rewritten with only that entry
changed, and only when it changes).

`plan_autoscale()` is the whole decision, pure and testable; `autoscale_pass()` reads,
measures and writes around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Mapping, Optional, Union

from lepton_operator import metrics
from lepton_operator.api.conditions import (
    CONDITION_METRICS_UNAVAILABLE,
    REASON_METRICS_AVAILABLE,
    REASON_METRICS_UNAVAILABLE,
)
from lepton_operator.api.models import (
    OBSERVATION_HISTORY,
    InvalidJob,
    LeptonJobSpec,
    LeptonJobStatus,
    Observation,
    parse_job,
    parse_status,
)
from lepton_operator.reconcile.conditions import condition_is_true, conditions_patch, get_condition
from lepton_operator.reconcile.config import OperatorConfig
from lepton_operator.reconcile.context import OperatorContext
from lepton_operator.reconcile.executor import post_events
from lepton_operator.reconcile.kube import Conflict, PermanentApiError, TransientApiError
from lepton_operator.reconcile.loop import read_job
from lepton_operator.scaling.policy import STALE_INTERVALS, ScaleDecision, ScalingState, decide
from lepton_operator.scaling.prometheus import MetricsError, Progress, PrometheusClient, Sample

# Longest rate window: beyond an hour the generation mean hardly changes.
MAX_WINDOW_SECONDS = 3600
# A measurement is written to status when throughput moved by more than this fraction
# (or the communication fraction by more than RECORD_COMM_CHANGE), else at the refresh.
RECORD_THROUGHPUT_CHANGE = 0.02
RECORD_COMM_CHANGE = 0.02
# With the cluster allocator, a steady job's measurement is written anew every 5 minutes.
ALLOCATOR_REFRESH_SECONDS = 300.0
# Progress alone is written when it moved by one percentage point.
PROGRESS_STEP = 0.01


@dataclass
class AutoscalePlan:
    """What one autoscaler pass writes: a status merge patch, maybe a new replica count, events."""

    status_patch: dict = field(default_factory=dict)
    replicas: Optional[int] = None
    events: list[tuple[str, str, str]] = field(default_factory=list)
    decision: Optional[ScaleDecision] = None


def warm_from(spec: LeptonJobSpec, status: LeptonJobStatus) -> Optional[datetime]:
    """When the current generation's warm-up ends (None: no generation started)."""
    start = status.generation_start_time
    return None if start is None else start + timedelta(seconds=spec.autoscaling.warmup_seconds)


def measurement_window(
    spec: LeptonJobSpec, status: LeptonJobStatus, now: datetime, reporting_since: Optional[datetime] = None
) -> Optional[int]:
    """Seconds of rate window inside this generation after its warm-up (and after all its
    workers began reporting, when known); None while that is shorter than `windowSeconds`.

    A window reaching back before the series existed would make Prometheus' rate()
    under-report (it extrapolates over the missing part), so the window never does.
    """
    start = warm_from(spec, status)
    if start is None:
        return None
    if reporting_since is not None and reporting_since > start:
        start = reporting_since
    settled = (now - start).total_seconds()
    if settled < spec.autoscaling.window_seconds:
        return None
    return int(min(settled, MAX_WINDOW_SECONDS))


def should_run(spec: LeptonJobSpec, status: LeptonJobStatus) -> bool:
    """The autoscaler measures only a Running job with no rescale under way."""
    return not spec.suspend and status.phase == "Running" and status.rescale is None and status.world_size > 0


def _metrics_condition(
    status: LeptonJobStatus, unavailable: bool, message: str, now: datetime, observed_generation: Optional[int]
) -> Optional[list]:
    """The conditions list with MetricsUnavailable set, or None when it would not change."""
    current = get_condition(status, CONDITION_METRICS_UNAVAILABLE)
    if not unavailable and (current is None or current.status == "False"):
        return None  # never unavailable so far, or already back: nothing new to say
    reason = REASON_METRICS_UNAVAILABLE if unavailable else REASON_METRICS_AVAILABLE
    return conditions_patch(
        status, CONDITION_METRICS_UNAVAILABLE, unavailable, reason, message, now, observed_generation
    )


def metrics_unavailable(status: LeptonJobStatus, status_patch: dict) -> bool:
    """Whether MetricsUnavailable is True once `status_patch` (the plan's) is written."""
    conditions = status_patch.get("conditions")
    if conditions is None:
        return condition_is_true(status, CONDITION_METRICS_UNAVAILABLE)
    return any(c.get("type") == CONDITION_METRICS_UNAVAILABLE and c.get("status") == "True" for c in conditions)


def record_observation(observations: list[Observation], new: Observation) -> list[Observation]:
    """The observations with `new` added: the latest per world size and the
    `OBSERVATION_HISTORY` most recent, ordered by size then time (the allocator fits its
    model to all of them; the per-job policy uses the latest per size)."""
    by_time = sorted([*observations, new], key=lambda o: o.measured_at)
    latest = {o.world_size: o for o in by_time}
    keep = {id(o) for o in by_time[-OBSERVATION_HISTORY:]} | {id(o) for o in latest.values()}
    return sorted((o for o in by_time if id(o) in keep), key=lambda o: (o.world_size, o.measured_at))


def worth_recording(
    observations: list[Observation], new: Observation, refresh_seconds: float, since: Optional[datetime]
) -> bool:
    """Whether a measurement says something the recorded ones do not, so that a job whose
    speed holds costs one status write per `refresh_seconds`, not one per interval: no
    observation at this size since `since` (the generation's warm-up end), the latest is
    `refresh_seconds` old, or throughput or communication fraction moved noticeably."""
    same = [o for o in observations if o.world_size == new.world_size]
    latest = max(same, key=lambda o: o.measured_at, default=None)
    if latest is None or (since is not None and latest.measured_at < since):
        return True
    if (new.measured_at - latest.measured_at).total_seconds() >= refresh_seconds:
        return True
    if abs(new.throughput - latest.throughput) > RECORD_THROUGHPUT_CHANGE * max(latest.throughput, 1e-9):
        return True
    old_comm, new_comm = latest.comm_fraction, new.comm_fraction
    if (old_comm is None) != (new_comm is None):
        return True
    return old_comm is not None and abs(new_comm - old_comm) > RECORD_COMM_CHANGE


def refresh_seconds(interval: float, decide_size: bool) -> float:
    """How long a steady job's latest observation may stand before it is recorded anew:
    within the per-job policy's staleness (STALE_INTERVALS intervals) when it decides
    sizes; with the cluster allocator, whose fit fades measurements over half an hour,
    `ALLOCATOR_REFRESH_SECONDS`."""
    within_policy = (STALE_INTERVALS - 1) * interval
    return within_policy if decide_size else max(within_policy, ALLOCATOR_REFRESH_SECONDS)


def progress_patch(progress: Optional[Progress], throughput: Optional[float], now: datetime) -> dict:
    """status.progress, remainingSamples and estimatedCompletionTime (at the current
    throughput), from the trainer's progress metrics; nothing when it does not export them."""
    if progress is None:
        return {}
    patch = {"progress": round(progress.fraction, 4), "remainingSamples": round(progress.remaining, 1)}
    if throughput and throughput > 0:
        eta = now + timedelta(seconds=progress.remaining / throughput)
        patch["estimatedCompletionTime"] = eta.strftime("%Y-%m-%dT%H:%M:%SZ")
    return patch


def plan_autoscale(
    spec: LeptonJobSpec,
    status: LeptonJobStatus,
    measured: Union[Sample, MetricsError, None],
    now: datetime,
    observed_generation: Optional[int] = None,
    window_seconds: Optional[int] = None,
    progress: Optional[Progress] = None,
    decide_size: bool = True,
    comm_fraction: Optional[float] = None,
    refresh: Optional[float] = None,
) -> AutoscalePlan:
    """One autoscaler pass, pure: record the measurement, decide, say what to write.

    `measured` is the throughput of the current generation (a Sample) over
    `window_seconds`, the error that prevented measuring it, or None when the generation
    is too young to be measured. `progress` is the trainer's position in its run.
    `comm_fraction` is the communication fraction of the step time over the same window
    (None: not exported); it goes with the measurement. With `decide_size` False (the
    cluster allocator decides sizes) it only records. With `refresh` (seconds) a
    measurement is recorded only when `worth_recording`, and progress only when it moved
    by `PROGRESS_STEP` (or goes with a recorded measurement); None records every one.
    """
    plan = AutoscalePlan()
    auto_patch: dict = {}
    n = status.world_size
    observations = list(status.autoscaling.observations)
    recorded = False
    if isinstance(measured, Sample):
        fraction = None if comm_fraction is None else round(min(1.0, max(0.0, comm_fraction)), 4)
        observation = Observation(
            world_size=n,
            throughput=max(0.0, measured.value),
            measured_at=now,
            window_seconds=window_seconds,
            comm_fraction=fraction,
        )
        recorded = refresh is None or worth_recording(observations, observation, refresh, warm_from(spec, status))
        if recorded:
            observations = record_observation(observations, observation)
            auto_patch["observations"] = [o.to_k8s() for o in observations]
            if fraction is not None or status.autoscaling.comm_fraction is not None:
                auto_patch["commFraction"] = fraction  # None removes a fraction no longer exported
            plan.status_patch["throughput"] = round(measured.value, 3)
        conditions = _metrics_condition(
            status, False, f"throughput {measured.value:.1f} samples/s at {n} workers", now, observed_generation
        )
    elif isinstance(measured, MetricsError):
        conditions = _metrics_condition(
            status, True, f"Prometheus: {measured}; holding {n} workers", now, observed_generation
        )
        if conditions is not None:
            plan.events.append(("Warning", REASON_METRICS_UNAVAILABLE, str(measured)[:1024]))
    else:
        conditions = None
    if conditions is not None:
        plan.status_patch["conditions"] = conditions
    throughput = measured.value if isinstance(measured, Sample) else status.throughput
    progressed = progress_patch(progress, throughput, now)
    moved = status.progress is None or abs(progressed.get("progress", 0.0) - status.progress) >= PROGRESS_STEP
    if progressed and (recorded or moved or refresh is None):
        plan.status_patch.update(progressed)

    if decide_size:
        # Without a fresh measurement the policy holds (it checks staleness itself).
        decision = decide(observations, spec, ScalingState.from_status(status), now)
        plan.decision = decision
        last = status.autoscaling.last_decision
        recorded = decision.to_model(now)
        if (
            last is None
            or last.target != recorded.target
            or last.reason != recorded.reason
            or decision.action != "hold"
        ):
            auto_patch["lastDecision"] = recorded.to_k8s()
        if decision.action != "hold" and decision.target != n and spec.workers.replicas != decision.target:
            plan.replicas = decision.target
            plan.events.append(("Normal", decision.reason, decision.message[:1024]))
    if auto_patch:
        plan.status_patch["autoscaling"] = auto_patch
    return plan


def measure(
    client: Optional[PrometheusClient],
    namespace: str,
    name: str,
    spec: LeptonJobSpec,
    status: LeptonJobStatus,
    now: datetime,
    reporting_since: dict[int, datetime],
) -> Union[Sample, MetricsError, None]:
    """Query the current generation's throughput (blocking; run it in a thread).

    `reporting_since` (per job, kept in the operator context) remembers when every worker
    of a generation was first seen reporting (again after a failed query); the rate window
    starts no earlier than that.
    """
    warm = warm_from(spec, status)
    if warm is None or now < warm:
        return None
    if client is None:
        return MetricsError("connection", "no Prometheus URL configured (--prometheus-url)")
    generation = status.worker_generation
    try:
        if generation not in reporting_since:
            reporting = client.reporting_workers(namespace, name, now=now.timestamp(), generation=generation)
            if reporting < status.world_size:
                return None  # still starting: not an outage
            reporting_since.clear()  # older generations are done
            reporting_since[generation] = now
        window = measurement_window(spec, status, now, reporting_since[generation])
        if window is None:
            return None
        sample = client.throughput(namespace, name, window, now=now.timestamp(), generation=generation)
        return dataclasses.replace(sample, window_seconds=window)
    except MetricsError as exc:
        if exc.kind == "empty" and generation not in reporting_since:
            return None  # no worker of this generation reports yet
        # While Prometheus fails us it may also miss scrapes. A window with that gap near
        # its end under-reports (rate() extrapolates only half a scrape interval over it;
        # seen 19 % low right after a restart, and the policy moved), so the window starts
        # again once Prometheus answers.
        reporting_since.pop(generation, None)
        return exc


def measure_comm_fraction(
    client: Optional[PrometheusClient],
    namespace: str,
    name: str,
    measured: Union[Sample, MetricsError, None],
    generation: int,
    now: datetime,
) -> Optional[float]:
    """The communication fraction over the throughput's window (blocking), or None: no
    throughput measured, no split exported, or any error (a missing split never holds
    the autoscaler: the model then fits throughput alone)."""
    if client is None or not isinstance(measured, Sample) or not measured.window_seconds:
        return None
    try:
        sample = client.comm_fraction(
            namespace, name, measured.window_seconds, now=now.timestamp(), generation=generation
        )
    except MetricsError:
        return None
    return None if sample is None else sample.value


def read_progress(client: Optional[PrometheusClient], namespace: str, name: str, now: datetime) -> Optional[Progress]:
    """The trainer's position in its run (None when unknown: no metrics, or an outage,
    which the throughput query reports already)."""
    if client is None:
        return None
    try:
        return client.run_progress(namespace, name, now=now.timestamp())
    except MetricsError:
        return None


def prometheus_client(config: OperatorConfig) -> Optional[PrometheusClient]:
    """The Prometheus client for the operator's settings (None: no URL configured)."""
    if not config.prometheus_url:
        return None
    return PrometheusClient(
        config.prometheus_url,
        timeout=config.prometheus_timeout,
        token_file=config.prometheus_token_file,
        ca_file=config.prometheus_ca_file,
    )


async def autoscale_pass(
    ctx: OperatorContext,
    namespace: str,
    name: str,
    interval: float,
    logger: logging.Logger,
    live: Optional[Mapping] = None,
) -> None:
    """If `interval` seconds passed since the job was last measured: measure, decide and,
    if the size should change, write spec.workers.replicas; events after the writes.
    `live`: kopf's live body of the job (loop.read_job)."""
    memory = ctx.autoscaler_memory((namespace, name))
    mono = time.monotonic()
    if memory.last_run is not None and mono - memory.last_run < interval - 0.5:
        return
    kube = ctx.kube
    try:
        # The writes below are conditional on this body's version: should the core have
        # just written (a rescale begun), they get a Conflict and the next tick reads again.
        body = await read_job(ctx, namespace, name, live)
        if body is None or body["metadata"].get("deletionTimestamp"):
            ctx.autoscaler.pop((namespace, name), None)  # a tick after the job's loop forgot it
            return
        try:
            job = parse_job(name, body.get("spec") or {})
        except InvalidJob:
            return  # the core marks the job Failed/InvalidSpec
        st = parse_status(body.get("status"))
        if not should_run(job, st) or (not job.autoscaling.enabled and not ctx.config.prometheus_url):
            metrics.set_job_metrics_unavailable(namespace, name, None)  # not measured now, no series
            return  # a fixed job without Prometheus: nothing to measure, nothing to decide
        memory.last_run = mono
        now = datetime.now(timezone.utc)
        client = prometheus_client(ctx.config)
        measured = await asyncio.to_thread(measure, client, namespace, name, job, st, now, memory.reporting_since)
        comm = await asyncio.to_thread(
            measure_comm_fraction, client, namespace, name, measured, st.worker_generation, now
        )
        progress = await asyncio.to_thread(read_progress, client, namespace, name, now)
        decide_size = job.autoscaling.enabled and not ctx.config.allocator
        plan = plan_autoscale(
            job,
            st,
            measured,
            now,
            observed_generation=body["metadata"].get("generation"),
            window_seconds=measured.window_seconds if isinstance(measured, Sample) else None,
            progress=progress,
            decide_size=decide_size,
            comm_fraction=comm,
            refresh=refresh_seconds(interval, decide_size),
        )
        version = body["metadata"]["resourceVersion"]
        if plan.status_patch:
            written = await asyncio.to_thread(kube.patch_job_status, namespace, name, version, plan.status_patch)
            version = written["metadata"]["resourceVersion"]
        metrics.set_job_metrics_unavailable(namespace, name, metrics_unavailable(st, plan.status_patch))
        if plan.replicas is not None:
            await asyncio.to_thread(kube.patch_job_replicas, namespace, name, version, plan.replicas)
    except Conflict:
        memory.last_run = None  # the job changed under us: decide again next tick
        return
    except (TransientApiError, PermanentApiError) as e:
        logger.warning(f"autoscaler: {e}")
        return
    d = plan.decision
    if d is not None and d.action != "hold":
        logger.info(f"autoscaler: {d.reason}: {d.message}")
    await post_events(ctx, body, plan.events, logger)
