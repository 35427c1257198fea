"""Exact resume: a run stopped at update k and resumed ends bit-identical to one never stopped."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import MLX_DP, PYTHON, ROOT, run, tiny_recipe

pytestmark = pytest.mark.e2e  # every test here starts real processes

WORKER = str(ROOT / "tests" / "workers" / "train_many.py")
# Everything that must be restored matters here: a decaying schedule with warmup,
# adapter dropout (RNG), gradient accumulation and data order across an epoch edge.
SHARED = ["training.steps=6", "training.lr_schedule=cosine", "training.warmup_steps=2",
          "training.grad_accumulation=2", "checkpoint.every=2"]
METHODS = {"lora": ["method.dropout=0.1"], "full": ["method.type=full", "training.learning_rate=1e-4"],
           # measured balance: the split and its speed estimates must resume too (rank 1 reports 3x the
           # compute time of rank 0, so the split moves to [3, 1] after update 2; one rank: nothing to split)
           "auto": ["method.dropout=0.1", "parallel.balance=auto"]}
FAKE_SPEEDS = "compute:rank=0:seconds=0.1;compute:rank=1:seconds=0.3"


def plan(tmp, recipe, batch):
    entries = []
    for method, extra in METHODS.items():
        rows = batch * 2 if method == "auto" else batch  # a split needs more rows than ranks
        common = [*SHARED, *extra, f"training.batch_size={rows}"]
        fake = FAKE_SPEEDS if method == "auto" else ""
        entries.append({"recipe": recipe, "overrides": [*common, f"checkpoint.dir={tmp}/{method}-straight"],
                        "faults": fake})
        stopped = [*common, f"checkpoint.dir={tmp}/{method}-resumed"]
        entries.append({"recipe": recipe, "overrides": stopped, "faults": f"stop:step=3;{fake}"})
        entries.append({"recipe": recipe, "overrides": stopped, "resume": True, "faults": fake})
    return entries


@pytest.fixture(scope="module", params=[1, 2], ids=["1-rank", "2-ranks"])
def runs(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"resume{world}")
    # 2 ranks x batch 1 and 1 rank x batch 2 make the same global batches; a small
    # data file makes the 6 updates cross an epoch boundary.
    data = tmp / "data.jsonl"
    rows = json.loads("[" + ",".join((ROOT / "data" / "tiny-task" / "train.jsonl").read_text().splitlines()[:20]) + "]")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = str(tiny_recipe(tmp, data={"path": str(data)}))
    spec = tmp / "spec.json"
    spec.write_text(json.dumps(plan(tmp, recipe, batch=2 // world)))
    command = [PYTHON, WORKER, str(spec)]
    result = run(command if world == 1 else [MLX_DP, "launch", "-n", "2", "--", *command], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


def arrays(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_stopped_and_resumed_run_is_bit_identical(runs, method):
    straight, resumed = runs / f"{method}-straight", runs / f"{method}-resumed"
    status = json.loads((resumed / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 6
    stopped_at = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert "step_0000003" in stopped_at, "the stop must have saved update 3"
    a, b = arrays(straight / "adapters.safetensors"), arrays(resumed / "adapters.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), f"{key} differs after resume"
    opt_a = arrays(straight / "checkpoints" / "step_0000006" / "optimizer.safetensors")
    opt_b = arrays(resumed / "checkpoints" / "step_0000006" / "optimizer.safetensors")
    for key in opt_a:
        assert np.array_equal(opt_a[key], opt_b[key]), f"optimizer state {key} differs after resume"
    la = [m["train_loss"] for m in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
          if "train_loss" in m]
    lb = [m["train_loss"] for m in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
          if "train_loss" in m]
    assert la == lb, "the loss curve of the resumed run must continue exactly"


def test_balanced_split_resumes(runs):
    metrics = [json.loads(m) for m in (runs / "auto-resumed" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train_loss" in m]
    rows = [m.get("rows_per_rank") for m in train]
    if train[0]["world_size"] == 1:
        assert rows == [None] * 6, "one rank: nothing to split"
    else:  # the update after the resume (4) is split as the checkpoint said
        assert rows == [[2, 2], [2, 2]] + [[3, 1]] * 4, rows
