"""The README's LeptonJob reference is generated from the CRD and must not drift."""

import pytest

from lepton_operator.api.crd import build_crd
from lepton_operator.api.reference import README, readme_with_reference, reference_markdown

pytestmark = pytest.mark.unit


def test_readme_reference_is_current():
    text = README.read_text()
    assert readme_with_reference(text) == text, "run `lepton-operator reference --write-readme`"


def test_reference_lists_every_spec_field_with_its_description():
    markdown = reference_markdown()
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for name, prop in spec["properties"].items():
        assert f"| `spec.{name}` |" in markdown
        assert prop["description"].split("`")[0][:20] in markdown
    assert "| `spec.autoscaling.efficiencyThreshold` | number | `0.1` | >= 0.0, <= 1.0 |" in markdown


def test_markers_are_required():
    with pytest.raises(ValueError):
        readme_with_reference("no markers here")
