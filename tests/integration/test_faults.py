"""Faults on the real local control plane (docs/reliability.md rows 19-21): a stale watch
cache, lost nodes, drains through the Eviction API, preemption."""

from __future__ import annotations

import signal
import time

import pytest
from jobs import FAST, create_job, job_body, patch_spec, pods, running, status, wait

from lepton_localcluster import procs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def uids(kube, namespace, job) -> dict[str, str]:
    return {n: p["metadata"]["uid"] for n, p in pods(kube, namespace, job, include_terminating=False).items()}


# ------------------------------------------------------------------ row 19: stale pod cache


def test_a_watch_gap_never_gets_a_live_pod_deleted_nor_leaves_the_job_waiting_on_a_ghost(
    kube, k8s, local_cluster, namespace, run_operator
):
    op = run_operator(*FAST, "--relist-seconds", "10")
    create_job(kube, namespace, job_body("gap"))
    wait(k8s, running(kube, namespace, "gap", 2, 1), 40, "Running", op)

    # While the operator is frozen, a worker goes, the job is scaled, and the apiserver
    # restarts: the operator's watches resume after a gap and its pod index may keep the
    # deleted generation-1 worker-1, whose name the next generation's worker reuses.
    procs.signal_group(op.pid, signal.SIGSTOP)
    try:
        k8s.core.delete_namespaced_pod("gap-worker-1", namespace, grace_period_seconds=0)
        patch_spec(kube, namespace, "gap", {"workers": {"replicas": 3}})
        local_cluster.restart_component("kube-apiserver", downtime=3)
    finally:
        procs.signal_group(op.pid, signal.SIGCONT)

    st = wait(k8s, running(kube, namespace, "gap", 3), 120, "Running at 3 after the gap", op)
    assert (st["restarts"], st["disruptions"]) == (0, 1)  # only the worker deleted by hand
    settled = uids(kube, namespace, "gap")
    assert sorted(settled) == ["gap-worker-0", "gap-worker-1", "gap-worker-2"]
    # Past a re-list period: nothing of the running generation is deleted by a stale name.
    time.sleep(15)
    st = status(kube, namespace, "gap")
    assert uids(kube, namespace, "gap") == settled
    assert (st["phase"], st["restarts"], st["disruptions"]) == ("Running", 0, 1), st
    assert op.running(), op.log_text()[-3000:]
