"""Failure classification of worker pods: the ExitCode rule and cluster-made failures."""

import pytest

from lepton_operator.reconcile.failures import classify_exit_code, classify_pod, is_ready, is_scheduled, is_terminating

pytestmark = pytest.mark.unit


def pod(phase, *codes, reason=None, conditions=(), node=None, deleting=False):
    statuses = [{"name": f"c{i}", "state": {"terminated": {"exitCode": c}}} for i, c in enumerate(codes)]
    status = {"phase": phase, "containerStatuses": statuses, "conditions": list(conditions)}
    if reason:
        status["reason"] = reason
    meta = {"name": "job-worker-1"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}, "status": status}


@pytest.mark.parametrize(
    "code, outcome",
    [
        (0, "succeeded"),
        (1, "permanent"),
        (2, "permanent"),
        (127, "permanent"),
        (128, "retryable"),
        (137, "retryable"),
        (143, "retryable"),
        (170, "retryable"),
        (255, "retryable"),
    ],
)
def test_exit_code_rule(code, outcome):
    assert classify_exit_code(code) == outcome
    if code:
        assert classify_pod(pod("Failed", code)).outcome == outcome


def test_success_running_pending():
    assert classify_pod(pod("Succeeded", 0)).outcome == "succeeded"
    assert classify_pod(pod("Running")).outcome == "running"
    assert classify_pod(pod("Pending")).outcome == "pending"
    assert classify_pod({"metadata": {"name": "x"}}).outcome == "pending"


@pytest.mark.parametrize("reason", ["Evicted", "Preempting", "NodeLost", "Shutdown", "OutOfnvidia.com/gpu"])
def test_cluster_made_failures_are_disruptions_whatever_the_code(reason):
    # An evicted pod's container may report 1 or nothing at all: the node took it away.
    assert classify_pod(pod("Failed", 1, reason=reason)).outcome == "disrupted"
    assert classify_pod(pod("Failed", reason=reason)).outcome == "disrupted"
    assert classify_pod(pod("Failed", reason=reason)).failed


def test_disruption_condition_and_unknown_phase_are_disruptions():
    disrupted = pod("Failed", 1, conditions=[{"type": "DisruptionTarget", "status": "True"}])
    assert classify_pod(disrupted).outcome == "disrupted"
    assert classify_pod(pod("Unknown")).outcome == "disrupted"


def test_failed_without_exit_code_is_retryable():
    assert classify_pod(pod("Failed")).outcome == "retryable"


def test_permanent_code_wins_over_a_signal_in_another_container():
    outcome = classify_pod(pod("Failed", 137, 3))
    assert (outcome.outcome, outcome.exit_code) == ("permanent", 3)


def test_negative_codes_are_signals():
    outcome = classify_pod(pod("Failed", -9))
    assert (outcome.outcome, outcome.exit_code) == ("retryable", 137)


def test_describe_names_worker_and_code():
    text = classify_pod(pod("Failed", 1)).describe("job-worker-1")
    assert "job-worker-1" in text and "code 1" in text


def test_predicates():
    ready = pod("Running", conditions=[{"type": "Ready", "status": "True"}], node="n1")
    assert is_ready(ready) and is_scheduled(ready) and not is_terminating(ready)
    assert not is_ready(pod("Running", conditions=[{"type": "Ready", "status": "False"}]))
    assert not is_scheduled(pod("Pending"))
    assert is_terminating(pod("Running", deleting=True))
