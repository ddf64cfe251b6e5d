"""The Grafana dashboard of monitoring/dashboards (issue 16): it parses, keeps its uid and
title, reads every panel through the `datasource` variable, each of its PromQL expressions
parses (promtool) once Grafana has put a namespace and a job in, it reads the recording
rules where there is one (so panels and alerts show the same numbers) and otherwise only
metrics the operator or the trainer export, the chart ships the same file in a ConfigMap
for the Grafana sidecar only when asked, and the README lists every panel.

promtool and helm are found as tests/unit/test_monitoring_rules.py and tests/conftest.py
find them (skips without them, fails under CI=true).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import test_chart
import test_monitoring_rules
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "dashboards" / "lepton-jobs.json"
CHART_DASHBOARD = test_chart.CHART / "files" / "dashboards" / "lepton-jobs.json"
RECORDING = ROOT / "monitoring" / "rules" / "recording.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

promtool = test_monitoring_rules.promtool  # the fixture, shared

# What Grafana puts in for the variables: one job, several (a regex alternation), All.
VARIANTS = {"one-job": "train-a", "two-jobs": "(train-a|train-b)", "all-jobs": ".+"}
BUILTINS = {"__rate_interval": "1m", "__interval": "30s", "__range": "6h"}
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")
# A recording rule's name (level:metric:operations; the level may be empty).
RECORDED = re.compile(r"(?<![\w:])([a-z_]*:lepton_[a-z_]+:[a-z0-9_]+)(?![\w:])")
RAW = re.compile(r"(?<![:\w])(lepton_(?:operator|trainer)_[a-z_]+)(?![:\w])")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _variables() -> dict[str, dict]:
    return {v["name"]: v for v in _dashboard()["templating"]["list"]}


def _variable_query(variable: dict) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def _annotations() -> list[dict]:
    return [a for a in _dashboard()["annotations"]["list"] if not a.get("builtIn")]


def _expressions() -> dict[str, str]:
    """Every PromQL expression of the dashboard, by where it is: the panels' targets, the
    annotations, and the series selectors of the query variables' label_values()."""
    found = {}
    for panel in _panels():
        for target in panel["targets"]:
            found[f"panel {panel['id']} ({panel['title']}) {target['refId']}"] = target["expr"]
    for annotation in _annotations():
        found[f"annotation {annotation['name']}"] = annotation["expr"]
    for name, variable in _variables().items():
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", _variable_query(variable))
            assert match, f"variable {name}: not label_values(selector, label)"
            found[f"variable {name}"] = match.group(1)
    return found


def _substitute(expr: str, job: str) -> str:
    values = {"namespace": "team-a", "job": job, **BUILTINS}
    return VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), m.group(0)), expr)


def _recording_rules() -> dict[str, str]:
    rules = yaml.safe_load(RECORDING.read_text())["groups"]
    return {rule["record"]: rule["expr"] for group in rules for rule in group["rules"]}


# ------------------------------------------------------------------------ the file


def test_the_dashboard_parses_and_keeps_its_uid_and_title():
    dashboard = _dashboard()
    assert dashboard["uid"] == "lepton-jobs"  # links and the sidecar's upserts rely on it
    assert dashboard["title"] == "LeptonJobs"
    assert dashboard["schemaVersion"] == 39
    assert dashboard.get("id") is None  # an id would clash with another Grafana's on import


def test_the_chart_ships_the_same_dashboard():
    assert CHART_DASHBOARD.is_file() and CHART_DASHBOARD.read_bytes() == DASHBOARD.read_bytes(), (
        "charts/lepton-operator/files/dashboards/lepton-jobs.json differs from monitoring/dashboards/lepton-jobs.json: "
        "edit monitoring/dashboards and run `cp monitoring/dashboards/*.json charts/lepton-operator/files/dashboards/`"
    )


