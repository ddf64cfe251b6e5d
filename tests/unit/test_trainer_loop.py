"""The training loop in-process at world size 1 (no torchrun), and the metrics module."""

import errno
import re
import time
import urllib.request

import pytest

torch = pytest.importorskip("torch", reason="trainer tests need torch: pip install -e '.[trainer]'")

from lepton_localcluster.procs import free_port
from lepton_trainer import exitcodes
from lepton_trainer.checkpoint import CheckpointStore
from lepton_trainer.config import parse_args
from lepton_trainer.metrics import TrainerMetrics
from lepton_trainer.train import DistEnv, Trainer

pytestmark = pytest.mark.unit


def _cfg(*argv):
    return parse_args(["--metrics-port", "0", "--log-every-seconds", "0.2", *argv], {})


def test_real_training_loss_falls_and_resume_continues(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    args = ["--global-batch-size", "16", "--max-steps", "60", "--checkpoint-dir", ck, "--checkpoint-every-steps", "20"]
    trainer = Trainer(_cfg(*args), DistEnv())
    first_loss = None
    assert trainer.run() == exitcodes.OK
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"^step=\d+/60 loss=([\d.]+)", out, re.M)]
    first_loss = losses[0]
    assert losses[-1] < first_loss and losses[-1] < 4.0
    # Extend the run: it must resume from the final checkpoint, not start over.
    resumed = Trainer(_cfg(*args[:2], "--max-steps", "70", *args[4:]), DistEnv())
    assert resumed.run() == exitcodes.OK
    out = capsys.readouterr().out
    assert "event=resumed step=60 data_position=960" in out
    entry = CheckpointStore(ck).entries()[0]
    state = CheckpointStore(ck).read(entry)
    assert (entry.generation, state["step"], state["data_position"]) == (0, 70, 70 * 16)


def test_synthetic_respects_the_pace_curve_and_checkpoints_positions(tmp_path):
    cfg = _cfg(
        "--synthetic",
        "--global-batch-size",
        "10",
        "--max-steps",
        "20",
        "--synthetic-samples-per-second",
        "100000",
        "--pace-curve",
        '{"1": 400, "4": 800}',
        "--checkpoint-dir",
        str(tmp_path),
    )
    start = time.monotonic()
    assert Trainer(cfg, DistEnv()).run() == exitcodes.OK
    elapsed = time.monotonic() - start
    assert elapsed >= 20 * 10 / 400 * 0.95  # capped at 400 samples/s at world size 1
    store = CheckpointStore(tmp_path)
    state = store.read(store.entries()[0])
    assert state["step"] == 20 and state["synthetic"] and state["data_position"] == 200 and "model" not in state


def test_no_checkpoint_dir_is_logged(capsys):
    assert (
        Trainer(
            _cfg(
                "--synthetic", "--max-steps", "2", "--global-batch-size", "1", "--synthetic-samples-per-second", "1000"
            ),
            DistEnv(),
        ).run()
        == 0
    )
    assert "event=checkpoints_disabled reason=LEPTON_CHECKPOINT_DIR_unset" in capsys.readouterr().out


def test_metrics_endpoint_serves_the_contract_names():
    port = free_port()
    metrics = TrainerMetrics()
    metrics.set_membership(3, 7)
    metrics.set_run(320, 64)
    metrics.serve("127.0.0.1", port)
    try:
        metrics.observe_step(16, 0.02, 2.5, 80)
        metrics.observe_step(16, 0.03, 2.4, 96)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        metrics.stop()
    for line in (
        "lepton_trainer_samples_total 32.0",
        "lepton_trainer_steps_total 2.0",
        "lepton_trainer_loss 2.4",
        "lepton_trainer_world_size 3.0",
        "lepton_trainer_generation 7.0",
        "lepton_trainer_step_seconds_count 2.0",
        "lepton_trainer_trained_samples 96.0",
        "lepton_trainer_target_samples 320.0",
    ):
        assert line in body.splitlines(), line


def _synthetic(ck, max_steps, *argv):
    fast = ["--global-batch-size", "4", "--synthetic-samples-per-second", "100000"]
    return _cfg("--synthetic", *fast, "--max-steps", str(max_steps), "--checkpoint-dir", str(ck), *argv)


