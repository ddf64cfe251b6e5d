"""The demo plots the Grafana dashboard's Throughput panel for each job (issue 16): the
query it sends is the dashboard's own, with the namespace and job variables set."""

import json

import pytest

from lepton_localcluster.demo import DASHBOARD, dashboard_query

pytestmark = pytest.mark.unit


def test_the_demo_sends_the_dashboards_own_throughput_query_for_one_job():
    panel = next(p for p in json.loads(DASHBOARD.read_text())["panels"] if p.get("title") == "Throughput")
    expr = panel["targets"][0]["expr"]
    assert "$namespace" in expr and "$job" in expr
    query = dashboard_query("Throughput", "team-a", "local-demo")
    assert query == expr.replace("$namespace", "team-a").replace("$job", "local-demo")
    assert 'namespace=~"team-a"' in query and 'job_name=~"local-demo"' in query


@pytest.mark.parametrize("name", ["a.b", "a|b", ".*", 'x"}', "Upper"])
def test_a_value_that_is_not_a_dns_label_is_refused(name):
    with pytest.raises(ValueError, match="DNS label"):
        dashboard_query("Throughput", "default", name)
