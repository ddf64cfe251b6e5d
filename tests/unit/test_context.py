"""The operator's in-memory state (reconcile/context.py): one shared context, deduplicated
events, watch health, and expectations (its own creates and deletes overlaid on a lagging index)."""

import copy
import time

import pytest

from lepton_operator.reconcile.context import EventRecorder, Expectations, OperatorContext, WatchHealth
from lepton_operator.reconcile.podcache import PodCache

pytestmark = pytest.mark.unit

KEY = ("ns", "job")
NOW = "2026-01-01T00:00:00+00:00"


def pod(name, deleting=False, uid=None):
    meta = {"name": name, "uid": uid or f"{name}-uid", "labels": {"lepton.ai/generation": "1"}}
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
    e.deleted(KEY, "job-worker-0-uid")
    # A new pod that already took the name (the next generation's) is not the deleted one.
    [other, shown] = e.overlay(KEY, [pod("job-worker-0", uid="new"), pod("job-worker-0")], NOW)
    assert "deletionTimestamp" not in other["metadata"]
    assert shown["metadata"]["deletionTimestamp"] == NOW
    assert e.overlay(KEY, [], NOW) == []  # gone: nothing is invented
    [again] = e.overlay(KEY, [pod("job-worker-0")], NOW)  # and forgotten once gone
    assert "deletionTimestamp" not in again["metadata"]


def test_expectations_expire_so_the_api_stays_the_truth():
    e = Expectations(ttl=0.01)
    e.created(KEY, pod("job-worker-1"))
    e.deleted(KEY, "job-worker-0-uid")
    time.sleep(0.02)
    [only] = e.overlay(KEY, [pod("job-worker-0")], NOW)
    assert only["metadata"]["name"] == "job-worker-0" and "deletionTimestamp" not in only["metadata"]


def test_jobs_do_not_share_expectations():
    e = Expectations()
    e.created(KEY, pod("job-worker-1"))
    assert e.overlay(("ns", "other"), [], NOW) == []
    e.forget(KEY)
    assert e.overlay(KEY, [], NOW) == []


def test_kopf_copies_of_the_context_are_the_context():
    # kopf hands each resource a copy.copy() of the operator-wide memo.
    ctx = OperatorContext(kube=None)
    assert copy.copy(ctx) is ctx
    ctx.triggers.fire("ns", "job")
    assert ctx.triggers.get(KEY).is_set()
    ctx.autoscaler_memory(KEY).last_run = 1.0
    ctx.expected.created(KEY, pod("job-worker-1"))
    ctx.forget(KEY)
    assert not ctx.triggers.get(KEY).is_set() and KEY not in ctx.autoscaler
    assert ctx.expected.overlay(KEY, [], NOW) == []


def test_event_recorder_skips_an_identical_event_within_its_window():
    rec = EventRecorder(window=60)
    assert rec.should_post(("uid", "Warning", "ForeignPod", "m"))
    assert not rec.should_post(("uid", "Warning", "ForeignPod", "m"))
    assert rec.should_post(("uid", "Warning", "ForeignPod", "other"))
    assert EventRecorder(window=0).should_post(("k",)) and EventRecorder(window=0).should_post(("k",))


def test_watch_health_turns_stale_when_the_watch_lags_the_api_for_long():
    health = WatchHealth(stale_after=0.01)
    health.watched(KEY, "5")
    health.compare(KEY, "5")
    assert health.stale() == []
    health.compare(KEY, "7")  # the API is ahead of what the watch delivered
    assert health.stale() == []  # not for long yet
    time.sleep(0.02)
    assert health.stale() == ["ns/job"]
    health.watched(KEY, "7")
    health.compare(KEY, "7")
    assert health.stale() == []


def test_pod_cache_drops_ghosts_the_api_no_longer_has_and_reports_a_lasting_disagreement():
    cache = PodCache(relist_seconds=3600, stale_after=0.01)
    assert cache.relist_due(KEY)
    ghost, live = pod("job-worker-1", uid="old"), pod("job-worker-1", uid="new")
    used = cache.listed(KEY, indexed_before=[ghost], listed=[{**live, "kind": "Pod"}])
    assert [p["metadata"]["uid"] for p in used] == ["new"] and not cache.relist_due(KEY)
    # Later passes use the index, without the ghost it still holds.
    assert [p["metadata"]["uid"] for p in cache.view(KEY, [ghost, live])] == ["new"]
    time.sleep(0.02)
    assert cache.stale() == ["ns/job"]  # index and API disagreed and no list has agreed since
    cache.request_relist(KEY)
    assert cache.relist_due(KEY)
    cache.listed(KEY, indexed_before=[live], listed=[live])
    assert cache.stale() == [] and cache.view(KEY, [live]) == [live]
