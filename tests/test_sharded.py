"""Optimizer state sharded across ranks (parallel.shard_optimizer): the collectives, the maths, resume.

References: the ring reduce-scatter against a per-array all_sum; sharded training
against unsharded training on the same ranks; resumed runs against straight ones.
"""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import MLX_DP, PYTHON, ROOT, read_weights, run, tiny_recipe, worker_result

pytestmark = pytest.mark.e2e  # every test here starts real processes

TRAIN = str(ROOT / "tests" / "workers" / "train_many.py")


def launch(n, command, timeout=600):
    result = run([MLX_DP, "launch", "-n", str(n), "--", *command], timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def reduce_result(n, mode):
    return worker_result(n, "reduce_check.py", mode)


@pytest.mark.parametrize("n", [2, 3])
def test_ring_reduce_scatter_equals_all_sum_then_slice(n):
    # random trees of mixed shapes and dtypes; bucket sizes that do not divide by n
    result = reduce_result(n, "scatter")
    assert result["methods"] == {"sendrecv": "sendrecv", "all_sum": "all_sum"}, "the ring has no sum_scatter"
    worst = result["worst_relative_error"]
    for key, err in worst.items():
        limit = 1e-6 if "float32" in key else 1e-2  # half precision rounds like the reference does
        assert err <= limit, (key, err)
    if n == 2:  # two addends: the same sum in either order, bit for bit
        assert worst["sendrecv-float32"] == 0.0


def test_mismatched_shard_plan_is_refused_before_any_collective():
    result = reduce_result(2, "scatter-mismatch")
    assert result["refused"] and "optimizer shard plan differs from rank 0" in result["refused"]
    assert result["all_gather_calls"] > 0, "the plans were compared"
    assert result["send_calls"] == result["recv_like_calls"] == result["all_sum_calls"] == 0


def optimizer_state(run_dir, step):
    return {k: np.array(v) for k, v in mx.load(str(run_dir / "checkpoints" / f"step_{step:07d}"
                                                   / "optimizer.safetensors")).items()}


FULL = ["method.type=full", "training.optimizer=adamw", "training.learning_rate=1e-3", "training.weight_decay=0.01",
        "training.grad_accumulation=2", "parallel.bucket_mb=0.5", "parallel.first_bucket_mb=0.1"]
CLIP = ["training.max_grad_norm=0.05"]  # small enough that every update is clipped


CASES = {"full": FULL, "full-clipped": FULL + CLIP, "lora-clipped": ["training.grad_accumulation=2", *CLIP]}
YARDSTICK = ("full-clipped", "lora-clipped")  # the cases compared within float noise (exact ones need no yardstick)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def equivalence(request, tmp_path_factory):
    n = request.param
    tmp = tmp_path_factory.mktemp(f"sharded{n}")
    recipe = str(tiny_recipe(tmp, training={"steps": 5, "batch_size": 2}, checkpoint={"every": 0}))
    entries = []
    for name, extra in CASES.items():
        for sharded in ("false", "true"):
            entries.append([recipe, *extra, f"parallel.shard_optimizer={sharded}", f"checkpoint.dir={tmp}/{name}-{sharded}"])
        if name in YARDSTICK:  # a genuinely different run, the yardstick for float noise under Adam
            entries.append([recipe, *extra, "training.seed=1", f"checkpoint.dir={tmp}/{name}-seed1"])
    (tmp / "spec.json").write_text(json.dumps(entries))
    out = launch(n, [PYTHON, TRAIN, str(tmp / "spec.json")])
    assert "optimizer state sharded over" in out.stdout
    return tmp, n


def rms(a, b):
    return float(np.sqrt(np.mean(np.concatenate([(a[k] - b[k]).ravel() ** 2 for k in a]))))


def test_sharded_adamw_is_the_unsharded_update(equivalence):
    tmp, n = equivalence
    one, two = read_weights(tmp / "full-false"), read_weights(tmp / "full-true")
    assert one.keys() == two.keys()
    worst = max(np.abs(one[k] - two[k]).max() for k in one)
    if n == 2:  # element-wise AdamW on the same summed gradients: the same bits
        assert worst == 0.0, worst
    else:  # three addends summed in another order, then Adam's division by sqrt(v) over every update:
        # float32 noise (seen: 1.1e-5 of the largest weight with the chunked loss, whose head gradient is
        # itself a sum over chunks); a wrong shard or a missed addend is orders of magnitude more
        assert worst <= 4e-5 * max(np.abs(v).max() for v in one.values()), worst


@pytest.mark.parametrize("method", ["full-clipped", "lora-clipped"])
def test_sharded_with_clipping_and_accumulation_matches_within_float_noise(equivalence, method):
    tmp, _ = equivalence
    one, two, other = (read_weights(tmp / f"{method}-{x}") for x in ("false", "true", "seed1"))
    # the global norm is summed from the ranks' shards, in another order: Adam carries
    # that last-bit difference; it must stay far below the distance between two runs
    assert rms(one, two) < 0.01 * rms(one, other), (rms(one, two), rms(one, other))
    # the checkpoint holds the unsharded layout: the same keys and moments either way
    a, b = optimizer_state(tmp / f"{method}-false", 5), optimizer_state(tmp / f"{method}-true", 5)
    assert a.keys() == b.keys() and any(k.endswith(".v") for k in a)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Straight and stopped-then-resumed full fine-tunes, sharded on 2 ranks, resumed three ways."""
    tmp = tmp_path_factory.mktemp("sharded-resume")
    recipe = str(tiny_recipe(tmp, training={"steps": 6}, checkpoint={"every": 3}))
    common = [*FULL, "training.batch_size=1"]  # 2 ranks x 1 x 2 = a global batch of 4
    two = []
    for name in ("straight", "to-sharded", "to-unsharded", "to-one-rank"):
        run_dir = f"checkpoint.dir={tmp}/{name}"
        faults = "" if name == "straight" else "stop:step=3"
        two.append({"recipe": recipe, "overrides": [*common, "parallel.shard_optimizer=true", run_dir],
                    "faults": faults})
    two.append({"recipe": recipe, "overrides": [*common, "parallel.shard_optimizer=true", f"checkpoint.dir={tmp}/to-sharded"],
                "resume": True})
    two.append({"recipe": recipe, "overrides": [*common, "parallel.shard_optimizer=false",
                                                f"checkpoint.dir={tmp}/to-unsharded"], "resume": True})
    (tmp / "two.json").write_text(json.dumps(two))
    launch(2, [PYTHON, TRAIN, str(tmp / "two.json")])
    # the same global batch on one rank: 1 x 2 x 2
    one = [{"recipe": recipe, "overrides": [*FULL, "training.batch_size=2", "parallel.shard_optimizer=true",
                                            f"checkpoint.dir={tmp}/to-one-rank"], "resume": True}]
    (tmp / "one.json").write_text(json.dumps(one))
    result = run([PYTHON, TRAIN, str(tmp / "one.json")], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


@pytest.mark.parametrize("target", ["to-sharded", "to-unsharded"])
def test_sharded_checkpoint_resumes_bit_identically(resumed, target):
    straight, other = read_weights(resumed / "straight"), read_weights(resumed / target)
    for key in straight:
        assert np.array_equal(straight[key], other[key]), f"{key} differs after resuming {target}"
    a, b = optimizer_state(resumed / "straight", 6), optimizer_state(resumed / target, 6)
    for key in a:
        assert np.array_equal(a[key], b[key]), f"optimizer state {key} differs after resuming {target}"


def test_sharded_checkpoint_resumes_on_one_rank(resumed):
    # the restored state is the saved one, bit for bit: the first update after the resume starts from it
    saved = optimizer_state(resumed / "to-one-rank", 3)
    straight3 = optimizer_state(resumed / "straight", 3)
    for key in saved:
        assert np.array_equal(saved[key], straight3[key]), key
    metrics = [json.loads(line) for line in (resumed / "to-one-rank" / "metrics.jsonl").read_text().splitlines()]
    after = [m for m in metrics if "train_loss" in m and m["world_size"] == 1]
    assert [m["step"] for m in after] == [4, 5, 6] and all(np.isfinite(m["train_loss"]) for m in after)
    # one rank at batch 2 sums the same rows as two ranks at batch 1: the same training within float noise
    one, two = read_weights(resumed / "to-one-rank"), read_weights(resumed / "straight")
    moved = max(np.abs(v).max() for v in two.values())
    assert max(np.abs(one[k] - two[k]).max() for k in two) <= 1e-4 * moved