def test_a_worker_of_an_older_generation_is_fenced_at_start(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert Trainer(_synthetic(ck, 10), DistEnv(generation=3)).run() == exitcodes.OK
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    assert Trainer(_synthetic(ck, 20), DistEnv(generation=2)).run() == exitcodes.FENCED
    assert re.search(r"^event=fenced rank=0 gen=2 step=0 reason='generation 3 owns ", capsys.readouterr().out, re.M)
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before  # not even a claim
    # The generation after 3 resumes from it.
    assert Trainer(_synthetic(ck, 20), DistEnv(generation=4)).run() == exitcodes.OK
    assert "event=resumed step=10 data_position=40 from_world=1 from_ranks=1 from_gen=3" in capsys.readouterr().out


def test_two_jobs_under_one_claim_resume_only_their_own(tmp_path, capsys):
    claim = tmp_path / "claim"  # the volume's mount path; each job gets <mountPath>/<uid>
    job_a, job_b = claim / "uid-a", claim / "uid-b"
    assert Trainer(_synthetic(job_a, 12), DistEnv(generation=9)).run() == exitcodes.OK
    assert Trainer(_synthetic(job_b, 4), DistEnv(generation=1)).run() == exitcodes.OK  # not fenced by job a
    out = capsys.readouterr().out
    assert "event=fresh_start" in out and "event=resumed" not in out
    assert Trainer(_synthetic(job_b, 6), DistEnv(generation=2)).run() == exitcodes.OK
    assert "event=resumed step=4 " in capsys.readouterr().out
    assert Trainer(_synthetic(job_a, 14), DistEnv(generation=10)).run() == exitcodes.OK
    assert "event=resumed step=12 " in capsys.readouterr().out


def test_an_unreadable_checkpoint_is_a_retryable_exit_not_a_fresh_start(tmp_path, monkeypatch, capsys):
    from lepton_trainer import checkpoint

    ck = tmp_path / "ck"
    assert Trainer(_synthetic(ck, 5), DistEnv(generation=1)).run() == exitcodes.OK

    def eio(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(checkpoint, "_read_bytes", eio)
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS", (0.0,))
    assert Trainer(_synthetic(ck, 10), DistEnv(generation=2)).run() == exitcodes.STORAGE_ERROR
    assert "event=storage_error" in capsys.readouterr().out
    assert [e.step for e in CheckpointStore(ck).entries()] == [5]  # kept, and nothing newer written


def _run_with_metrics(cfg_argv, env):
    """Run a synthetic trainer with /metrics on; returns (exit code, the run's two progress
    gauges at start, the position gauge after every step, the last scrape of /metrics)."""
    port = free_port()
    trainer = Trainer(_synthetic(*cfg_argv, "--metrics-addr", "127.0.0.1", "--metrics-port", str(port)), env)
    seen = {"start": None, "steps": [], "body": ""}
    start_metrics = trainer._start_metrics

    def gauges():
        reg = trainer.metrics.registry
        return reg.get_sample_value("lepton_trainer_trained_samples"), reg.get_sample_value(
            "lepton_trainer_target_samples"
        )

    def start_and_watch():
        start_metrics()
        seen["start"] = gauges()
        observe = trainer.metrics.observe_step

        def observe_and_record(*args, **kwargs):
            observe(*args, **kwargs)
            seen["steps"].append(gauges()[0])
            seen["body"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()

        trainer.metrics.observe_step = observe_and_record

    trainer._start_metrics = start_and_watch
    return trainer.run(), seen


def test_the_run_position_and_target_are_exported_and_survive_a_resume(tmp_path, capsys):
    ck = tmp_path / "ck"  # global batch 4 (see _synthetic)
    code, seen = _run_with_metrics((ck, 5), DistEnv(generation=1))
    assert code == exitcodes.OK
    assert seen["start"] == (0.0, 20.0)
    assert seen["steps"] == [4.0, 8.0, 12.0, 16.0, 20.0]  # updated every step
    scraped = seen["body"].splitlines()
    assert "lepton_trainer_trained_samples 20.0" in scraped and "lepton_trainer_target_samples 20.0" in scraped
    # A new generation (new pods: the samples counter starts over) extends the run to 8
    # steps and resumes at step 5: the position comes back from the checkpoint.
    code, seen = _run_with_metrics((ck, 8), DistEnv(generation=2))
    assert code == exitcodes.OK
    assert "event=resumed step=5 data_position=20" in capsys.readouterr().out
    assert seen["start"] == (20.0, 32.0)
    assert seen["steps"] == [24.0, 28.0, 32.0]
    scraped = seen["body"].splitlines()
    assert "lepton_trainer_trained_samples 32.0" in scraped and "lepton_trainer_target_samples 32.0" in scraped
    assert "lepton_trainer_samples_total 12.0" in scraped  # this pod's own work only
