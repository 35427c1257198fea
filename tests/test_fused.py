"""Fused exp (trainer.model.fused, trainer.tools.fastjit): MLX's results, computed in fused kernels."""

import json
import os
import subprocess

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from conftest import PYTHON, ROOT, mlx_dp, one_error_line, packed_mask, tiny_recipe
from trainer.model import attention, fused
from trainer.tools import fastjit


def grads_of(fn, *arrays, weights=None, argnums=None):
    """Value and gradients of a weighted sum of ``fn``'s output (every position its own gradient)."""
    argnums = tuple(range(len(arrays))) if argnums is None else argnums
    return mx.value_and_grad(lambda *a: (fn(*a) * weights).sum(), argnums=argnums)(*arrays)


def close(ours, ref, rtol=1e-5, atol=1e-6) -> bool:
    return mx.allclose(ours, ref, rtol=rtol, atol=atol).item()


@pytest.mark.parametrize("compiled", [False, True])
def test_swiglu_matches_mlx_lm(compiled):
    from mlx_lm.models.activations import swiglu as reference

    gate = mx.concatenate([mx.random.normal((3, 50, 64), key=mx.random.key(0)) * 4,
                           mx.array([-100.0, -30.0, 0.0, 30.0, 100.0] * 12 + [1.0] * 4).reshape(1, 1, 64)
                           * mx.ones((3, 1, 64))], axis=1)
    x = mx.random.normal(gate.shape, key=mx.random.key(1))
    weights = mx.random.normal(gate.shape, key=mx.random.key(2))
    ours_fn = mx.compile(fused.swiglu) if compiled else fused.swiglu
    ref_value, ref_grads = grads_of(lambda g, x: nn.silu(g) * x, gate, x, weights=weights)
    value, grads = grads_of(ours_fn, gate, x, weights=weights)
    assert close(ours_fn(gate, x), reference(gate, x))
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    for ours, ref in zip(grads, ref_grads):
        assert mx.isfinite(ours).all().item()
        assert close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_cross_entropy_matches_mlx(dtype):
    logits = (mx.random.normal((2, 33, 300), key=mx.random.key(3)) * 6).astype(dtype)
    logits[0, 0, 7] = 200.0  # a confident token: exp must not overflow
    targets = mx.random.randint(0, 300, (2, 33), key=mx.random.key(4))
    weights = mx.random.uniform(shape=(2, 33), key=mx.random.key(5))
    ref_value, ref_grad = grads_of(lambda z: nn.losses.cross_entropy(z.astype(mx.float32), targets), logits,
                                   weights=weights)
    value, grad = grads_of(lambda z: fused.cross_entropy(z, targets), logits, weights=weights)
    assert grad.dtype == dtype and fused.cross_entropy(logits, targets).dtype == mx.float32
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    assert close(grad.astype(mx.float32), ref_grad.astype(mx.float32), rtol=1e-3, atol=1e-6)
    # the target's gradient is softmax - 1: it must be negative where a target was scored
    picked = mx.take_along_axis(grad.astype(mx.float32), targets[..., None], axis=-1)
    assert (picked <= 0).all().item()


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("length,block", [(40, 64), (130, 64), (97, 16)])
@pytest.mark.parametrize("packed", [False, True])
def test_attention_matches_mlx(heads, kv_heads, length, block, packed):
    keys = mx.random.split(mx.random.key(length + block + heads), 4)
    q = mx.random.normal((2, heads, length, 16), key=keys[0])
    k, v = mx.random.normal((2, kv_heads, length, 16), key=keys[1]), mx.random.normal((2, kv_heads, length, 16),
                                                                                        key=keys[2])
    weights = mx.random.normal((2, heads, length, 16), key=keys[3])
    mask = packed_mask(length, [length // 3, length // 2 + 5], rows=2) if packed else "causal"
    ref_value, ref_grads = grads_of(
        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask), q, k, v,
        weights=weights)
    value, grads = grads_of(lambda q, k, v: fused.attention(q, k, v, 0.25, mask, block), q, k, v, weights=weights)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-4, abs=1e-3)
    for ours, ref in zip(grads, ref_grads):
        assert close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.fixture
def model(tiny_model):
    return tiny_model


