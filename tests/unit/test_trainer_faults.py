"""Checkpoint and trainer faults with real processes: a writer SIGKILLed inside save(), a
stale generation still running when a newer one claims the directory, ranks that must
agree on a fallback checkpoint, and --hang-at-step."""

import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="trainer tests need torch: pip install -e '.[trainer]'")

from lepton_localcluster.procs import free_port
from lepton_trainer import exitcodes
from lepton_trainer.checkpoint import CheckpointStore

pytestmark = pytest.mark.unit

FAST = ["--synthetic", "--global-batch-size", "4", "--log-every-seconds", "0.2"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEPTON_", "PET_", "TORCHELASTIC"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class Proc:
    """A child process with its output in a file, killed at the end of the test."""

    def __init__(self, log: Path, argv: list[str], **env):
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(argv, env=_env(**env), stdout=self._out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := re.search(pattern, self.text(), re.M):
                return match
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"no /{pattern}/:\n{self.text()[-3000:]}")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running:\n{self.text()[-3000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(*args, **env) -> Proc:
        started.append(Proc(*args, **env))
        return started[-1]

    yield start
    for proc in started:
        proc.close()


WRITER = """
import sys, torch
from lepton_trainer.checkpoint import CheckpointStore
store = CheckpointStore(sys.argv[1], keep=2, generation=1)
step = int(sys.argv[2])
weights = torch.zeros(4_000_000)  # 16 MB: a save takes long enough to be hit
print("ready", flush=True)
while True:
    step += 1
    weights.fill_(step)
    store.save({"step": step, "data_position": step, "synthetic": True, "weights": weights})
    print(step, flush=True)
"""


def test_sigkill_inside_save_never_leaves_a_partial_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=2, generation=1)
    rng = random.Random(11)
    step, killed_mid_write = 0, 0
    for _ in range(6):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(step)], stdout=subprocess.PIPE, text=True, env=_env()
        )
        try:
            assert writer.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.5))
        finally:
            writer.kill()
            writer.wait()
        done = [int(line) for line in writer.stdout.read().split()]
        writer.stdout.close()
        killed_mid_write += bool(list(tmp_path.glob(".tmp-*")))
        path, state = store.latest_valid()
        last = done[-1] if done else step
        # The save in flight may have been renamed just before the kill, never half-written.
        assert state["step"] in (last, last + 1), (done, path)
        assert torch.equal(state["weights"], torch.full((4_000_000,), float(state["step"])))
        assert not list(tmp_path.glob("*.corrupt"))
        step = state["step"]
    print(f"{killed_mid_write} of 6 kills left a temp file behind")
    store.save({"step": step + 1, "data_position": 0, "synthetic": True})
    assert not list(tmp_path.glob(".tmp-*"))  # the dead writers' temp files are pruned


def _trainer(ck, *argv):
    return [sys.executable, "-m", "lepton_trainer.train", *FAST, "--checkpoint-dir", str(ck), *argv]


def test_a_running_old_generation_stops_writing_once_a_newer_one_claims(tmp_path, procs):
    ck = tmp_path / "ck"
    old = procs(
        tmp_path / "g3.log",
        _trainer(ck, "--max-steps", "100000", "--checkpoint-every-steps", "5", "--metrics-port", "0"),
        LEPTON_GENERATION="3",
    )
    old.wait_for(r"^event=checkpoint_saved step=10 ")
    CheckpointStore(ck, generation=4).claim()  # generation 4 starts (g3 is behind a partition)
    assert old.wait(30) == exitcodes.FENCED, old.text()[-3000:]
    assert re.search(r"^event=fenced rank=0 gen=3 step=\d+ reason='generation 4 owns ", old.text(), re.M)
    assert {e.generation for e in CheckpointStore(ck).entries()} == {3}
    # Generation 4 resumes the newest checkpoint generation 3 completed.
    newest = CheckpointStore(ck).entries()[0]
    new = procs(
        tmp_path / "g4.log",
        _trainer(ck, "--max-steps", str(newest.step + 5), "--metrics-port", "0"),
        LEPTON_GENERATION="4",
    )
    assert new.wait(60) == exitcodes.OK, new.text()[-3000:]
    assert f"event=resumed step={newest.step} " in new.text()


