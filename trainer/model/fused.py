"""The training step's exp-heavy ops, written so that MLX fuses their ``exp`` into compiled kernels.

Why this exists: on MLX's CPU backend an op that ``mx.compile`` does not fuse
runs MLX's prebuilt kernel, which on the Linux wheel computes ``exp`` one
element at a time (:mod:`trainer.tools.fastjit` says why), while fused kernels
are built at run time and can use vector instructions (``MLX_DP_JIT=avx2``).
A profile of one update put more samples in those exps than in attention and
LoRA together (measured: docs/RESULTS.md, "Exps in fused kernels"). Three ops
in mlx-lm's models keep their ``exp`` out of fused kernels:

* SwiGLU (``mlx_lm.models.activations.swiglu``): the backward pass keeps the
  sigmoid's output, and ``mx.compile`` does not fuse a single op whose result
  other kernels read, so MLX's own ``Sigmoid`` computes it. :func:`swiglu`
  writes the sigmoid as ``1 / (1 + exp(-x))`` (a fused kernel) and gives it a
  backward that reads only that sigmoid.
* The loss's ``logsumexp`` over the vocabulary (a primitive). :func:`cross_entropy`
  takes the max, then ``exp(x - max)`` fused; its backward recomputes
  ``exp(x - lse)`` inside the gradient's kernel, as MLX's own does.
* Attention's softmax (on a CPU ``mx.fast.scaled_dot_product_attention`` falls
  back to MLX's Softmax). :func:`attention` fuses ``exp(s - max)`` and
  normalises after the product with the values (L x D divisions instead of
  L x L); the query heads that share a KV head are one matmul of stacked rows
  instead of a broadcast batch of small ones.

Results equal MLX's up to float rounding (tests/test_fused.py compares outputs
and gradients, and a model's loss and gradients, with MLX's ops). They are used
where ``training.fused_exp`` says (``auto``: on a CPU; a GPU's Metal kernels are
fused already). The rewrite pays only together with the vector flags: either
alone changes little (same section).

What is left alone: models whose MLP calls ``nn.silu`` or ``nn.gelu`` directly
rather than mlx-lm's ``swiglu`` (their attention and loss still go through
here). The loss's forward keeps ``exp(x - max)`` for one sum, a transient array
the size of the logits that MLX's ``logsumexp`` does not allocate: on a CPU with
a large vocabulary, set ``training.fused_exp: false`` if that peak matters.
"""

import mlx.core as mx
import mlx.nn as nn

_MASKED = -1e30  # a masked score; exp(_MASKED - max) is exactly 0 in float32


def resolve(setting) -> bool:
    """``training.fused_exp`` as a bool: ``auto`` is true when MLX computes on the CPU."""
    if setting == "auto":
        return mx.default_device().type == mx.cpu
    return bool(setting)


# ---------------------------------------------------------------------------- SwiGLU


def _sigmoid(x: mx.array) -> mx.array:
    # A chain of four ops, so mx.compile builds it as one fused kernel, even where the
    # result is kept for the backward pass (mx.sigmoid alone would run MLX's own kernel).
    return 1.0 / (1.0 + mx.exp(-x))


@mx.custom_function
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x``, as mlx-lm's ``swiglu``, with its sigmoid computed in a fused kernel."""
    return gate * _sigmoid(gate) * x


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    # The sigmoid is the same expression as the forward's, so mx.compile computes it once
    # for both; plain autodiff would keep exp(-gate) and 1 + exp(-gate) as well.
    gate, x = primals
    s = _sigmoid(gate)
    silu = gate * s
    return cotangent * x * (s * (1.0 + gate * (1.0 - s))), cotangent * silu


# ---------------------------------------------------------------------------- cross-entropy


@mx.custom_function
def _cross_entropy(logits: mx.array, targets: mx.array):
    x = logits.astype(mx.float32)
    top = x.max(axis=-1, keepdims=True)
    lse = mx.log(mx.exp(x - top).sum(axis=-1, keepdims=True)) + top
    picked = mx.take_along_axis(x, targets[..., None], axis=-1)
    return (lse - picked).squeeze(-1), lse