def test_model_loss_and_gradients_are_mlx_lms(model):
    from trainer.objectives.base import TokenLoss, token_loss_sum

    tokens = mx.random.randint(0, 200, (2, 101), key=mx.random.key(1))
    mask = mx.ones((2, 100))

    def loss_and_grads(nll=None):
        step = nn.value_and_grad(model, lambda x: token_loss_sum(model, x[:, :-1], x[:, 1:], mask, nll=nll))
        return mx.compile(step)(tokens)  # compiled, as in training: the fused kernels are what is tested

    ref_loss, ref_grads = loss_and_grads()
    calls = {"attention": 0, "swiglu": 0, "loss": 0}

    def counting(name, fn):
        return lambda *a, **k: calls.__setitem__(name, calls[name] + 1) or fn(*a, **k)

    originals = fused.attention, fused.swiglu, fused.cross_entropy
    try:
        fused.attention = counting("attention", originals[0])
        fused.swiglu = counting("swiglu", originals[1])
        fused.cross_entropy = counting("loss", originals[2])
        assert fused.use_fused(model, True) == ["mlx_lm.models.llama"]
        attention.use_blocks(model, 32, fused=True)
        loss, grads = loss_and_grads(TokenLoss(fused=True))  # the run's choice, not a module flag
        fused.use_fused(model, False)  # while fused.swiglu is still the counting one it installed
    finally:
        fused.attention, fused.swiglu, fused.cross_entropy = originals
    layers = len(model.layers)
    assert calls == {"attention": layers, "swiglu": layers, "loss": 1}, "every layer and the loss were routed"
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for (name, ours), (_, ref) in zip(tree_flatten(grads), tree_flatten(ref_grads)):
        assert close(ours, ref, rtol=1e-3, atol=1e-5), name

    attention.use_blocks(model, 0)
    import mlx_lm.models.llama as llama
    from mlx_lm.models import activations, base

    assert llama.swiglu is activations.swiglu and llama.scaled_dot_product_attention is base.scaled_dot_product_attention


def test_generation_is_unchanged(model):
    from mlx_lm.models.cache import make_prompt_cache

    prompt = mx.random.randint(0, 200, (1, 80), key=mx.random.key(2))

    def greedy(steps=6):
        cache = make_prompt_cache(model)
        logits = model(prompt, cache=cache)  # prefill: ours; one query over the cache: mlx-lm's
        out = []
        for _ in range(steps):
            token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
            out.append(token.item())
            logits = model(token, cache=cache)
        return out

    reference = greedy()
    fused.use_fused(model, True)
    attention.use_blocks(model, 16, fused=True)
    assert greedy() == reference


@pytest.mark.e2e
def test_the_key_is_checked_and_auto_is_on_for_a_cpu(tmp_path):
    from trainer.config.schema import TrainingConfig
    from trainer.errors import ConfigError

    assert fused.resolve("auto") == (mx.default_device().type == mx.cpu)
    assert fused.resolve(False) is False
    with pytest.raises(ConfigError, match="training.fused_exp"):
        TrainingConfig(fused_exp="yes")
    result = mlx_dp("train", str(tiny_recipe(tmp_path, training={"fused_exp": 3})))
    assert result.returncode == 2
    assert "training.fused_exp must be one of 'auto' or true or false, got 3" in one_error_line(result)


@pytest.mark.e2e
def test_training_reports_it_and_trains_the_same(tmp_path):
    """One short run with fused exp and one without: the same losses, up to float rounding."""
    losses = {}
    for on in (True, False):
        recipe = tiny_recipe(tmp_path, name=f"r-{on}.yaml", training={"steps": 6, "fused_exp": on},
                             checkpoint={"dir": str(tmp_path / f"run-{on}"), "every": 6},
                             logging={"every": 1}, eval={"every": 0, "at_start": False})
        result = mlx_dp("train", str(recipe))
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("[mlx-dp] fused exp: loss, attention, SwiGLU" in result.stdout) == on
        rows = [json.loads(line) for line in (tmp_path / f"run-{on}" / "metrics.jsonl").read_text().splitlines()]
        losses[on] = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses[True]) == 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


# ---------------------------------------------------------------------------- fastjit