RANK = """
import errno, os, sys
from lepton_trainer import checkpoint
from lepton_trainer.config import parse_args
from lepton_trainer.train import DistEnv, Trainer

ck, unreadable = sys.argv[1], sys.argv[2]
if unreadable != "-":
    real = checkpoint._read_bytes
    def read(path):
        if path.name == unreadable:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)
    checkpoint._read_bytes = read
    checkpoint.RETRY_DELAYS = (0.0, 0.0)
argv = ["--synthetic", "--max-steps", "10", "--metrics-port", "0", "--checkpoint-dir", ck]
trainer = Trainer(parse_args(argv, {}), DistEnv.from_environ())
code = trainer.run()
print(f"rank={os.environ['RANK']} code={code} resumed_step={trainer.step}", flush=True)
"""


@pytest.mark.parametrize("fault", ["eio-on-rank-1", "truncated"])
def test_all_ranks_fall_back_to_the_same_checkpoint(tmp_path, procs, fault):
    ck = tmp_path / "ck"
    gen0 = CheckpointStore(ck, generation=0)
    for step in (10, 20):
        gen0.save(
            {
                "step": step,
                "data_position": step * 4,
                "synthetic": True,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            }
        )
    newest = gen0.path_for(0, 20)
    if fault == "truncated":
        newest.write_bytes(newest.read_bytes()[:-10])
    port = str(free_port())
    ranks = [
        procs(
            tmp_path / f"rank{rank}.log",
            [sys.executable, "-c", RANK, str(ck), newest.name if fault == "eio-on-rank-1" and rank == 1 else "-"],
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            LEPTON_GENERATION="1",
        )
        for rank in range(2)
    ]
    for rank, proc in enumerate(ranks):
        assert proc.wait(120) == 0, proc.text()[-3000:]
        assert f"rank={rank} code=0 resumed_step=10" in proc.text(), proc.text()[-3000:]
    if fault == "eio-on-rank-1":
        assert newest.exists() and not list(ck.glob("*.corrupt"))  # a read error buries nothing
        assert "event=checkpoint_read_retry" in ranks[1].text() and "moved_to=-" in ranks[1].text()
    else:
        assert not newest.exists() and newest.with_name(newest.name + ".corrupt").exists()
    assert "event=resumed step=10 data_position=40 " in ranks[0].text()


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(lepton_trainer_\w+) ([-+\deE.]+)$", body, re.M)}


def test_hang_at_step_stalls_the_samples_counter_and_still_stops_on_sigterm(tmp_path, procs):
    port, ck = free_port(), tmp_path / "ck"
    run = procs(
        tmp_path / "hang.log",
        _trainer(
            ck,
            "--max-steps",
            "1000",
            "--hang-at-step",
            "6",
            "--synthetic-samples-per-second",
            "400",
            "--metrics-addr",
            "127.0.0.1",
            "--metrics-port",
            str(port),
        ),
    )
    run.wait_for(r"^event=hang_injected step=6 rank=0")
    first = _scrape(port)
    time.sleep(1.5)
    later = _scrape(port)
    assert run.proc.poll() is None  # alive, serving metrics
    assert first["lepton_trainer_samples_total"] == later["lepton_trainer_samples_total"] == 6 * 4
    assert later["lepton_trainer_steps_total"] == 6
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(30) == exitcodes.STOPPED, run.text()[-3000:]
    assert "event=stopping reason=sigterm step=6" in run.text()
    store = CheckpointStore(ck)
    assert store.read(store.entries()[0])["step"] == 6
