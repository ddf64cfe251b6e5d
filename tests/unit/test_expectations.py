"""The operator's expectations: its own creates and deletes overlaid on a lagging index."""

import time

import pytest

from lepton_operator.reconcile.handlers import Expectations

pytestmark = pytest.mark.unit

KEY = ("ns", "job")
NOW = "2026-01-01T00:00:00+00:00"


def pod(name, deleting=False):
    meta = {"name": name, "labels": {"lepton.ai/generation": "1"}}
    if deleting:
        meta["deletionTimestamp"] = NOW
    return {"metadata": meta, "spec": {}, "status": {"phase": "Running"}}


def test_a_created_pod_counts_as_pending_until_the_index_shows_it():
    e = Expectations()
    e.created(KEY, pod("job-worker-1"))
    seen = e.overlay(KEY, [pod("job-worker-0")], NOW)
    assert [p["metadata"]["name"] for p in seen] == ["job-worker-0", "job-worker-1"]
    assert seen[1]["status"] == {"phase": "Pending"}
    # Once the watch delivered it, the index's version is used and the expectation goes.
    indexed = pod("job-worker-1")
    assert e.overlay(KEY, [pod("job-worker-0"), indexed], NOW)[1] is indexed
    assert len(e.overlay(KEY, [pod("job-worker-0")], NOW)) == 1


def test_a_deleted_pod_counts_as_terminating_until_the_index_shows_it():
    e = Expectations()
    e.deleted(KEY, "job-worker-0")
    [shown] = e.overlay(KEY, [pod("job-worker-0")], NOW)
    assert shown["metadata"]["deletionTimestamp"] == NOW
    assert e.overlay(KEY, [], NOW) == []  # gone: nothing is invented
    [again] = e.overlay(KEY, [pod("job-worker-0")], NOW)  # a new pod of that name later
    assert "deletionTimestamp" not in again["metadata"]


def test_expectations_expire_so_the_api_stays_the_truth():
    e = Expectations(ttl=0.01)
    e.created(KEY, pod("job-worker-1"))
    e.deleted(KEY, "job-worker-0")
    time.sleep(0.02)
    [only] = e.overlay(KEY, [pod("job-worker-0")], NOW)
    assert only["metadata"]["name"] == "job-worker-0" and "deletionTimestamp" not in only["metadata"]


def test_jobs_do_not_share_expectations():
    e = Expectations()
    e.created(KEY, pod("job-worker-1"))
    assert e.overlay(("ns", "other"), [], NOW) == []
    e.forget(KEY)
    assert e.overlay(KEY, [], NOW) == []
