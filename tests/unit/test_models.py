"""The LeptonJob models: defaults, bounds, cross-field rules, names, and the template hash.

These are the rules the operator applies to every job, including on a 1.20 apiserver
that does not run the CRD's CEL rules: a bad job must come back with *every* problem
listed, so the user fixes it in one round.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import pytest
import yaml
from pydantic import Field, TypeAdapter, ValidationError

from lepton_operator.api import models
from lepton_operator.api.models import (
    DEFAULT_RENDEZVOUS_PORT,
    DEFAULT_TRAINER_IMAGE,
    MAX_JOB_NAME_LENGTH,
    QUANTITY_PATTERN,
    RESERVED_ENV_NAMES,
    InvalidJob,
    LeptonJobSpec,
    LeptonJobStatus,
    parse_job,
    parse_status,
)
from lepton_operator.desired import workers

pytestmark = pytest.mark.unit


def errors_of(name: str, spec: dict) -> list[str]:
    with pytest.raises(InvalidJob) as info:
        parse_job(name, spec)
    return info.value.errors


# ------------------------------------------------------------------- defaults


def test_empty_spec_is_a_runnable_one_worker_job():
    spec = parse_job("demo", {})
    assert spec.image == DEFAULT_TRAINER_IMAGE
    assert (spec.workers.min, spec.workers.max) == (1, 1)
    assert spec.initial_workers == 1 and spec.requested_workers() == 1
    assert spec.resources.gpus == 0 and spec.processes_per_worker == 1
    assert spec.rendezvous_port == DEFAULT_RENDEZVOUS_PORT
    assert spec.restart.max_restarts == 3
    assert spec.autoscaling.enabled is False
    assert spec.checkpoint is None and not spec.suspend


def test_nproc_defaults_to_gpus_and_can_be_overridden():
    assert parse_job("a", {"resources": {"gpus": 8}}).processes_per_worker == 8
    assert parse_job("a", {"resources": {"gpus": 8}, "nprocPerNode": 2}).processes_per_worker == 2


def test_initial_defaults_to_min_and_replicas_is_clamped():
    spec = parse_job("a", {"workers": {"min": 2, "max": 6}})
    assert spec.initial_workers == 2 and spec.requested_workers() == 2
    spec = parse_job("a", {"workers": {"min": 2, "max": 6, "initial": 4}})
    assert spec.requested_workers() == 4
    # kubectl scale writes replicas; values outside [min, max] are clamped, not rejected
    assert parse_job("a", {"workers": {"min": 2, "max": 6, "replicas": 100}}).requested_workers() == 6
    assert parse_job("a", {"workers": {"min": 2, "max": 6, "replicas": 0}}).requested_workers() == 2


def test_wire_form_round_trips_in_camel_case():
    raw = {
        "workers": {"min": 1, "max": 4},
        "resources": {"gpus": 1, "sharedMemory": "8Gi"},
        "checkpoint": {"claimName": "ckpt", "mountPath": "/ckpt"},
        "terminationGracePeriodSeconds": 120,
    }
    wire = parse_job("a", raw).to_k8s()
    assert wire["resources"]["sharedMemory"] == "8Gi"
    assert wire["terminationGracePeriodSeconds"] == 120
    assert "shared_memory" not in str(wire)
    assert parse_job("a", wire) == parse_job("a", raw)


# --------------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    "spec, where",
    [
        ({"workers": {"min": 0}}, "spec.workers.min"),
        ({"workers": {"max": 1001}}, "spec.workers.max"),
        ({"resources": {"gpus": -1}}, "spec.resources.gpus"),
        ({"resources": {"gpus": 99}}, "spec.resources.gpus"),
        ({"resources": {"memory": "12 Gi"}}, "spec.resources.memory"),
        ({"resources": {"cpu": "lots"}}, "spec.resources.cpu"),
        ({"rendezvousPort": 80}, "spec.rendezvousPort"),
        ({"terminationGracePeriodSeconds": 0}, "spec.terminationGracePeriodSeconds"),
        ({"activeDeadlineSeconds": 10**12}, "spec.activeDeadlineSeconds"),
        ({"image": ""}, "spec.image"),
        ({"image": "x" * 513}, "spec.image"),
        ({"command": ["x"] * 65}, "spec.command"),
        ({"env": [{"name": "1BAD", "value": "x"}]}, "spec.env.0.name"),
        ({"checkpoint": {"claimName": "Bad_Name"}}, "spec.checkpoint.claimName"),
        ({"checkpoint": {"size": "1Gi", "mountPath": "relative"}}, "spec.checkpoint.mountPath"),
        ({"priorityClassName": "x;rm -rf /"}, "spec.priorityClassName"),
        ({"bogus": 1}, "spec.bogus"),
        ({"resources": {"privileged": True}}, "spec.resources.privileged"),
    ],
)
def test_out_of_bounds_and_unknown_fields_are_rejected(spec, where):
    errors = errors_of("demo", spec)
    assert any(e.startswith(where) for e in errors), errors


def test_no_spec_field_can_carry_a_raw_pod_template_or_security_context():
    for field in ("securityContext", "hostNetwork", "hostPID", "volumes", "serviceAccountName", "template"):
        assert any(e.startswith(f"spec.{field}") for e in errors_of("demo", {field: {}})), field


# ----------------------------------------------------------------- cross-field


def test_min_above_max_and_initial_outside_are_rejected():
    assert any(
        "min (5) must be <= spec.workers.max (2)" in e for e in errors_of("a", {"workers": {"min": 5, "max": 2}})
    )
    assert any("initial (9)" in e for e in errors_of("a", {"workers": {"min": 1, "max": 4, "initial": 9}}))


@pytest.mark.parametrize("checkpoint", [{}, {"claimName": "c", "size": "1Gi"}])
def test_checkpoint_needs_exactly_one_source(checkpoint):
    assert any("exactly one of claimName" in e for e in errors_of("a", {"checkpoint": checkpoint}))


@pytest.mark.parametrize("name", sorted(RESERVED_ENV_NAMES) + ["PET_ANYTHING", "TORCHELASTIC_X"])
def test_reserved_env_names_are_rejected(name):
    errors = errors_of("a", {"env": [{"name": name, "value": "1"}]})
    assert any("reserved" in e and name in e for e in errors), errors


def test_env_value_and_value_from_rules():
    both = {"name": "X", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    assert any("both value and valueFrom" in e for e in errors_of("a", {"env": [both]}))
    none = {"name": "X", "valueFrom": {}}
    assert any("exactly one source" in e for e in errors_of("a", {"env": [none]}))
    ok = {"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    assert parse_job("a", {"env": [ok]}).env[0].value_from.secret_key_ref.key == "k"


def test_mount_paths_must_differ():
    spec = {
        "checkpoint": {"claimName": "c", "mountPath": "/data"},
        "dataVolumes": [{"claimName": "d", "mountPath": "/data"}],
    }
    assert any("mount paths must differ" in e for e in errors_of("a", spec))


def test_every_problem_is_listed_at_once():
    spec = {
        "workers": {"min": 5, "max": 2},
        "env": [{"name": "RANK", "value": "0"}, {"name": "WORLD_SIZE", "value": "1"}],
        "checkpoint": {"claimName": "c", "size": "1Gi"},
    }
    errors = errors_of("Bad-Name", spec)
    assert len(errors) == 5, errors
    assert any("metadata.name" in e for e in errors)


def test_schema_errors_and_name_errors_are_reported_together():
    errors = errors_of("x" * 60, {"workers": {"min": 0}, "resources": {"gpus": 99}})
    assert len(errors) == 3, errors


# ------------------------------------------------------------------ quantities

# The grammar of k8s.io/apimachinery pkg/api/resource/quantity.go (ParseQuantity). "1."
# and "1.G" are valid there: `<number> ::= ... | <digits>. | ...`, and the parser says
# "TODO: we currently allow 1.G". The exponent is an integer: its parser refuses "1e1.5".
QUANTITIES = [
    "1", "0", "007", "1.5", ".5", "1.", "1.G", "+1", "-1", "-.5", "1Gi", "1.5Gi", "8Ei", "500m",
    "100n", "3u", "2k", "1M", "1G", "1T", "1P", "1E", "1e3", "2E6", "1e+3", "1E-3", "1e0",
]  # fmt: skip
# ParseQuantity refuses these: the pod would be refused with 422 and the job sit Pending.
NOT_QUANTITIES = [
    "1.2.3Gi", "5kM", "Gi", "1 Gi", "1gi", "1K", "", "e3", "1e", "1e+", "1e1.5", "1Ee3", "1m3", "1i",
    "1ki", "--1", "+-1", "1,5", "0x10", "1Gb", "1mi", "lots", "1.5.",
]  # fmt: skip
# Outside the grammar, refused here, though the server would take them: Quantity's
# UnmarshalJSON trims white space ("TODO: Remove support for leading/trailing whitespace"),
# and the parser reads a lone sign or "." as 0.
OUTSIDE_THE_GRAMMAR = [" 1", "1Ki ", "1\n", "+", "-", "."]


@pytest.mark.parametrize("value", QUANTITIES)
def test_quantity_pattern_accepts_the_apimachinery_grammar(value):
    # The model's regex engine (pydantic's) and Python's, as a stand-in for the CRD's RE2.
    TypeAdapter(Annotated[str, Field(pattern=QUANTITY_PATTERN)]).validate_python(value)
    assert re.fullmatch(QUANTITY_PATTERN, value)


@pytest.mark.parametrize("value", NOT_QUANTITIES + OUTSIDE_THE_GRAMMAR)
def test_quantity_pattern_refuses_what_is_not_a_quantity(value):
    with pytest.raises(ValidationError):
        TypeAdapter(Annotated[str, Field(pattern=QUANTITY_PATTERN)]).validate_python(value)
    assert not re.fullmatch(QUANTITY_PATTERN, value)


@pytest.mark.parametrize("field", ["cpu", "memory", "sharedMemory"])
@pytest.mark.parametrize(
    "value, ok",
    [("500m", True), ("+2", True), ("1.5Gi", True), ("0", True), ("1.2.3Gi", False), ("5kM", False), ("-1", False)],
)
def test_resource_quantities_follow_the_grammar_and_are_never_negative(field, value, ok):
    # The server refuses negative requests, limits and sizeLimit: the pod would never be created.
    spec = {"resources": {field: value}}
    if ok:
        assert parse_job("a", spec).to_k8s()["resources"][field] == value
    else:
        assert any(e.startswith(f"spec.resources.{field}") for e in errors_of("a", spec))


@pytest.mark.parametrize(
    "size, ok",
    [("1Gi", True), ("0.5Gi", True), ("+10M", True), ("1e-3", True), ("0", False), ("0.0Gi", False), ("-1Gi", False)],
)
def test_a_created_checkpoint_claim_must_have_a_positive_size(size, ok):
    # The server refuses a PVC whose storage request is not greater than zero.
    spec = {"checkpoint": {"size": size}}
    if ok:
        assert parse_job("a", spec).checkpoint.size == size
    else:
        assert any(e.startswith("spec.checkpoint.size") for e in errors_of("a", spec))


# ----------------------------------------------------------------- mount paths


def data(*paths: str) -> list[dict]:
    return [{"claimName": f"d{i}", "mountPath": p} for i, p in enumerate(paths)]


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"dataVolumes": data("/dev/shm")}, "spec.dataVolumes[0].mountPath (/dev/shm) must be neither /dev/shm"),
        ({"dataVolumes": data("/dev/shm/cache")}, "spec.dataVolumes[0].mountPath (/dev/shm/cache) must be neither"),
        ({"dataVolumes": data("/dev")}, "spec.dataVolumes[0].mountPath (/dev) must be neither /dev/shm"),
        ({"checkpoint": {"size": "1Gi", "mountPath": "/dev/shm"}}, "spec.checkpoint.mountPath (/dev/shm) must be"),
        ({"dataVolumes": data("/data", "/data")}, "spec.dataVolumes[1].mountPath (/data) is also spec.dataVolumes[0]"),
        (
            {"dataVolumes": data("/data", "/data/sub")},
            "(/data/sub) and spec.dataVolumes[0].mountPath (/data) are nested",
        ),
        (
            {"dataVolumes": data("/data/sub", "/data")},
            "(/data) and spec.dataVolumes[0].mountPath (/data/sub) are nested",
        ),
        (
            {"dataVolumes": data("/data"), "checkpoint": {"size": "1Gi", "mountPath": "/data/ckpt"}},
            "spec.checkpoint.mountPath (/data/ckpt) and spec.dataVolumes[0].mountPath (/data) are nested",
        ),
        (
            {"dataVolumes": data("/data/in"), "checkpoint": {"size": "1Gi", "mountPath": "/data"}},
            "spec.checkpoint.mountPath (/data) and spec.dataVolumes[0].mountPath (/data/in) are nested",
        ),
        # Not normalised: "/data/" would be "/data" to the runtime, but another string to the server.
        ({"dataVolumes": data("/data/")}, "spec.dataVolumes.0.mountPath: String should match pattern"),
        ({"dataVolumes": data("/a/../dev/shm")}, "spec.dataVolumes.0.mountPath: String should match pattern"),
        ({"dataVolumes": data("//dev/shm")}, "spec.dataVolumes.0.mountPath: String should match pattern"),
        ({"dataVolumes": data("/")}, "spec.dataVolumes.0.mountPath: String should match pattern"),
        ({"checkpoint": {"size": "1Gi", "mountPath": "/ckpt/."}}, "spec.checkpoint.mountPath: String should match"),
    ],
)
def test_mount_paths_that_clash_are_rejected(spec, problem):
    errors = errors_of("a", spec)
    assert any(problem in e for e in errors), errors


@pytest.mark.parametrize(
    "spec",
    [
        {"dataVolumes": data("/data", "/database", "/cache"), "checkpoint": {"size": "1Gi"}},
        {"dataVolumes": data("/dev/shmem", "/devices")},
        {"dataVolumes": data("/data/a", "/data/b"), "checkpoint": {"size": "1Gi", "mountPath": "/data/c"}},
        {"dataVolumes": data("/.cache", "/...", "/a..b", "/v1.2/x")},
    ],
)
def test_mount_paths_that_do_not_clash_are_allowed(spec):
    parse_job("a", spec)


def test_the_shared_memory_path_is_the_one_the_builder_mounts():
    assert models.SHM_MOUNT_PATH == workers.SHM_MOUNT_PATH


# ----------------------------------------------------------------------- names


def test_longest_name_fits_every_child_name():
    name = "a" * MAX_JOB_NAME_LENGTH
    parse_job(name, {})
    assert len(f"{name}-worker-{models.MAX_WORKERS - 1}") == 63
    errors = errors_of(name + "a", {})
    assert any(f"at most {MAX_JOB_NAME_LENGTH}" in e for e in errors)


@pytest.mark.parametrize(
    "name",
    ["1job", "-job", "job-", "Job", "job.x", "job_x", "job\n", "job;rm", 'job"}', "job worker", "jöb", ""],
)
def test_names_that_are_not_dns_1035_labels_are_rejected(name):
    assert any("metadata.name" in e for e in errors_of(name, {}))


# ---------------------------------------------------------------- template hash


def test_template_hash_is_stable_and_covers_only_immutable_fields():
    base = {"image": "img:1", "resources": {"gpus": 1}, "workers": {"min": 1, "max": 4}}
    h = parse_job("a", base).template_hash()
    assert h == parse_job("b", dict(base)).template_hash()  # name does not matter
    assert len(h) == 16 and int(h, 16) >= 0
    # scaling and suspending change nothing about the pods' template
    assert parse_job("a", {**base, "workers": {"min": 2, "max": 8, "replicas": 3}}).template_hash() == h
    assert parse_job("a", {**base, "suspend": True, "autoscaling": {"enabled": True}}).template_hash() == h
    # image, resources, env do
    assert parse_job("a", {**base, "image": "img:2"}).template_hash() != h
    assert parse_job("a", {**base, "resources": {"gpus": 2}}).template_hash() != h
    assert parse_job("a", {**base, "env": [{"name": "X", "value": "1"}]}).template_hash() != h


def test_template_hash_does_not_depend_on_how_defaults_were_written():
    assert (
        parse_job("a", {}).template_hash()
        == parse_job("a", {"image": DEFAULT_TRAINER_IMAGE, "env": []}).template_hash()
    )


def test_immutable_fields_exist_on_the_spec():
    assert set(models.IMMUTABLE_FIELDS) <= set(LeptonJobSpec.model_fields)


# ---------------------------------------------------------------------- status


def test_status_parse_drops_unknown_fields_and_renders_kubernetes_times():
    status = parse_status({"phase": "Running", "kopf": {"progress": {}}, "replicas": 2})
    assert status.phase == "Running" and status.replicas == 2
    wire = LeptonJobStatus.model_validate(
        {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "WorkersReady",
                    "lastTransitionTime": "2024-05-01T10:00:00.5+02:00",
                }
            ],
            "lastRescale": {"from": 2, "to": 3, "reason": "ManualScale", "time": "2024-05-01T08:00:00Z"},
        }
    ).to_k8s()
    assert wire["conditions"][0]["lastTransitionTime"] == "2024-05-01T08:00:00Z"
    assert wire["lastRescale"]["from"] == 2
    assert parse_status(None).worker_generation == 0


# -------------------------------------------------------------------- examples

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_the_documented_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"cpu-job.yaml", "gpu-job.yaml", "autoscaling-demo.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_a_valid_job(path):
    """Examples are what users copy: none may drift from the API."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == models.API_VERSION and doc["kind"] == models.KIND
        spec = parse_job(doc["metadata"]["name"], doc.get("spec"))
        assert spec.requested_workers() >= 1


