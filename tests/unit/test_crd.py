"""The generated CRD: in sync with the committed file, structural, documented and bounded.

What this protects: `kubectl explain lj.spec...` explains every field; the apiserver
bounds every string, list and number a user can send (hostile input is rejected before
the operator sees it); `kubectl scale` and `kubectl get lj` work; and nobody edits the
committed YAML by hand or forgets to regenerate it after changing the models.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from lepton_operator.api import crd_cli, models
from lepton_operator.api.crd import (
    GENERATED_HEADER,
    build_crd,
    crd_for_server,
    yaml_dump_crd,
)

pytestmark = pytest.mark.unit


def schema() -> dict:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict, path: str = ""):
    """Yield (path, node) for every schema node below `node`."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


# ----------------------------------------------------------------------- drift


def test_committed_crd_file_matches_the_models():
    diff = crd_cli.drift()
    assert not diff, "crds/leptonjobs.lepton.ai.yaml is stale; run `lepton-operator crd --write`:\n" + "".join(diff)


def test_check_command_exits_1_on_drift_and_0_when_in_sync(tmp_path):
    stale = tmp_path / "crd.yaml"
    stale.write_text(yaml_dump_crd().replace("maxLength: 52", "maxLength: 63"))
    cmd = [sys.executable, "-m", "lepton_operator.api.crd_cli", "--check", "--file"]
    result = subprocess.run(cmd + [str(stale)], capture_output=True, text=True)
    assert result.returncode == 1 and "maxLength: 52" in result.stdout
    fresh = tmp_path / "fresh.yaml"
    assert (
        subprocess.run(
            [sys.executable, "-m", "lepton_operator.api.crd_cli", "--write", "--file", str(fresh)]
        ).returncode
        == 0
    )
    assert subprocess.run(cmd + [str(fresh)], capture_output=True).returncode == 0
    assert subprocess.run(cmd + [str(tmp_path / "missing.yaml")], capture_output=True).returncode == 1


def test_yaml_is_stable_and_says_it_is_generated():
    text = yaml_dump_crd()
    assert text == yaml_dump_crd()
    assert text.startswith(GENERATED_HEADER) and "GENERATED" in text.splitlines()[0]
    assert yaml.safe_load(text) == build_crd()
    assert "&id" not in text and "*id" not in text  # no YAML aliases


# ------------------------------------------------------------------ structure


def test_names_scope_and_version():
    crd = build_crd()
    assert crd["metadata"]["name"] == "leptonjobs.lepton.ai"
    spec = crd["spec"]
    assert spec["group"] == models.GROUP and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "plural": "leptonjobs",
        "singular": "leptonjob",
        "kind": "LeptonJob",
        "listKind": "LeptonJobList",
        "shortNames": ["lj"],
        "categories": ["lepton"],
    }
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]


def test_schema_is_structural():
    for path, node in walk(schema()):
        assert "$ref" not in node and "anyOf" not in node and "oneOf" not in node and "allOf" not in node, path
        assert "title" not in node, path
        if path != ".metadata":
            assert "type" in node, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        assert node.get("default", 0) not in (None, ""), f"{path}: null/empty defaults break 1.20"


def test_no_unknown_fields_are_preserved_in_spec():
    text = yaml.safe_dump(schema()["properties"]["spec"])
    assert "x-kubernetes-preserve-unknown-fields" not in text
    assert "x-kubernetes-int-or-string" not in text


def test_every_property_has_a_description():
    # Named properties and object items; scalar list items and map values (`command[]`,
    # `nodeSelector{}`) are explained by their list's description.
    missing = [
        path
        for path, node in walk(schema())
        if path
        and path != ".metadata"
        and not node.get("description")
        and not (path.endswith(("[]", "{}")) and node["type"] != "object")
    ]
    assert not missing, f"no description (kubectl explain shows nothing): {missing}"