def test_the_variables_are_datasource_namespace_and_job():
    variables = _variables()
    assert list(variables) == ["datasource", "namespace", "job"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    namespace, job = variables["namespace"], variables["job"]
    for variable in (namespace, job):
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
    assert _variable_query(namespace).endswith(", namespace)")
    assert _variable_query(job).endswith(", job_name)")
    assert 'namespace=~"$namespace"' in _variable_query(job)  # job depends on namespace
    assert job["multi"] is True and job["includeAll"] is True


def test_the_variable_queries_list_the_per_job_recording_rules():
    recorded = _recording_rules()
    for name in ("namespace", "job"):
        selector = _expressions()[f"variable {name}"]
        (pattern,) = re.findall(r'__name__=~"([^"]+)"', selector)
        matched = {record for record in recorded if re.fullmatch(pattern, record)}
        assert matched and all(record.startswith("namespace_job_name:") for record in matched), name


def test_the_rows_are_cluster_then_job_and_every_panel_has_a_place():
    dashboard = _dashboard()
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ["Cluster", "Job"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    job_row_y = rows[1]["gridPos"]["y"]
    for panel in _panels():
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        in_job_row = grid["y"] > job_row_y
        uses_job = any("$job" in t["expr"] for t in panel["targets"])
        assert in_job_row == uses_job, f"{panel['title']}: a Job row panel filters by $job, a Cluster one does not"


# -------------------------------------------------------------------- the queries


def test_every_panel_and_annotation_reads_the_datasource_variable():
    for panel in _panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    assert _annotations()
    for annotation in _annotations():
        assert annotation["datasource"] == DATASOURCE, annotation["name"]


def test_the_variables_are_used_only_as_regex_matchers():
    """Multi-value and All arrive as regexes ("(a|b)", ".+"): only =~ matches them."""
    for where, expr in _expressions().items():
        used = re.findall(r"\$\{?(namespace|job)\b", expr)
        as_regex = re.findall(r'=~"\$\{?(namespace|job)\}?"', expr)
        assert len(used) == len(as_regex), f"{where}: {expr}"


def test_a_rescale_annotation_marks_changes_of_generation_and_world_size():
    exprs = [a["expr"] for a in _annotations()]
    for rule in (
        "namespace_job_name:lepton_trainer_generation:max",
        "namespace_job_name:lepton_trainer_world_size:max",
    ):
        assert any(e.startswith(f"changes({rule}{{") and "$job" in e for e in exprs), rule


def test_every_expression_parses_as_promql_once_the_variables_are_in(promtool, tmp_path):
    names, rules = {}, []
    for variant, job in VARIANTS.items():
        for i, (where, expr) in enumerate(_expressions().items()):
            concrete = _substitute(expr, job)
            assert not re.search(r"\$(?!\d)", concrete), f"{where}: a variable Grafana does not know: {concrete}"
            record = f"dashboard_check_{variant.replace('-', '_')}_{i}"
            names[record] = f"{where} [{variant}]: {concrete}"
            rules.append({"record": record, "expr": concrete})
    path = tmp_path / "dashboard-exprs.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    listing = "\n".join(f"rule {n}: {text}" for n, text in enumerate(names.values(), 1))
    assert proc.returncode == 0, proc.stdout + proc.stderr + "\n" + listing
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_the_raw_per_job_operator_series_land_in_the_jobs_namespace_however_scraped(promtool, tmp_path):
    """Restarts remaining and metrics unavailable have no recording rule: the panels read
    the job's namespace as the rules do, from `exported_namespace` when a scrape without
    honor_labels moved it there, else from `namespace`, and show no other namespace's job."""
    panels = {p["title"]: p for p in _panels()}
    cases = []
    for title, metric in (
        ("Restarts", "lepton_operator_job_restarts_remaining"),
        ("Metrics unavailable", "lepton_operator_job_metrics_unavailable"),
    ):
        (expr,) = [t["expr"] for t in panels[title]["targets"] if metric in t["expr"]]
        operator = 'job="lj-lepton-operator-metrics", instance="10.0.0.9:8081"'
        series = [
            # ServiceMonitor default: the job's namespace moved to exported_namespace.
            (f'{metric}{{namespace="lepton-system", exported_namespace="team-a", job_name="train-a", {operator}}}', 2),
            # honor_labels: the job's namespace kept.
            (f'{metric}{{namespace="team-a", job_name="train-b", {operator}}}', 1),
            # Another namespace's job of the same name, both ways.
            (f'{metric}{{namespace="lepton-system", exported_namespace="team-b", job_name="train-a", {operator}}}', 5),
            (f'{metric}{{namespace="team-b", job_name="train-b", {operator}}}', 5),
        ]
        expected = [
            {"labels": '{namespace="team-a", job_name="train-a"}', "value": 2},
            {"labels": '{namespace="team-a", job_name="train-b"}', "value": 1},
        ]
        for variant, job in VARIANTS.items():
            want = expected[:1] if variant == "one-job" else expected  # one job: train-a
            cases.append(
                {
                    "interval": "1m",
                    "input_series": [{"series": s, "values": f"{v}x5"} for s, v in series],
                    "promql_expr_test": [{"expr": _substitute(expr, job), "eval_time": "3m", "exp_samples": want}],
                }
            )
    path = tmp_path / "dashboard-test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": [], "tests": cases}, sort_keys=False))
    proc = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_recording_rule_the_dashboard_uses_exists():
    recorded = _recording_rules()
    used = {name for expr in _expressions().values() for name in RECORDED.findall(expr)}
    assert len(used) >= 15 and used - recorded.keys() == set()


