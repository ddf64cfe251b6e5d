"""The admin policy (api/policy.py): what a LeptonJob may ask for, and where it is enforced.

Every rule has a hostile spec that is refused, naming the rule, and an allowed one next to
it, which proves the rule is not over-broad. Then the pass: a job that never started
fails as InvalidSpec creating nothing; a started job whose spec breaks the policy keeps
its workers (PolicyViolation) and gets no new one until it complies. Then the policy file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from planworld import World, base_spec, running_world, scale_to

from lepton_operator.api.conditions import (
    CONDITION_FAILED,
    CONDITION_INVALID_SPEC,
    CONDITION_POLICY_VIOLATION,
    REASON_INVALID_SPEC,
    REASON_POLICY_SATISFIED,
    REASON_POLICY_VIOLATION,
)
from lepton_operator.api.models import CONDITION_MESSAGE_MAX_LENGTH, STATUS_MESSAGE_MAX_LENGTH, parse_job
from lepton_operator.api.policy import (
    CHECKPOINT_CLAIM_SUFFIX,
    DEFAULT_POLICY,
    AdminPolicy,
    InvalidPolicy,
    check_policy,
    checkpoint_claim_owner,
    command_args_env_bytes,
    parse_policy,
)
from lepton_operator.cli import main
from lepton_operator.desired import checkpoint_pvc_name
from lepton_operator.reconcile.cli import read_policy
from lepton_operator.reconcile.conditions import get_condition

pytestmark = pytest.mark.unit

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
PROFILES = {"profiles": {"rdma": {"namespaces": ["ml-*"]}, "tcp": {"namespaces": ["team-?"]}}}


def volume(claim: str = "datasets", path: str = "/data", read_only: bool = True) -> dict:
    return {"claimName": claim, "mountPath": path, "readOnly": read_only}


def secret_env(secret: str) -> list[dict]:
    return [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}}]


def big_env(count: int, size: int = 30_000) -> list[dict]:
    return [{"name": f"BLOB_{i}", "value": "x" * size} for i in range(count)]


# (id, policy settings, spec settings, the rule it breaks (None: allowed), what the message quotes)
# Each hostile row has an allowed row right after it.
CASES = [
    # priority classes
    (
        "system-class",
        {},
        {"priorityClassName": "system-node-critical"},
        "allowedPriorityClasses",
        "system-node-critical",
    ),
    ("custom-class", {}, {"priorityClassName": "training-high"}, None, ""),
    (
        "system-wildcard",
        {"allowedPriorityClasses": ["system-*", "training-*"]},
        {"priorityClassName": "system-cluster-critical"},
        "allowedPriorityClasses",
        "system-cluster-critical",
    ),
    (
        "wildcard-others",
        {"allowedPriorityClasses": ["system-*", "training-*"]},
        {"priorityClassName": "training-a"},
        None,
        "",
    ),
    (
        "system-listed",
        {"allowedPriorityClasses": ["system-cluster-critical"]},
        {"priorityClassName": "system-cluster-critical"},
        None,
        "",
    ),
    (
        "unlisted-class",
        {"allowedPriorityClasses": ["training-*"]},
        {"priorityClassName": "batch-low"},
        "allowedPriorityClasses",
        "batch-low",
    ),
    ("listed-class", {"allowedPriorityClasses": ["training-*"]}, {"priorityClassName": "training-low"}, None, ""),
    ("no-class-none-allowed", {"allowedPriorityClasses": []}, {}, None, ""),
    # tolerations
    (
        "tolerate-all",
        {},
        {"tolerations": [{"operator": "Exists"}]},
        "allowedTolerationKeys",
        "tolerations[0] has no key",
    ),
    ("tolerate-gpu", {}, {"tolerations": [GPU_TOLERATION]}, None, ""),
    (
        "tolerate-all-noexecute",
        {"allowedTolerationKeys": ["nvidia.com/gpu", "gpu-pool"]},
        {"tolerations": [GPU_TOLERATION, {"operator": "Exists", "effect": "NoExecute"}]},
        "allowedTolerationKeys",
        "tolerations[1] has no key",
    ),
    (
        "tolerate-listed-pool",
        {"allowedTolerationKeys": ["nvidia.com/gpu", "gpu-pool"]},
        {"tolerations": [GPU_TOLERATION, {"key": "gpu-pool", "operator": "Equal", "value": "a100"}]},
        None,
        "",
    ),
    (
        "tolerate-control-plane",
        {},
        {"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]},
        "allowedTolerationKeys",
        "node-role.kubernetes.io/control-plane",
    ),
    # node selectors
    (
        "select-control-plane",
        {},
        {"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}},
        "forbiddenNodeSelectorKeys",
        "node-role.kubernetes.io/control-plane",
    ),
    (
        "select-master",
        {},
        {"nodeSelector": {"node-role.kubernetes.io/master": "true"}},
        "forbiddenNodeSelectorKeys",
        "master",
    ),
    (
        "select-gpu-nodes",
        {},
        {"nodeSelector": {"nvidia.com/gpu.present": "true", "kubernetes.io/hostname": "n1"}},
        None,
        "",
    ),
    # mount paths
    ("mount-proc", {}, {"dataVolumes": [volume(path="/proc/self")]}, "forbiddenMountPaths", "/proc/self"),
    ("mount-etc", {}, {"dataVolumes": [volume(path="/etc")]}, "forbiddenMountPaths", "/etc"),
    (
        "mount-sa-token",
        {},
        {"dataVolumes": [volume(path="/var/run/secrets/kubernetes.io/serviceaccount")]},
        "forbiddenMountPaths",
        "/var/run",
    ),
    ("mount-dev", {}, {"dataVolumes": [volume(path="/dev/nvidia0")]}, "forbiddenMountPaths", "/dev/nvidia0"),
    ("mount-sys", {}, {"dataVolumes": [volume(path="/sys")]}, "forbiddenMountPaths", "/sys"),
    ("mount-run", {}, {"dataVolumes": [volume(path="/run/containerd")]}, "forbiddenMountPaths", "/run/containerd"),
    (
        "checkpoint-in-etc",
        {},
        {"checkpoint": {"size": "1Gi", "mountPath": "/etc/ckpt"}},
        "forbiddenMountPaths",
        "checkpoint.mountPath",
    ),
    # Only whole path parts count: /etcetera and /runs are not /etc and /run.
    ("mount-lookalikes", {}, {"dataVolumes": [volume(path="/etcetera"), volume("b", "/runs")]}, None, ""),
    (
        "mount-outside-prefixes",
        {"allowedMountPathPrefixes": ["/data", "/checkpoints"]},
        {"dataVolumes": [volume(path="/opt/models")]},
        "allowedMountPathPrefixes",
        "/opt/models",
    ),
    (
        "mount-inside-prefixes",
        {"allowedMountPathPrefixes": ["/data", "/checkpoints"]},
        {"dataVolumes": [volume(path="/data/imagenet")], "checkpoint": {"size": "1Gi"}},
        None,
        "",
    ),
    # read-write data volumes
    ("data-read-write", {}, {"dataVolumes": [volume(read_only=False)]}, "allowReadWriteDataVolumes", "datasets"),
    ("data-read-only", {}, {"dataVolumes": [volume()]}, None, ""),
    (
        "data-read-write-allowed",
        {"allowReadWriteDataVolumes": True},
        {"dataVolumes": [volume(read_only=False)]},
        None,
        "",
    ),
    # Secrets
    ("secret-by-default", {}, {"env": secret_env("db-password")}, "allowedSecretNames", "db-password"),
    (
        "configmap-and-field-refs",
        {},
        {
            "env": [
                {"name": "CFG", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            ]
        },
        None,
        "",
    ),
    (
        "secret-unlisted",
        {"allowedSecretNames": ["wandb-*"]},
        {"env": secret_env("db-password")},
        "allowedSecretNames",
        "db-password",
    ),
    ("secret-listed", {"allowedSecretNames": ["wandb-*"]}, {"env": secret_env("wandb-key")}, None, ""),
    # sizes (etcd)
    ("bytes-per-pod", {}, {"env": big_env(3)}, "maxCommandArgsEnvBytes", "more than 65536"),
    ("bytes-per-pod-fits", {}, {"env": big_env(2)}, None, ""),
    (
        "bytes-times-workers",
        {},
        {"env": big_env(2), "workers": {"min": 1, "max": 300}},
        "maxCommandArgsEnvBytesAllWorkers",
        "workers.max (300)",
    ),
    ("bytes-times-workers-fits", {}, {"env": big_env(2), "workers": {"min": 1, "max": 250}}, None, ""),
    # GPUs
    (
        "gpus-over-limit",
        {"maxGpusPerJob": 16},
        {"resources": {"gpus": 8}, "workers": {"min": 1, "max": 4}},
        "maxGpusPerJob",
        "32 GPUs",
    ),
    ("gpus-at-limit", {"maxGpusPerJob": 16}, {"resources": {"gpus": 8}, "workers": {"min": 1, "max": 2}}, None, ""),
    ("gpus-unlimited", {}, {"resources": {"gpus": 16}, "workers": {"min": 1, "max": 1000}}, None, ""),
    # the allocator's priority: lowering is free, raising needs the admin
    ("priority-above-max", {}, {"priority": 1}, "maxPriority", "spec.priority 1 is above 0"),
    ("priority-lowered", {}, {"priority": -5}, None, ""),
    ("priority-raised-by-admin", {"maxPriority": 100}, {"priority": 100}, None, ""),
    # fabric profiles (tests/unit/test_fabric_profiles.py has the rest); the job's namespace is team-a
    ("profile-undefined", {}, {"profile": "rdma"}, "profiles", "spec.profile rdma is not a profile"),
    ("profile-other-namespace", PROFILES, {"profile": "rdma"}, "profiles", "namespace team-a may not use"),
    ("profile-allowed", PROFILES, {"profile": "tcp"}, None, ""),
    # claims: never another LeptonJob's checkpoint claim
    (
        "mount-other-jobs-checkpoints",
        {},
        {"dataVolumes": [volume("victim-checkpoints")]},
        "checkpointClaims",
        "victim-checkpoints",
    ),
    (
        "checkpoint-on-other-jobs-claim",
        {},
        {"checkpoint": {"claimName": "victim-checkpoints"}},
        "checkpointClaims",
        "LeptonJob victim",
    ),
    (
        "own-checkpoint-claim",
        {},
        {"checkpoint": {"claimName": "job-checkpoints"}, "dataVolumes": [volume("job-checkpoints")]},
        None,
        "",
    ),
    (
        "named-claims",
        {},
        {"checkpoint": {"claimName": "shared-ckpt"}, "dataVolumes": [volume("7-checkpoints")]},
        None,
        "",
    ),
]

RULES = {field.alias for field in AdminPolicy.model_fields.values()} | {"checkpointClaims"}
NAMESPACE = "team-a"


@pytest.mark.parametrize("settings, spec, rule, quoted", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_rule_refuses_its_hostile_spec_and_allows_its_neighbour(settings, spec, rule, quoted):
    parsed = parse_job("job", base_spec(**spec))  # the schema and the operator's rules accept it
    violations = check_policy("job", parsed, AdminPolicy.model_validate(settings), NAMESPACE)
    if rule is None:
        assert violations == []
    else:
        assert violations and all(v.startswith(f"policy {rule}: ") for v in violations), violations
        assert any(quoted in v for v in violations), violations


def test_the_table_has_a_refused_and_an_allowed_case_for_every_rule():
    refused = {c[3] for c in CASES if c[3] is not None}
    assert refused == RULES
    # Under the policy of every refused row, another spec is allowed: no rule refuses everything.
    for case in CASES:
        if case[3] is not None:
            assert any(c[1] == case[1] and c[3] is None for c in CASES), case[0]


def test_every_violation_is_listed_not_only_the_first():
    spec = base_spec(
        priorityClassName="system-node-critical",
        tolerations=[{"operator": "Exists"}, {"key": "other", "operator": "Exists"}],
        dataVolumes=[volume("victim-checkpoints", "/proc/data", read_only=False)],
        env=secret_env("db"),
    )
    violations = check_policy("job", parse_job("job", spec))
    rules = [v.split(":")[0] for v in violations]
    assert rules == [
        "policy allowedPriorityClasses",
        "policy allowedTolerationKeys",
        "policy allowedTolerationKeys",
        "policy forbiddenMountPaths",
        "policy allowReadWriteDataVolumes",
        "policy allowedSecretNames",
        "policy checkpointClaims",
    ]


def test_the_size_is_the_json_of_command_args_and_env():
    spec = parse_job("job", base_spec(command=["python"], args=["-m", "x"], env=[{"name": "A", "value": "é"}]))
    expected = json.dumps(
        {"command": ["python"], "args": ["-m", "x"], "env": [{"name": "A", "value": "é"}]},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert command_args_env_bytes(spec) == len(expected.encode())
    assert command_args_env_bytes(parse_job("job", base_spec())) < 64  # the defaults cost nothing


def test_the_largest_spec_the_schema_allows_is_refused_by_default():
    """The issue's 1.31 MB spec copied into 1000 pods: over both limits."""
    spec = parse_job(
        "job",
        base_spec(
            env=[{"name": f"V{i}", "value": "v" * 32768} for i in range(128)],
            args=["a" * 4096] * 256,
            command=["c" * 4096] * 64,
            workers={"min": 1, "max": 1000},
        ),
    )
    rules = {v.split(":")[0] for v in check_policy("job", spec)}
    assert rules == {"policy maxCommandArgsEnvBytes", "policy maxCommandArgsEnvBytesAllWorkers"}


