"""Checkpoint files: atomic writes, checksums, generation fencing, keep-last-K, damaged
files moved aside, unreadable ones kept."""

import errno
import os
import socket
import threading
import time

import pytest

torch = pytest.importorskip("torch", reason="trainer tests need torch: pip install -e '.[trainer]'")

from lepton_trainer import checkpoint
from lepton_trainer.checkpoint import (
    CheckpointStore,
    CheckpointTimer,
    StaleGeneration,
    UnreadableCheckpoints,
)

pytestmark = pytest.mark.unit


def _state(step):
    return {"step": step, "data_position": step * 8, "synthetic": False, "weights": torch.arange(1000.0) * step}


def _store(directory, generation=0, keep=3):
    return CheckpointStore(directory, keep=keep, generation=generation, retry_delays=(0.0, 0.01))


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_save_and_load_latest(tmp_path):
    store = _store(tmp_path, generation=2)
    for step in (10, 20, 30):
        store.save(_state(step))
    path, state = store.latest_valid()
    assert path.name == "ckpt-g0002-s000000030.ckpt" and state["data_position"] == 240
    assert path.read_bytes().startswith(checkpoint.MAGIC)


def test_keeps_only_the_last_k(tmp_path):
    store = _store(tmp_path, keep=2)
    for step in range(1, 6):
        store.save(_state(step))
    assert [s for s, _ in store.list()] == [5, 4]


def test_pruning_goes_by_generation_then_step(tmp_path):
    _store(tmp_path, generation=1).save(_state(900))
    newer = _store(tmp_path, generation=2, keep=2)
    newer.save(_state(5))
    assert [(e.generation, e.step) for e in newer.entries()] == [(2, 5), (1, 900)]  # g1 kept: within K
    newer.save(_state(6))
    assert [(e.generation, e.step) for e in newer.entries()] == [(2, 6), (2, 5)]  # g1 s900 is the oldest


def test_loading_prefers_the_higher_generation_over_a_higher_step(tmp_path):
    _store(tmp_path, generation=1).save(_state(900))
    _store(tmp_path, generation=2).save(_state(5))
    path, state = _store(tmp_path, generation=3).latest_valid()
    assert state["step"] == 5 and path.name == "ckpt-g0002-s000000005.ckpt"


def test_a_stale_generation_writer_is_refused_and_the_newer_checkpoint_untouched(tmp_path):
    old, new = _store(tmp_path, generation=4), _store(tmp_path, generation=5)
    old.save(_state(100))
    newest = new.save(_state(101))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(StaleGeneration, match="generation 5 owns"):
        old.save(_state(102))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no write, no prune, no temp
    path, state = new.latest_valid()
    assert path == newest and state["step"] == 101
    assert new.save(_state(103)).exists()  # the newest generation keeps writing


def test_a_claim_fences_older_writers_before_the_new_generation_writes(tmp_path):
    old = _store(tmp_path, generation=4)
    old.save(_state(100))
    _store(tmp_path, generation=5).claim()  # generation 5 started and is loading g4 s100
    with pytest.raises(StaleGeneration):
        old.save(_state(150))
    assert [(e.generation, e.step) for e in old.entries()] == [(4, 100)]
    with pytest.raises(StaleGeneration):
        old.claim()  # a restarted old generation does not get in either


def test_claims_of_older_generations_are_pruned(tmp_path):
    for generation in (1, 2, 3):
        _store(tmp_path, generation=generation).claim()
    _store(tmp_path, generation=3).save(_state(1))
    assert _names(tmp_path) == ["ckpt-g0003-s000000001.ckpt", "claim-g0003"]


def test_steps_past_10_to_the_8_sort_and_load(tmp_path):
    store = _store(tmp_path, keep=3)
    for step in (99_999_998, 99_999_999, 100_000_000, 100_000_001):
        store.save(_state(step))
    assert [s for s, _ in store.list()] == [100_000_001, 100_000_000, 99_999_999]
    assert store.latest_valid()[1]["step"] == 100_000_001


def test_format_1_files_are_still_read_at_any_width(tmp_path):
    # The old writer: a bare torch.save named ckpt-<step, 8 digits>.pt (9 digits past 10^8).
    for step in (99_999_999, 100_000_000):
        torch.save({"format": 1, **_state(step)}, tmp_path / f"ckpt-{step:08d}.pt")
    store = _store(tmp_path)
    assert store.latest_valid()[1]["step"] == 100_000_000
    store.save(_state(7))  # any new checkpoint is newer than every format-1 one
    assert store.latest_valid()[1]["step"] == 7


def test_truncated_checkpoint_is_skipped_and_moved_aside(tmp_path, capsys):
    store = _store(tmp_path)
    store.save(_state(10))
    good = store.save(_state(20))
    data = good.read_bytes()
    store.path_for(0, 30).write_bytes(data[: len(data) // 2])  # a write cut in the middle
    path, state = store.latest_valid()
    assert state["step"] == 20 and path == good
    out = capsys.readouterr().out
    assert "event=checkpoint_skipped" in out and "truncated" in out
    assert (tmp_path / "ckpt-g0000-s000000030.ckpt.corrupt").exists()
    assert [s for s, _ in store.list()] == [20, 10]


def test_checksum_mismatch_is_moved_aside(tmp_path, capsys):
    store = _store(tmp_path)
    store.save(_state(10))
    bad = store.save(_state(20))
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit of payload: same size, still a zip maybe, wrong bytes
    bad.write_bytes(bytes(data))
    assert store.latest_valid()[1]["step"] == 10
    assert "sha256 mismatch" in capsys.readouterr().out
    assert not bad.exists() and bad.with_name(bad.name + ".corrupt").exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",
        lambda data: b"PK\x03\x04" + data[4:],  # not our magic
        lambda data: data.split(b"\n", 1)[0] + b"\n{not json",  # cut in the header
    ],
    ids=["empty", "bad-magic", "bad-header"],
)
def test_other_damage_is_moved_aside(tmp_path, damage):
    store = _store(tmp_path)
    store.save(_state(1))
    bad = store.save(_state(2))
    bad.write_bytes(damage(bad.read_bytes()))
    assert store.latest_valid()[1]["step"] == 1
    assert bad.with_name(bad.name + ".corrupt").exists()