@_cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangents, outputs):
    logits, targets = primals
    cotangent = cotangents[0][..., None]
    onehot = mx.arange(logits.shape[-1]) == targets[..., None]
    grad = mx.exp(logits.astype(mx.float32) - outputs[1]) * cotangent - mx.where(onehot, cotangent, 0.0)
    return grad.astype(logits.dtype), mx.zeros_like(targets)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross-entropy, as ``nn.losses.cross_entropy(logits, targets)``, in float32."""
    return _cross_entropy(logits, targets)[0]


# ---------------------------------------------------------------------------- attention


def _allowed(mask, start: int, end: int, repeats: int):
    """Which of the block's (stacked) queries may see which keys: (.., repeats * rows, end)."""
    rows = end - start
    if isinstance(mask, str):  # "causal": query i (absolute start + i) sees keys 0..start + i
        allowed = mx.arange(start, end)[:, None] >= mx.arange(end)[None]
        return mx.broadcast_to(allowed[None], (repeats, rows, end)).reshape(repeats * rows, end)
    part = mask[..., start:end, :end]  # packed rows' SegmentMask: (batch, 1, rows, end), boolean
    batch = part.shape[0]
    return mx.broadcast_to(part[:, :, None], (batch, 1, repeats, rows, end)).reshape(batch, 1, -1, end)


def attention(queries, keys, values, scale: float, mask, block: int) -> mx.array:
    """Causal attention of ``queries`` over ``keys``/``values`` (same length), ``block`` queries at a time.

    Each block attends only the keys up to its end (see ``trainer.model.attention``).

    Args:
        queries (mx.array): (batch, heads, length, dim).
        keys (mx.array): (batch, kv_heads, length, dim).
        values (mx.array): (batch, kv_heads, length, dim).
        scale (float): Score scale.
        mask (str | mx.array): ``"causal"``, or packed rows' boolean (batch, 1, length, length)
            mask (``trainer.data.packing.SegmentMask``; ``trainer.model.attention`` routes no other).
        block (int): Queries per block (the length or more: one block).
    """
    batch, heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    repeats = heads // kv_heads
    outputs = []
    for start in range(0, length, block):
        end = min(length, start + block)
        # (batch, heads, rows, dim) -> (batch, kv_heads, repeats * rows, dim): head h reads kv head h // repeats
        q = (queries[:, :, start:end] * scale).reshape(batch, kv_heads, repeats * (end - start), dim)
        scores = (q @ keys[:, :, :end].swapaxes(-1, -2)).astype(mx.float32)
        scores = mx.where(_allowed(mask, start, end, repeats), scores, _MASKED)
        top = mx.stop_gradient(scores.max(axis=-1, keepdims=True))  # the softmax is shift-invariant
        weights = mx.exp(scores - top)  # fused: sub + exp in one compiled kernel
        out = (weights.astype(values.dtype) @ values[:, :, :end]) / weights.sum(axis=-1, keepdims=True).astype(
            values.dtype)
        outputs.append(out.reshape(batch, heads, end - start, dim))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)


# ---------------------------------------------------------------------------- routing


def use_fused(model: nn.Module, on: bool) -> list[str]:
    """Route ``model``'s SwiGLU through this module (``on``), or back.

    ``trainer.model.attention.use_blocks`` handles the attention side, and the
    run's loss is its own choice (``trainer.objectives.base.TokenLoss``). Only
    this model's modules change (``trainer.model.routing``: never mlx-lm's
    module globals). A compiled step keeps what was set when it was traced.

    Returns:
        list[str]: The mlx-lm model modules whose ``swiglu`` is now :func:`swiglu`.
    """
    from mlx_lm.models import activations

    from .routing import route

    return route(model, {"swiglu": activations.swiglu}, {"swiglu": swiglu} if on else {})
