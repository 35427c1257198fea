"""Speed-balanced splits (trainer/data/balance.py): the maths, and shards under any split. Pure numpy."""

import numpy as np
import pytest

from trainer.data.balance import Balancer, assign_rows, predicted_time, rows_of, water_fill
from trainer.data.batches import BatchStream, epoch_batches, rank_rows
from conftest import fake_split


def test_water_fill_is_proportional_and_gives_every_rank_a_row():
    assert water_fill(8, [3.0, 1.0]) == [6, 2]
    assert water_fill(16, [1.0, 1.0]) == [8, 8]
    assert water_fill(12, [2.0, 1.0, 1.0]) == [6, 3, 3]
    assert water_fill(8, [100.0, 1.0]) == [7, 1], "the slowest rank still gets one row"
    assert sum(water_fill(17, [1.3, 0.7, 2.2])) == 17
    # no other split of the rows finishes sooner
    speeds = [1.0, 0.55]
    best = predicted_time(water_fill(10, speeds), speeds)
    assert all(predicted_time([a, 10 - a], speeds) >= best for a in range(1, 10))


@pytest.mark.parametrize("split", [[4, 4], [6, 2], [1, 7], [5, 2, 1], [3, 3, 3, 3], [9, 1, 1, 5]])
@pytest.mark.parametrize("count_short", [0, 1, 3])
def test_assign_rows_covers_every_position_once_within_each_share(split, count_short):
    count = max(1, sum(split) - count_short)
    owned = assign_rows(count, split)
    flat = sorted(p for positions in owned for p in positions)
    assert flat == list(range(count))
    assert all(len(positions) <= share for positions, share in zip(owned, split))
    if count_short == 0:
        assert [len(p) for p in owned] == split


def test_even_split_is_the_strided_deal_and_uneven_deals_lengths_in_proportion():
    batch = np.arange(100, 116)  # a length-sorted global micro-batch (longest first)
    assert [p for p in assign_rows(16, [8, 8])] == [list(range(0, 16, 2)), list(range(1, 16, 2))]
    for r in range(2):
        assert np.array_equal(rows_of(batch, r, [8, 8]), rank_rows(batch, r, 2))
    fast, slow = (rows_of(batch, r, [12, 4]) for r in range(2))
    # the slow rank gets long and short rows alike, not just the longest or shortest
    assert fast.min() < slow.min() and slow.max() > np.median(batch)


def test_shards_stay_disjoint_and_cover_each_epoch_under_any_split():
    split = fake_split(101)
    for row_split in ([6, 2], [1, 7], [3, 3], [5, 1, 3]):
        world = len(row_split)
        streams = [BatchStream(split, sum(row_split) // world, r, world, seed=3, pad_multiple=8)
                   for r in range(world)]
        for s in streams:
            s.set_split(row_split)
        per_epoch = len(epoch_batches(split.lengths, sum(row_split), seed=3, epoch=0))
        seen = [[] for _ in range(world)]
        for _ in range(per_epoch):
            for r, s in enumerate(streams):
                b = next(s)
                assert b.inputs.shape[0] == row_split[r], "each rank computes its share's rows"
                seen[r].extend(b.indices.tolist())
        flat = [i for s in seen for i in s]
        assert len(flat) == len(set(flat)) and sorted(flat) == list(range(101)), row_split


def test_auto_balancer_moves_rows_to_the_faster_rank_with_hysteresis():
    b = Balancer.from_setting("auto", rows=16, world_size=2)
    assert b.split == [8, 8] and not b.wants_measure(1) and b.wants_measure(2)
    assert not b.wants_measure(5) and b.wants_measure(16) and b.wants_measure(32)
    # rank 1 takes twice as long per row: two thirds of the rows go to rank 0
    note = b.observe([1.0, 2.0], widths=[64])
    assert b.split == [11, 5] and "rows per micro-batch [11, 5]" in note
    # small noise in a later measurement does not move the split (fewer shapes to compile)
    seconds = [r * 64 / s for r, s in zip(b.split, b.speeds)]
    assert b.observe([seconds[0] * 1.01, seconds[1]], widths=[64]) is None and b.split == [11, 5]
    # the same numbers give the same split, whoever computes it
    again = Balancer.from_setting("auto", rows=16, world_size=2)
    again.observe([1.0, 2.0], widths=[64])
    assert again.split == [11, 5] and again.speeds == pytest.approx([16.0 * 64 / 2, 16.0 * 64 / 4])
    assert Balancer.from_dict(b.to_dict()) == b, "a checkpoint holds the whole balancer"


def test_fixed_speeds_and_a_rank_that_barely_helps():
    b = Balancer.from_setting([3, 1], rows=8, world_size=2)
    assert b.split == [6, 2] and not b.wants_measure(2)
    slow = Balancer.from_setting([20, 1], rows=16, world_size=2)
    assert slow.split == [15, 1] and "rank 1 barely helps" in slow.describe()
    assert Balancer.from_setting("auto", rows=4, world_size=1).mode == "off"


def test_off_and_fixed_splits_time_compute_only_when_asked():
    # logging.compute_timings: measured updates cost overlap and memory, so only on request
    for balancer in (Balancer.from_setting("off", 8, 2), Balancer.from_setting([3, 1], 8, 2)):
        assert not any(balancer.wants_measure(step) for step in range(1, 40))
        balancer.timed = True
        assert [s for s in range(1, 40) if balancer.wants_measure(s)] == [2, 3, 4, 16, 32]
        split = list(balancer.split)
        assert balancer.observe([1.0, 3.0], [64]) is None and balancer.split == split  # reported, never acted on
