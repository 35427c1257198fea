"""Causal attention computed in query blocks, skipping the keys the mask would discard.

Why this exists: mlx-lm's attention layers call ``mx.fast.scaled_dot_product_attention``.
On MLX's CPU backend that (and its backward) computes the whole L x L score matrix
and then masks away the half above the diagonal, which is most of the extra time of a
long row; blocks gain a few percent on short rows, much more on long ones and over an
epoch of variable-length text (measured: docs/RESULTS.md, "Attention in query blocks"
and "One epoch at N=2 against mlx_lm.lora"). Nothing in MLX or mlx-lm skips those
blocks for training, so this does.

How: the queries are split into blocks of ``block``; block ``i`` (queries
``s..e``) attends keys ``0..e`` only, through the same
``mx.fast.scaled_dot_product_attention``. With fewer queries than keys, MLX's
``"causal"`` mask is aligned to the last key, which is exactly the block's
offset, so each block is the causal attention of its rows; the outputs are
concatenated. The result equals the whole-row call up to float rounding
(tests/test_attention.py checks outputs and gradients), for (n + 1) / 2n of
the score work with n blocks.

Where it applies: :func:`use_blocks` routes the given model's attention
modules to this module's version (``trainer.model.routing`` says how). The
replacement takes over only calls it can do exactly: a causal mask
(``"causal"``, or the packed rows' block-diagonal causal mask of
:class:`~trainer.data.packing.SegmentMask`), as many queries as keys, more
than one block, no quantized KV cache and no attention sinks. Everything else
(generation with a KV cache, sliding-window or bidirectional masks) goes to
mlx-lm's function unchanged. On a GPU the default leaves MLX's fused kernels
alone: the measurements are the CPU's. With ``training.fused_exp`` (on by
default on a CPU) each block, or a row short enough to be one block, is
computed by :func:`trainer.model.fused.attention` instead of MLX's call, so
that its softmax's exp runs in a fused kernel.
"""

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from . import fused as _fused
from .routing import route

DEFAULT_CPU_BLOCK = 64  # 32 and 128 were within noise of it (docs/RESULTS.md, "Attention in query blocks")


def resolve_block(setting) -> int:
    """The query block size for ``training.attention_block``: an int, or ``"auto"``.

    ``auto`` is :data:`DEFAULT_CPU_BLOCK` when MLX computes on the CPU, and 0
    (MLX's own kernel over whole rows) on a GPU.
    """
    if setting == "auto":
        return DEFAULT_CPU_BLOCK if mx.default_device().type == mx.cpu else 0
    return int(setting)


def blocked_attention(queries, keys, values, scale: float, mask, block: int):
    """Causal attention of ``queries`` over ``keys``/``values`` (same length), ``block`` queries at a time.

    Args:
        queries (mx.array): (batch, heads, length, dim).
        keys (mx.array): (batch, kv_heads, length, dim).
        values (mx.array): (batch, kv_heads, length, dim).
        scale (float): Score scale.
        mask (str | mx.array): ``"causal"``, or a causal (batch, 1, length, length)
            mask such as packed rows' block-diagonal one.
        block (int): Queries per block.
    """
    length = queries.shape[2]
    outputs = []
    for start in range(0, length, block):
        end = min(length, start + block)
        part = mask if isinstance(mask, str) else mask[..., start:end, :end]
        outputs.append(mx.fast.scaled_dot_product_attention(
            queries[:, :, start:end], keys[:, :, :end], values[:, :, :end], scale=scale, mask=part))
    return mx.concatenate(outputs, axis=2)


def _causal(mask, cache) -> bool:
    from ..data.packing import SegmentMask

    if isinstance(mask, str):
        return mask == "causal"
    return isinstance(cache, SegmentMask) and isinstance(mask, mx.array)


@lru_cache(maxsize=None)
def attention_in_blocks(block: int, fused: bool):
    """mlx-lm's ``scaled_dot_product_attention``, in query blocks of ``block`` where that is exact (see the
    module doc), each block by ``trainer.model.fused.attention`` when ``fused``. One function per setting."""
    from mlx_lm.models import base

    original = base.scaled_dot_product_attention

    def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None):
        length = queries.shape[2]
        blocks = 0 < block < length
        if (not (blocks or fused) or keys.shape[2] != length or sinks is not None or hasattr(cache, "bits")
                or not _causal(mask, cache)):
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        if fused:  # the softmax's exp in fused kernels (trainer.model.fused); a single block when blocks are off
            return _fused.attention(queries, keys, values, scale, mask, block if blocks else length)
        return blocked_attention(queries, keys, values, scale, mask, block)

    return scaled_dot_product_attention


def use_blocks(model: nn.Module, block: int, fused: bool = False) -> list[str]:
    """Route ``model``'s attention through :func:`attention_in_blocks` in blocks of ``block``.

    ``block`` 0 keeps whole rows. ``fused`` computes each block with
    ``trainer.model.fused.attention`` (the softmax's exp in fused kernels)
    instead of MLX's attention call. ``block`` 0 without ``fused`` gives the
    model mlx-lm's function back. Only this model's modules change
    (``trainer.model.routing``); a compiled step traces with whatever they call
    when it first runs.

    Returns:
        list[str]: The mlx-lm model modules now routed (empty when the model
        calls MLX's attention directly, or neither blocks nor ``fused`` are asked for).
    """
    from mlx_lm.models import base

    block = max(0, int(block))
    on = {"scaled_dot_product_attention": attention_in_blocks(block, bool(fused))} if block or fused else {}
    return route(model, {"scaled_dot_product_attention": base.scaled_dot_product_attention}, on)