def test_example_shapes_match_their_promises():
    by_name = {p.name: yaml.safe_load(p.read_text()) for p in EXAMPLES}
    cpu = parse_job("cpu-job", by_name["cpu-job.yaml"]["spec"])
    assert cpu.resources.gpus == 0 and cpu.requested_workers() == 2
    gpu = parse_job("gpu-job", by_name["gpu-job.yaml"]["spec"])
    assert gpu.resources.gpus == 8 and gpu.autoscaling.enabled and (gpu.workers.min, gpu.workers.max) == (1, 8)
    assert gpu.checkpoint is not None and gpu.checkpoint.size is not None
    demo = parse_job("autoscaling-demo", by_name["autoscaling-demo.yaml"]["spec"])
    assert demo.resources.gpus == 0 and demo.autoscaling.enabled and (demo.workers.min, demo.workers.max) == (1, 4)
    assert demo.checkpoint is not None and demo.checkpoint.size == "1Gi"
    curve = json.loads(demo.args[demo.args.index("--pace-curve") + 1])
    assert max(curve, key=curve.get) == "4" and curve["4"] - curve["3"] < 0.1 * curve["3"]  # saturates at 3
    assert any(var.name == "LEPTON_MAX_STEPS" for var in demo.env)


def test_status_written_by_a_newer_operator_parses_and_its_unknown_fields_are_ignored():
    status = parse_status(
        {
            "phase": "Running",
            "fencingEpoch": 4,  # unknown top-level field
            "workers": {"desired": 2, "ready": 2, "cordoned": 1},  # unknown nested field
            "rescale": {
                "from": 2,
                "to": 3,
                "reason": "ManualScale",
                "stage": "Starting",
                "startedAt": "2026-01-01T00:00:00Z",
                "targetGeneration": 2,
                "gate": "open",
            },
        }
    )
    assert status.phase == "Running" and status.workers.ready == 2 and status.rescale.to == 3
    assert "fencingEpoch" not in status.to_k8s() and "cordoned" not in status.to_k8s()["workers"]
    # The spec still refuses what it does not know: a typo there must not pass silently.
    with pytest.raises(InvalidJob, match="spec.workers.maximum"):
        parse_job("job", {"workers": {"maximum": 4}})
