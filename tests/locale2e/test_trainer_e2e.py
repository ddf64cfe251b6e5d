"""The trainer under real torchrun on CPU: 2 local ranks, 2 "nodes" with c10d rendezvous,
SIGTERM, resume at another world size, a truncated checkpoint, /metrics.

Every launcher runs in its own process group with a marker in its environment; the
finally blocks stop them and then kill anything still carrying the marker (torchrun puts
its workers in sessions of their own, so a process-group kill alone would miss them).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the trainer needs torch: pip install -e '.[trainer]'")

from lepton_localcluster.procs import free_port
from lepton_trainer.checkpoint import CheckpointStore
from lepton_trainer.data import GlobalSampler, load_corpus
from lepton_trainer.schedule import lr_at

pytestmark = [pytest.mark.locale2e, pytest.mark.timeout(900)]

GRACE_SECONDS = 30  # Kubernetes' default terminationGracePeriodSeconds
TINY = ["--log-every-seconds", "0.3", "--global-batch-size", "32", "--micro-batch-size", "8"]


class Launcher:
    """One ``python -m lepton_trainer`` process (one pod), its output in a file."""

    def __init__(self, tmp: Path, name: str, args: list[str], env: dict[str, str], marker: str):
        self.log_path = tmp / f"{name}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "LEPTON_", "TORCHELASTIC"))}
        full_env.update(env, LEPTON_TEST_MARKER=marker, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
        self._out = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lepton_trainer", *args],
            env=full_env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 400) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text(), re.M)
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before /{pattern}/:\n" + self.text()[-3000:])
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for /{pattern}/:\n" + self.text()[-3000:])

    def wait(self, timeout: float = 400) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("still running:\n" + self.text()[-3000:]) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._out.close()


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment carries this test's marker."""
    needle = f"LEPTON_TEST_MARKER={marker}".encode()
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (pid_dir / "environ").read_bytes().split(b"\0"):
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.fixture
def launch(tmp_path):
    """Start launchers; on teardown stop them and kill anything left."""
    marker = uuid.uuid4().hex
    started: list[Launcher] = []

    def start(name, args, env):
        launcher = Launcher(tmp_path, name, args, env, marker)
        started.append(launcher)
        return launcher

    try:
        yield start
    finally:
        for launcher in started:
            launcher.stop()
        kill_marked(marker)


def progress(text: str) -> list[tuple[int, float]]:
    """(step, loss) of every progress line."""
    return [
        (int(m.group(1)), float(m.group(2)))
        for m in re.finditer(r"^step=(\d+)/\d+ loss=([\d.]+) samples/s=", text, re.M)
    ]


