"""kopf wiring, nothing else: indexes, triggers, the liveness probe, the per-job loop and
the autoscaler timer. Every handler gets the `OperatorContext` as kopf's `memo`.

- `@kopf.index` handlers keep the job's pods, Service and PVC (selected by the
  managed-by label) in memory, so a pass makes no list call (`loop.py`).
- `@kopf.on.event` handlers on the job and its children wake the job's loop.
- One `@kopf.daemon` per LeptonJob runs its reconcile loop (`loop.job_loop`).
- One `@kopf.timer` per LeptonJob with `spec.autoscaling.enabled` runs the autoscaler
  (`autoscaling.autoscale_pass`).

kopf's daemons put a finalizer on the job (kopf stops the daemon before the job goes).
Pods get none: children are removed by ownerReferences and the garbage collector. A job
deleted while the operator is down waits, Terminating, until the operator returns and
releases it; the GC then removes its pods (docs/reliability.md, row 9).
"""

from __future__ import annotations

import kopf

from lepton_operator.api.models import GROUP, PLURAL, VERSION
from lepton_operator.desired import LABEL_JOB_NAME, LABEL_MANAGED_BY, MANAGED_BY, JobRef
from lepton_operator.reconcile.autoscaling import autoscale_pass
from lepton_operator.reconcile.context import OperatorContext
from lepton_operator.reconcile.loop import job_loop

MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}
# The autoscaler timer's tick; the job's own interval (>= 5 s) is checked against it.
AUTOSCALER_TICK_SECONDS = 5.0


# ------------------------------------------------------------------ indexes


def trim_pod(body) -> dict:
    """The parts of a pod that plan() reads (kopf bodies are live views: copy)."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {})
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": [dict(r) for r in meta.get("ownerReferences") or []],
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {"nodeName": spec.get("nodeName")},
        "status": {
            "phase": status.get("phase"),
            "reason": status.get("reason"),
            "message": status.get("message"),
            "conditions": [dict(c) for c in status.get("conditions") or []],
            "containerStatuses": [
                {
                    "name": cs.get("name"),
                    "state": dict(cs.get("state") or {}),
                    "lastState": dict(cs.get("lastState") or {}),
                }
                for cs in status.get("containerStatuses") or []
            ],
        },
    }


@kopf.index("", "v1", "pods", labels=MANAGED)
async def pods_by_job(namespace, labels, body, **_):
    """Pods with our labels, by (namespace, job name); includes pods we do not own."""
    job = labels.get(LABEL_JOB_NAME)
    return {(namespace, job): trim_pod(body)} if job else {}


@kopf.index("", "v1", "services", labels=MANAGED)
async def services_by_job(namespace, name, labels, **_):
    job = labels.get(LABEL_JOB_NAME)
    return {(namespace, job): name} if job else {}


@kopf.index("", "v1", "persistentvolumeclaims", labels=MANAGED)
async def claims_by_job(namespace, name, labels, **_):
    job = labels.get(LABEL_JOB_NAME)
    return {(namespace, job): name} if job else {}


# ------------------------------------------------------------------ triggers and health


@kopf.on.event("", "v1", "pods", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("", "v1", "persistentvolumeclaims", labels=MANAGED)
async def child_changed(namespace, labels, memo: OperatorContext, **_):
    """A child changed: wake its job's loop."""
    memo.triggers.fire(namespace, labels.get(LABEL_JOB_NAME))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def job_changed(namespace, name, meta, memo: OperatorContext, **_):
    """The job changed (spec, scale, status written by anyone): wake its loop."""
    memo.watch.watched((namespace, name), meta.get("resourceVersion"))
    memo.triggers.fire(namespace, name)


@kopf.on.probe(id="watch")
async def watch_probe(memo: OperatorContext, **_):
    """Liveness: fails when a job's watch lags the API (see context.WatchHealth)."""
    stale = memo.watch.stale()
    if stale:
        raise kopf.PermanentError(f"watch events stopped arriving for {', '.join(stale[:5])}")
    return "ok"


# ------------------------------------------------------------------ per-job loops


@kopf.daemon(GROUP, VERSION, PLURAL, id="reconcile", cancellation_timeout=10)
async def reconcile_loop(
    namespace, name, uid, stopped, logger, memo: OperatorContext, pods_by_job, services_by_job, claims_by_job, **_
):
    """The job's reconcile loop (loop.job_loop)."""
    indexes = {"pods_by_job": pods_by_job, "services_by_job": services_by_job, "claims_by_job": claims_by_job}
    await job_loop(memo, JobRef(name=name, namespace=namespace, uid=uid), indexes, lambda: bool(stopped), logger)


def _autoscaling_enabled(spec, **_) -> bool:
    return bool(((spec or {}).get("autoscaling") or {}).get("enabled"))


@kopf.timer(GROUP, VERSION, PLURAL, interval=AUTOSCALER_TICK_SECONDS, when=_autoscaling_enabled)
async def autoscale(spec, name, namespace, logger, memo: OperatorContext, **_):
    """The autoscaler, every `spec.autoscaling.intervalSeconds` (autoscaling.autoscale_pass)."""
    interval = ((spec or {}).get("autoscaling") or {}).get("intervalSeconds", AUTOSCALER_TICK_SECONDS)
    await autoscale_pass(memo, namespace, name, interval, logger)