def test_every_spec_value_is_bounded():
    """Strings have maxLength (or an enum), lists maxItems, maps maxProperties, numbers both bounds."""
    unbounded = []
    for path, node in walk(schema()["properties"]["spec"], ".spec"):
        kind = node.get("type")
        if kind == "string" and "enum" not in node and "maxLength" not in node:
            unbounded.append(path)
        elif kind == "array" and "maxItems" not in node:
            unbounded.append(path)
        elif kind == "object" and "additionalProperties" in node and "maxProperties" not in node:
            unbounded.append(path)
        elif kind in ("integer", "number") and not ("minimum" in node and "maximum" in node):
            unbounded.append(path)
    assert not unbounded, unbounded


def test_optional_fields_are_not_required_and_required_ones_are():
    spec = schema()["properties"]["spec"]
    assert "required" not in spec  # every spec field has a default
    env_item = spec["properties"]["env"]["items"]
    assert env_item["required"] == ["name"]
    assert spec["properties"]["dataVolumes"]["items"]["required"] == ["claimName", "mountPath"]


def test_static_defaults_match_the_model():
    spec = schema()["properties"]["spec"]
    props = spec["properties"]
    assert props["image"]["default"] == models.DEFAULT_TRAINER_IMAGE
    assert props["rendezvousPort"]["default"] == models.DEFAULT_RENDEZVOUS_PORT
    assert props["workers"]["properties"]["min"]["default"] == 1
    # nested objects default to {} so the apiserver fills in their own defaults
    assert props["workers"]["default"] == {} and props["autoscaling"]["default"] == {}
    assert props["env"]["default"] == [] and props["nodeSelector"]["default"] == {}
    assert "default" not in props["checkpoint"]  # Optional: absent means "no checkpoints"
    assert props["autoscaling"]["properties"]["efficiencyThreshold"]["default"] == 0.1


def test_enums_come_from_literals():
    props = schema()["properties"]
    assert props["status"]["properties"]["phase"]["enum"] == list(models.PHASES)
    assert props["spec"]["properties"]["imagePullPolicy"]["enum"] == ["Always", "IfNotPresent", "Never"]


def test_metadata_name_is_limited_so_child_names_stay_dns_labels():
    metadata = schema()["properties"]["metadata"]
    # The apiserver forbids anything on metadata but `type` and name/generateName limits.
    assert set(metadata) == {"type", "properties"} and set(metadata["properties"]) == {"name"}
    name = metadata["properties"]["name"]
    assert name["maxLength"] == models.MAX_JOB_NAME_LENGTH
    assert re.fullmatch(name["pattern"].strip("^$"), "a" * models.MAX_JOB_NAME_LENGTH)
    assert not re.match(name["pattern"], "1job")  # `1job-workers` is not a valid Service name
    assert len("a" * models.MAX_JOB_NAME_LENGTH + f"-worker-{models.MAX_WORKERS - 1}") == 63


# --------------------------------------------------------------- subresources


def resolve(path: str) -> dict:
    node = schema()
    for part in path.lstrip(".").split("."):
        node = node["properties"][part]
    return node