def test_checkpoint_claim_names_are_the_ones_the_operator_creates():
    assert checkpoint_pvc_name("train") == "train" + CHECKPOINT_CLAIM_SUFFIX
    assert checkpoint_claim_owner("train-checkpoints") == "train"
    assert checkpoint_claim_owner("a-b-checkpoints") == "a-b"
    # Names no LeptonJob can have: no job's claim.
    assert checkpoint_claim_owner("7-checkpoints") is None
    assert checkpoint_claim_owner("x" * 53 + "-checkpoints") is None
    assert checkpoint_claim_owner("checkpoints") is None
    assert checkpoint_claim_owner("train-ckpt") is None


def test_every_setting_says_why_its_default_is_the_default():
    for name, field in AdminPolicy.model_fields.items():
        assert field.description and "Default" in field.description, name
    assert DEFAULT_POLICY == AdminPolicy()
    assert DEFAULT_POLICY.allowed_secret_names == [] and DEFAULT_POLICY.allow_read_write_data_volumes is False
    assert DEFAULT_POLICY.max_command_args_env_bytes == 64 * 1024
    assert DEFAULT_POLICY.max_command_args_env_bytes_all_workers == 16 * 1024 * 1024
    assert DEFAULT_POLICY.max_gpus_per_job is None


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_complies_with_the_default_policy(path):
    """Examples are what users copy: the chart's default policy must run them."""
    for doc in [d for d in yaml.safe_load_all(path.read_text()) if d]:
        name = doc["metadata"]["name"]
        assert check_policy(name, parse_job(name, doc["spec"])) == []


