"""spec.placement on the real 1.20 scheduler (issue 14): a cluster of this module's own,
4 simulated nodes x 8 GPUs labelled into 2 racks (`example.com/rack`: a, b).

The operator only writes pod affinity and topology spread constraints; every placement
asserted here (pod node names) is the real kube-scheduler's. Each test waits until the
previous test's pods released their GPUs.
"""

from __future__ import annotations

from collections import Counter

import pytest
from jobs import FAST, create_job, job_body, pods, running, status, wait

from lepton_localcluster import SimulatedNode
from lepton_localcluster.pytest_plugin import wait_for_idle_gpus

RACK = "example.com/rack"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.own_cluster(
        nodes=[SimulatedNode(f"rack-{r}-{i}", gpus=8, labels={RACK: r}) for r in "ab" for i in range(2)]
    ),
]
NO_ALLOCATOR = (*FAST, "--no-allocator")


def rack(node: str) -> str:
    return node.split("-")[1]  # rack-<rack>-<i>


def fixed(name, workers, gpus, placement=None):
    """A job of `workers` x `gpus` that nobody resizes."""
    size = {"min": workers, "max": workers, "initial": workers}
    extra = {"placement": placement} if placement else {}
    return job_body(name, workers=size, resources={"gpus": gpus}, **extra)


def nodes_of(kube, namespace, job) -> dict[str, str]:
    """Worker pod -> the node the scheduler bound it to (live pods only)."""
    found = pods(kube, namespace, job, include_terminating=False)
    return {name: p["spec"].get("nodeName") for name, p in found.items()}


def racks_of(kube, namespace, job) -> Counter:
    return Counter(rack(node) for node in nodes_of(kube, namespace, job).values() if node)


def domains(kube, namespace, job, expected):
    def check():
        placement = status(kube, namespace, job).get("placement") or {}
        return placement.get("domains") == expected and placement

    return check


