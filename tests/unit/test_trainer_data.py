"""Sampler and data positions: the data order does not depend on the world size."""

import pytest

pytest.importorskip("torch", reason="trainer tests need torch: pip install -e '.[trainer]'")

from lepton_trainer.data import ByteBlocks, GlobalSampler, load_corpus, rank_slice

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("batch,world", [(32, 1), (32, 2), (32, 3), (7, 4), (3, 5)])
def test_rank_slices_tile_the_global_batch(batch, world):
    slices = [rank_slice(batch, world, r) for r in range(world)]
    covered = [p for off, n in slices for p in range(off, off + n)]
    assert covered == list(range(batch))
    assert max(n for _, n in slices) - min(n for _, n in slices) <= 1


def test_each_epoch_is_a_permutation_and_epochs_differ():
    s = GlobalSampler(50, seed=7)
    first, second = s.indices(0, 50), s.indices(50, 50)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second


def test_same_seed_same_order_other_seed_other_order():
    assert GlobalSampler(100, 1).indices(0, 100) == GlobalSampler(100, 1).indices(0, 100)
    assert GlobalSampler(100, 1).indices(0, 100) != GlobalSampler(100, 2).indices(0, 100)


def _consumed(num_samples, batch, plan):
    """Positions consumed when world sizes change between steps: plan = [(world, steps)]."""
    sampler, pos, out = GlobalSampler(num_samples, 3), 0, []
    for world, steps in plan:
        for _ in range(steps):
            step_samples = []
            for r in range(world):
                off, n = rank_slice(batch, world, r)
                step_samples += sampler.indices(pos + off, n)
            out.append(step_samples)
            pos += batch
    return out


def test_resume_at_another_world_size_sees_the_same_samples_in_the_same_steps():
    fixed = _consumed(97, 12, [(1, 30)])
    changing = _consumed(97, 12, [(2, 10), (3, 7), (5, 13)])
    assert changing == fixed  # same samples per global step, in the same rank order
    flat = [i for step in fixed for i in step]
    # 30 steps * 12 = 360 positions across epochs of 97: each epoch is complete
    for e in range(3):
        assert sorted(flat[e * 97 : (e + 1) * 97]) == list(range(97))


def test_bundled_corpus_blocks():
    corpus = load_corpus()
    assert 100_000 < len(corpus) < 1_000_000
    blocks = ByteBlocks(corpus, 16)
    x, y = blocks.batch([0, blocks.num_samples - 1])
    assert x.shape == y.shape == (2, 16)
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are the inputs shifted by one byte
