"""Preference tuning end to end through the real CLI: tiny-dpo learns, eval reports it, resume is exact."""

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import MLX_DP, PYTHON, ROOT, launched, mlx_dp, read_metrics, run, start_ranks

pytestmark = pytest.mark.e2e  # every test here starts real processes

WORKER = str(ROOT / "tests" / "workers" / "train_many.py")
QUIET = ["eval.every=0", "checkpoint.every=0", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, blas_env):
    """tiny-dpo as shipped, on one process (batch 8) and on 2 ranks (batch 4 each: the same global batch)."""
    tmp = tmp_path_factory.mktemp("tiny-dpo")
    one = mlx_dp("train", "tiny-dpo", f"checkpoint.dir={tmp}/one", *QUIET, env=blas_env, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launched(2, "train", "tiny-dpo", "training.batch_size=4", f"checkpoint.dir={tmp}/two", *QUIET,
                   env=blas_env, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp, two.stdout


@pytest.mark.parametrize("side", ["one", "two"])
def test_tiny_dpo_goes_from_chance_to_nine_in_ten_held_out_pairs(trained, side):
    tmp, _ = trained
    metrics = read_metrics(tmp / side)
    val = [m for m in metrics if "val_preference_accuracy" in m]
    assert [m["step"] for m in val] == [0, 150]
    assert val[0]["val_preference_accuracy"] <= 0.65, "the base model is near chance on the held-out pairs"
    assert val[-1]["val_preference_accuracy"] >= 0.90, val[-1]
    train = [m for m in metrics if "train_loss" in m]
    assert {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp",
            "preference_accuracy", "pairs_per_s"} <= set(train[-1])
    assert train[-1]["reward_accuracy"] > 0.8 and train[-1]["reward_margin"] > 0
    assert train[-1]["world_size"] == (1 if side == "one" else 2) and train[-1]["global_batch"] == 8


def test_the_reference_is_computed_once_and_read_back_by_the_next_run(trained):
    _, second = trained
    assert "reference log-probs of the train pairs: cached" in second, "the 2-rank run reads what the first wrote"
    assert "computing them once" not in second
    assert "global batch = 4 x 2 x 1 = 8 pairs per update" in second


def test_eval_prints_preference_accuracy_on_held_out_pairs(trained, blas_env, tmp_path):
    tmp, _ = trained
    result = mlx_dp("eval", "tiny-dpo", f"checkpoint.dir={tmp}/one", "--json", str(tmp_path / "eval.json"),
                    env=blas_env)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert f"preference accuracy {scored['preference_accuracy']:.0%}" in result.stdout
    assert "held-out pairs" in result.stdout and scored["pairs"] == 112 and scored["split"] == "test"
    assert scored["preference_accuracy"] >= 0.85
    base = mlx_dp("eval", "tiny-dpo", "--checkpoint", "none", "--json", str(tmp_path / "base.json"), env=blas_env)
    assert base.returncode == 0, base.stderr[-3000:]
    assert json.loads((tmp_path / "base.json").read_text())["preference_accuracy"] <= 0.65


def test_a_bad_pair_row_is_one_line_naming_file_and_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 3 + '{"prompt": "a", "chosen": "b"}\n')
    result = mlx_dp("train", "tiny-dpo", f"data.path={data}", f"checkpoint.dir={tmp_path}/run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{data} line 4: 'rejected' is missing" in result.stderr


# ---------------------------------------------------------------------------- exact resume


METHODS = {"dpo": ["method.objective=dpo", "method.dropout=0.1"], "orpo": ["method.objective=orpo"]}
SHARED = ["training.steps=6", "training.lr_schedule=cosine", "training.warmup_steps=2",
          "training.grad_accumulation=2", "training.batch_size=1", "checkpoint.every=2", "checkpoint.keep_last=5",
          "eval.every=2", "eval.max_batches=2", "logging.progress_bar=false", "logging.every=1"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """On 2 ranks: a straight run, and one stopped at update 3 and resumed. The resumed run keeps its datasets
    cache elsewhere, so it computes the reference anew: from the base, before the checkpoint is loaded. The
    others share a cache of their own: one in the user's cache, written with another BLAS, would differ in
    rounding."""
    tmp = tmp_path_factory.mktemp("preference-resume")
    rows = (ROOT / "data" / "tiny-preference" / "train.jsonl").read_text().splitlines()[:14]
    (tmp / "data").mkdir()
    (tmp / "data" / "train.jsonl").write_text("\n".join(rows) + "\n")  # 6 updates x 4 pairs cross an epoch
    (tmp / "data" / "valid.jsonl").write_text((ROOT / "data" / "tiny-preference" / "valid.jsonl").read_text())
    spec = []
    for name, extra in METHODS.items():
        common = ["tiny-dpo", *SHARED, *extra, f"data.path={tmp}/data", f"data.cache_dir={tmp}/cache"]
        spec.append({"recipe": common[0], "overrides": [*common[1:], f"checkpoint.dir={tmp}/{name}-straight"]})
        stopped = [*common[1:], f"checkpoint.dir={tmp}/{name}-resumed"]
        spec.append({"recipe": common[0], "overrides": stopped, "faults": "stop:step=3"})
        spec.append({"recipe": common[0], "overrides": [*stopped, f"data.cache_dir={tmp}/other-cache"],
                     "resume": True})
    from trainer.tools.recipes import find_recipe

    for entry in spec:
        entry["recipe"] = str(find_recipe(entry["recipe"]))
    (tmp / "spec.json").write_text(json.dumps(spec))
    result = run([MLX_DP, "launch", "-n", "2", "--", PYTHON, WORKER, str(tmp / "spec.json")], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # the resumed DPO run computed its reference anew (into its own cache), before loading the checkpoint
    assert re.search(rf"reference log-probs of the train pairs: computed \({re.escape(str(tmp))}/other-cache",
                     result.stdout), result.stdout[-3000:]
    return tmp


def arrays(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_stopped_and_resumed_preference_run_is_bit_identical(resumed, method):
    straight, again = resumed / f"{method}-straight", resumed / f"{method}-resumed"
    assert json.loads((again / "status.json").read_text())["state"] == "completed"
    assert "step_0000003" in os.listdir(again / "checkpoints")
    a, b = arrays(straight / "adapters.safetensors"), arrays(again / "adapters.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    opt = [arrays(d / "checkpoints" / "step_0000006" / "optimizer.safetensors") for d in (straight, again)]
    assert all(np.array_equal(opt[0][k], opt[1][k]) for k in opt[0])
    curve = [[(m["step"], m.get("train_loss"), m.get("reward_accuracy"), m.get("val_loss"))
              for m in read_metrics(d) if "train_loss" in m or "val_loss" in m] for d in (straight, again)]
    assert curve[0] == curve[1], "the resumed run continues the same curve: losses and metrics"


def test_ranks_holding_different_pairs_stop_by_name_before_the_reference_pass(tmp_path):
    """The same recipe, but each rank's ``~/pairs`` differs by one row: the reference pass sums per pair over
    ranks, so it must never start; the agreement check before it names the difference."""
    rows = (ROOT / "data" / "tiny-preference" / "train.jsonl").read_text().splitlines()[:40]
    homes = [tmp_path / "home0", tmp_path / "home1"]
    for home, data in zip(homes, (rows, rows[:-1])):
        (home / "pairs").mkdir(parents=True)
        (home / "pairs" / "train.jsonl").write_text("\n".join(data) + "\n")
    args = ["train", "tiny-dpo", "data.path=~/pairs", f"data.cache_dir={tmp_path}/cache",
            f"checkpoint.dir={tmp_path}/run", "training.steps=2", "training.batch_size=2", *QUIET]
    procs = start_ranks(tmp_path, [args, args], env_per_rank=[{"HOME": str(h)} for h in homes])
    codes = [p.wait(timeout=180) for p in procs]
    log = (tmp_path / "rank0.log").read_text() + (tmp_path / "rank1.log").read_text()
    assert codes[0] != 0 and codes[1] != 0, log[-2000:]
    assert "ranks disagree before training" in log and "train pairs differs" in log, log[-2000:]
    assert "reference log-probs of the train pairs" not in log
