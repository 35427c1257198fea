"""Sharding maths: global batches, rank slices, balance, determinism. Pure numpy."""

import numpy as np
import pytest

from trainer.data.batches import BatchStream, epoch_batches, make_batch, padded_width, rank_rows
from conftest import fake_split


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [40, 37, 101])
def test_shards_are_disjoint_and_cover_the_data(world, n):
    split = fake_split(n)
    per_rank = 3
    for epoch in range(3):
        seen = [[] for _ in range(world)]
        for batch in epoch_batches(split.lengths, per_rank * world, seed=7, epoch=epoch):
            for rank in range(world):
                seen[rank].extend(rank_rows(batch, rank, world).tolist())
        flat = [i for s in seen for i in s]
        assert len(flat) == len(set(flat)), "a sample went to two ranks"
        assert sorted(flat) == list(range(n)), "the epoch does not cover the data"
        # balanced: rank shard sizes differ by at most one row per batch
        sizes = [len(s) for s in seen]
        assert max(sizes) - min(sizes) <= -(-n // (per_rank * world))


def test_n_ranks_see_the_batches_of_one_process_at_n_times_the_batch():
    split = fake_split(90)
    for world in (2, 3):
        one = BatchStream(split, 2 * world, 0, 1, seed=1, pad_multiple=8)
        ranks = [BatchStream(split, 2, r, world, seed=1, pad_multiple=8) for r in range(world)]
        for _ in range(40):  # crosses epoch boundaries (15 or 10 batches per epoch)
            whole = next(one)
            parts = [next(stream) for stream in ranks]
            union = np.concatenate([p.indices for p in parts])
            assert sorted(whole.indices.tolist()) == sorted(union.tolist())
            assert all(p.global_tokens == whole.global_tokens for p in parts)
            assert sum(p.tokens for p in parts) == whole.tokens


def test_order_is_deterministic_and_reshuffled_per_epoch():
    split = fake_split(64)
    a = epoch_batches(split.lengths, 8, seed=3, epoch=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(split.lengths, 8, seed=3, epoch=0)]
    b = epoch_batches(split.lengths, 8, seed=3, epoch=1)
    c = epoch_batches(split.lengths, 8, seed=4, epoch=0)
    assert [x.tolist() for x in a] != [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]


def test_ranks_get_equal_width_and_similar_tokens():
    split = fake_split(400, max_len=200)
    world, per_rank = 4, 4
    for batch in epoch_batches(split.lengths, per_rank * world, seed=0, epoch=0)[:20]:
        parts = [make_batch(split, batch, r, world, per_rank, 16) for r in range(world)]
        assert len({p.inputs.shape for p in parts}) == 1, "ranks must do the same work per step"
        tokens = [p.tokens for p in parts]
        assert sum(tokens) == parts[0].global_tokens
        assert max(tokens) - min(tokens) <= 0.25 * max(tokens) + 8


def test_mask_counts_only_completion_targets_and_padding_rows_are_empty():
    split = fake_split(10)
    batch = np.array([0, 1, 2])  # partial global batch for 2 ranks x 2 rows
    part = make_batch(split, batch, 1, 2, 2, 8)
    assert part.inputs.shape[1] % 8 == 0
    assert part.mask[1].sum() == 0  # rank 1 has one real row and one padding row
    i = 1
    assert part.mask[0].sum() == split.lengths[i] - max(split.prompt_lengths[i], 1)
    assert part.tokens == int(part.mask.sum())
    assert padded_width(17, 16) == 17 and padded_width(18, 16) == 33


def test_stream_position_resumes_exactly():
    split = fake_split(50)
    a = BatchStream(split, 2, 0, 2, seed=5, pad_multiple=8)
    for _ in range(17):  # crosses an epoch boundary (13 batches per epoch)
        next(a)
    b = BatchStream(split, 2, 0, 2, seed=5, pad_multiple=8)
    assert b.restore(a.position()) is None
    for _ in range(10):
        x, y = next(a), next(b)
        assert np.array_equal(x.inputs, y.inputs) and np.array_equal(x.indices, y.indices)


def test_stream_remaps_its_position_to_another_micro_batch():
    split = fake_split(96)
    two = BatchStream(split, 4, 0, 2, seed=5, pad_multiple=8)  # 8 sequences per micro-batch, 12 per epoch
    for _ in range(15):
        next(two)
    four = BatchStream(split, 4, 0, 4, seed=5, pad_multiple=8)  # 16 sequences, 6 per epoch
    note = four.restore(two.position())
    assert "micro-batches changed from 8 to 16" in note
    assert (four.epoch, four.index) == (1, 1)  # 3 of 12 batches of epoch 1 done = 1 (rounded down) of 6
    assert four.epoch_progress() == pytest.approx(1 + 1 / 6)


def same_batch(x, y):
    return (np.array_equal(x.inputs, y.inputs) and np.array_equal(x.mask, y.mask)
            and np.array_equal(x.indices, y.indices) and x.global_tokens == y.global_tokens)


def test_prefetched_order_is_the_order_built_in_place_through_split_changes():
    split = fake_split(50)
    plain = BatchStream(split, 2, 1, 2, seed=5, pad_multiple=8)
    ahead = BatchStream(split, 2, 1, 2, seed=5, pad_multiple=8, prefetch=True)
    try:
        for step in range(40):  # three epochs of 13 batches
            if step == 9:  # a new balance split while a batch is already built ahead under the old one
                plain.set_split([3, 1])
                ahead.set_split([3, 1])
            x, y = next(plain), next(ahead)
            assert same_batch(x, y), f"batch {step} differs"
            assert x.inputs.shape[0] == (1 if step >= 9 else 2)
    finally:
        ahead.close()


def test_prefetching_stream_resumes_exactly():
    split = fake_split(50)
    a = BatchStream(split, 2, 0, 2, seed=5, pad_multiple=8, prefetch=True)
    for _ in range(17):
        next(a)
    position = a.position()  # the batch built ahead is not counted as served
    b = BatchStream(split, 2, 0, 2, seed=5, pad_multiple=8, prefetch=True)
    assert b.restore(position) is None
    reference = BatchStream(split, 2, 0, 2, seed=5, pad_multiple=8)
    for _ in range(17):
        next(reference)
    try:
        for _ in range(10):
            r = next(reference)
            assert same_batch(next(a), r) and same_batch(next(b), r)
    finally:
        a.close()
        b.close()
