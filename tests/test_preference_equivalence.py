"""DPO and ORPO on N ranks at batch b train exactly what one process trains at batch N*b.

The reference comparison of tests/test_equivalence.py, for the preference
objectives: per-pair terms are normalised by the pairs of the whole update and
the NLL by its tokens, so with SGD the weights match to float rounding, with
accumulation, with balance's uneven split and with the optimizer state sharded
(ZeRO-1). The 2-rank runs keep their own datasets cache, so they tokenize and
compute DPO's reference log-probs themselves, sharded over the two ranks; the
values must be bit-identical to the single process's (which keeps a cache of its
own too, so nothing another test left in the session's cache stands in for it).

The pairs are the first rows of the shipped set: 4 updates read at most 32
train pairs and validation 8, while the reference log-probs are computed over
the whole train split, so the short split keeps that pass short; it still
spans two or more reference chunks, so each rank computes some.
"""

import numpy as np
import pytest

from conftest import ROOT, TINY_MODEL, read_metrics, read_weights, train_one_and_two
from trainer.objectives.reference import CHUNK_PAIRS

pytestmark = pytest.mark.e2e  # every test here starts real processes

SGD = ["training.optimizer=sgd", "training.momentum=0.9", "training.learning_rate=0.05"]
CASES = {  # name: overrides shared by both sides (2 ranks: per-rank batch 2, one process: 4)
    "dpo": ["method.objective=dpo", *SGD],
    "dpo-accum": ["method.objective=dpo", *SGD, "training.grad_accumulation=2"],
    "dpo-smooth-full": ["method.objective=dpo", "method.label_smoothing=0.2", "method.type=full",
                        "training.optimizer=sgd", "training.learning_rate=0.02"],
    "orpo": ["method.objective=orpo", *SGD],
    "orpo-accum": ["method.objective=orpo", *SGD, "training.grad_accumulation=2"],
}
# rows of data/tiny-preference per split (see above); train: at least two reference chunks
PAIRS = {"train": max(64, 2 * CHUNK_PAIRS), "valid": 16, "test": 16}
VALIDATED = ("dpo", "orpo")  # the runs whose validation metrics are compared (at 0, 2 and 4)
FINAL_EVAL_ONLY = ["eval.at_start=false", "eval.every=0"]  # the others' validation is not what they check
TWO_RANK_ONLY = {  # run on 2 ranks, compared with the one-process run named first
    "dpo-uneven": ("dpo-accum", ["parallel.balance=[3, 1]"]),
    "orpo-uneven": ("orpo-accum", ["parallel.balance=[3, 1]"]),
    "dpo-zero1": ("dpo-accum", ["parallel.shard_optimizer=true"]),
    "orpo-zero1": ("orpo", ["parallel.shard_optimizer=true"]),
}


def short_pairs(tmp):
    """The first rows of each split of data/tiny-preference, in ``tmp / "pairs"``."""
    out = tmp / "pairs"
    out.mkdir()
    for split, rows in PAIRS.items():
        lines = (ROOT / "data" / "tiny-preference" / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (out / f"{split}.jsonl").write_text("".join(lines[:rows]))
    return out


def recipe(tmp):
    import yaml

    path = tmp / "pairs.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(TINY_MODEL)},
        "data": {"path": str(short_pairs(tmp)), "max_seq_length": 64},
        "method": {"type": "lora", "rank": 4, "scale": 4.0},
        "training": {"steps": 4, "seed": 0},
        "eval": {"every": 2, "at_start": True, "max_batches": 2},
        "checkpoint": {"every": 0},
        "logging": {"every": 1, "progress_bar": False}}))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preference-equivalence")
    path = recipe(tmp)
    single, multi = [], []
    for name, overrides in CASES.items():
        checked = [] if name in VALIDATED else FINAL_EVAL_ONLY
        single.append([path, *overrides, *checked, "training.batch_size=4", f"checkpoint.dir={tmp}/one-{name}",
                       f"data.cache_dir={tmp}/one-cache"])
        multi.append([path, *overrides, *checked, "training.batch_size=2", f"checkpoint.dir={tmp}/two-{name}",
                      f"data.cache_dir={tmp}/two-cache"])
    for name, (base, extra) in TWO_RANK_ONLY.items():
        multi.append([path, *CASES[base], *extra, *FINAL_EVAL_ONLY, "training.batch_size=2",
                      f"checkpoint.dir={tmp}/two-{name}", f"data.cache_dir={tmp}/two-cache"])
    single.append([path, *CASES["dpo"], *FINAL_EVAL_ONLY, "training.batch_size=4", "training.seed=1",
                   f"checkpoint.dir={tmp}/other", f"data.cache_dir={tmp}/one-cache"])
    train_one_and_two(tmp, single, multi, timeout=900)
    return tmp


def worst_difference(a, b):
    assert a.keys() == b.keys()
    scale = max(np.abs(v).max() for v in a.values())
    return max(np.abs(a[k] - b[k]).max() for k in a) / scale


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_what_one_process_trains(runs, case):
    one, two = read_weights(runs / f"one-{case}"), read_weights(runs / f"two-{case}")
    assert worst_difference(one, two) <= 1e-5
    if "full" not in case:  # another seed trains other weights, far beyond that: the comparison means something
        assert worst_difference(one, read_weights(runs / "other")) > 1e-2
    logged = [[m["train_loss"] for m in read_metrics(runs / f"{side}-{case}") if "train_loss" in m]
              for side in ("one", "two")]
    assert np.allclose(*logged, rtol=1e-5), logged


@pytest.mark.parametrize("case", list(TWO_RANK_ONLY))
def test_uneven_split_and_sharded_optimizer_train_the_same(runs, case):
    base, _ = TWO_RANK_ONLY[case]
    assert worst_difference(read_weights(runs / f"one-{base}"), read_weights(runs / f"two-{case}")) <= 1e-5
    rows = [m.get("rows_per_rank") for m in read_metrics(runs / f"two-{case}") if "train_loss" in m]
    assert rows == ([[3, 1]] * 4 if "uneven" in case else [[2, 2]] * 4)


def test_validation_metrics_match_and_are_per_pair(runs):
    for case in VALIDATED:
        one, two = ([m for m in read_metrics(runs / f"{side}-{case}") if "val_loss" in m] for side in ("one", "two"))
        assert [m["step"] for m in one] == [0, 2, 4] == [m["step"] for m in two]
        for a, b in zip(one, two):
            for key in ("val_loss", "val_preference_accuracy", "val_reward_accuracy", "val_chosen_logp"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (case, key)
    start = next(m for m in read_metrics(runs / "one-dpo") if "val_loss" in m)
    assert start["val_loss"] == pytest.approx(np.log(2), abs=1e-5), "before any update DPO's loss is log 2"
    assert start["val_reward_accuracy"] == 0.5, "the policy is the reference: every pair is a tie"


def test_reference_sharded_over_two_ranks_is_bit_identical(runs):
    one = sorted((runs / "one-cache" / "mlx-dp-reference").glob("*.npy"))
    two = {p.name: p for p in (runs / "two-cache" / "mlx-dp-reference").glob("*.npy")}
    assert two, "the 2-rank runs computed their own reference log-probs"
    shared = [p for p in one if p.name in two]
    assert shared, "1 and 2 ranks key the same pairs and model alike"
    for path in shared:
        assert np.array_equal(np.load(path), np.load(two[path.name]))
