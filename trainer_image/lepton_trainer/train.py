"""The per-rank training loop, started by torchrun (``python -m lepton_trainer.train``).

One global step: every rank takes its slice of the global batch (see ``data``), runs it
in micro-batches (gradient accumulation), DDP averages the gradients, the optimizer steps
with the LR of that global step, then one small all-reduce shares the loss and whether any
rank was asked to stop. The step counter and the data position change together right
after the optimizer step, so the state is consistent at every collective: whatever fails,
rank 0 can checkpoint what it holds.

SIGTERM (the pod is being deleted; torchrun's agent forwards it to every worker) only sets
a flag: all ranks finish the current step, agree through that all-reduce, rank 0 writes a
checkpoint, everyone waits for it at a barrier and exits 143 (``exitcodes.STOPPED``).

Checkpoints are fenced by ``LEPTON_GENERATION`` (see ``checkpoint``): rank 0 claims the
directory on start, and a worker of an older generation exits 172 (``exitcodes.FENCED``)
instead of writing.
"""

from __future__ import annotations

import time

_WORKER_START = time.time()  # before the heavy imports: the restart-cost breakdown uses it

import contextlib
import ctypes
import json
import math
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import exitcodes
from .checkpoint import (
    TRANSIENT_ERRNOS,
    CheckpointStore,
    CheckpointTimer,
    StaleGeneration,
    UnreadableCheckpoints,
)
from .comm import CommTimer, StepComm
from .config import TrainConfig, parse_args
from .data import ByteBlocks, GlobalSampler, load_corpus, rank_slice
from .metrics import TrainerMetrics
from .model import TinyGPT
from .pace import Pacer, interpolate
from .schedule import lr_at

_STOP = {"requested": False}


