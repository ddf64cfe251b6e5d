"""The training loop in-process at world size 1 (no torchrun), and the metrics module."""

import re
import time
import urllib.request

import pytest

torch = pytest.importorskip("torch", reason="trainer tests need torch: pip install -e '.[trainer]'")

from lepton_localcluster.procs import free_port
from lepton_trainer import exitcodes
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
    state = torch.load(tmp_path / "ck" / "ckpt-00000070.pt", weights_only=True)
    assert state["step"] == 70 and state["data_position"] == 70 * 16


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
    state = torch.load(tmp_path / "ckpt-00000020.pt", weights_only=True)
    assert state["synthetic"] and state["data_position"] == 200 and "model" not in state


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
    metrics.serve("127.0.0.1", port)
    try:
        metrics.observe_step(16, 0.02, 2.5)
        metrics.observe_step(16, 0.03, 2.4)
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
    ):
        assert line in body.splitlines(), line
