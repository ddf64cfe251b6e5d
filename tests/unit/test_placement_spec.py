"""spec.placement (issue 14): the pod fields that carry it out, its validation, and the
domains the current generation occupies (status.placement).

The scheduler's behaviour on these fields (Pack lands in one rack or the fewest, Spread
spreads, exclusive keeps other jobs out both ways) is tested against the real 1.20
scheduler in tests/integration/test_placement.py.
"""

from __future__ import annotations

import pytest

from lepton_operator.api.crd import build_crd
from lepton_operator.api.models import InvalidJob, parse_job
from lepton_operator.desired import JobRef, build_worker_pod
from lepton_operator.desired.placement import apply_placement, placement_scheduling
from lepton_operator.reconcile.nodes import NodeInfo, node_info
from lepton_operator.reconcile.placement import placement_status
from tests.unit.planworld import World, base_spec, running_world

pytestmark = pytest.mark.unit

RACK = "example.com/rack"
JOB = JobRef("train", "ns", "uid-1")
GENERATION_2 = {
    "matchLabels": {
        "app.kubernetes.io/managed-by": "lepton-operator",
        "lepton.ai/generation": "2",
        "lepton.ai/job-name": "train",
    }
}
OTHER_JOBS = {
    "matchExpressions": [
        {"key": "app.kubernetes.io/managed-by", "operator": "In", "values": ["lepton-operator"]},
        {"key": "lepton.ai/job-name", "operator": "NotIn", "values": ["train"]},
    ]
}


def spec(placement=None, **overrides):
    body = base_spec(**overrides)
    if placement is not None:
        body["placement"] = placement
    return parse_job("train", body)


def pod_spec(placement=None, **overrides) -> dict:
    return build_worker_pod(JOB, spec(placement, **overrides), 1, 2, 3)["spec"]


# ------------------------------------------------------------------------ builders


def test_pack_is_a_preferred_affinity_to_the_generation_over_the_topology_key():
    assert placement_scheduling("train", spec({"topologyKey": RACK, "mode": "Pack"}), 2) == {
        "affinity": {
            "podAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 100, "podAffinityTerm": {"labelSelector": GENERATION_2, "topologyKey": RACK}}
                ]
            }
        }
    }


def test_spread_is_a_soft_topology_spread_constraint_over_the_generation():
    assert placement_scheduling("train", spec({"topologyKey": RACK, "mode": "Spread"}), 2) == {
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": RACK, "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": GENERATION_2}
        ]
    }


def test_exclusive_is_a_required_anti_affinity_to_every_other_lepton_job():
    scheduling = placement_scheduling("train", spec({"topologyKey": RACK, "mode": "Pack", "exclusive": True}), 2)
    assert scheduling["affinity"]["podAntiAffinity"] == {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": OTHER_JOBS, "namespaceSelector": {}, "topologyKey": RACK}
        ]
    }
    assert "podAffinity" in scheduling["affinity"]  # Pack stays
    # Exclusive alone: no preference, only the exclusion.
    alone = placement_scheduling("train", spec({"topologyKey": RACK, "exclusive": True}), 2)
    assert set(alone) == {"affinity"} and set(alone["affinity"]) == {"podAntiAffinity"}


def test_no_placement_or_mode_none_adds_nothing_to_the_pod():
    assert placement_scheduling("train", spec(), 2) == {}
    assert placement_scheduling("train", spec({"topologyKey": RACK}), 2) == {}
    plain = pod_spec()
    assert "affinity" not in plain and "topologySpreadConstraints" not in plain
    assert pod_spec({"topologyKey": RACK, "mode": "None"}) == plain


def test_the_worker_pod_carries_the_placement_next_to_the_users_node_selector_and_tolerations():
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    built = pod_spec(
        {"topologyKey": RACK, "mode": "Spread", "exclusive": True},
        nodeSelector={"gpu": "h100"},
        tolerations=[toleration],
    )
    assert built["nodeSelector"] == {"gpu": "h100"}
    assert built["tolerations"] == [toleration]
    assert built["topologySpreadConstraints"][0]["labelSelector"] == GENERATION_2
    assert built["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == (
        RACK
    )


