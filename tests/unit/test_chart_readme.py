"""The chart README's value table is generated from values.yaml's comments and current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def generator():
    spec = importlib.util.spec_from_file_location("chart_readme", ROOT / "scripts" / "chart_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chart_readme_is_current():
    gen = generator()
    assert gen.README.read_text() == gen.render(), "run `python scripts/chart_readme.py --write`"


def test_every_policy_and_network_value_is_documented():
    gen = generator()
    text = (gen.CHART / "values.yaml").read_text()
    documented = {key for key, _ in gen.documented_values(text)}
    values = yaml.safe_load(text)

    def leaves(node, prefix):
        for key, value in node.items():
            path = f"{prefix}.{key}"
            if isinstance(value, dict) and value:
                yield from leaves(value, path)
            else:
                yield path

    for section in ("policy", "networkPolicy"):
        assert set(leaves(values[section], section)) <= documented