# ------------------------------------------------------------------- the reconcile pass


def test_a_job_that_never_started_fails_as_invalid_spec_creating_nothing():
    spec = base_spec(priorityClassName="system-node-critical", tolerations=[{"operator": "Exists"}])
    w = World(spec)
    p = w.step()
    assert p.creates == [] and p.deletes == [] and p.patches == []  # no Service, PDB, PVC or pod
    assert w.status.phase == "Failed"
    invalid = get_condition(w.status, CONDITION_INVALID_SPEC)
    assert invalid.status == "True" and invalid.reason == REASON_INVALID_SPEC
    assert "policy allowedPriorityClasses: " in invalid.message and "policy allowedTolerationKeys: " in invalid.message
    assert get_condition(w.status, CONDITION_FAILED).reason == REASON_INVALID_SPEC
    assert w.reasons() == [REASON_INVALID_SPEC]
    assert w.step(30).events == []  # the same finding: no new event

    # The admin allows it (the operator restarted with another policy): the job starts.
    w.policy = AdminPolicy(allowed_priority_classes=["system-node-critical"])
    w.set_spec(tolerations=[GPU_TOLERATION])
    p = w.step()
    assert w.status.phase == "Pending" and len(w.created_pods()) == 2
    assert get_condition(w.status, CONDITION_INVALID_SPEC).status == "False"
    assert get_condition(w.status, CONDITION_FAILED).status == "False"


