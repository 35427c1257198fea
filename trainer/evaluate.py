"""Distributed evaluation: token-weighted loss over a split, sharded across ranks.

Each rank scores its rows of fixed, length-sorted global batches; loss sums
are summed over ranks and divided by the global token count, so the result is
what one process scoring the whole split would report.
"""

import math

import mlx.core as mx

from .batches import epoch_batches, make_batch
from .step import make_eval_loss, to_arrays


def eval_batches(split, per_rank_batch: int, world_size: int, max_batches: int | None = None):
    """Global batches of a split in a fixed order (no shuffling), optionally capped."""
    batches = epoch_batches(split.lengths, per_rank_batch * world_size, seed=0, epoch=0, shuffle=False)
    return batches if max_batches is None else batches[:max_batches]


def evaluate_loss(world, model, split, per_rank_batch: int, pad_multiple: int,
                  max_batches: int | None = None, progress=None) -> dict:
    """Token-weighted loss and perplexity of ``model`` on ``split``.

    Args:
        world (trainer.parallel.World): The group; every rank must call this.
        model: The model (switched to eval mode for the duration).
        split (trainer.data.TokenizedSplit): Validation or test data.
        per_rank_batch (int): Rows per rank per batch.
        pad_multiple (int): Padding granularity.
        max_batches (int | None): Score only the first N global batches. Default: ``None``.
        progress (callable | None): Called once per batch (e.g. a tqdm update). Default: ``None``.

    Returns:
        dict: ``loss``, ``perplexity``, ``tokens`` (global) and ``batches``.
    """
    was_training = model.training
    model.eval()
    loss_fn = make_eval_loss(model)
    total = mx.array(0.0, mx.float32)
    tokens = 0
    batches = eval_batches(split, per_rank_batch, world.size, max_batches)
    for indices in batches:
        batch = make_batch(split, indices, world.rank, world.size, per_rank_batch, pad_multiple)
        total = total + loss_fn(*to_arrays(batch))
        tokens += batch.global_tokens
        mx.eval(total)  # note: sync point per batch keeps memory at one batch
        if progress is not None:
            progress()
    loss_sum = world.all_sum([total.item()], phase="eval")[0]
    if was_training:
        model.train()
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "batches": len(batches)}
