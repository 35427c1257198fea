"""The lab's ``bench scaling --epoch``: one epoch side by side, ratios within each round."""

import pytest

from conftest import tiny_recipe
from lab.bench.scaling import make_lab_plan, parse_args
from lab.bench.scaling_epoch import epoch_schedule, summarize_epochs
from lab.rank import repair_length_sort
from trainer.bench.scaling_plan import BenchError, Run, bench_overrides


def plan_for(tmp_path, *extra):
    recipe = tiny_recipe(tmp_path)
    return make_lab_plan(parse_args([str(recipe), "-n", "2", "--launcher", "mlx-dp", *extra]))


def test_epoch_plan_runs_one_epoch_at_n_with_each_variant(tmp_path):
    plan = plan_for(tmp_path, "--epoch", "--vs-mlx-lm", "--mlx-lm-sort", "tokens", "--variant", "data.packing=true",
                    "data.long_samples=truncate")
    assert plan.sizes == [2] and plan.cfg.training.epochs == 1 and plan.cfg.training.steps is None
    assert "training.epochs=1" in bench_overrides(plan, tmp_path, epoch=True)
    kinds = [r.kind for r in epoch_schedule(plan, 0)]
    assert kinds == ["ours", "variant0", "mlx_lm"]


def test_variant_needs_epoch(tmp_path):
    with pytest.raises(BenchError, match="--variant applies to --epoch only"):
        plan_for(tmp_path, "--variant", "data.packing=true")


def test_ratios_are_taken_within_each_round(tmp_path):
    plan = plan_for(tmp_path, "--epoch", "--vs-mlx-lm", "--variant", "data.packing=true",
                    "data.long_samples=truncate")
    measured = {}
    # round 0: the whole machine is 2x slower than in round 1; the ratios must not see it
    for r, slow in ((0, 2.0), (1, 1.0)):
        measured[Run("ours", 2, "mlx-dp launch", r)] = {"updates": 10, "seconds": 10 * slow, "loss_tokens": 1000,
                                                        "tokens_per_s": 100 / slow}
        measured[Run("variant0", 2, "mlx-dp launch", r)] = {"updates": 5, "seconds": 8 * slow, "loss_tokens": 1000,
                                                            "tokens_per_s": 125 / slow}
        measured[Run("mlx_lm", 2, "mlx-dp launch", r)] = {"updates": 10, "seconds": 12 * slow}
    doc = summarize_epochs(plan, measured)
    ratios = {(x["run"].split(" ")[-1], x["against"].split(" ")[0]): x for x in doc["ratios"]}
    assert ratios[("data.packing=true", "mlx-dp")]["per_round"] == pytest.approx([1.25, 1.25])
    assert ratios[("mlx-dp", "mlx_lm.lora")]["per_round"] == pytest.approx([1.2, 1.2])
    mlx_lm = next(x for x in doc["runs"] if x["kind"] == "mlx_lm")
    assert mlx_lm["per_round"] == pytest.approx([1000 / 24, 1000 / 12]), "counted with our loss tokens"


def test_epoch_vs_mlx_lm_needs_truncation(tmp_path):
    from lab.bench.scaling_epoch import check_epoch_plan

    with pytest.raises(BenchError, match="data.long_samples=truncate"):
        check_epoch_plan(plan_for(tmp_path, "--epoch", "--vs-mlx-lm"))


def test_repaired_sort_orders_mlx_lm_batches_by_tokens():
    from mlx_lm.tuner.datasets import CacheDataset

    class Rows:
        rows = [{"text": [1] * n} for n in (30, 5, 60, 12)]  # a raw row is a dict, as mlx-lm reads jsonl

        def __len__(self):
            return 4

        def process(self, row):
            return (row["text"], 0)

        def __getitem__(self, i):
            return self.rows[i]

    original = CacheDataset.itemlen
    try:
        data = CacheDataset(Rows())
        assert [data.itemlen(i) for i in range(4)] == [1] * 4, "as shipped: the fields of the raw row"
        repair_length_sort()
        assert [data.itemlen(i) for i in range(4)] == [30, 5, 60, 12]
    finally:
        CacheDataset.itemlen = original
