"""Communication measured apart from compute: a DDP communication hook around the gradient
all-reduce, and the per-step split the trainer exports (see trainer_image/README.md,
"Communication").

The hook is `default_hooks.allreduce_hook` (divide the bucket by the world size, all-reduce
it asynchronously, hand DDP the averaged tensor) with timestamps around it:

- the **launch** of every bucket's all-reduce and its **completion** (the future's
  callback): their difference, summed over the step's buckets, is the *all-reduce time*.
  With DDP's overlap most of it runs while backward still computes, and buckets queued
  behind each other count their queueing too, so it is not what the step loses to
  communication;
- the launch of the **last bucket** (`GradBucket.is_last()`): DDP launches it when the
  last gradient is ready, i.e. when backward's compute is done. The step then waits in
  `backward()` until every bucket is reduced: from that launch to `backward()` returning
  is the *exposed* gradient communication, the part that overlap did not hide (it
  includes waiting for a slower rank to reach the all-reduce: a synchronisation cost that
  grows with the worker count, like the transfer itself).

On CUDA both marks synchronise first (the compute stream at the last bucket, the device
after backward), since kernels and NCCL run asynchronously to the host.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class StepComm:
    """Communication of one global step on this rank, in seconds."""

    exposed: float = 0.0
    """Gradient all-reduce the step waited for after backward's compute was done."""
    allreduce: float = 0.0
    """Launch-to-completion time of every bucket's all-reduce, summed (overlap included)."""
    buckets: int = 0


class CommTimer:
    """A DDP communication hook (``register(ddp)``) that times the gradient all-reduce.

    Per synchronising backward: call ``backward_started()`` before it and
    ``backward_finished()`` after it returns; ``take()`` returns the step's totals and
    starts the next step.
    """

    def __init__(self, cuda: bool = False, clock=time.perf_counter):
        self.cuda = cuda
        self._clock = clock
        self._lock = threading.Lock()  # completions arrive on the backend's thread
        self._step = StepComm()
        self._compute_done: float | None = None

    def register(self, ddp: torch.nn.parallel.DistributedDataParallel, process_group=None) -> None:
        ddp.register_comm_hook(process_group, self.hook)

    def hook(self, process_group, bucket):  # no annotations: DDP compares them as objects
        """`allreduce_hook` semantics, timed (``bucket`` is a ``dist.GradBucket``)."""
        group = process_group if process_group is not None else dist.group.WORLD
        if bucket.is_last():
            if self.cuda:
                torch.cuda.current_stream().synchronize()
            self._compute_done = self._clock()
        launched = self._clock()
        tensor = bucket.buffer()
        tensor.div_(group.size())
        fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()

        def done(f: torch.futures.Future) -> torch.Tensor:
            elapsed = self._clock() - launched
            with self._lock:
                self._step.allreduce += elapsed
                self._step.buckets += 1
            return f.value()[0]

        return fut.then(done)

    def backward_started(self) -> None:
        self._compute_done = None

    def backward_finished(self) -> None:
        """After a synchronising ``backward()`` returned: the exposed wait ends now."""
        if self._compute_done is None:
            return  # no bucket launched (nothing to reduce)
        if self.cuda:
            torch.cuda.synchronize()
        wait = max(0.0, self._clock() - self._compute_done)
        with self._lock:
            self._step.exposed += wait
        self._compute_done = None

    def take(self) -> StepComm:
        """The step's communication so far, and reset."""
        with self._lock:
            step, self._step = self._step, StepComm()
        return step