@pytest.mark.parametrize(
    "policy, edit, fix",
    [
        # The admin tightened the policy; the admin relaxes it again.
        (AdminPolicy(allowed_toleration_keys=[]), {}, {}),
        # A user's edit of a mutable field; the user reverts it.
        (DEFAULT_POLICY, {"priorityClassName": "system-cluster-critical"}, {"priorityClassName": "training-high"}),
        (DEFAULT_POLICY, {"workers": {"min": 1, "max": 600}}, {"workers": {"min": 1, "max": 4, "replicas": 3}}),
    ],
    ids=["policy-changed", "priority-class-edited", "workers-max-edited"],
)
def test_a_started_job_that_breaks_the_policy_keeps_its_workers_and_starts_none(policy, edit, fix):
    w = running_world(base_spec(tolerations=[GPU_TOLERATION], env=big_env(1)))  # 30 KB: fits 4 workers, not 600
    before = dict(w.pods)
    w.policy = policy
    if edit:
        w.set_spec(**edit)
    p = w.step()
    assert (p.creates, p.deletes) == ([], []) and w.status.phase == "Running"
    cond = get_condition(w.status, CONDITION_POLICY_VIOLATION)
    assert cond.status == "True" and cond.reason == REASON_POLICY_VIOLATION and "policy " in cond.message
    assert w.reasons() == [REASON_POLICY_VIOLATION]
    assert w.step(30).events == []

    # No new generation while it violates: not for a scale, not for a failed worker.
    scale_to(w, 3)
    p = w.step()
    assert (p.creates, p.deletes) == ([], []) and w.status.rescale is None and w.pods.keys() == before.keys()
    w.exit("job-worker-1", 137)
    w.settle()
    assert w.live() == [] and "admin policy" in w.status.message and w.status.worker_generation == 1

    # Compliant again: the condition clears and the new generation starts.
    w.policy = DEFAULT_POLICY
    if fix:
        w.set_spec(**fix)
    w.settle()
    assert w.status.phase == "Running" and w.status.worker_generation > 1 and len(w.live()) == 3
    cond = get_condition(w.status, CONDITION_POLICY_VIOLATION)
    assert cond.status == "False" and cond.reason == REASON_POLICY_SATISFIED