def log(**fields) -> None:
    """One ``key=value`` line on stdout, flushed (kubectl logs and the demo read these)."""
    print(" ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


def _on_sigterm(signum, frame) -> None:
    # Only set a flag: the loop stops at the end of the current step, after a checkpoint.
    _STOP["requested"] = True


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (from torchrun's and the operator's env)."""

    rank: int = 0
    world: int = 1  # ranks (processes) in the job
    local_rank: int = 0
    local_world: int = 1  # ranks on this node (pod)
    node_rank: int = 0
    nodes: int = 1  # nodes (pods) in this generation: the operator's world size
    generation: int = 0

    @classmethod
    def from_environ(cls, environ=None) -> "DistEnv":
        e = os.environ if environ is None else environ
        world = int(e.get("WORLD_SIZE", "1"))
        local_world = int(e.get("LOCAL_WORLD_SIZE", str(world)))
        nodes = int(
            e.get("GROUP_WORLD_SIZE")
            or e.get("LEPTON_WORLD_SIZE")
            or e.get("LEPTON_JOB_TOTAL_WORKERS")
            or max(1, world // local_world)
        )
        return cls(
            rank=int(e.get("RANK", "0")),
            world=world,
            local_rank=int(e.get("LOCAL_RANK", "0")),
            local_world=local_world,
            node_rank=int(e.get("GROUP_RANK", "0")),
            nodes=nodes,
            generation=int(e.get("LEPTON_GENERATION") or "0"),
        )

    def node_share(self, global_batch: int) -> int:
        """Samples of a global batch processed on this node: the ranks of this node are
        contiguous (torchrun assigns rank = node_rank * local_world + local_rank)."""
        first = self.node_rank * self.local_world
        return sum(
            rank_slice(global_batch, self.world, r)[1] for r in range(first, min(first + self.local_world, self.world))
        )


def worker_device(local_rank: int, cuda: bool) -> torch.device:
    """The device of one rank: GPU `LOCAL_RANK` of the pod under CUDA (torchrun starts
    `nproc_per_node` ranks per pod, one per GPU, numbered 0..n-1 on each pod), else the CPU."""
    return torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def _is_peer_failure(exc: BaseException) -> bool:
    """Does this exception mean a collective broke because another process went away?"""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("connection closed", "connection reset", "broken pipe", "gloo", "nccl", "timed out", "peer")
    )


class Trainer:
    """Runs the training (or synthetic) loop for one rank; ``run()`` returns an exit code.

    ``metrics`` and ``checkpoints`` can be switched off for the overhead benchmark.
    """

    def __init__(self, cfg: TrainConfig, env: DistEnv, metrics: bool = True, checkpoints: bool = True):
        self.cfg = cfg
        self.env = env
        self.use_metrics = metrics and env.local_rank == 0 and cfg.metrics_port > 0
        self.store = (
            CheckpointStore(cfg.checkpoint_dir, cfg.keep_checkpoints, env.generation)
            if checkpoints and cfg.checkpoint_dir
            else None
        )
        self.step = 0
        self.data_position = 0
        self.last_saved_step = 0  # step 0 (nothing learnt) is never worth a file
        self.metrics: TrainerMetrics | None = None
        self.positions_file = None
        self.cuda = torch.cuda.is_available() and not cfg.synthetic
        self.device = worker_device(env.local_rank, self.cuda)
        # The compute/communication split is exported for real training only: a synthetic
        # step or a --pace-curve sleep is neither, and would pass for compute.
        self.measure_comm = not cfg.synthetic and not cfg.pace_curve
        self.comm: CommTimer | None = None
        self._stats_seconds = 0.0

    # ----- setup -------------------------------------------------------------------

    def _init_distributed(self) -> None:
        if self.env.world > 1 and not dist.is_initialized():
            t0 = time.time()
            if self.cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.cuda else "gloo")
            # One line per rank: which device each local rank drives (kubectl logs shows a bad mapping).
            log(event="rank_device", rank=self.env.rank, local_rank=self.env.local_rank, device=self.device)
            if self.env.rank == 0:
                log(
                    event="process_group_ready",
                    backend=dist.get_backend(),
                    seconds=f"{time.time() - t0:.3f}",
                    t=f"{time.time():.3f}",
                )

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # same init everywhere (DDP also broadcasts rank 0's)
        random.seed(cfg.seed)
        if cfg.synthetic:
            self.sampler = GlobalSampler(1_000_000, cfg.seed)
            self.model = self.ddp = self.optimizer = None
            return
        self.blocks = ByteBlocks(load_corpus(), cfg.block_size)
        self.sampler = GlobalSampler(self.blocks.num_samples, cfg.seed)
        self.model = TinyGPT(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ddp = None
        if dist.is_initialized():
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.env.local_rank] if self.cuda else None)
            if self.measure_comm:
                self.comm = CommTimer(cuda=self.cuda)
                self.comm.register(self.ddp)

    def _broadcast(self, values: list[int]) -> list[int]:
        """Rank 0's values on every rank (a tensor: broadcast_object_list needs numpy)."""
        if not dist.is_initialized():
            return values
        box = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.broadcast(box, src=0)
        return box.tolist()

    def _any_rank(self, values: list[int]) -> list[int]:
        """Element-wise max over all ranks."""
        if not dist.is_initialized():
            return values
        box = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return box.tolist()

    def _resume(self) -> None:
        """Rank 0 claims the directory for this generation, then all ranks agree on the
        newest checkpoint every one of them can read, and load it."""
        if self.store is None:
            if self.env.rank == 0:
                log(event="fresh_start", step=0)
            return
        t0 = time.time()
        stale = ""
        if self.env.rank == 0:
            try:
                self.store.claim()
            except StaleGeneration as exc:
                stale = str(exc)
        # Every rank learns of it, so that all exit FENCED rather than PEER_LOST.
        if self._broadcast([int(bool(stale))])[0]:
            raise StaleGeneration(stale or "rank 0 found a newer generation's checkpoints")
        entry, state = self.store.load_newest(self.env.rank == 0, self._broadcast, self._any_rank)
        if entry is None:
            if self.env.rank == 0:
                log(event="fresh_start", step=0)
            return
        path = entry.path
        if bool(state["synthetic"]) != self.cfg.synthetic:
            raise ValueError(f"{path} was written with synthetic={state['synthetic']}")
        if not self.cfg.synthetic:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = self.last_saved_step = int(state["step"])
        self.data_position = int(state["data_position"])
        if self.env.rank == 0:
            log(
                event="resumed",
                step=self.step,
                data_position=self.data_position,
                from_world=state.get("world_size"),
                from_ranks=state.get("ranks"),
                from_gen=entry.generation,
                path=path,
                seconds=f"{time.time() - t0:.3f}",
                t=f"{time.time():.3f}",
            )

    def _start_metrics(self) -> None:
        if not self.use_metrics:
            return
        self.metrics = TrainerMetrics(comm=self.measure_comm)
        self.metrics.set_membership(self.env.nodes, self.env.generation)
        self.metrics.set_run(self.cfg.max_steps * self.cfg.global_batch_size, self.data_position)
        try:
            self.metrics.serve(self.cfg.metrics_addr, self.cfg.metrics_port)
            log(
                event="metrics_serving", addr=self.cfg.metrics_addr, port=self.cfg.metrics_port, node=self.env.node_rank
            )
        except OSError as exc:
            # Training matters more than its metrics; the operator holds on missing data.
            log(event="metrics_unavailable", error=repr(str(exc)))

    def _open_positions(self) -> None:
        if self.cfg.positions_dir:
            Path(self.cfg.positions_dir).mkdir(parents=True, exist_ok=True)
            name = f"positions-g{self.env.generation}-r{self.env.rank}.jsonl"
            self.positions_file = open(Path(self.cfg.positions_dir) / name, "a")

    # ----- one step ----------------------------------------------------------------

    def _real_step(self, indices: list[int]) -> float:
        """Forward/backward over this rank's samples; returns their summed loss."""
        cfg, env = self.cfg, self.env
        # Same number of micro-batches on every rank: DDP needs matching backward calls.
        largest_share = math.ceil(cfg.global_batch_size / env.world)
        n_micro = max(1, math.ceil(largest_share / cfg.micro_batch_size))
        # Weight so that DDP's mean over ranks equals the mean over the global batch.
        scale = env.world / cfg.global_batch_size
        total = torch.zeros((), device=self.device)
        for i in range(n_micro):
            start, count = rank_slice(len(indices), n_micro, i)
            chunk = indices[start : start + count]
            sync = self.ddp is None or i == n_micro - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
            # An empty share still runs a zero-weight pass so DDP's all-reduce fires.
            x, y = self.blocks.batch(chunk or [0])
            timed = sync and self.comm is not None
            with ctx, autocast:
                loss = (self.ddp or self.model)(x.to(self.device), y.to(self.device))
                weight = scale if chunk else 0.0
                if timed:
                    self.comm.backward_started()
                (loss * weight).backward()
                if timed:
                    self.comm.backward_finished()
            if chunk:
                total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)

    def _synthetic_step(self, indices: list[int]) -> float:
        """Sleep as long as the emulated job would need for one global batch."""
        job_rate = self.cfg.synthetic_samples_per_second * self.env.nodes
        time.sleep(self.cfg.global_batch_size / job_rate)
        # A falling curve, so dashboards of synthetic jobs look like training.
        return len(indices) * (1.0 + 4.5 * math.exp(-self.step / 200.0))

    def _all_reduce_stats(self, loss_sum: float) -> tuple[float, bool]:
        stats = torch.tensor([loss_sum, 1.0 if _STOP["requested"] else 0.0], dtype=torch.float64, device=self.device)
        self._stats_seconds = 0.0
        if dist.is_initialized():
            t0 = time.perf_counter()
            dist.all_reduce(stats)
            self._stats_seconds = time.perf_counter() - t0
        return float(stats[0]) / self.cfg.global_batch_size, bool(stats[1] > 0)

    # ----- checkpoint --------------------------------------------------------------

    def _state(self) -> dict:
        state = {
            "step": self.step,
            "data_position": self.data_position,
            "global_batch_size": self.cfg.global_batch_size,
            "seed": self.cfg.seed,
            "synthetic": self.cfg.synthetic,
            "world_size": self.env.nodes,
            "ranks": self.env.world,
            "generation": self.env.generation,
            "time": time.time(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        if not self.cfg.synthetic:
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def _save(self, reason: str) -> None:
        if self.store is None or self.env.rank != 0 or self.step == self.last_saved_step:
            return
        t0 = time.time()
        path = self.store.save(self._state())
        self.last_saved_step = self.step
        log(
            event="checkpoint_saved",
            step=self.step,
            reason=reason,
            path=path,
            seconds=f"{time.time() - t0:.3f}",
            t=f"{time.time():.3f}",
        )

    # ----- the loop ----------------------------------------------------------------

    def run(self) -> int:
        cfg, env = self.cfg, self.env
        self._init_distributed()
        if env.rank == 0:
            log(
                event="start",
                mode="synthetic" if cfg.synthetic else "real",
                world=env.nodes,
                ranks=env.world,
                gen=env.generation,
                device=self.device.type,
                max_steps=cfg.max_steps,
                global_batch=cfg.global_batch_size,
                checkpoint_dir=cfg.checkpoint_dir or "-",
                t=f"{_WORKER_START:.3f}",
            )
            if self.store is None:
                log(
                    event="checkpoints_disabled",
                    reason="LEPTON_CHECKPOINT_DIR_unset" if not cfg.checkpoint_dir else "disabled_by_caller",
                )
        self._build()
        try:
            try:
                self._resume()
                self._start_metrics()
                self._open_positions()
                return self._loop()
            except Exception as exc:
                if env.world > 1 and _is_peer_failure(exc):
                    log(
                        event="peer_lost",
                        rank=env.rank,
                        step=self.step,
                        error=repr(str(exc).splitlines()[0][:200] if str(exc) else ""),
                    )
                    self._save("peer_lost")  # rank 0's state is consistent at any collective
                    return exitcodes.PEER_LOST
                raise
        except StaleGeneration as exc:
            # A newer generation owns the checkpoints: the operator has moved on without us.
            log(event="fenced", rank=env.rank, gen=env.generation, step=self.step, reason=repr(str(exc)))
            return exitcodes.FENCED
        except (UnreadableCheckpoints, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in TRANSIENT_ERRNOS:
                raise
            # The storage may recover: a retry, not a permanent failure, nor a fresh start.
            log(event="storage_error", rank=env.rank, step=self.step, error=repr(str(exc)[:300]))
            return exitcodes.STORAGE_ERROR
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            if self.positions_file is not None:
                self.positions_file.close()

    def _loop(self) -> int:
        cfg, env = self.cfg, self.env
        G = cfg.global_batch_size
        offset, count = rank_slice(G, env.world, env.rank)
        node_samples = env.node_share(G)
        points = cfg.pace_points()
        pacer = Pacer(interpolate(points, env.nodes)) if points else None
        timer = CheckpointTimer(cfg.checkpoint_every_steps, cfg.checkpoint_every_seconds)
        step_fn = self._synthetic_step if cfg.synthetic else self._real_step
        log_t, log_step, loss = time.monotonic(), self.step, float("nan")
        first = True

        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(self.step, cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
            if self.optimizer is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            start = self.data_position + offset
            indices = self.sampler.indices(start, count)
            if self.positions_file is not None:
                self.positions_file.write(
                    json.dumps(
                        {
                            "step": self.step,
                            "rank": env.rank,
                            "ranks": env.world,
                            "lr": lr,
                            "positions": [start, start + count],
                            "samples": indices,
                        }
                    )
                    + "\n"
                )
                self.positions_file.flush()

            t_fn = time.perf_counter()
            loss_sum = step_fn(indices)
            fn_seconds = time.perf_counter() - t_fn
            grad_comm = self.comm.take() if self.comm is not None else StepComm()
            # Step and position move together, right after the optimizer step: the state
            # stays consistent.
            self.step += 1
            self.data_position += G
            loss, stop = self._all_reduce_stats(loss_sum)
            if pacer is not None:
                pacer.wait(G)
            seconds = time.perf_counter() - t0
            if self.metrics is not None:
                self.metrics.observe_step(node_samples, seconds, loss, self.data_position)
                # Exposed communication: the gradient all-reduce the step waited for, and
                # the stats all-reduce; compute: the rest of the step function.
                self.metrics.observe_split(
                    compute=max(0.0, fn_seconds - grad_comm.exposed),
                    comm=grad_comm.exposed + self._stats_seconds,
                    allreduce=grad_comm.allreduce,
                )
            if first and env.rank == 0:
                log(event="first_step", step=self.step, t=f"{time.time():.3f}")
                first = False

            if (
                cfg.fail_at_step
                and self.step == cfg.fail_at_step
                and cfg.fail_rank in (-1, env.rank)
                and cfg.fail_generation in (-1, env.generation)
            ):
                log(event="fail_injected", step=self.step, rank=env.rank, exit_code=cfg.fail_exit_code)
                sys.stdout.flush()
                os._exit(cfg.fail_exit_code)  # a crash: no cleanup, no checkpoint

            if cfg.hang_at_step and self.step == cfg.hang_at_step and not stop:
                # A stuck job, for the operator's hang watchdog: no more steps (so no more
                # samples in /metrics, whose server thread keeps running), but SIGTERM
                # still checkpoints and exits 143 below.
                log(event="hang_injected", step=self.step, rank=env.rank)
                while not _STOP["requested"]:
                    time.sleep(0.05)
                stop = True

            now = time.monotonic()
            if env.local_rank == 0 and (now - log_t >= cfg.log_every_seconds or self.step == cfg.max_steps or stop):
                rate = (self.step - log_step) * G / max(now - log_t, 1e-9)
                log(
                    step=f"{self.step}/{cfg.max_steps}",
                    loss=f"{loss:.4f}",
                    **{"samples/s": f"{rate:.1f}"},
                    world=env.nodes,
                    gen=env.generation,
                    lr=f"{lr:.3e}",
                    **{"node_samples/s": f"{rate * node_samples / G:.1f}"},
                )
                log_t, log_step = now, self.step

            if stop and self.step < cfg.max_steps:
                if env.rank == 0:
                    log(event="stopping", reason="sigterm", step=self.step)
                self._save("sigterm")
                self._barrier()
                return exitcodes.STOPPED
            if self.step < cfg.max_steps and timer.due(self.step):
                self._save("periodic")
                timer.reset()

        self._save("final")
        self._barrier()
        if env.rank == 0:
            log(event="finished", step=self.step, loss=f"{loss:.4f}")
        return exitcodes.OK

    def _barrier(self) -> None:
        """Wait until rank 0's checkpoint is written before anyone exits."""
        if dist.is_initialized():
            dist.barrier()


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us if torchrun's agent dies, so no worker outlives it."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the agent died before prctl took effect
        _STOP["requested"] = True


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank; returns the process exit code."""
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _die_with_parent()
    env = DistEnv.from_environ()
    code = Trainer(cfg, env).run()
    if code == exitcodes.STOPPED:
        # Inside the grace period every second counts: the checkpoint is fsync'd and
        # every rank passed the barrier, so skip process-group and interpreter teardown
        # (seconds with torch loaded on a busy node).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if dist.is_initialized() and code == exitcodes.OK:  # a broken group (peer lost, fenced) may hang
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
