"""InvalidSpec messages stay within the schema's bounds, however many problems a spec has.

A status message over the CRD's maxLength makes the whole status write fail with 422:
the job would never show Failed. So `invalid_spec()` summarises ("...and K more") and
cuts each problem (one may quote user input, like a map key).
"""

from __future__ import annotations

import pytest
from planworld import World, base_spec, running_world

from lepton_operator.api.conditions import CONDITION_INVALID_SPEC, REASON_INVALID_SPEC
from lepton_operator.api.crd import build_crd
from lepton_operator.api.models import (
    CONDITION_MESSAGE_MAX_LENGTH,
    STATUS_MESSAGE_MAX_LENGTH,
    InvalidJob,
    LeptonJobStatus,
    parse_job,
)
from lepton_operator.reconcile.conditions import get_condition
from lepton_operator.reconcile.lifecycle import (
    EVENT_MESSAGE_MAX_LENGTH,
    INVALID_SPEC_PREFIX,
    KEPT_WORKERS_NOTE,
    PROBLEM_MAX_LENGTH,
    summarize_problems,
)

pytestmark = pytest.mark.unit


def hostile_spec() -> dict:
    """A spec with several hundred problems, each within the schema's list bounds."""
    return base_spec(
        args=["x" * 5000] * 256,
        command=["y" * 5000] * 64,
        env=[{"name": f"{i}BAD", "value": "v" * 40000} for i in range(128)],
        nodeSelector={f"key-{i}": "z" * 100 for i in range(32)},
    )


def problems(spec: dict, name: str = "job") -> list[str]:
    with pytest.raises(InvalidJob) as info:
        parse_job(name, spec)
    return info.value.errors


def crd_status_bounds() -> tuple[int, int]:
    status = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    condition = status["properties"]["conditions"]["items"]["properties"]["message"]
    return status["properties"]["message"]["maxLength"], condition["maxLength"]


def assert_within_bounds(status: LeptonJobStatus) -> None:
    status_max, condition_max = crd_status_bounds()
    assert (status_max, condition_max) == (STATUS_MESSAGE_MAX_LENGTH, CONDITION_MESSAGE_MAX_LENGTH)
    LeptonJobStatus.model_validate(status.to_k8s())  # raises past any bound
    assert len(status.message) <= status_max
    assert all(len(c.message) <= condition_max for c in status.conditions)


def shown_and_more(message: str) -> tuple[int, int]:
    """(problems shown, K of '...and K more') of a summary."""
    head, _, tail = message.rpartition("...and ")
    return len(head[len(INVALID_SPEC_PREFIX) :].rstrip("; ").split("; ")), int(tail.split()[0])


def test_a_spec_with_hundreds_of_problems_fails_with_a_status_the_server_accepts():
    spec = hostile_spec()
    total = len(problems(spec))
    assert total >= 500
    w = World(spec)
    p = w.step()  # World stores the status through LeptonJobStatus, as the server would
    assert p.creates == [] and w.status.phase == "Failed"
    assert_within_bounds(p.status)
    message = p.status.message
    assert message.startswith(INVALID_SPEC_PREFIX) and message.endswith(" more")
    shown, more = shown_and_more(message)
    assert shown + more == total and shown >= 5
    cond = get_condition(p.status, CONDITION_INVALID_SPEC)
    assert cond.message == message
    [(kind, reason, event)] = p.events
    assert (kind, reason) == ("Warning", REASON_INVALID_SPEC)
    assert len(event) <= EVENT_MESSAGE_MAX_LENGTH and event.endswith(" more")
    assert sum(shown_and_more(event)) == total
    # The summary is the same every pass: no new event, no churn.
    p = w.step(30)
    assert p.events == [] and w.status.message == message


def test_an_invalid_edit_of_a_running_job_keeps_the_note_within_bounds():
    w = running_world()
    hostile = hostile_spec()
    w.set_spec(**{k: hostile[k] for k in ("args", "command", "env", "nodeSelector")})
    p = w.step()
    assert (p.creates, p.deletes) == ([], []) and w.status.phase == "Running"
    assert_within_bounds(p.status)
    assert p.status.message.endswith(KEPT_WORKERS_NOTE)


def test_a_problem_quoting_a_huge_user_key_is_cut():
    spec = base_spec(nodeSelector={"k" * 100_000: "v" * 64})
    [problem] = problems(spec)
    assert len(problem) > 100_000
    w = World(spec)
    p = w.step()
    assert_within_bounds(p.status)
    assert len(p.status.message) <= len(INVALID_SPEC_PREFIX) + PROBLEM_MAX_LENGTH
    assert p.status.message.endswith("...")


def test_a_few_problems_are_listed_in_full():
    errors = ["spec.workers.min (3) must be <= spec.workers.max (2)", "spec.env[PET_NNODES]: reserved"]
    assert summarize_problems(errors, EVENT_MESSAGE_MAX_LENGTH) == INVALID_SPEC_PREFIX + "; ".join(errors)


@pytest.mark.parametrize("limit", [600, EVENT_MESSAGE_MAX_LENGTH, STATUS_MESSAGE_MAX_LENGTH - len(KEPT_WORKERS_NOTE)])
@pytest.mark.parametrize("count, size", [(1, 2000), (3, 300), (40, 50), (500, 1), (1000, 200), (7, 511), (9, 512)])
def test_a_summary_never_exceeds_its_limit_and_counts_what_it_leaves_out(limit, count, size):
    errors = [f"{i}:" + "p" * size for i in range(count)]
    text = summarize_problems(errors, limit)
    assert len(text) <= limit and text.startswith(INVALID_SPEC_PREFIX)
    if text.endswith(" more"):
        shown, more = shown_and_more(text)
        assert shown + more == count and shown >= 1
    else:
        assert text.count("; ") == count - 1
