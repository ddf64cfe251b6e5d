"""The chart passes the operator's client-side rate limit (`operator.apiQps`,
`operator.apiBurst`) as `--api-qps` and `--api-burst`, the operator's own parser accepts
what it renders, and the schema refuses a limit the operator would refuse."""

from __future__ import annotations

import pytest
from test_chart import one, render, render_error

from lepton_operator.cli import build_parser
from lepton_operator.reconcile.kube import DEFAULT_API_BURST, DEFAULT_API_QPS

pytestmark = pytest.mark.unit


def _args(objects: list[dict]) -> list[str]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


def _flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, args
    return args[args.index(name) + 1]


def test_the_default_limits_reach_the_operator_and_match_its_own_defaults(helm, tmp_path):
    args = _args(render(helm, tmp_path))
    assert float(_flag(args, "--api-qps")) == DEFAULT_API_QPS
    assert int(_flag(args, "--api-burst")) == DEFAULT_API_BURST
    parsed = build_parser().parse_args(args)
    assert (parsed.api_qps, parsed.api_burst) == (DEFAULT_API_QPS, DEFAULT_API_BURST)


@pytest.mark.parametrize(
    "qps, burst, expected",
    [
        (12.5, 40, (12.5, 40)),
        (0, 1, (0.0, 1)),  # 0: unlimited
        (2000, 1000000, (2000.0, 1000000)),  # a large burst stays a whole number (not 1e+06)
    ],
)
def test_set_limits_render_as_flags_the_operator_parses(helm, tmp_path, qps, burst, expected):
    args = _args(render(helm, tmp_path, {"operator": {"apiQps": qps, "apiBurst": burst}}))
    parsed = build_parser().parse_args(args)
    assert (parsed.api_qps, parsed.api_burst) == expected


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"operator": {"apiQps": -1}}, "apiQps"),
        ({"operator": {"apiBurst": 0}}, "apiBurst"),
        ({"operator": {"apiBurst": 2.5}}, "apiBurst"),
        ({"operator": {"apiQPS": 10}}, "apiQPS"),  # a misspelt key fails, not ignored
    ],
)
def test_schema_rejects_bad_limits(helm, tmp_path, values, complaint):
    error = render_error(helm, tmp_path, values)
    assert "schema" in error and complaint in error, error
