"""Checkpoint files: atomic writes, keep-last-K, damaged files skipped."""

import os

import pytest

torch = pytest.importorskip("torch", reason="trainer tests need torch: pip install -e '.[trainer]'")

from lepton_trainer import checkpoint
from lepton_trainer.checkpoint import CheckpointStore, CheckpointTimer

pytestmark = pytest.mark.unit


def _state(step):
    return {
        "format": checkpoint.FORMAT,
        "step": step,
        "data_position": step * 8,
        "synthetic": False,
        "weights": torch.arange(1000.0) * step,
    }


def test_save_and_load_latest(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for step in (10, 20, 30):
        store.save(_state(step))
    path, state = store.latest_valid()
    assert path.name == "ckpt-00000030.pt" and state["data_position"] == 240


def test_keeps_only_the_last_k(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in range(1, 6):
        store.save(_state(step))
    assert [s for s, _ in store.list()] == [5, 4]


def test_truncated_checkpoint_is_skipped_and_moved_aside(tmp_path, capsys):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(_state(10))
    good = store.save(_state(20))
    data = good.read_bytes()
    store.path_for(30).write_bytes(data[: len(data) // 2])  # a write cut in the middle
    path, state = store.latest_valid()
    assert state["step"] == 20 and path == good
    out = capsys.readouterr().out
    assert "event=checkpoint_skipped" in out and "ckpt-00000030.pt" in out
    assert (tmp_path / "ckpt-00000030.pt.corrupt").exists()
    assert [s for s, _ in store.list()] == [20, 10]


def test_checkpoint_with_wrong_content_is_skipped(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(_state(5))
    torch.save({"step": 9}, store.path_for(9))  # loads, but is not ours
    assert store.latest_valid()[1]["step"] == 5


def test_no_checkpoints(tmp_path):
    assert CheckpointStore(tmp_path / "missing").latest_valid() == (None, None)


def test_interrupted_write_leaves_no_visible_file(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(_state(1))

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError):
        store.save(_state(2))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.pt"]  # no temp file, no ckpt 2
    assert store.latest_valid()[1]["step"] == 1


def test_temp_files_of_dead_writers_are_pruned(tmp_path):
    store = CheckpointStore(tmp_path)
    stale = tmp_path / ".tmp-ckpt-00000007-999999999"  # a pid that cannot exist
    stale.write_bytes(b"x")
    store.save(_state(8))
    assert not stale.exists()


def test_timer_by_steps_and_by_seconds():
    now = [0.0]
    timer = CheckpointTimer(every_steps=10, every_seconds=5.0, clock=lambda: now[0])
    assert timer.due(10) and not timer.due(3)
    now[0] = 6.0
    assert timer.due(3)
    timer.reset()
    assert not timer.due(4)
