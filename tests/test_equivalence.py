"""N ranks at batch b train exactly what one process trains at batch N*b.

Reference comparison: the same recipes run on 1 process at batch 4 and on 2
ranks at batch 2, and the final trainable weights are compared. With SGD
the match is to float rounding. With Adam, an element whose gradient is about
zero can flip the sign of its first update (docs/PLATFORM.md), so Adam is
judged against the distance between two genuinely different runs.
"""

import json

import numpy as np
import pytest

from conftest import read_weights, tiny_recipe, train_one_and_two

pytestmark = pytest.mark.e2e  # every test here starts real processes

CASES = {  # name: overrides shared by both sides
    "sgd": ["training.optimizer=sgd", "training.momentum=0.9", "training.learning_rate=0.05"],
    "sgd-accum": ["training.optimizer=sgd", "training.momentum=0.9", "training.learning_rate=0.05",
                  "training.grad_accumulation=2"],
    "sgd-full": ["training.optimizer=sgd", "training.learning_rate=0.05", "method.type=full"],
    "adamw-accum": ["training.optimizer=adamw", "training.learning_rate=0.01", "training.grad_accumulation=2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("equivalence")
    recipe = str(tiny_recipe(tmp, training={"steps": 4}, checkpoint={"every": 0}))
    single, multi = [], []
    for name, overrides in CASES.items():
        single.append([recipe, *overrides, "training.batch_size=4", f"checkpoint.dir={tmp}/one-{name}"])
        multi.append([recipe, *overrides, "training.batch_size=2", f"checkpoint.dir={tmp}/two-{name}"])
    single.append([recipe, *CASES["adamw-accum"], "training.batch_size=4", "training.seed=1",
                   f"checkpoint.dir={tmp}/one-adamw-accum-seed1"])
    for name in ("sgd", "sgd-accum", "adamw-accum"):  # a fixed uneven split: 3 rows on rank 0, 1 on rank 1
        multi.append([recipe, *CASES[name], "training.batch_size=2", "parallel.balance=[3, 1]",
                      f"checkpoint.dir={tmp}/two-uneven-{name}"])
    # measured balance, where rank 1 reports three times rank 0's compute time (a slower Mac)
    multi.append({"recipe": recipe, "overrides": [*CASES["sgd"], "training.batch_size=2", "parallel.balance=auto",
                                                  "logging.per_rank_timings=true", f"checkpoint.dir={tmp}/two-auto"],
                  "faults": "compute:rank=0:seconds=0.1;compute:rank=1:seconds=0.3"})
    for overlap in ("true", "false"):  # many small buckets, sent during backward or after it
        multi.append([recipe, "method.type=full", "training.learning_rate=1e-4", "training.batch_size=2",
                      "parallel.bucket_mb=0.25", "parallel.first_bucket_mb=0.05", f"parallel.overlap={overlap}",
                      f"checkpoint.dir={tmp}/two-full-overlap-{overlap}"])
    train_one_and_two(tmp, single, multi)
    return tmp


def diff(a, b):
    d = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
    return d.max(), float(np.sqrt((d ** 2).mean()))


@pytest.mark.parametrize("case", ["sgd", "sgd-accum", "sgd-full"])
def test_sgd_two_ranks_equal_one_process(runs, case):
    one, two = read_weights(runs / f"one-{case}"), read_weights(runs / f"two-{case}")
    assert one.keys() == two.keys()
    scale = max(np.abs(v).max() for v in one.values())
    worst, _ = diff(one, two)
    assert worst <= 1e-5 * scale, f"max difference {worst:.3g} (weights up to {scale:.3g})"


def test_adam_two_ranks_match_within_float_noise(runs):
    one, two = read_weights(runs / "one-adamw-accum"), read_weights(runs / "two-adamw-accum")
    other = read_weights(runs / "one-adamw-accum-seed1")
    _, same = diff(one, two)
    _, different = diff(one, other)
    assert same < 0.01 * different, f"rms {same:.3g} vs {different:.3g} between different runs"


@pytest.mark.parametrize("case", ["sgd", "sgd-accum"])
def test_uneven_split_trains_what_one_process_trains(runs, case):
    one, uneven = read_weights(runs / f"one-{case}"), read_weights(runs / f"two-uneven-{case}")
    scale = max(np.abs(v).max() for v in one.values())
    worst, _ = diff(one, uneven)
    assert worst <= 1e-5 * scale, f"max difference {worst:.3g} (weights up to {scale:.3g})"
    rows = [m["rows_per_rank"] for m in map(json.loads, (runs / f"two-uneven-{case}" / "metrics.jsonl")
                                              .read_text().splitlines()) if "train_loss" in m]
    assert rows and all(r == [3, 1] for r in rows)


def test_uneven_split_with_adam_matches_within_float_noise(runs):
    one, uneven = read_weights(runs / "one-adamw-accum"), read_weights(runs / "two-uneven-adamw-accum")
    _, same = diff(one, uneven)
    _, different = diff(one, read_weights(runs / "one-adamw-accum-seed1"))
    assert same < 0.01 * different, f"rms {same:.3g} vs {different:.3g} between different runs"


def test_measured_split_is_the_same_on_every_rank_and_exact(runs):
    run_dir = runs / "two-auto"
    splits = [[(m["step"], m["split"]) for m in map(json.loads, (run_dir / f"metrics.rank{r}.jsonl")
                                                      .read_text().splitlines())] for r in range(2)]
    assert splits[0] == splits[1], "every rank must use the same split"
    assert splits[0][0][1] == [2, 2] and splits[0][-1][1] == [3, 1], "rank 0 is 3x faster: it takes 3 of 4 rows"
    one, auto = read_weights(runs / "one-sgd"), read_weights(run_dir)
    scale = max(np.abs(v).max() for v in one.values())
    assert diff(one, auto)[0] <= 1e-5 * scale


def test_overlap_reproduces_the_serial_path_exactly(runs):
    overlapped, serial = read_weights(runs / "two-full-overlap-true"), read_weights(runs / "two-full-overlap-false")
    assert overlapped.keys() == serial.keys()
    for key in overlapped:
        assert np.array_equal(overlapped[key], serial[key]), f"{key} differs between overlap and serial"