def scrape(addr: str, port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://{addr}:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(lepton_trainer_\w+) ([-+\deE.naNIf]+)$", body, re.M)}


def test_two_local_ranks_loss_falls(launch, tmp_path):
    ck = tmp_path / "ck"
    run = launch(
        "two-ranks",
        [*TINY, "--max-steps", "300", "--metrics-port", "0"],
        {"PET_NPROC_PER_NODE": "2", "LEPTON_CHECKPOINT_DIR": str(ck)},
    )
    assert run.wait() == 0, run.text()[-3000:]
    losses = progress(run.text())
    assert losses[-1][0] == 300
    assert losses[-1][1] < 3.2 and losses[-1][1] < losses[0][1] - 0.3, losses
    assert "ranks=2" in run.text() and CheckpointStore(ck).path_for(0, 300).exists()


def test_two_nodes_c10d_rendezvous_metrics_increase_and_loss_falls(launch, tmp_path):
    rdzv, metrics_port = free_port("0.0.0.0"), free_port("0.0.0.0")
    common = {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{rdzv}",
        "PET_RDZV_ID": "e2e-uid-g4",
        "PET_MAX_RESTARTS": "0",
        "LEPTON_GENERATION": "4",
        "LEPTON_WORLD_SIZE": "2",
        "LEPTON_METRICS_PORT": str(metrics_port),
        "LEPTON_JOB_NAME": "e2e",
        "LEPTON_CHECKPOINT_DIR": str(tmp_path / "ck"),
    }
    addrs = ["127.0.0.2", "127.0.0.3"]
    nodes = [
        launch(
            f"node{i}",
            [*TINY, "--max-steps", "200"],
            {**common, "PET_RDZV_CONF": f"is_host={int(i == 0)}", "POD_IP": addrs[i], "LEPTON_WORKER_INDEX": str(i)},
        )
        for i in range(2)
    ]
    for node in nodes:
        node.wait_for(r"^event=metrics_serving")
    first = [None, None]
    for i, addr in enumerate(addrs):  # poll until training has produced some samples
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            first[i] = scrape(addr, metrics_port)
            if first[i].get("lepton_trainer_samples_total", 0) > 0:
                break
            time.sleep(0.2)
    time.sleep(1.0)
    for i, addr in enumerate(addrs):
        later = scrape(addr, metrics_port)
        for counter in ("lepton_trainer_samples_total", "lepton_trainer_steps_total"):
            assert later[counter] > first[i][counter] > 0, (counter, first[i], later)
        # each pod counts its own share: 16 of the 32 samples of every global step
        assert later["lepton_trainer_samples_total"] == 16 * later["lepton_trainer_steps_total"]
        assert later["lepton_trainer_world_size"] == 2
        assert later["lepton_trainer_generation"] == 4
        assert later["lepton_trainer_step_seconds_count"] > 0
        assert 0 < later["lepton_trainer_loss"] < 6
    for node in nodes:
        assert node.wait() == 0, node.text()[-3000:]
    losses = progress(nodes[0].text())
    assert losses[-1][0] == 200 and losses[-1][1] < losses[0][1] - 0.3, losses
    assert "world=2" in nodes[1].text()  # both pods log progress


def _positions(pos_dir: Path, gen: int) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    for path in sorted(pos_dir.glob(f"positions-g{gen}-r*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], []).append(rec)
    return by_step


def test_sigterm_checkpoint_then_resume_at_three_ranks(launch, tmp_path):
    ck, pos = tmp_path / "ck", tmp_path / "pos"
    max_steps, G = 160, 32
    args = [
        *TINY,
        "--max-steps",
        str(max_steps),
        "--checkpoint-every-steps",
        "25",
        "--metrics-port",
        "0",
        "--positions-dir",
        str(pos),
    ]
    env = {"LEPTON_CHECKPOINT_DIR": str(ck)}

    # Generation 0: two ranks, stopped by SIGTERM mid-run (as when its pod is deleted).
    gen0 = launch("gen0", args, {**env, "PET_NPROC_PER_NODE": "2", "LEPTON_GENERATION": "0"})
    gen0.wait_for(r"^step=(4\d|[5-9]\d)/")  # past step 40, mid-run
    sent = time.monotonic()
    gen0.proc.send_signal(signal.SIGTERM)  # the launcher only, as the kubelet does
    assert gen0.wait(GRACE_SECONDS) == 143, gen0.text()[-3000:]
    assert time.monotonic() - sent < GRACE_SECONDS
    stop = int(gen0.wait_for(r"^event=stopping reason=sigterm step=(\d+)").group(1))
    assert 40 <= stop < max_steps
    store = CheckpointStore(ck)
    newest = store.entries()[0]
    assert (newest.generation, newest.step) == (0, stop)
    saved = store.read(newest)  # a complete file, its checksum verified
    assert saved["step"] == stop and saved["data_position"] == stop * G
    assert saved["ranks"] == 2 and "model" in saved and "optimizer" in saved

    # A newer checkpoint cut off mid-write must be skipped in favour of `stop`.
    whole = newest.path.read_bytes()
    cut = store.path_for(0, stop + 5)
    cut.write_bytes(whole[: len(whole) // 3])

    # Generation 1: three ranks resume and finish.
    gen1 = launch("gen1", args, {**env, "PET_NPROC_PER_NODE": "3", "LEPTON_GENERATION": "1"})
    assert gen1.wait() == 0, gen1.text()[-3000:]
    text = gen1.text()
    assert re.search(rf"^event=checkpoint_skipped path=\S+{re.escape(cut.name)} reason='corrupt: truncated", text, re.M)
    assert re.search(
        rf"^event=resumed step={stop} data_position={stop * G} "
        r"from_world=1 from_ranks=2 ",
        text,
        re.M,
    )

    steps0, steps1 = _positions(pos, 0), _positions(pos, 1)
    assert sorted(steps0) == list(range(stop))  # gen 0 did steps [0, stop)
    assert sorted(steps1) == list(range(stop, max_steps))  # gen 1 continued at `stop`
    sampler = GlobalSampler((len(load_corpus()) - 1) // 64, seed=1234)
    seen = []
    for step, recs in sorted({**steps0, **steps1}.items()):
        ranks = 2 if step < stop else 3
        assert sorted(r["rank"] for r in recs) == list(range(ranks))
        recs.sort(key=lambda r: r["rank"])
        positions = [p for r in recs for p in range(*r["positions"])]
        assert positions == list(range(step * G, (step + 1) * G))  # none repeated/skipped
        assert [i for r in recs for i in r["samples"]] == sampler.indices(step * G, G)
        for r in recs:  # the LR schedule continues across the resume
            assert r["lr"] == pytest.approx(lr_at(step, 3e-3, max_steps, 20, 0.1))
        seen += positions
    assert seen == list(range(max_steps * G))
    assert progress(text)[-1][0] == max_steps


@pytest.mark.parametrize("code", [3, 137])
def test_fail_at_step_sets_the_pod_exit_code(launch, code):
    """One rank crashes: the pod reports that rank's code, not its peer's PEER_LOST."""
    run = launch(
        f"fail{code}",
        [
            "--synthetic",
            "--max-steps",
            "50",
            "--fail-at-step",
            "5",
            "--fail-rank",
            "1",
            "--fail-exit-code",
            str(code),
            "--metrics-port",
            "0",
            "--global-batch-size",
            "4",
            "--synthetic-samples-per-second",
            "200",
        ],
        {"PET_NPROC_PER_NODE": "2"},
    )
    assert run.wait() == code, run.text()[-3000:]
    assert "event=fail_injected step=5 rank=1" in run.text()