def test_scale_subresource_paths_exist_in_the_schema():
    version = build_crd()["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    assert version["subresources"]["status"] == {}
    assert resolve(scale["specReplicasPath"])["type"] == "integer"
    assert resolve(scale["statusReplicasPath"])["type"] == "integer"
    assert resolve(scale["labelSelectorPath"])["type"] == "string"
    assert scale["specReplicasPath"] == ".spec.workers.replicas"


def test_printer_columns_point_at_schema_fields():
    columns = build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    names = [c["name"] for c in columns]
    for wanted in ("Phase", "Ready", "Workers", "Min", "Max", "Throughput", "Age"):
        assert wanted in names
    for column in columns:
        if column["jsonPath"].startswith((".spec", ".status")):
            node = resolve(column["jsonPath"])
            expected = {"string": "string", "integer": "integer", "number": "number"}[node["type"]]
            assert column["type"] == expected, column


def test_conditions_are_a_map_keyed_by_type():
    conditions = schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


# ------------------------------------------------------------------ CEL rules


def rules_at(node: dict) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def test_cel_rules_mirror_the_operator_checks():
    spec = schema()["properties"]["spec"]
    props = spec["properties"]
    assert "self.min <= self.max" in rules_at(props["workers"])
    assert any("self.initial" in r for r in rules_at(props["workers"]))
    assert "has(self.claimName) != has(self.size)" in rules_at(props["checkpoint"])
    env_rules = " ".join(rules_at(props["env"]["items"]))
    for name in models.RESERVED_ENV_NAMES:
        assert f"'{name}'" in env_rules
    for prefix in models.RESERVED_ENV_PREFIXES:
        assert f"startsWith('{prefix}')" in env_rules


def test_quantities_carry_the_grammar_and_a_created_claim_a_positive_size():
    spec = schema()["properties"]["spec"]["properties"]
    for node in (spec["resources"]["properties"]["cpu"], spec["checkpoint"]["properties"]["size"]):
        assert node["pattern"] == models.NON_NEGATIVE_QUANTITY_PATTERN
    assert any(models.POSITIVE_QUANTITY_PREFIX in r for r in rules_at(spec["checkpoint"]))


def test_cel_rules_mirror_the_mount_path_and_claim_size_checks():
    props = schema()["properties"]["spec"]["properties"]
    shm = f"'{models.SHM_MOUNT_PATH}'"
    assert any(shm in r for r in rules_at(props["checkpoint"]))
    assert any(shm in r for r in rules_at(props["dataVolumes"]["items"]))
    assert any("exists_one" in r and "startsWith" in r for r in rules_at(props["dataVolumes"]))
    assert any("self.dataVolumes.all" in r for r in rules_at(schema()["properties"]["spec"]))
    assert any(models.POSITIVE_QUANTITY_PREFIX in r for r in rules_at(props["checkpoint"]))
    # The string tests of those rules are exact only for normalised paths: the schema insists.
    assert props["checkpoint"]["properties"]["mountPath"]["pattern"] == models.MOUNT_PATH_PATTERN
    assert props["dataVolumes"]["items"]["properties"]["mountPath"]["pattern"] == models.MOUNT_PATH_PATTERN


def test_status_messages_carry_the_bounds_the_operator_keeps():
    status = schema()["properties"]["status"]["properties"]
    assert status["message"]["maxLength"] == models.STATUS_MESSAGE_MAX_LENGTH
    assert status["conditions"]["items"]["properties"]["message"]["maxLength"] == models.CONDITION_MESSAGE_MAX_LENGTH


def test_immutable_fields_have_transition_rules():
    spec = schema()["properties"]["spec"]
    for field in models.IMMUTABLE_FIELDS:
        key = models.LeptonJobSpec.model_fields[field].alias or field
        assert "self == oldSelf" in rules_at(spec["properties"][key]), key
    # Optional ones also may not appear or disappear
    assert "has(self.checkpoint) == has(oldSelf.checkpoint)" in rules_at(spec)
    # mutable fields stay mutable
    for key in ("workers", "suspend", "autoscaling"):
        assert not any("oldSelf" in r for r in rules_at(spec["properties"][key])), key


def test_old_servers_get_the_crd_without_cel_rules():
    assert "x-kubernetes-validations" in yaml_dump_crd(crd_for_server("1.27"))
    for old in ("1.20", "v1.20.2", "1.24+"):
        stripped = yaml_dump_crd(crd_for_server(old))
        assert "x-kubernetes-validations" not in stripped
        assert "maxLength: 52" in stripped and "specReplicasPath" in stripped
    assert (
        crd_for_server("1.20")["spec"]["versions"][0]["subresources"]
        == build_crd()["spec"]["versions"][0]["subresources"]
    )
    with pytest.raises(ValueError):
        crd_for_server("latest")