def test_a_started_job_with_hundreds_of_violations_keeps_a_status_the_server_accepts():
    w = running_world(base_spec(nodeSelector={f"key-{i}": "v" for i in range(32)}))
    w.policy = AdminPolicy(forbidden_node_selector_keys=[f"key-{i}" for i in range(32)])
    w.set_spec(tolerations=[{"operator": "Exists"}] * 32)
    p = w.step()
    cond = get_condition(w.status, CONDITION_POLICY_VIOLATION)
    assert len(cond.message) <= min(STATUS_MESSAGE_MAX_LENGTH, CONDITION_MESSAGE_MAX_LENGTH)
    assert "...and " in cond.message and len(p.events[0][2]) <= 1024


def test_a_finished_job_is_left_alone_when_the_policy_changes():
    w = running_world(base_spec(tolerations=[GPU_TOLERATION]))
    for name in w.live():
        w.exit(name, 0)
    w.step()
    assert w.status.phase == "Succeeded"
    w.policy = AdminPolicy(allowed_toleration_keys=[])
    p = w.step(5)
    assert get_condition(w.status, CONDITION_POLICY_VIOLATION) is None and p.events == []


# --------------------------------------------------------------------- the policy file


def test_a_policy_file_is_yaml_or_json_and_empty_means_the_defaults(tmp_path):
    assert parse_policy("") == DEFAULT_POLICY
    yaml_text = "allowedTolerationKeys: [nvidia.com/gpu, gpu-pool]\nmaxGpusPerJob: 64\n"
    policy = parse_policy(yaml_text)
    assert policy.allowed_toleration_keys == ["nvidia.com/gpu", "gpu-pool"] and policy.max_gpus_per_job == 64
    assert parse_policy(json.dumps({"allowedSecretNames": ["wandb-*"]})).allowed_secret_names == ["wandb-*"]
    # What the chart renders (every value, camelCase) reads back as the same policy.
    rendered = DEFAULT_POLICY.model_dump(mode="json", by_alias=True)
    assert parse_policy(json.dumps(rendered)) == DEFAULT_POLICY
    path = tmp_path / "policy.yaml"
    path.write_text(yaml_text)
    assert read_policy(str(path)) == policy
    assert read_policy(None) == DEFAULT_POLICY


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("allowedTolerationKey: [a]", "allowedTolerationKey"),  # a typo is not ignored
        ("maxGpusPerJob: lots", "maxGpusPerJob"),
        ("maxCommandArgsEnvBytes: 10", "maxCommandArgsEnvBytes"),
        ("forbiddenMountPaths: [proc]", "forbiddenMountPaths"),
        ("allowedMountPathPrefixes: []", "allowedMountPathPrefixes"),
        ("allowedSecretNames: ['']", "allowedSecretNames"),
        ("- allowedSecretNames", "mapping"),
        ("allowedSecretNames: [a", "YAML"),
    ],
)
def test_an_invalid_policy_file_is_refused_naming_the_problem(text, complaint):
    with pytest.raises(InvalidPolicy) as info:
        parse_policy(text)
    assert complaint in str(info.value)


def test_the_operator_refuses_to_start_with_an_invalid_or_missing_policy_file(tmp_path, capsys):
    bad = tmp_path / "policy.yaml"
    bad.write_text("allowReadWriteDataVolume: true\n")
    assert main(["run", "--policy-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err and str(bad) in err and "allowReadWriteDataVolume" in err
    assert main(["run", "--policy-file", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read it" in capsys.readouterr().err
