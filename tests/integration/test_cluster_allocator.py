"""The cluster allocator on the real local control plane (issue 12): gang admission, the
queue, priorities that shrink lower-priority elastic jobs to (never below) their min, and
GPUs going to the next job when one finishes.

A cluster of this module's own (2 simulated nodes x 8 GPUs, default kubelet mode: pods are
marked Running, nothing executes), so that no other test's pods hold GPUs. A sampler
checks, all along, that the GPUs requested by live worker pods never exceed the 16 GPUs
and that no worker pod is ever left unschedulable (Pending for want of GPUs).
The measured side (throughput curves, convergence to the optimum) is in
tests/locale2e/test_allocator_e2e.py.
"""

from __future__ import annotations

import time

import pytest
from jobs import condition, create_job, events, job_body, pods, running, status, wait

from lepton_localcluster import SimulatedNode
from lepton_localcluster.pytest_plugin import GpuSampler, wait_for_idle_gpus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.own_cluster(nodes=[SimulatedNode("gpu-a", gpus=8), SimulatedNode("gpu-b", gpus=8)]),
]

CAPACITY = 16
ARGS = ("--standalone", "--liveness-port", "0", "--metrics-port", "0", "--resync-seconds", "5")
ALLOCATOR = ("--allocator-interval-seconds", "3")


@pytest.fixture
def priority_classes(kube):
    """PriorityClasses high (100) and higher (200), deleted afterwards."""
    path = "/apis/scheduling.k8s.io/v1/priorityclasses"
    names = {"alloc-test-high": 100, "alloc-test-higher": 200}
    for name, value in names.items():
        kube.request("POST", path, body={"metadata": {"name": name}, "value": value})
    yield list(names)
    for name in names:
        kube.request("DELETE", f"{path}/{name}")


def fixed(name, workers, gpus, **spec):
    """A job of `workers` x `gpus` that the allocator never resizes (autoscaling off)."""
    size = {"min": workers, "max": workers, "initial": workers}
    return job_body(name, workers=size, resources={"gpus": gpus}, **spec)


def queued(kube, namespace, name):
    def check():
        st = status(kube, namespace, name)
        return st.get("phase") == "Queued" and condition(st, "Admitted").get("status") == "False" and st

    return check


def test_gang_admission_queue_backfill_and_completion(kube, k8s, namespace, run_operator, cluster):
    wait_for_idle_gpus(k8s)
    op = run_operator(*ARGS, *ALLOCATOR)
    with GpuSampler(k8s, namespace, CAPACITY, interval=0.3) as sampler:
        create_job(kube, namespace, fixed("big", 3, 4))  # 12 of 16 GPUs
        wait(k8s, running(kube, namespace, "big", 3), 40, "big Running", op)
        create_job(kube, namespace, fixed("wait", 2, 4))  # 8 GPUs: does not fit next to big
        st = wait(k8s, queued(kube, namespace, "wait"), 30, "wait Queued", op)
        assert st["allocation"]["queuePosition"] == 1 and st["allocation"]["reason"] == "Queued"
        assert "do not fit" in condition(st, "Admitted")["message"]
        create_job(kube, namespace, fixed("huge", 3, 8))  # 24 GPUs: never fits this cluster
        st = wait(k8s, queued(kube, namespace, "huge"), 30, "huge Queued", op)
        assert condition(st, "Admitted")["reason"] == "NoMatchingNodes"
        # A later, smaller job that fits starts in the gap (the earlier job has not waited
        # long enough to reserve it).
        create_job(kube, namespace, fixed("small", 1, 4))
        wait(k8s, running(kube, namespace, "small", 1), 40, "small Running", op)
        time.sleep(4)  # more allocator passes: the queued jobs still have no pods
        assert pods(kube, namespace, "wait") == {} and pods(kube, namespace, "huge") == {}
        assert status(kube, namespace, "wait")["phase"] == "Queued"

        # big finishes: its GPUs go to the queued job.
        for name in pods(kube, namespace, "big"):
            cluster.kubelet.inject_exit(namespace, name, 0)
        wait(k8s, lambda: status(kube, namespace, "big").get("phase") == "Succeeded", 30, "big Succeeded", op)
        st = wait(k8s, running(kube, namespace, "wait", 2), 40, "wait admitted and Running", op)
        assert condition(st, "Admitted")["status"] == "True"
        assert status(kube, namespace, "huge")["phase"] == "Queued"
    assert sampler.samples > 20 and not sampler.violations, sampler.violations[:5]
    assert sampler.peak == CAPACITY  # small + big, then small + wait: the cluster was used


def test_a_higher_priority_job_shrinks_a_lower_one_to_make_room_never_below_min(
    kube, k8s, namespace, run_operator, cluster, priority_classes
):
    wait_for_idle_gpus(k8s)  # the operator sees only its namespace: the last test's pods must be gone
    op = run_operator(*ARGS, *ALLOCATOR)
    with GpuSampler(k8s, namespace, CAPACITY, interval=0.3) as sampler:
        create_job(
            kube,
            namespace,
            job_body(
                "low",
                workers={"min": 3, "max": 8, "initial": 8},
                resources={"gpus": 2},
                autoscaling={"enabled": True},
            ),
        )
        wait(k8s, running(kube, namespace, "low", 8), 40, "low Running with all 16 GPUs", op)
        create_job(kube, namespace, fixed("high", 5, 2, priorityClassName="alloc-test-high"))  # 10 GPUs
        st = wait(k8s, running(kube, namespace, "high", 5), 60, "high admitted and Running", op)
        assert condition(st, "Admitted")["status"] == "True"
        low = wait(k8s, running(kube, namespace, "low"), 40, "low Running again", op)
        assert low["worldSize"] == 3  # shrunk to make room: 16 - 10 = 6 GPUs, its min
        shrinks = events(kube, namespace, "low", "AllocatorShrink")
        assert shrinks and "room for admitted jobs" in shrinks[0]["message"]
        # A second high-priority job cannot push low below its min: it waits.
        create_job(kube, namespace, fixed("higher", 2, 2, priorityClassName="alloc-test-higher"))
        wait(k8s, queued(kube, namespace, "higher"), 30, "higher Queued", op)
        time.sleep(4)
        assert status(kube, namespace, "low")["worldSize"] == 3 and pods(kube, namespace, "higher") == {}
    assert not sampler.violations, sampler.violations[:5]