def test_pack_lands_in_one_rack_and_a_job_too_wide_for_a_rack_takes_the_fewest(kube, k8s, namespace, run_operator):
    wait_for_idle_gpus(k8s)
    op = run_operator(*NO_ALLOCATOR)
    pack = {"topologyKey": RACK, "mode": "Pack"}
    create_job(kube, namespace, fixed("pack", 2, 8, pack))
    wait(k8s, running(kube, namespace, "pack", 2), 40, "pack Running", op)
    racks = racks_of(kube, namespace, "pack")
    assert len(racks) == 1, nodes_of(kube, namespace, "pack")  # both 8-GPU workers in one rack
    (only,) = racks
    placement = wait(k8s, domains(kube, namespace, "pack", [only]), 20, "status.placement of pack", op)
    assert placement["topologyKey"] == RACK
    term = next(iter(pods(kube, namespace, "pack").values()))["spec"]["affinity"]["podAffinity"]
    assert term["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == RACK

    # pack finishes; a second Pack job of 6 x 4 GPUs (24 > a rack's 16) fills one rack and
    # puts only the rest into the other (a spread would be 3 + 3).
    for name in pods(kube, namespace, "pack"):
        k8s.cluster.kubelet.inject_exit(namespace, name, 0)
    wait(k8s, lambda: status(kube, namespace, "pack").get("phase") == "Succeeded", 30, "pack Succeeded", op)
    create_job(kube, namespace, fixed("wide", 6, 4, pack))
    wait(k8s, running(kube, namespace, "wide", 6), 40, "wide Running", op)
    racks = racks_of(kube, namespace, "wide")
    assert sorted(racks.values()) == [2, 4], nodes_of(kube, namespace, "wide")
    wait(k8s, domains(kube, namespace, "wide", ["a", "b"]), 20, "status.placement of wide", op)


def unschedulable(kube, namespace, job) -> dict[str, str]:
    """Pending pods of the job the scheduler gave up on, with its message."""
    out = {}
    for name, p in pods(kube, namespace, job, include_terminating=False).items():
        for c in p.get("status", {}).get("conditions") or []:
            if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable":
                out[name] = c.get("message", "")
    return out


def test_exclusive_keeps_other_jobs_out_of_its_rack_and_stays_out_of_theirs(kube, k8s, namespace, run_operator):
    wait_for_idle_gpus(k8s)
    op = run_operator(*NO_ALLOCATOR)
    # A job without placement: 4 GPUs somewhere, in rack P.
    create_job(kube, namespace, fixed("plain", 1, 4))
    wait(k8s, running(kube, namespace, "plain", 1), 40, "plain Running", op)
    (rack_p,) = racks_of(kube, namespace, "plain")
    rack_q = "b" if rack_p == "a" else "a"

    # An exclusive job avoids rack P (its own anti-affinity) though P has 12 GPUs free.
    exclusive = {"topologyKey": RACK, "mode": "Pack", "exclusive": True}
    create_job(kube, namespace, fixed("excl", 2, 4, exclusive))
    wait(k8s, running(kube, namespace, "excl", 2), 40, "excl Running", op)
    assert racks_of(kube, namespace, "excl") == Counter({rack_q: 2}), nodes_of(kube, namespace, "excl")
    wait(k8s, domains(kube, namespace, "excl", [rack_q]), 20, "status.placement of excl", op)
    term = next(iter(pods(kube, namespace, "excl").values()))["spec"]["affinity"]["podAntiAffinity"]
    (required,) = term["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["topologyKey"] == RACK
    assert "namespaceSelector" not in required  # a 1.20 server has no such field (1.21+): the namespace only

    # A third job without placement: 5 x 4 GPUs. Rack Q still has 8 free GPUs, but the
    # exclusive job's anti-affinity keeps it out (the scheduler checks existing pods' terms):
    # 3 workers fit rack P, 2 stay unschedulable.
    create_job(kube, namespace, fixed("third", 5, 4))

    def settled():
        stuck = unschedulable(kube, namespace, "third")
        bound = [n for n in nodes_of(kube, namespace, "third").values() if n]
        return len(bound) == 3 and len(stuck) == 2 and stuck

    stuck = wait(k8s, settled, 40, "third: 3 workers bound, 2 unschedulable", op)
    assert racks_of(kube, namespace, "third") == Counter({rack_p: 3}), nodes_of(kube, namespace, "third")
    assert all("anti-affinity" in message for message in stuck.values()), stuck
    assert racks_of(kube, namespace, "excl") == Counter({rack_q: 2})


def test_spread_puts_the_same_number_of_workers_into_each_rack(kube, k8s, namespace, run_operator):
    wait_for_idle_gpus(k8s)
    op = run_operator(*NO_ALLOCATOR)
    create_job(kube, namespace, fixed("spread", 4, 2, {"topologyKey": RACK, "mode": "Spread"}))
    wait(k8s, running(kube, namespace, "spread", 4), 40, "spread Running", op)
    assert racks_of(kube, namespace, "spread") == Counter({"a": 2, "b": 2}), nodes_of(kube, namespace, "spread")
    wait(k8s, domains(kube, namespace, "spread", ["a", "b"]), 20, "status.placement of spread", op)


def test_the_allocator_gives_a_pack_job_no_more_workers_than_one_rack_holds(kube, k8s, namespace, run_operator):
    wait_for_idle_gpus(k8s)
    op = run_operator(*FAST, "--allocator-interval-seconds", "3")
    # Asks for 4 x 8 GPUs (the whole cluster, two racks); one rack holds 2 of them.
    body = job_body(
        "packed",
        workers={"min": 1, "max": 4, "initial": 4},
        resources={"gpus": 8},
        autoscaling={"enabled": True},
        placement={"topologyKey": RACK, "mode": "Pack"},
    )
    create_job(kube, namespace, body)
    st = wait(k8s, running(kube, namespace, "packed", 2), 60, "packed Running at 2", op)
    assert st["allocation"]["target"] == 2
    assert "placement Pack" in st["allocation"]["whyNotMore"]
    assert len(racks_of(kube, namespace, "packed")) == 1, nodes_of(kube, namespace, "packed")
