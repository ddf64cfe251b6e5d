"""The operator's own metrics (lepton_operator/metrics.py): the phase gauge counts the jobs
this operator reconciles, and a job that is forgotten leaves no trace in the registry."""

from __future__ import annotations

import pytest

from lepton_operator import metrics

pytestmark = pytest.mark.unit


def samples() -> list:
    """Every sample the operator's registry would expose on /metrics."""
    return [s for family in metrics.REGISTRY.collect() for s in family.samples]


def jobs_in(phase: str) -> float:
    """The gauge's value for the phase (0 before the first job set it)."""
    values = [s.value for s in samples() if s.name == "lepton_operator_jobs" and s.labels == {"phase": phase}]
    return sum(values)


def mentions(namespace: str, name: str) -> list:
    """Samples with the job's namespace or name in a label value."""
    return [s for s in samples() if {namespace, name} & set(s.labels.values())]


def test_the_phase_gauge_counts_jobs_and_forgets_them():
    running, failed = jobs_in("Running"), jobs_in("Failed")
    metrics.set_job_phase("metrics-ns", "a", "Running")
    metrics.set_job_phase("metrics-ns", "b", "Running")
    assert jobs_in("Running") == running + 2
    metrics.set_job_phase("metrics-ns", "b", "Failed")  # a job counts in one phase only
    assert (jobs_in("Running"), jobs_in("Failed")) == (running + 1, failed + 1)
    metrics.forget_job("metrics-ns", "a")
    metrics.forget_job("metrics-ns", "b")
    metrics.forget_job("metrics-ns", "b")  # twice: harmless
    assert (jobs_in("Running"), jobs_in("Failed")) == (running, failed)


def test_a_job_without_a_phase_counts_as_unknown_until_forgotten():
    unknown = jobs_in("Unknown")
    metrics.set_job_phase("metrics-ns", "new", None)
    assert jobs_in("Unknown") == unknown + 1
    metrics.forget_job("metrics-ns", "new")
    assert jobs_in("Unknown") == unknown


def test_no_series_is_labelled_by_job_so_a_deleted_job_leaves_none():
    # Series per job would grow with every job ever run; the gauge is by phase only.
    metrics.set_job_phase("metrics-ns-x", "metrics-job-x", "Running")
    metrics.count_rescale("ManualScale")
    metrics.count_restarts(1)
    with metrics.time_reconcile():
        pass
    assert mentions("metrics-ns-x", "metrics-job-x") == []
    metrics.forget_job("metrics-ns-x", "metrics-job-x")
    assert mentions("metrics-ns-x", "metrics-job-x") == []
    phases = {s.labels["phase"] for s in samples() if s.name == "lepton_operator_jobs"}
    assert phases == {*metrics.PHASES, "Unknown"}  # a bounded set of series
