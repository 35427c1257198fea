"""Weighted mixes (``data.mix``): exact counts per epoch, the same on 1 and 2 ranks, with packing, pairs and resume."""

import json

import numpy as np
import pytest

from conftest import (MLX_DP, PYTHON, ROOT, TINY_DATA, fake_split, read_metrics, read_weights, run, tiny_recipe,
                      write_jsonl)
from trainer.config.load import DataConfig
from trainer.data.batches import BatchStream
from trainer.data.mix import MixPlan, mix_counts
from trainer.data.packing import pack
from trainer.errors import ConfigError, DataError

ROWS_WORKER = str(ROOT / "tests" / "workers" / "rows.py")
TRAIN_MANY = str(ROOT / "tests" / "workers" / "train_many.py")


def test_counts_are_the_weights_shares_and_add_up_exactly():
    assert mix_counts([3, 1], 400).tolist() == [300, 100]
    assert mix_counts([1, 1, 1], 7).tolist() == [3, 2, 2]  # the leftover sample goes to the first tie
    assert mix_counts([0.5, 0.3, 0.2], 10).tolist() == [5, 3, 2]
    assert mix_counts([2.0, 1e-3], 1000).sum() == 1000


def test_an_epoch_holds_each_sources_count_drawn_without_repeats_until_a_source_is_used_up():
    plan = MixPlan(("a", "b"), (100, 40), (1.0, 3.0), 140)  # a: 35 an epoch (down), b: 105 (up: 2.6 passes)
    for epoch in range(4):
        members = plan.members(seed=7, epoch=epoch)
        assert np.bincount(plan.source_of(members), minlength=2).tolist() == [35, 105]
        assert np.array_equal(members, plan.members(seed=7, epoch=epoch))  # a pure function: every rank agrees
    seen = np.concatenate([plan.members(7, e) for e in range(20)])
    a, b = seen[plan.source_of(seen) == 0], seen[plan.source_of(seen) == 1] - 100
    assert len(np.unique(a[:100])) == 100  # a's picks cover its 100 samples before any comes back
    assert (np.bincount(a) == 7).all()  # 20 epochs x 35 = 7 whole passes over a
    assert sorted(set(np.bincount(b))) == [52, 53] and (np.bincount(b) == 53).sum() == 20  # 52.5 passes over b ...
    b8 = np.concatenate([plan.members(7, e) for e in range(8)])
    assert (np.bincount(b8[plan.source_of(b8) == 1] - 100) == 21).all()  # ... and 8 x 105 = 21 whole passes
    assert not np.array_equal(plan.members(7, 0), plan.members(8, 0))


def _mixed(sizes=(60, 60), weights=(3.0, 1.0), epoch_size=None):
    split = fake_split(sum(sizes), seed=1)
    split.mix = MixPlan(("a", "b"), sizes, weights, epoch_size or sum(sizes))
    return split


def test_two_ranks_train_the_global_batches_of_one_process_at_twice_the_batch():
    split = _mixed()
    one = BatchStream(split, 8, 0, 1, seed=3, pad_multiple=8)
    two = BatchStream(split, 4, 0, 2, seed=3, pad_multiple=8, hosted=(0, 1))
    for update in range(2 * 15):  # two epochs of 120 samples at 8 a micro-batch
        single, pair = one.take(1)[0], two.take(1)
        assert sorted(single.indices) == sorted(np.concatenate([b.indices for b in pair]))
        assert single.global_tokens == pair[0].global_tokens == pair[1].global_tokens
    assert one.epoch == two.epoch == 1 and one.index == 15


def test_packed_rows_of_a_mix_hold_each_epochs_picks():
    split = _mixed()
    packed = pack(split, 128)
    for epoch in range(3):
        view, members = packed.epoch_view(seed=5, epoch=epoch)
        assert members is None
        samples = np.concatenate([row for row in view.rows])
        assert sorted(samples) == sorted(split.mix.members(5, epoch))
        assert np.bincount(split.mix.source_of(samples)).tolist() == [90, 30]
    assert packed.epoch_items(5) == len(packed.epoch_view(5, 0)[0])


