"""The bundled corpus and the world-size independent data order.

A *sample* is one block of ``block_size + 1`` bytes of the corpus (input and shifted
target); sample ``i`` starts at byte ``i * block_size``. The data order is a seeded
permutation of the sample indices, a new one per epoch. *Positions* count samples in that
order across epochs: global step ``s`` (at a fixed global batch ``G``) consumes positions
``[s*G, (s+1)*G)``, and rank ``r`` of ``R`` takes a contiguous slice of them
(:func:`rank_slice`). The checkpoint stores the next position, so a resume at any world
size continues exactly where the data stopped.
"""

from __future__ import annotations

from importlib import resources

import torch

CORPUS = "corpus.txt"


def load_corpus() -> torch.Tensor:
    """The bundled corpus as a uint8 tensor (bytes; the model's vocabulary is 256)."""
    raw = resources.files("lepton_trainer").joinpath("data", CORPUS).read_bytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def rank_slice(global_batch: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, count) of rank ``rank``'s share of a global batch.

    Shares differ by at most one sample when ``world`` does not divide the batch (the
    first ``global_batch % world`` ranks take one more); the loss is weighted so the
    gradient is still the mean over the whole global batch.
    """
    base, extra = divmod(global_batch, world)
    count = base + (1 if rank < extra else 0)
    offset = rank * base + min(rank, extra)
    return offset, count


class GlobalSampler:
    """Maps global positions to sample indices through seeded per-epoch permutations."""

    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError("the corpus is shorter than one block")
        self.num_samples = num_samples
        self.seed = seed
        self._epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=gen).tolist()
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        """Sample indices at positions ``[start, start + count)``."""
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.num_samples)
            out.append(self._permutation(epoch)[offset])
        return out


class ByteBlocks:
    """Non-overlapping (input, target) blocks of a byte corpus."""

    def __init__(self, corpus: torch.Tensor, block_size: int):
        self.corpus = corpus
        self.block_size = block_size
        self.num_samples = (len(corpus) - 1) // block_size

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked inputs and targets (int64, shape [len(indices), block_size])."""
        rows = [self.corpus[i * self.block_size : i * self.block_size + self.block_size + 1] for i in indices]
        data = torch.stack(rows).long()
        return data[:, :-1], data[:, 1:]
