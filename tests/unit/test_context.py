"""The operator's in-memory state (reconcile/context.py): one shared context, deduplicated
events, watch health, and expectations (its own creates and deletes overlaid on a lagging index)."""

import asyncio
import copy
import time

import pytest

from lepton_operator import metrics
from lepton_operator.desired import JobRef
from lepton_operator.reconcile.config import OperatorConfig
from lepton_operator.reconcile.context import EventRecorder, Expectations, OperatorContext, WatchHealth, newer
from lepton_operator.reconcile.loop import job_loop
from lepton_operator.reconcile.podcache import PodCache, nothing_waits_on_pods

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
    trigger = ctx.triggers.get(KEY)  # the job's loop takes its trigger when it starts
    ctx.triggers.fire("ns", "job")
    assert trigger.is_set()
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
    health.known(KEY, "5")
    assert health.stale() == [] and not health.behind(KEY, "5")
    health.known(KEY, "7")  # the API answered a version the watch has not delivered
    assert health.behind(KEY, "5") and not health.behind(KEY, "7")
    assert health.stale() == []  # not for long yet
    time.sleep(0.02)
    assert health.stale() == ["ns/job"]
    health.watched(KEY, "6")  # delivered, but not yet what the API answered
    assert health.stale() == ["ns/job"]
    health.watched(KEY, "7")
    assert health.stale() == [] and not health.behind(KEY, "7")


def test_watch_health_ignores_versions_the_watch_already_delivered_and_jobs_it_forgot():
    health = WatchHealth(stale_after=0.0)
    health.watched(KEY, "12")
    health.known(KEY, "9")  # a write's answer arriving after the watch delivered a later event
    health.known(KEY, "12")
    assert health.stale() == [] and not health.behind(KEY, "12")
    health.known(("ns", "never-watched"), "3")  # not a job the watch has shown: nothing to expect
    health.forget(KEY)
    health.known(KEY, "20")  # a late answer for a deleted job must not fail the liveness probe
    time.sleep(0.01)
    assert health.stale() == []


def test_resource_versions_compare_as_numbers_and_otherwise_count_any_difference_as_newer():
    assert newer("10", "9") and not newer("9", "10") and not newer("10", "10")
    assert newer("5", None) and not newer(None, "5")
    assert newer("b", "a") and newer("a", "b") and not newer("a", "a")


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


# ------------------------------------------------------------- a deleted job is forgotten

GONE_KEY, GONE_UID = ("forget-ns", "forget-job"), "forget-uid"


def remembered(ctx: OperatorContext, key, uid) -> list[str]:
    """Every table of the context (a dict attribute of any of its parts) that still holds
    the job's key, or a key that contains its uid; new tables are covered without a change."""
    found = []
    for part_name, part in vars(ctx).items():
        if part_name in ("kube", "config"):
            continue
        tables = {part_name: part} if isinstance(part, dict) else vars(part)
        for name, table in tables.items():
            if isinstance(table, dict) and any(k == key or (isinstance(k, tuple) and uid in k) for k in table):
                found.append(f"{part_name}.{name}")
    return found


def jobs_counted() -> float:
    return sum(s.value for f in metrics.REGISTRY.collect() for s in f.samples if s.name == "lepton_operator_jobs")


def remember_everything(ctx: OperatorContext, key, uid) -> None:
    """What a few passes, the watches, the timers and an event leave about a job."""
    ctx.triggers.get(key)
    ctx.watch.watched(key, "5")
    ctx.watch.known(key, "7")  # lagging
    ctx.expected.created(key, pod("job-worker-1"))
    ctx.expected.deleted(key, "job-worker-0-uid")
    ctx.pods.listed(key, indexed_before=[pod("job-worker-0", uid="ghost")], listed=[])
    ctx.autoscaler_memory(key).reporting_since[1] = NOW
    ctx.taken[key] = frozenset({"Service job-workers"})
    ctx.events.should_post((uid, "Normal", "Rescaling", "2 -> 3"))
    metrics.set_job_phase(*key, "Running")