def test_a_mix_is_strict_about_its_keys():
    with pytest.raises(ConfigError, match=r"unknown key data.mix\[0\].wieght .*did you mean weight"):
        DataConfig(mix=[{"path": "a.jsonl", "wieght": 3}])
    with pytest.raises(ConfigError, match=r"data.mix\[1\].weight must be a positive number"):
        DataConfig(mix=[{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": -1}])
    with pytest.raises(ConfigError, match="data.mix cannot stream"):
        DataConfig(mix=[{"path": "a.jsonl"}], streaming=True)
    with pytest.raises(ConfigError, match=r"data.mix\[0\].hf_dataset needs a `path`"):
        DataConfig(mix=[{"hf_dataset": {"train_split": "train"}}])


def _sources(tmp_path, sizes=(60, 60)):
    rows = [json.loads(line) for line in (TINY_DATA / "train.jsonl").read_text().splitlines()]
    a = write_jsonl(tmp_path / "a.jsonl", rows[:sizes[0]])
    b = write_jsonl(tmp_path / "b.jsonl", rows[1000:1000 + sizes[1]])
    return a, b


def test_pairs_and_too_small_a_share_load_as_a_mix(tmp_path, tokenizer):
    from trainer.data.pair_batches import PairStream
    from trainer.data.pairs import load_pair_splits

    pairs = [json.loads(line) for line in (ROOT / "data" / "tiny-preference" / "train.jsonl").read_text().splitlines()]
    a, b = write_jsonl(tmp_path / "pa.jsonl", pairs[:30]), write_jsonl(tmp_path / "pb.jsonl", pairs[30:50])
    cfg = DataConfig(mix=[{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}], epoch_size=40)
    train = load_pair_splits(cfg, tokenizer, ("train",), show_progress=False)["train"]
    assert train.mix.sizes == (30, 20) and train.mix.counts.tolist() == [10, 30]
    stream = PairStream(train, 4, 0, 1, seed=0, pad_multiple=8)
    picked = np.concatenate([stream.take(1)[0].indices for _ in range(10)])  # one epoch: 40 pairs
    assert np.bincount(train.mix.source_of(picked)).tolist() == [10, 30]
    small = DataConfig(mix=[{"path": str(a), "weight": 1000}, {"path": str(b), "weight": 1}], epoch_size=40)
    with pytest.raises(DataError, match="gives .*pb.jsonl no sample in an epoch of 40"):
        load_pair_splits(small, tokenizer, ("train",), show_progress=False)


def _rows(out_dir, ranks: int) -> dict:
    """step -> the sample indices every rank trained at that update."""
    steps = {}
    for rank in range(ranks):
        for line in (out_dir / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(i for batch in record["indices"] for i in batch)
    return steps


@pytest.mark.e2e
def test_a_3_to_1_mix_trains_on_its_sources_in_that_proportion_every_epoch_on_1_and_2_ranks(tmp_path):
    a, b = _sources(tmp_path)  # 60 samples each: weighted 3:1, an epoch of 120 takes 90 of a and 30 of b
    mix = [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}]
    per_epoch = 120 // 8  # global micro-batches of 8 samples
    trained = {}
    for ranks in (1, 2):
        recipe = tiny_recipe(tmp_path / f"n{ranks}", data={"path": None, "mix": mix, "max_seq_length": 128},
                             training={"batch_size": 8 // ranks, "steps": 2 * per_epoch, "learning_rate": 1e-3},
                             checkpoint={"dir": str(tmp_path / f"run{ranks}"), "every": 0},
                             logging={"every": 10, "progress_bar": False})
        out = tmp_path / f"rows{ranks}"
        result = run([MLX_DP, "launch", "-n", str(ranks), "--", PYTHON, ROWS_WORKER, str(out), "-", "--", "train",
                      str(recipe)], timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "data.mix: 120 samples per epoch" in result.stdout + result.stderr
        record = next(r for r in read_metrics(tmp_path / f"run{ranks}") if r.get("event") == "data_mix")
        assert [s["per_epoch"] for s in record["sources"]] == [90, 30]
        trained[ranks] = _rows(out, ranks)
        for epoch in range(2):
            rows = [i for step in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1)
                    for i in trained[ranks][step]]
            assert len(rows) == 120
            assert sum(i < 60 for i in rows) == 90 and sum(i >= 60 for i in rows) == 30  # 3:1 in samples
    assert {s: sorted(r) for s, r in trained[1].items()} == {s: sorted(r) for s, r in trained[2].items()}


def resume_plan(tmp_path, recipe, stop: int) -> list:
    """``train_many.py``'s runs: uninterrupted into ``whole``, then stopped after update ``stop`` and resumed
    into ``stopped``."""
    whole, stopped = f"checkpoint.dir={tmp_path / 'whole'}", f"checkpoint.dir={tmp_path / 'stopped'}"
    return [{"recipe": str(recipe), "overrides": [whole]},
            {"recipe": str(recipe), "overrides": [stopped], "faults": f"stop:step={stop}"},
            {"recipe": str(recipe), "overrides": [stopped], "resume": True}]


@pytest.mark.e2e
def test_a_packed_mix_resumed_after_a_stop_trains_what_an_uninterrupted_run_trains(tmp_path):
    a, b = _sources(tmp_path, sizes=(80, 40))
    mix = [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 2}]
    recipe = tiny_recipe(tmp_path, data={"path": None, "mix": mix, "epoch_size": 90, "packing": True,
                                         "max_seq_length": 128},
                         training={"batch_size": 2, "steps": 14, "learning_rate": 1e-3}, checkpoint={"every": 0})
    (tmp_path / "spec.json").write_text(json.dumps(resume_plan(tmp_path, recipe, stop=5)))
    result = run([MLX_DP, "launch", "-n", "2", "--", PYTHON, TRAIN_MANY, str(tmp_path / "spec.json")], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # about 45 packed rows an epoch at 4 a global micro-batch: 14 updates cross an epoch, packed anew
    assert max(r["epoch"] for r in read_metrics(tmp_path / "whole") if "train_loss" in r) > 1.0
    assert any(r.get("event") == "resumed" for r in read_metrics(tmp_path / "stopped"))
    whole, again = read_weights(tmp_path / "whole"), read_weights(tmp_path / "stopped")
    assert all(np.array_equal(whole[k], again[k]) for k in whole)