needs_avx2 = pytest.mark.skipif(fastjit.why_not() is not None, reason=f"fastjit: {fastjit.why_not()}")


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.e2e
@needs_avx2
def test_fastjit_builds_mlx_kernels_with_the_flags_in_a_cache_of_its_own(tmp_path):
    code = """
import os, tempfile
before = tempfile.gettempdir()
from trainer.tools import fastjit
print(fastjit.maybe_enable(), fastjit.active())
import mlx.core as mx
f = mx.compile(lambda a: mx.exp(a * 2.0 - 1.0))
mx.eval(f(mx.arange(1000, dtype=mx.float32)))
print(tempfile.gettempdir() == before, os.environ.get("TMPDIR"))
"""
    result = run_python(code, {"MLX_DP_CACHE": str(tmp_path), "MLX_DP_JIT": "avx2"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    assert lines[0].startswith("MLX_DP_JIT=avx2: MLX's fused kernels are compiled with -mavx2") and \
        lines[0].endswith("avx2"), "opt-in, and said"
    assert lines[1] == f"True {tmp_path / 'jit-avx2'}", "MLX's kernels move, Python's temporary files do not"
    wrapper = (tmp_path / "jit-avx2" / "bin" / "g++").read_text()
    assert all(flag in wrapper for flag in fastjit.FLAGS)
    assert list((tmp_path / "jit-avx2" / "mlx").glob("*/cpu/*.so")), "the kernels were built in its own cache"

    for unasked in ({"MLX_DP_JIT": "mlx"}, {}):  # the default leaves MLX's compiler, PATH and TMPDIR alone
        result = run_python(code, {"MLX_DP_CACHE": str(tmp_path), **unasked})
        assert result.returncode == 0 and result.stdout.split("\n")[:2] == ["None mlx", f"True {os.environ.get('TMPDIR')}"]


@pytest.mark.e2e
@needs_avx2
def test_fastjit_refuses_flags_that_change_results(tmp_path):
    """Without -ffp-contract=off, g++ fuses a * b + c into one rounding: the check must catch it."""
    code = """
from trainer.tools import fastjit
fastjit.FLAGS = tuple(f for f in fastjit.FLAGS if f != "-ffp-contract=off")
fastjit.enable()
"""
    result = run_python(code, {"MLX_DP_CACHE": str(tmp_path)})
    assert result.returncode != 0
    assert "fused multiply-add compiled with -mavx2 -mfma -mf16c differs" in result.stderr


@pytest.mark.e2e
def test_fastjit_setting_is_checked(tmp_path):
    result = mlx_dp("train", str(tiny_recipe(tmp_path)), env={"MLX_DP_JIT": "fast"})
    assert result.returncode == 2
    assert "MLX_DP_JIT='fast' is not one of 'mlx' (the default) or 'avx2'" in one_error_line(result)


@pytest.mark.e2e
def test_fastjit_wrapper_renames_the_library_into_place(tmp_path):
    """MLX loads a kernel library once its file exists: the compiler must write it under another name."""
    fake = tmp_path / "fake-g++"  # records its arguments, writes its -o file
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(dirname "$0")/args"\n'
                    'for a do [ "$prev" = -o ] && echo lib > "$a"; prev=$a; done\nexit 0\n')
    fake.chmod(0o755)
    fastjit._wrapper(tmp_path / "bin", str(fake))
    out = tmp_path / "out dir" / "libk.so"
    out.parent.mkdir()
    result = subprocess.run([str(tmp_path / "bin" / "g++"), "-O3", "k.cpp", "-o", str(out)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    written = args[args.index("-o") + 1]
    assert written != str(out) and written.startswith(str(out)) and written.endswith(".tmp"), "built under another name"
    assert out.read_text() == "lib\n" and not list(out.parent.glob("*.tmp")), "then renamed into place"
    assert all(flag in args for flag in fastjit.FLAGS)

    fake.write_text("#!/bin/sh\nexit 3\n")
    failed = subprocess.run([str(tmp_path / "bin" / "g++"), "k.cpp", "-o", str(tmp_path / "x.so")])
    assert failed.returncode == 3 and not (tmp_path / "x.so").exists(), "a failed compile leaves nothing"