def test_checkpoint_with_wrong_content_is_skipped(tmp_path):
    store = _store(tmp_path)
    store.save(_state(5))
    torch.save({"step": 9}, tmp_path / "ckpt-00000009.pt")  # loads, but is not ours
    assert store.latest_valid()[1]["step"] == 5


def _failing_reads(monkeypatch, name, err=errno.EIO):
    """Make reading ``name`` fail with ``err``; returns the list of attempts."""
    attempts = []
    real = checkpoint._read_bytes

    def read(path):
        if path.name == name:
            attempts.append(path)
            raise OSError(err, os.strerror(err), str(path))
        return real(path)

    monkeypatch.setattr(checkpoint, "_read_bytes", read)
    return attempts


@pytest.mark.parametrize("err", [errno.EIO, errno.ESTALE, errno.ETIMEDOUT])
def test_a_transient_read_error_is_retried_keeps_the_file_and_falls_back(tmp_path, monkeypatch, capsys, err):
    store = _store(tmp_path)
    store.save(_state(10))
    newest = store.save(_state(20))
    attempts = _failing_reads(monkeypatch, newest.name, err)
    assert store.latest_valid()[1]["step"] == 10  # this start falls back...
    assert len(attempts) == 3  # the first try and one per retry delay
    assert newest.exists() and not list(tmp_path.glob("*.corrupt"))  # ...but nothing is buried
    out = capsys.readouterr().out
    assert out.count("event=checkpoint_read_retry") == 2 and "moved_to=-" in out
    monkeypatch.undo()
    assert store.latest_valid()[1]["step"] == 20  # the storage recovered: the newest again


def test_a_read_error_that_clears_on_retry_loads_the_newest(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.save(_state(10))
    newest = store.save(_state(20))
    real, calls = checkpoint._read_bytes, []

    def flaky(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(checkpoint, "_read_bytes", flaky)
    path, state = store.latest_valid()
    assert path == newest and state["step"] == 20 and calls == [newest, newest]


def test_if_no_checkpoint_can_be_read_the_start_fails_retryably_instead_of_fresh(tmp_path, monkeypatch):
    store = _store(tmp_path)
    only = store.save(_state(10))
    _failing_reads(monkeypatch, only.name)
    with pytest.raises(UnreadableCheckpoints):
        store.latest_valid()
    assert only.exists()


def test_a_permanent_read_error_is_not_retried_and_not_buried(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.save(_state(10))
    newest = store.save(_state(20))
    attempts = _failing_reads(monkeypatch, newest.name, errno.EACCES)
    assert store.latest_valid()[1]["step"] == 10
    assert len(attempts) == 1 and newest.exists()


def test_no_checkpoints(tmp_path):
    assert CheckpointStore(tmp_path / "missing").latest_valid() == (None, None)


def test_the_directory_is_created_even_by_many_at_once(tmp_path):
    job_dir = tmp_path / "claim" / "uid-1234"  # <mountPath>/<job uid>: neither exists yet
    errors = []

    def claim(generation):
        try:
            _store(job_dir, generation=generation).claim()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(0,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and job_dir.is_dir() and _names(job_dir) == ["claim-g0000"]


def test_two_jobs_under_one_claim_never_see_each_other(tmp_path):
    job_a, job_b = _store(tmp_path / "uid-a", generation=7), _store(tmp_path / "uid-b", generation=1)
    job_a.claim()
    job_a.save(_state(500))
    job_b.claim()  # a lower generation, but another job: not fenced
    assert job_b.latest_valid() == (None, None)
    job_b.save(_state(3))
    assert job_a.latest_valid()[1]["step"] == 500 and job_b.latest_valid()[1]["step"] == 3
    assert _store(tmp_path).entries() == []  # the claim's root holds no checkpoint of either


def test_interrupted_write_leaves_no_visible_file(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.save(_state(1))

    def crash(fd):
        raise OSError(errno.ENOSPC, "disk full")

    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(OSError):
        store.save(_state(2))
    monkeypatch.undo()
    assert _names(tmp_path) == ["ckpt-g0000-s000000001.ckpt"]  # no temp file, no ckpt 2
    assert store.latest_valid()[1]["step"] == 1


def test_temp_files_of_dead_writers_are_pruned(tmp_path):
    store = _store(tmp_path)
    host = socket.gethostname()
    dead_here = tmp_path / f".tmp-ckpt-g0000-s000000007.ckpt-{host}-999999999"  # a pid that cannot exist
    other_host = tmp_path / ".tmp-ckpt-g0000-s000000007.ckpt-other-pod-12"  # maybe alive elsewhere
    old_other_host = tmp_path / ".tmp-ckpt-g0000-s000000006.ckpt-other-pod-11"
    for path in (dead_here, other_host, old_other_host):
        path.write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old_other_host, (hours_ago, hours_ago))
    store.save(_state(8))
    assert not dead_here.exists() and other_host.exists() and not old_other_host.exists()


def test_timer_by_steps_and_by_seconds():
    now = [0.0]
    timer = CheckpointTimer(every_steps=10, every_seconds=5.0, clock=lambda: now[0])
    assert timer.due(10) and not timer.due(3)
    now[0] = 6.0
    assert timer.due(3)
    timer.reset()
    assert not timer.due(4)