def test_forget_drops_every_per_job_entry_and_the_phase_and_events_expire():
    ctx = OperatorContext(kube=None, events=EventRecorder(window=0.05))
    counted = jobs_counted()
    remember_everything(ctx, GONE_KEY, GONE_UID)
    remember_everything(ctx, KEY, "other-uid")  # another job, which must keep its entries
    held = remembered(ctx, GONE_KEY, GONE_UID)
    # The probe sees every table (so an empty answer below means something).
    for table in ("triggers._events", "watch.seen", "watch.ahead", "expected._created", "expected._deleted"):
        assert table in held
    for table in ("pods._listed_at", "pods._ghosts", "pods._disagree_since", "autoscaler.autoscaler", "taken.taken"):
        assert table in held
    assert "events._posted" in held and jobs_counted() == counted + 2

    ctx.forget(GONE_KEY)
    assert remembered(ctx, GONE_KEY, GONE_UID) == ["events._posted"]  # until its window passes
    assert jobs_counted() == counted + 1
    ctx.triggers.fire(*GONE_KEY)  # the watch reports the deleted job's pods going away
    assert remembered(ctx, GONE_KEY, GONE_UID) == ["events._posted"]
    time.sleep(0.06)
    ctx.events.should_post(("other-uid", "Normal", "Resumed", "m"))  # any later event prunes
    assert remembered(ctx, GONE_KEY, GONE_UID) == []
    assert len(remembered(ctx, KEY, "other-uid")) == len(held)

    ctx.forget(KEY)
    assert jobs_counted() == counted


def test_the_event_recorder_holds_only_the_events_of_its_window():
    rec = EventRecorder(window=0.05)
    for i in range(1000):
        rec.should_post((f"uid-{i}", "Warning", "Reason", "m"))
    time.sleep(0.06)
    rec.should_post(("uid-last", "Warning", "Reason", "m"))
    assert len(rec._posted) == 1


class DeletingKube:
    """The API as a pass sees it while the job is being deleted (finalizers pending)."""

    def get_job(self, namespace, name):
        meta = {"name": name, "namespace": namespace, "uid": GONE_UID, "resourceVersion": "9"}
        return {"metadata": {**meta, "deletionTimestamp": NOW}, "spec": {}}


def test_when_a_deleted_jobs_loop_ends_nothing_about_the_job_remains():
    ctx = OperatorContext(kube=DeletingKube(), config=OperatorConfig(), events=EventRecorder(window=0.05))
    counted = jobs_counted()
    remember_everything(ctx, GONE_KEY, GONE_UID)
    indexes = {"pods_by_job": {}, "services_by_job": {}, "claims_by_job": {}, "budgets_by_job": {}}
    job = JobRef(name=GONE_KEY[1], namespace=GONE_KEY[0], uid=GONE_UID)
    asyncio.run(asyncio.wait_for(job_loop(ctx, job, indexes, stopped=lambda: False), 10))
    ctx.triggers.fire(*GONE_KEY)
    time.sleep(0.06)
    ctx.events.should_post(("other-uid", "Normal", "Resumed", "m"))
    assert remembered(ctx, GONE_KEY, GONE_UID) == []
    assert jobs_counted() == counted  # the phase gauge no longer counts it


def test_a_settled_job_is_relisted_less_often_than_one_in_motion():
    cache = PodCache(relist_seconds=0.0, settled_relist_seconds=3600)
    cache.listed(KEY, indexed_before=[], listed=[])
    assert cache.relist_due(KEY) and not cache.relist_due(KEY, settled=True)
    cache.request_relist(KEY)  # a delete found its pod gone: list at once, settled or not
    assert cache.relist_due(KEY, settled=True)
    # Never more often than the job-in-motion period.
    slow = PodCache(relist_seconds=3600, settled_relist_seconds=0)
    slow.listed(KEY, indexed_before=[], listed=[])
    assert not slow.relist_due(KEY, settled=True)


def test_jobs_running_steadily_queued_or_finished_are_the_settled_ones():
    assert nothing_waits_on_pods("Running", rescaling=False)
    assert nothing_waits_on_pods("Queued", rescaling=False)  # no workers until admitted
    assert nothing_waits_on_pods("Succeeded", rescaling=False) and nothing_waits_on_pods("Failed", rescaling=False)
    # Starting, moving, or suspending (its workers must be seen gone): every relist period.
    for phase in ("Pending", "Rescaling", "Suspended", ""):
        assert not nothing_waits_on_pods(phase, rescaling=False), phase
    assert not nothing_waits_on_pods("Running", rescaling=True)


def test_watch_health_can_be_read_while_the_api_threads_report_versions():
    import sys
    import threading

    health = WatchHealth(stale_after=0.0)
    keys = [("ns", f"job-{i}") for i in range(200)]
    for key in keys:
        health.watched(key, "1")
    stop = threading.Event()

    def report():  # what the API threads do while the event loop reads the health
        n = 2
        while not stop.is_set():
            for key in keys:
                health.known(key, str(n))
                health.watched(key, str(n))
            n += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a loaded machine does
    threads = [threading.Thread(target=report) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            health.stale()  # raised "dictionary changed size during iteration" at 1,000 jobs
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
