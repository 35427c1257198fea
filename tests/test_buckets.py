"""Gradient buckets: planning, backward order, exactness against plain all_sum, plan checks."""

import mlx.core as mx
import pytest

from conftest import TINY_MODEL, worker_result
from trainer.parallel import MiB, plan_buckets


def launch_worker(n, mode):
    return worker_result(n, "reduce_check.py", mode, timeout=300)


@pytest.mark.e2e
@pytest.mark.parametrize("n", [2, 3])
def test_bucketed_reduction_equals_per_array_all_sum(n):
    worst = launch_worker(n, "compare")["worst_relative_error"]
    assert worst["float32"] <= 1e-6, worst
    # half-precision gradients summed in their own dtype round like the reference does
    for key in ("bfloat16", "float16"):
        if key in worst:
            assert worst[key] <= 1e-2, worst


@pytest.mark.e2e
def test_mismatched_plan_is_refused_before_any_all_sum():
    result = launch_worker(2, "mismatch")
    assert result["refused"] and "gradient bucket plan differs from rank 0" in result["refused"]
    assert "rank 1 (" in result["refused"]
    assert result["all_gather_calls"] > 0, "the plans were compared"
    assert result["all_sum_calls"] == 0, "no gradient was sent before the comparison"


def test_plan_fills_in_backward_order_first_bucket_small_and_per_dtype():
    order = [f"p{i}" for i in range(10)]
    shapes = {n: (256, 1024) for n in order}  # 1 MiB each in float32
    dtypes = {n: mx.float32 for n in order}
    dtypes["p3"] = mx.bfloat16
    buckets = plan_buckets(order, shapes, dtypes, bucket_bytes=4 * MiB, first_bucket_bytes=1 * MiB)
    assert buckets[0].names == ("p0",), "the first bucket is small and holds the first gradients produced"
    flat = [n for b in buckets for n in b.names]
    assert sorted(flat) == sorted(order) and len(flat) == len(order)
    fp32 = [n for b in buckets if b.comm_dtype == mx.float32 for n in b.names]
    assert fp32 == [n for n in order if n != "p3"], "within a dtype, buckets keep backward order"
    assert all(b.nbytes <= 4 * MiB for b in buckets)
    assert any(b.comm_dtype == mx.bfloat16 and b.names == ("p3",) for b in buckets)
    wired = plan_buckets(order, shapes, dtypes, 4 * MiB, 1 * MiB, comm_dtype=mx.float32)
    assert all(b.comm_dtype == mx.float32 for b in wired)
    assert [n for b in wired for n in b.names] == order


def test_backward_order_puts_last_layer_first_and_embedding_last():
    from mlx_lm import load

    from trainer.config.load import MethodConfig
    from trainer.model.load import apply_method, backward_order

    model, _ = load(str(TINY_MODEL))
    apply_method(model, MethodConfig(type="full"), seed=0)
    order = backward_order(model, mx.array([[1, 2, 3, 4]]))
    assert order[0] == "model.norm.weight"
    assert order[-1] == "model.embed_tokens.weight", "a tied embedding's gradient completes last"
    layer = [int(n.split(".")[2]) for n in order if n.startswith("model.layers.")]
    assert layer == sorted(layer, reverse=True), "deeper layers produce gradients first"
    first_block = [n for n in order if n.startswith("model.layers.3.")]
    assert first_block[0].startswith("model.layers.3.mlp"), "within a block the MLP comes back first"
    apply_method(model, MethodConfig(type="lora"), seed=0)
    lora = backward_order(model, mx.array([[1, 2, 3, 4]]))
    assert all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in lora)
    assert lora[0].startswith("model.layers.3.mlp")