def test_every_raw_metric_the_dashboard_reads_is_exported():
    read = {name for expr in _expressions().values() for name in RAW.findall(expr)}
    assert read and read - test_monitoring_rules._exported() == set()


def test_the_dashboard_reads_no_metric_raw_that_a_recording_rule_aggregates():
    """Where a recording rule exists the panel uses it, so it shows the alerts' numbers."""
    aggregated = {name for expr in _recording_rules().values() for name in RAW.findall(expr)}
    read = {name for expr in _expressions().values() for name in RAW.findall(expr)}
    assert read & aggregated == set()


# ------------------------------------------------------------------------ the chart


def _dashboard_configmaps(objects: list[dict]) -> list[dict]:
    return [o for o in test_chart.of_kind(objects, "ConfigMap") if "lepton-jobs.json" in o.get("data", {})]


def test_the_dashboard_configmap_is_off_by_default(helm, tmp_path):
    assert _dashboard_configmaps(test_chart.render(helm, tmp_path)) == []
    disabled = {"monitoring": {"dashboard": {"enabled": False}}}
    assert _dashboard_configmaps(test_chart.render(helm, tmp_path, disabled)) == []


def test_the_dashboard_configmap_carries_the_sidecar_label_and_the_json(helm, tmp_path):
    values = {"monitoring": {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "LeptonJobs"}}}}
    (config_map,) = _dashboard_configmaps(test_chart.render(helm, tmp_path, values))
    metadata = config_map["metadata"]
    assert metadata["name"] == f"{test_chart.FULLNAME}-dashboard"
    assert metadata["namespace"] == test_chart.RELEASE_NS
    assert metadata["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label
    assert metadata["labels"]["app.kubernetes.io/instance"] == test_chart.RELEASE
    assert metadata["annotations"] == {"grafana_folder": "LeptonJobs"}
    # The file as it is: Grafana's own {{namespace}} legends untouched by Helm.
    assert config_map["data"] == {"lepton-jobs.json": DASHBOARD.read_text()}


def test_the_dashboard_label_and_namespace_can_be_set(helm, tmp_path):
    dashboard = {"enabled": True, "label": "grafana.example/dashboard", "labelValue": "lepton", "namespace": "grafana"}
    (config_map,) = _dashboard_configmaps(test_chart.render(helm, tmp_path, {"monitoring": {"dashboard": dashboard}}))
    metadata = config_map["metadata"]
    assert metadata["labels"]["grafana.example/dashboard"] == "lepton" and "grafana_dashboard" not in metadata["labels"]
    assert metadata["namespace"] == "grafana"
    assert "annotations" not in metadata


@pytest.mark.parametrize(
    ("dashboard", "complaint"),
    [
        ({"enabled": "yes"}, "enabled"),
        ({"enabled": True, "label": ""}, "label"),
        ({"enabled": True, "label": "grafana dashboard"}, "label"),
        ({"enabled": True, "labelValue": 1}, "labelValue"),
        ({"enabled": True, "namespace": "Grafana"}, "namespace"),
        ({"enabled": True, "annotations": {"grafana_folder": 1}}, "grafana_folder"),
        ({"enabled": True, "folder": "LeptonJobs"}, "folder"),
    ],
    ids=[
        "enabled-not-boolean",
        "empty-label",
        "label-with-space",
        "value-not-string",
        "bad-namespace",
        "annotation-not-string",
        "unknown-key",
    ],
)
def test_schema_rejects_bad_dashboard_values(helm, tmp_path, dashboard, complaint):
    error = test_chart.render_error(helm, tmp_path, {"monitoring": {"dashboard": dashboard}})
    assert "schema" in error and complaint in error, error


# ----------------------------------------------------------------------- the README


def test_the_readme_dashboard_section_lists_every_panel_and_how_to_install_it():
    readme = (ROOT / "README.md").read_text()
    monitoring = readme.split("\n## Monitoring\n", 1)[1].split("\n## ", 1)[0]
    section = monitoring.split("\n### Dashboard\n", 1)[1].split("\n### ", 1)[0]
    for panel in _panels():
        assert f"**{panel['title']}**" in section, f"README's Dashboard section does not list {panel['title']}"
    assert "monitoring.dashboard.enabled=true" in section
    assert "monitoring/dashboards/lepton-jobs.json" in section
