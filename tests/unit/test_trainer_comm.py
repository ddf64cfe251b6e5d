"""Communication measured apart from compute: real DDP training with gloo on CPU at 2 and 4
ranks (one process per rank, as torchrun starts them), and the modes that export no split."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="trainer tests need torch: pip install -e '.[trainer]'")

from lepton_localcluster.procs import free_port
from lepton_trainer import exitcodes
from lepton_trainer.config import parse_args
from lepton_trainer.train import DistEnv, Trainer

pytestmark = pytest.mark.unit

# Gradients of ~0.4 M parameters (1.7 MB) per step against a small compute share: the
# all-reduce is a measurable part of the step, and a run of 20 steps stays short.
MODEL = ["--n-layer", "2", "--n-embd", "128", "--n-head", "4", "--block-size", "32"]
STEPS = 20

# As train.main() does: the process group is destroyed before exit. Left to interpreter
# teardown, gloo's threads can abort the process ("terminate called without an active
# exception", -6), as it did under load.
RANK = """
import json, sys
import torch.distributed as dist
from lepton_trainer.config import parse_args
from lepton_trainer.train import DistEnv, Trainer

port, argv = sys.argv[1], sys.argv[2:]
cfg = parse_args(["--metrics-addr", "127.0.0.1", "--metrics-port", port, "--log-every-seconds", "100", *argv], {})
trainer = Trainer(cfg, DistEnv.from_environ(), checkpoints=False)
code = trainer.run()
if dist.is_initialized():
    dist.destroy_process_group()
sums = {}
if trainer.metrics is not None:
    for family in trainer.metrics.registry.collect():
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                sums[sample.name] = sample.value
print("METRICS " + json.dumps(sums), flush=True)
sys.exit(code)
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEPTON_", "PET_", "TORCHELASTIC"))}
    # One thread per rank: the ranks share the machine's cores.
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def _train(tmp_path, world: int) -> dict[str, float]:
    """Run `world` ranks to the end; rank 0's (local rank 0's) metric sums and counts."""
    master = str(free_port())
    argv = ["--max-steps", str(STEPS), "--global-batch-size", "8", "--micro-batch-size", "8", *MODEL]
    procs, logs = [], []
    try:
        for rank in range(world):
            logs.append(open(tmp_path / f"w{world}-rank{rank}.log", "w+"))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", RANK, str(free_port()), *argv],
                    env=_env(
                        RANK=str(rank),
                        LOCAL_RANK=str(rank),
                        WORLD_SIZE=str(world),
                        LOCAL_WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=master,
                    ),
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                )
            )
        for rank, proc in enumerate(procs):
            code = proc.wait(120)
            logs[rank].seek(0)
            assert code == exitcodes.OK, logs[rank].read()[-3000:]
        logs[0].seek(0)
        text = logs[0].read()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    line = next(x for x in text.splitlines() if x.startswith("METRICS "))
    return json.loads(line.removeprefix("METRICS "))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comm")
    return {world: _train(tmp, world) for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
def test_comm_is_positive_and_with_compute_makes_up_the_step(runs, world):
    m = runs[world]
    for name in ("step", "compute", "comm", "allreduce"):
        assert m[f"lepton_trainer_{name}_seconds_count"] == STEPS, name
    step = m["lepton_trainer_step_seconds_sum"]
    comm = m["lepton_trainer_comm_seconds_sum"]
    compute = m["lepton_trainer_compute_seconds_sum"]
    assert comm > 0 and compute > 0
    # The split accounts for the step: what is neither (data indices, bookkeeping) is small.
    assert comm + compute == pytest.approx(step, rel=0.10), m
    assert comm < step
    # The buckets' all-reduce ran: launch-to-completion time was measured too.
    assert m["lepton_trainer_allreduce_seconds_sum"] > 0


def test_comm_grows_with_world_size(runs):
    per_step = {w: runs[w]["lepton_trainer_comm_seconds_sum"] / STEPS for w in (2, 4)}
    fraction = {
        w: runs[w]["lepton_trainer_comm_seconds_sum"] / runs[w]["lepton_trainer_step_seconds_sum"] for w in (2, 4)
    }
    assert per_step[4] > per_step[2], runs
    assert fraction[4] > fraction[2], runs


def _sums(trainer: Trainer) -> dict[str, float]:
    # run() has stopped the server; the registry still holds the values.
    return {s.name: s.value for family in trainer.metrics.registry.collect() for s in family.samples}


@pytest.mark.parametrize(
    "extra, split",
    [
        ([], True),
        (["--pace-curve", '{"1": 100000}'], False),
        (["--synthetic", "--synthetic-samples-per-second", "100000"], False),
    ],
    ids=["one-rank", "paced", "synthetic"],
)
def test_one_rank_exports_zero_comm_and_paced_or_synthetic_runs_no_split(extra, split):
    """One rank runs no collective: comm 0 (a size without communication). A paced or a
    synthetic step would pass its sleep off as compute: no split series at all."""
    port = str(free_port())
    cfg = parse_args(["--metrics-addr", "127.0.0.1", "--metrics-port", port, "--max-steps", "3", *MODEL, *extra], {})
    trainer = Trainer(cfg, DistEnv(), checkpoints=False)
    assert trainer.run() == exitcodes.OK
    sums = _sums(trainer)
    assert sums["lepton_trainer_step_seconds_count"] == 3
    if split:
        assert sums["lepton_trainer_comm_seconds_count"] == 3
        assert sums["lepton_trainer_comm_seconds_sum"] == 0.0
        assert sums["lepton_trainer_compute_seconds_sum"] > 0
    else:
        assert not any(name.startswith(("lepton_trainer_comm_", "lepton_trainer_compute_")) for name in sums)
