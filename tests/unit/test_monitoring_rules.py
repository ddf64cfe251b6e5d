"""The Prometheus rules of monitoring/rules (issue 16): promtool accepts every rule file
and passes the rule unit tests in monitoring/rules/tests, each alert has a test that
fires it and one where it must stay quiet, a severity, a summary, a description naming
the job (or the operator instance) and a runbook section in docs/runbooks.md, every
metric a rule reads is one the operator or the trainer exports, and the chart ships the
same files.

promtool comes with Debian's prometheus package (scripts/setup.sh installs it); without
it the promtool tests skip with the reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lepton_operator import metrics as operator_metrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "rules"
RULE_FILES = sorted(RULES.glob("*.yaml"))
TEST_FILES = sorted((RULES / "tests").glob("*.yaml"))
CHART_RULES = ROOT / "charts" / "lepton-operator" / "files" / "rules"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_BASE = "https://github.com/lepton-ai/lepton-operator/blob/main/docs/runbooks.md#"
PROMTOOL = os.environ.get("LEPTON_PROMTOOL_BINARY", "/usr/bin/promtool")


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool; skips without it (fails under CI=true, where set-up installs it)."""
    if os.path.isfile(PROMTOOL) and os.access(PROMTOOL, os.X_OK):
        return PROMTOOL
    found = shutil.which("promtool")
    if found:
        return found
    reason = "promtool is not installed (Debian's prometheus package; scripts/setup.sh installs it)"
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI=true, so this fails")
    pytest.skip(reason)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _rules(kind: str) -> list[dict]:
    """Every rule of the rule files that has the key `kind` ("alert" or "record")."""
    return [rule for path in RULE_FILES for group in _load(path)["groups"] for rule in group["rules"] if kind in rule]


def _alerts() -> list[dict]:
    return _rules("alert")


def test_the_rule_files_and_their_tests_exist():
    assert [p.name for p in RULE_FILES] == ["alerts.yaml", "recording.yaml"]
    assert TEST_FILES, "no promtool tests in monitoring/rules/tests"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_checks_the_rule_file(promtool, path):
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_promtool_rule_unit_tests_pass(promtool, path):
    # promtool resolves rule_files relative to the test file.
    proc = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_must_not():
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for test in _load(path).get("tests", []):
            for case in test.get("alert_rule_test", []):
                (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - fires == set(), "alerts without a test that fires them"
    assert names - quiet == set(), "alerts without a test where they must stay quiet"
    assert (fires | quiet) - names == set(), "tests of alerts that do not exist"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("alert", _alerts(), ids=lambda a: a["alert"])
def test_every_alert_has_severity_summary_description_and_a_runbook(alert):
    assert re.fullmatch(r"Lepton[A-Z][A-Za-z]+", alert["alert"])
    assert alert["labels"]["severity"] in ("warning", "critical")
    annotations = alert["annotations"]
    assert annotations["summary"]
    description = annotations["description"]
    per_job = "job_name" in alert["expr"] and "$labels.job_name" in description
    assert per_job and "$labels.namespace" in description or "$labels.instance" in description
    assert annotations["runbook_url"].startswith(RUNBOOK_BASE)
    anchor = annotations["runbook_url"][len(RUNBOOK_BASE) :]
    assert anchor == alert["alert"].lower()
    assert anchor in _anchors(RUNBOOKS.read_text()), f"docs/runbooks.md has no section #{anchor}"


def test_every_runbook_section_has_what_it_means_what_to_check_and_what_to_do():
    text = RUNBOOKS.read_text()
    for alert in _alerts():
        section = text.split(f"## {alert['alert']}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**Means**", "**Check**", "**Do**"):
            assert part in section, f"{alert['alert']}: runbook section lacks {part}"


def test_recording_rule_names_follow_the_level_metric_operations_convention():
    for rule in _rules("record"):
        level, metric, operations = rule["record"].split(":")
        assert re.fullmatch(r"([a-z]+(_[a-z]+)*)?", level), rule["record"]
        assert re.fullmatch(r"lepton_(trainer|operator)_[a-z_]+", metric), rule["record"]
        assert not metric.endswith("_total"), f"{rule['record']}: drop _total after rate/increase"
        assert re.fullmatch(r"[a-z0-9_]+", operations), rule["record"]


def _exported() -> set[str]:
    """Every metric name the operator and the trainer export (histograms and counters
    with their suffixes)."""
    from lepton_trainer.metrics import TrainerMetrics

    names = set()
    for registry in (operator_metrics.REGISTRY, TrainerMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            # A labelled counter or histogram has no sample before its first use.
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [])
            names.update(family.name + suffix for suffix in suffixes)
            names.update(sample.name for sample in family.samples)
    return names


def test_every_metric_the_rules_read_is_exported():
    exported = _exported()
    read = set()
    for path in RULE_FILES:  # names not inside a recorded name (level:metric:operations)
        read |= set(re.findall(r"(?<![:\w])(lepton_(?:operator|trainer)_[a-z_]+)(?![:\w])", path.read_text()))
    assert len(read) > 10 and read - exported == set()


def test_the_operators_scrape_job_is_matched_but_the_trainers_podmonitor_job_is_not():
    job = re.compile(r'job=~"(.*?)"')
    (pattern,) = set(job.findall((RULES / "alerts.yaml").read_text()))
    assert re.fullmatch(pattern, "lj-lepton-operator-metrics")  # the chart's metrics Service
    assert not re.fullmatch(pattern, "lepton-system/lj-lepton-operator-trainers")  # the PodMonitor's job
    assert not re.fullmatch(pattern, "lepton-trainer")  # scaling/scrape.py's job


@pytest.mark.parametrize("name", ["recording.yaml", "alerts.yaml"])
def test_the_chart_ships_the_same_rule_files(name):
    copy = CHART_RULES / name
    assert copy.is_file() and copy.read_bytes() == (RULES / name).read_bytes(), (
        f"charts/lepton-operator/files/rules/{name} differs from monitoring/rules/{name}: "
        "edit monitoring/rules and run `cp monitoring/rules/*.yaml charts/lepton-operator/files/rules/`"
    )


def test_the_readme_monitoring_section_describes_every_rule_and_alert():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Monitoring\n", 1)[1].split("\n## ", 1)[0]
    for alert in _alerts():
        assert f"[`{alert['alert']}`](docs/runbooks.md#{alert['alert'].lower()})" in section, alert["alert"]
    for rule in _rules("record"):
        assert f"`{rule['record']}`" in section, f"README's Monitoring section does not describe {rule['record']}"
