"""Restart cost: seconds from SIGTERM of generation g to the first step of generation g+1.

Runs real launchers on CPU (``python -m lepton_trainer``, 2 "nodes" by default with c10d
rendezvous on localhost, as the operator's pods would), lets generation g train, sends
SIGTERM to every launcher at once (what pod deletion does), waits until all have exited
(the operator waits for the old pods to be gone), then starts generation g+1 immediately
(the operator's and the scheduler's own latency is not included) and waits for its first
step. The breakdown comes from the trainer's timestamped ``event=`` log lines:

  stop:        SIGTERM -> the step in flight finishes, the checkpoint is saved
               (save = rank 0's torch.save + fsync + rename), all processes exit
  start:       g+1 launcher spawned -> torch imported in the launcher
  rendezvous:  -> c10d rendezvous of the agents done and the workers spawned (a worker
               process begins), then the worker's torch import and process group init
  build:       -> corpus read, model and optimizer built
  load:        -> checkpoint read and applied on every rank
  first step:  -> first global step of g+1 done

    .venv/bin/python benchmarks/restart_cost.py [--nodes 2] [--to-nodes 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lepton_localcluster.procs import free_port


def _event(text: str, name: str, field: str = "t") -> float:
    match = re.search(rf"^event={name}\b.*?\b{field}=([\d.]+)", text, re.M)
    if not match:
        raise RuntimeError(f"no event={name} {field}= in:\n{text[-2000:]}")
    return float(match.group(1))


class Generation:
    """The launchers (pods) of one generation."""

    def __init__(self, tmp: Path, gen: int, nodes: int, args: list[str]):
        port = free_port("0.0.0.0")
        self.logs = [tmp / f"g{gen}-w{i}.log" for i in range(nodes)]
        self.procs = []
        self.spawned = time.time()
        for i in range(nodes):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "LEPTON_"))}
            env.update(
                PET_NNODES=str(nodes),
                PET_NPROC_PER_NODE="1",
                PET_RDZV_BACKEND="c10d",
                PET_RDZV_ENDPOINT=f"127.0.0.1:{port}",
                PET_RDZV_ID=f"bench-g{gen}",
                PET_MAX_RESTARTS="0",
                PET_RDZV_CONF=f"is_host={int(i == 0)}",
                LEPTON_GENERATION=str(gen),
                LEPTON_WORLD_SIZE=str(nodes),
                LEPTON_WORKER_INDEX=str(i),
                LEPTON_CHECKPOINT_DIR=str(tmp / "ck"),
                PYTHONWARNINGS="ignore",
            )
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "lepton_trainer", *args],
                    env=env,
                    stdout=open(self.logs[i], "w"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def text(self, i: int = 0) -> str:
        return self.logs[i].read_text()

    def wait_for(self, pattern: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text(), re.M):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"no /{pattern}/:\n{self.text()[-2000:]}")
            time.sleep(0.02)

    def terminate(self) -> tuple[float, float]:
        """SIGTERM every launcher at once; returns (sent at, all exited at)."""
        sent = time.time()
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(60) for p in self.procs]
        if any(c != 143 for c in codes):
            raise RuntimeError(f"exit codes {codes}:\n{self.text()[-2000:]}")
        return sent, time.time()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def one_restart(nodes: int, to_nodes: int, warm_steps: int, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old = Generation(tmp, 0, nodes, args)
        try:
            old.wait_for(rf"^step=({warm_steps}|[1-9]\d{{{len(str(warm_steps))}}})/")
            sent, exited = old.terminate()
        finally:
            old.kill()
        save = _event(old.text(), "checkpoint_saved", "seconds")
        new = Generation(tmp, 1, to_nodes, args)
        try:
            new.wait_for(r"^event=first_step")
            text = new.text()
            t_torch = _event(text, "torch_imported")
            t_worker = _event(text, "start")  # a rank's process began (before its imports)
            t_pg = _event(text, "process_group_ready")
            t_loaded = _event(text, "resumed")
            t_first = _event(text, "first_step")
        finally:
            for p in new.procs:
                p.send_signal(signal.SIGTERM)
            for p in new.procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            new.kill()
        return {
            "total": t_first - sent,
            "stop (incl. save)": exited - sent,
            "  of which checkpoint save": save,
            "start (launcher + torch import)": t_torch - new.spawned,
            "rendezvous (agents + worker spawn)": t_worker - t_torch,
            "worker import + process group": t_pg - t_worker,
            "build model + data": t_loaded - _event(text, "resumed", "seconds") - t_pg,
            "checkpoint load": _event(text, "resumed", "seconds"),
            "first step": t_first - t_loaded,
            "gap (old gone -> new spawned)": new.spawned - exited,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2, help="world size of generation g")
    parser.add_argument("--to-nodes", type=int, default=2, help="world size of g+1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm-steps", type=int, default=30)
    args, extra = parser.parse_known_args()
    trainer_args = ["--max-steps", "100000", "--log-every-seconds", "0.1", "--metrics-port", "0", *extra]
    runs = [one_restart(args.nodes, args.to_nodes, args.warm_steps, trainer_args) for _ in range(args.repeats)]
    print(
        f"restart cost, CPU, {args.nodes} -> {args.to_nodes} nodes (1 rank each), "
        f"{args.repeats} runs; trainer args: {' '.join(trainer_args)}"
    )
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"  {key:38s} median {statistics.median(values):7.3f} s   runs: " + ", ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