def test_merging_keeps_what_the_pod_spec_already_has():
    pod = {
        "nodeSelector": {"gpu": "h100"},
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}},
            "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": {}}]},
        },
        "topologySpreadConstraints": [{"maxSkew": 2}],
    }
    extra = placement_scheduling("train", spec({"topologyKey": RACK, "mode": "Pack", "exclusive": True}), 2)
    apply_placement(pod, extra)
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert "nodeAffinity" in pod["affinity"] and "podAntiAffinity" in pod["affinity"]
    preferred = pod["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [t["weight"] for t in preferred] == [1, 100]  # appended, not replaced
    assert pod["topologySpreadConstraints"] == [{"maxSkew": 2}]
    # The merge copies: changing the pod never changes what was merged in.
    preferred[1]["weight"] = 5
    assert extra["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 100


def test_each_generation_is_packed_or_spread_over_its_own_workers_only():
    s = spec({"topologyKey": RACK, "mode": "Pack"})
    g3 = build_worker_pod(JOB, s, 0, 3, 2)["spec"]["affinity"]["podAffinity"]
    term = g3["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["labelSelector"]["matchLabels"]["lepton.ai/generation"] == "3"


def test_placement_is_not_an_immutable_field():
    # Like nodeSelector, it may change: the next generation is placed the new way.
    assert spec({"topologyKey": RACK, "mode": "Pack"}).template_hash() == spec().template_hash()


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "placement, wants",
    [
        ({"mode": "Pack"}, "mode Pack"),
        ({"mode": "Spread"}, "mode Spread"),
        ({"exclusive": True}, "exclusive: true"),
    ],
)
def test_pack_spread_and_exclusive_need_a_topology_key(placement, wants):
    with pytest.raises(InvalidJob) as err:
        spec(placement)
    assert err.value.errors == [
        f"spec.placement.topologyKey is required with {wants}: name the node label whose values are the "
        "domains (e.g. topology.kubernetes.io/zone)"
    ]


@pytest.mark.parametrize(
    "key, ok",
    [
        ("topology.kubernetes.io/zone", True),
        ("example.com/rack", True),
        ("rack", True),
        ("nvidia.com/gpu.clique", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("Example.com/rack", False),  # the prefix is a lowercase DNS subdomain
        ("example.com/", False),
        ("/rack", False),
        ("rack name", False),
        ("-rack", False),
    ],
)
def test_the_topology_key_is_a_label_key(key, ok):
    if ok:
        assert spec({"topologyKey": key, "mode": "Pack"}).placement.topology_key == key
    else:
        with pytest.raises(InvalidJob) as err:
            spec({"topologyKey": key, "mode": "Pack"})
        assert err.value.errors[0].startswith("spec.placement.topologyKey:")


def test_unknown_modes_and_fields_are_rejected():
    with pytest.raises(InvalidJob, match="spec.placement.mode"):
        spec({"topologyKey": RACK, "mode": "Scatter"})
    with pytest.raises(InvalidJob, match="spec.placement.zone"):
        spec({"topologyKey": RACK, "zone": "a"})


def test_the_crd_states_the_same_rule_in_cel_and_defaults_mode_none():
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    placement = schema["properties"]["spec"]["properties"]["placement"]
    assert placement["properties"]["mode"]["enum"] == ["None", "Pack", "Spread"]
    assert placement["properties"]["mode"]["default"] == "None"
    assert placement["properties"]["exclusive"]["default"] is False
    (rule,) = placement["x-kubernetes-validations"]
    assert "has(self.topologyKey)" in rule["rule"] and "topologyKey is required" in rule["message"]
    status = schema["properties"]["status"]["properties"]["placement"]
    assert status["properties"]["domains"]["items"]["type"] == "string"


def test_an_invalid_placement_fails_the_job_as_invalid_spec():
    w = World(base_spec(placement={"mode": "Pack"}))
    w.step()
    assert w.status.phase == "Failed"
    failed = next(c for c in w.status.conditions if c.type == "Failed")
    assert failed.reason == "InvalidSpec" and "spec.placement.topologyKey is required" in failed.message
    assert w.pods == {}


# ------------------------------------------------------------------ status domains


def running_pod(name, generation, node, phase="Running", terminating=False):
    meta = {"name": name, "labels": {"lepton.ai/generation": str(generation)}}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": node}, "status": {"phase": phase}}


NODES = {
    "a-0": NodeInfo(ready=True, labels={RACK: "a"}),
    "a-1": NodeInfo(ready=True, labels={RACK: "a"}),
    "b-0": NodeInfo(ready=True, labels={RACK: "b"}),
    "c-0": NodeInfo(ready=True, labels={RACK: "c"}),
    "bare": NodeInfo(ready=True),
}


def test_domains_are_the_racks_of_the_current_generations_running_workers():
    pods = [
        running_pod("w0", 2, "b-0"),
        running_pod("w1", 2, "a-0"),
        running_pod("w2", 2, "a-1"),
        running_pod("w3", 2, "bare"),  # a node without the label: in no domain
        running_pod("w4", 2, "gone"),  # not in the node view
        running_pod("w5", 2, "c-0", phase="Pending"),  # not Running yet
        running_pod("w6", 2, "c-0", terminating=True),
        running_pod("old", 1, "c-0"),  # another generation
    ]
    found = placement_status(spec({"topologyKey": RACK, "mode": "Pack"}), 2, pods, NODES)
    assert found.to_k8s() == {"topologyKey": RACK, "domains": ["a", "b"]}
    assert placement_status(spec(), 2, pods, NODES) is None
    assert placement_status(spec({"topologyKey": RACK}), 0, pods, NODES).domains == []


def test_node_info_keeps_the_labels_and_equality_ignores_them():
    node = {
        "metadata": {"name": "a-0", "labels": {RACK: "a"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    info = node_info(node)
    assert info.labels == {RACK: "a"} and info == NodeInfo(ready=True)


def test_the_pass_writes_the_domains_and_keeps_them_without_a_node_view():
    w = World(base_spec(placement={"topologyKey": RACK, "mode": "Pack"}))
    w.nodes = {"node-1": NodeInfo(ready=True, labels={RACK: "r7"})}
    w.step()
    w.settle(2)
    assert w.status.phase == "Running"
    assert w.status.placement.to_k8s() == {"topologyKey": RACK, "domains": ["r7"]}
    w.nodes = None  # nodes cannot be listed: the last reading stays
    w.step()
    assert w.status.placement.domains == ["r7"]
    w.set_spec(placement=None)  # no placement asked for: no placement status
    w.step()
    assert w.status.placement is None


def test_a_job_without_a_placement_has_no_placement_status():
    w = running_world()
    assert w.status.placement is None and "placement" not in w.status.to_k8s()
