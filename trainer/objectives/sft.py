"""Supervised fine-tuning: next-token cross-entropy, normalised by the update's loss tokens.

The loss of a micro-batch is the *sum* of its token cross-entropies times
``1 / T``, where ``T`` is the number of loss tokens in the whole update (every
rank's micro-batches, summed over ranks), known to every rank from the data
plan (``trainer.data.batches``).
"""

import mlx.core as mx

from .. import log
from ..data.batches import make_batch
from ..data.stream import stream_splits
from ..data.stream_batches import token_stream
from ..data.tokenized import load_splits
from .base import ObjectiveBase, token_loss_sum
from .evaluate import evaluate_loss, exact_match, through


class SFT(ObjectiveBase):
    """Next tokens of the data: plain text, prompt and completion, or chat rows (mlx-lm's formats)."""

    name = "sft"
    items = "samples"
    unit = "sequences"
    packing = True
    stats = ("loss_sum",)

    def load(self, data, tokenizer, splits: tuple, show_progress: bool) -> dict:
        if data.streaming:  # the training split is read while training (trainer.data.stream)
            return stream_splits(data, tokenizer, splits, show_progress, load_splits)
        return load_splits(data, tokenizer, splits, show_progress=show_progress)

    def stream(self, split, per_rank: int, rank: int, world_size: int, seed: int, pad_multiple: int, **options):
        return token_stream(split, per_rank, rank, world_size, seed, pad_multiple, **options)

    def batch(self, split, indices, rank: int, world_size: int, rows: int, pad_multiple: int):
        return make_batch(split, indices, rank, world_size, rows, pad_multiple)

    def arrays(self, batch) -> tuple:
        arrays = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
        return arrays if batch.segments is None else (*arrays, mx.array(batch.segments))

    def scales(self, micro_batches: list, ranks: int) -> mx.array:
        return mx.array(ranks / sum(b.global_tokens for b in micro_batches), mx.float32)

    def loss(self, model, scale, inputs, targets, mask, *segments):
        loss_sum = token_loss_sum(model, inputs, targets, mask, *segments, nll=self.nll)
        return loss_sum * scale, loss_sum.reshape(1)

    def counts(self, micro_batches: list) -> dict:
        return {}

    def summary(self, stats: list, tokens: int, counts: dict) -> dict:
        return {"train_loss": stats[0] / max(tokens, 1)}

    def validate(self, world, model, split, per_rank: int, pad_multiple: int, max_batches, members,
                 score=None) -> dict:
        return {"val_loss": evaluate_loss(world, model, split, self, per_rank, pad_multiple, max_batches,
                                          members=members, score=score)["loss"]}

    def evaluate(self, world, model, tokenizer, split, cfg, stage=None) -> dict:
        """Loss and perplexity, and greedy exact match of completion rows (``eval.exact_match``; not on a
        pipeline's stages, where no one machine holds the model to generate with)."""
        batch = cfg.eval.batch_size or cfg.training.batch_size
        result = evaluate_loss(world, model, split, self, batch, cfg.data.pad_multiple, cfg.eval.max_batches,
                               **through(stage, self))
        if stage is not None and cfg.eval.exact_match:
            log.info("eval.exact_match: skipped under parallel.pipeline (generation needs the whole model on one "
                     "machine); the loss went through the stages")
        elif cfg.eval.exact_match and (split.prompt_lengths > 0).any():
            limit = None if cfg.eval.max_batches is None else cfg.eval.max_batches * batch * world.size
            scored = exact_match(world, model, tokenizer, split, cfg.eval.max_new_tokens, limit)
            result.update(exact_match=scored["exact_match"], exact_match_samples=scored["samples"])
        return result

    def describe(self, result: dict) -> str:
        line = (f"{result['split']}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} over "
                f"{result['tokens']} tokens of {result['samples']} samples on {result['world_size']} rank(s)")
        if "exact_match" in result:
            line += f"; exact match {result['exact_match']:.1%} of {result['exact_match_samples']} greedy generations"
        return line
