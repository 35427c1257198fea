"""Attention in query blocks: the same outputs and gradients as MLX's whole-row attention."""

import mlx.core as mx
import pytest

from conftest import mlx_dp, packed_mask, tiny_recipe
from trainer.model import attention


def whole_rows(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)


def value_and_grads(fn, q, k, v, weights):
    # a weighted sum, so that every output position has its own gradient
    return mx.value_and_grad(lambda q, k, v: (fn(q, k, v) * weights).sum(), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("length,block", [(65, 32), (130, 64), (200, 64), (97, 16)])
@pytest.mark.parametrize("packed", [False, True])
def test_blocks_match_whole_rows(length, block, packed):
    mx.random.seed(length + block)
    q = mx.random.normal((2, 4, length, 16))  # 4 query heads sharing 2 key/value heads
    k, v = mx.random.normal((2, 2, length, 16)), mx.random.normal((2, 2, length, 16))
    weights = mx.random.normal((2, 4, length, 16))
    mask = packed_mask(length, [length // 3, length // 2 + 5]) if packed else "causal"
    ref_value, ref_grads = value_and_grads(lambda *a: whole_rows(*a, mask), q, k, v, weights)
    value, grads = value_and_grads(lambda *a: attention.blocked_attention(*a, 0.125, mask, block), q, k, v, weights)
    assert abs(value.item() - ref_value.item()) <= 1e-4 * abs(ref_value.item()) + 1e-3
    for ours, ref in zip(grads, ref_grads):
        assert mx.allclose(ours, ref, rtol=1e-4, atol=1e-5).item()


@pytest.fixture
def model(tiny_model):
    return tiny_model


def loss_and_grads(model, tokens):
    import mlx.nn as nn

    def loss(x):
        return nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]).sum()

    return nn.value_and_grad(model, loss)(tokens)


def test_model_trains_the_same_in_blocks(model, monkeypatch):
    tokens = mx.random.randint(0, 200, (2, 101), key=mx.random.key(1))
    ref_loss, ref_grads = loss_and_grads(model, tokens)

    calls = []
    blocked = attention.blocked_attention
    monkeypatch.setattr(attention, "blocked_attention", lambda *a: calls.append(a[-1]) or blocked(*a))
    routed = attention.use_blocks(model, 32)
    assert routed == ["mlx_lm.models.llama"]
    loss, grads = loss_and_grads(model, tokens)
    assert calls and set(calls) == {32}, "every layer's attention ran in blocks"
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    from mlx.utils import tree_flatten

    for (name, ours), (_, ref) in zip(tree_flatten(grads), tree_flatten(ref_grads)):
        assert mx.allclose(ours, ref, rtol=1e-3, atol=1e-5).item(), name

    calls.clear()
    attention.use_blocks(model, 0)
    loss_and_grads(model, tokens)
    assert not calls, "block 0 gives mlx-lm its own function back"


def test_generation_with_a_cache_is_left_to_mlx_lm(model, monkeypatch):
    from mlx_lm.models.cache import make_prompt_cache

    calls = []
    blocked = attention.blocked_attention
    monkeypatch.setattr(attention, "blocked_attention", lambda *a: calls.append(1) or blocked(*a))
    prompt = mx.random.randint(0, 200, (1, 80), key=mx.random.key(2))

    def greedy(steps=4):
        cache = make_prompt_cache(model)
        logits = model(prompt, cache=cache)  # prefill: as many queries as keys, so in blocks
        out = []
        for _ in range(steps):  # one query over the cached keys: never in blocks
            token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
            out.append(token.item())
            logits = model(token, cache=cache)
        return out

    reference = greedy()
    attention.use_blocks(model, 16)
    calls.clear()
    assert greedy() == reference
    assert len(calls) == len(model.layers), "only the prefill ran in blocks"


@pytest.mark.e2e
def test_auto_is_blocks_on_cpu_and_the_key_is_checked(tmp_path):
    from trainer.config.schema import TrainingConfig
    from trainer.errors import ConfigError

    assert attention.resolve_block("auto") == (attention.DEFAULT_CPU_BLOCK if mx.default_device().type == mx.cpu
                                               else 0)
    assert attention.resolve_block(0) == 0
    with pytest.raises(ConfigError, match="training.attention_block"):
        TrainingConfig(attention_block=-1)
    recipe = tiny_recipe(tmp_path, training={"attention_block": "fast"})
    result = mlx_dp("train", str(recipe))
    assert result.returncode == 2
    assert "training.attention_block must be" in result.stderr
