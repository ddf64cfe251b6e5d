"""Overhead of metrics + checkpointing over the bare training loop (samples/s).

Runs the real trainer loop in this process at world size 1 (no torchrun, so the
measurement is the loop itself), alternating a bare run (no metrics server, no
checkpoints) and a full run (metrics served and updated every step, checkpoints at the
default cadence plus the final one), and prints the median samples/s of each.
Target: overhead <= 3 %.

On a shared machine wall-clock figures swing with other people's load, so it also
reports samples per CPU-second of this process (``time.process_time``: the loop, the
metrics server thread and checkpoint writes, but not other processes), and the best run
of each kind (the least disturbed one). Most robust of all: the full runs time the
extra work itself (metrics updates, checkpoint writes) and report it as a share of the
loop's time, which load on the machine scales alike. A scraper thread reads /metrics every
second during full runs (Prometheus would every 15-30 s), so serving is included too.

    .venv/bin/python benchmarks/trainer_overhead.py [--steps 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import threading
import time
import urllib.request

import torch

from lepton_localcluster.procs import free_port
from lepton_trainer.config import parse_args
from lepton_trainer.train import DistEnv, Trainer

SHARES: list[float] = []  # extra-work share of each full run
EXTRA = {"s": 0.0}  # seconds spent in metrics updates and checkpoint writes (full runs)


def _timed(fn):
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            EXTRA["s"] += time.perf_counter() - t0

    return wrapper


def _scrape_every_second(port: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()


def measure(full: bool, steps: int, every: int, extra: list[str]) -> tuple[float, float]:
    """(samples per wall second, per CPU second) of the loop (setup excluded, final
    checkpoint included)."""
    with tempfile.TemporaryDirectory() as ck:
        argv = [
            "--max-steps",
            str(steps),
            "--checkpoint-every-steps",
            str(every),
            "--metrics-addr",
            "127.0.0.1",
            "--metrics-port",
            str(free_port() if full else 0),
            "--checkpoint-dir",
            ck if full else "",
            *extra,
        ]
        cfg = parse_args(argv, {})
        trainer = Trainer(cfg, DistEnv(), metrics=full, checkpoints=full)
        loop, elapsed = trainer._loop, {}

        def timed_loop():
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return loop()
            finally:
                elapsed["s"] = time.perf_counter() - t0
                elapsed["cpu"] = time.process_time() - c0

        trainer._loop = timed_loop
        trainer._save = _timed(trainer._save)
        start_metrics = trainer._start_metrics

        def start_and_time_metrics():
            start_metrics()
            if trainer.metrics is not None:
                trainer.metrics.observe_step = _timed(trainer.metrics.observe_step)

        trainer._start_metrics = start_and_time_metrics
        stop = threading.Event()
        if full:
            threading.Thread(target=_scrape_every_second, daemon=True, args=(cfg.metrics_port, stop)).start()
        EXTRA["s"] = 0.0
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                trainer.run()
        finally:
            stop.set()
        if full:
            SHARES.append(EXTRA["s"] / elapsed["s"])
        samples = steps * cfg.global_batch_size
        return samples / elapsed["s"], samples / elapsed["cpu"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint-every-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable figures on a shared machine)")
    args, extra = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    measure(False, 20, 10, extra)  # warm-up: allocator, kernels
    bare, full = [], []
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        bare.append(measure(False, args.steps, args.checkpoint_every_steps, extra))
        full.append(measure(True, args.steps, args.checkpoint_every_steps, extra))
    print(
        f"steps={args.steps} repeats={args.repeats} threads={args.threads} "
        f"checkpoint_every_steps={args.checkpoint_every_steps} extra={' '.join(extra) or '-'}"
    )
    for i, label in ((0, "samples/s (wall)"), (1, "samples per CPU-second")):
        b = [r[i] for r in bare]
        f = [r[i] for r in full]
        for how, pick in (("median", statistics.median), ("best", max)):
            print(
                f"{label:24s} {how:6s} bare {pick(b):8.1f}  full {pick(f):8.1f}  "
                f"overhead {100 * (pick(b) - pick(f)) / pick(b):+6.2f} %"
            )
    print(
        f"extra work timed inside full runs: median {100 * statistics.median(SHARES):.2f} % "
        f"of loop time (runs: {', '.join(f'{100 * x:.2f}' for x in SHARES)})"
    )
    print("target: overhead <= 3 %")


if __name__ == "__main__":
    main()
