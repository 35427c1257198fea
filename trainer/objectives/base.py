"""The contract every objective keeps (:class:`Objective`), and the token losses they share.

An objective is what the loss teaches (``method.objective``): next tokens
(``trainer.objectives.sft``), preferences (``trainer.objectives.preference``)
or rewards. Each is one class, registered by name in
``trainer.objectives.registry``, that carries everything that differs between
objectives: what ``training.batch_size`` counts, how its rows are loaded and
batched, whether it needs a reference, whether it generates its own rows each
update, its loss, its metrics and its evaluation. The rest of the trainer asks
the objective and never compares ``method.objective`` against names.

Every loss is written as *sums* over this rank's rows, each divided by a count
of the whole update, summed over every rank and micro-batch (tokens for a token
term, pairs or groups for a per-item term). Those counts are known to every
rank from the data plan (``trainer.data.batches``), so the gradients summed
over ranks are the gradient of the global objective, and N ranks at batch b
train exactly what one process trains at batch N*b, with accumulation and with
any split of the rows (``trainer.data.balance``). Beside the loss, an objective
returns a short vector of statistics, also sums, which ride with the gradients
at no extra collective and which its metrics divide by the same counts.

docs/INTERNALS.md, "Adding an objective", walks through a new one.
"""

from contextlib import contextmanager
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from ..model import chunked, fused, heads


class TokenLoss:
    """Per-token negative log-likelihood of a model's next tokens, computed one way for a whole run.

    The objectives and the reference pass take it from the run, so the choice of
    kernels belongs to the run's step functions, not to a module flag.

    Args:
        fused (bool): Cross-entropy with its exp in fused kernels
            (``trainer.model.fused.cross_entropy``, ``training.fused_exp``);
            else MLX's ``nn.losses.cross_entropy``. Default: ``False``.
        chunked (bool): Never hold the [tokens x vocabulary] logits: the model's
            trunk gives hidden states and :func:`trainer.model.chunked.chunked_cross_entropy`
            computes the loss a chunk of tokens at a time (``training.chunked_loss``).
            A model whose output head :func:`trainer.model.heads.split_head` cannot
            open (a pipeline stage, an unsurveyed architecture, a DoRA head) gets the
            plain loss. Default: ``False``.
    """

    def __init__(self, fused: bool = False, chunked: bool = False):
        self.fused = fused
        self.chunked = chunked
        self._grad = True

    @contextmanager
    def scoring(self):
        """Within it, traced losses are for values only (evaluation, reference log-probs, a policy's
        old log-probs): the chunked loss then skips the gradient work it would do in its forward."""
        before, self._grad = self._grad, False
        try:
            yield self
        finally:
            self._grad = before

    def __call__(self, model: nn.Module, inputs, targets, segments=None, scale: float = 1.0) -> mx.array:
        """``(rows, length)`` float32 NLL of ``targets`` given ``inputs`` (``segments``: packed rows), of the
        logits times ``scale`` (one over a sampling temperature)."""
        cache = None
        if segments is not None:
            from ..data.packing import SegmentMask

            cache = [SegmentMask(segments)] * len(model.layers)
        split = heads.split_head(model) if self.chunked else None
        if split is not None:
            hidden = split.trunk(inputs, cache)
            return chunked.chunked_cross_entropy(hidden, targets, split.head, scale=scale,
                                                 grad_in_forward=None if self._grad else False)
        logits = model(inputs) if cache is None else model(inputs, cache=cache)
        if scale != 1.0:
            logits = logits * scale
        cross_entropy = fused.cross_entropy if self.fused else nn.losses.cross_entropy
        return cross_entropy(logits, targets).astype(mx.float32)


def token_loss_sum(model: nn.Module, inputs, targets, mask, segments=None, nll: TokenLoss | None = None) -> mx.array:
    """Sum of masked next-token cross-entropies, in float32 (``nll``: how; default MLX's own loss)."""
    return ((nll or TokenLoss())(model, inputs, targets, segments) * mask).sum()


def sequence_logps(model: nn.Module, inputs, targets, mask, nll: TokenLoss | None = None) -> mx.array:
    """Per row, the summed log-prob of the masked targets (an answer), in float32."""
    return -((nll or TokenLoss())(model, inputs, targets) * mask).sum(axis=-1)


def wins(a: mx.array, b: mx.array) -> mx.array:
    """1 where ``a > b``, 0.5 on a tie, 0 otherwise."""
    return (a > b).astype(mx.float32) + 0.5 * (a == b).astype(mx.float32)


def _cuts(items: int, parts: int) -> list:
    """``items`` cut into up to ``parts`` consecutive, nearly equal, non-empty ranges."""
    parts = max(1, min(parts, items))
    bounds = [round(i * items / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class Objective(Protocol):
    """What the trainer asks of an objective; one class per ``method.objective``.

    Attributes:
        name: Its ``method.objective``.
        items: What a row of its data is (``"samples"``, ``"pairs"``, ``"prompts"``).
        unit: What ``training.batch_size`` counts (``"sequences"``, ``"pairs"``, ``"prompts"``).
        packing: Whether ``data.packing`` may pack its items into shared rows.
        needs_reference: Whether :meth:`prepare` computes reference values before training.
        on_policy: Whether it makes its own rows each update from the policy (:meth:`rollout`).
        stats: Names of the summed statistics :meth:`loss` returns (the first is the loss sum).
        rollout_seconds: This rank's seconds in :meth:`rollout` making the current update's rows, before any
            collective (``parallel.balance`` adds them to the measured compute).
        nll: The run's :class:`TokenLoss`, which its losses use (an instance's: given to its constructor).
    """

    name: str
    items: str
    unit: str
    packing: bool
    needs_reference: bool
    on_policy: bool
    stats: tuple
    rollout_seconds: float

    @classmethod
    def rows_per_item(cls, method) -> int:
        """Model rows one item becomes under ``method`` (a pair: 2; a prompt: its group of completions)."""

    @classmethod
    def row_length(cls, cfg) -> int:
        """The longest row a batch can hold, in tokens (what ``recipes memory`` plans for)."""

    def check(self, cfg) -> None:
        """Raise ``ConfigError`` for recipe keys that do not apply to it, naming them."""

    def load(self, data, tokenizer, splits: tuple, show_progress: bool) -> dict:
        """The tokenized splits of ``data`` (a ``DataConfig``), by name."""

    def stream(self, split, per_rank: int, rank: int, world_size: int, seed: int, pad_multiple: int, **options):
        """The endless stream of this rank's training micro-batches (a ``trainer.data.batches.BatchStream``)."""

    def batch(self, split, indices, rank: int, world_size: int, rows: int, pad_multiple: int):
        """This rank's batch of the global batch ``indices`` (validation and evaluation)."""

    def prepare(self, world, model, tokenizer, splits: dict, cache_dir, settings: dict, stage=None) -> dict:
        """Before training, with the model as loaded: reference values, or what rollouts need; returns what
        every rank must agree on. A collective where it computes over ranks (``needs_reference``); ``stage``: this
        rank's stage of a pipeline (``trainer.run.stages.Stage``), whose forward runs through every stage."""

    def rollout(self, model, take, step: int, hosted: int = 1) -> list:
        """The micro-batches update ``step`` trains on. ``take()`` gives the stream's next ones (each global
        micro-batch once per ``hosted`` nominal rank); an on-policy objective makes its rows from them now,
        from the policy as it is, and may reuse them for later updates without taking more."""

    def resumable_after(self, step: int) -> bool:
        """Whether a checkpoint after update ``step`` resumes exactly (an on-policy objective that reuses a
        generation across updates can only resume between generations); the loop saves and stops there."""

    def split(self, batch, parts: int) -> list:
        """``batch`` cut into up to ``parts`` batches of whole items (a pipeline's micro-batches); global counts
        stay the whole batch's."""

    def arrays(self, batch) -> tuple:
        """The batch's arrays :meth:`loss` takes after ``model`` and ``scales``."""

    def scales(self, micro_batches: list, ranks: int) -> mx.array:
        """What each loss sum is multiplied by: ``ranks`` over a global count of the update."""

    def loss(self, model, scales, *arrays) -> tuple:
        """``(scaled loss, stats)`` for this rank's rows."""

    def counts(self, micro_batches: list) -> dict:
        """The global counts :meth:`summary` divides by."""

    def summary(self, stats: list, tokens: int, counts: dict) -> dict:
        """The training metrics of summed ``stats``."""

    def progress(self, record: dict) -> dict:
        """What the progress bar shows of a training record besides loss, tokens/s and learning rate."""

    def validation_note(self, record: dict) -> str:
        """What the line after a validation says besides the loss (``, preference accuracy 93.0%``)."""

    def validate(self, world, model, split, per_rank: int, pad_multiple: int, max_batches, members,
                 score=None) -> dict:
        """One validation's ``metrics.jsonl`` record (``val_loss`` first), over the nominal ranks' batches
        (``members``: a ``Membership``), so it scores the same rows however many ranks run; ``score``: how a
        batch is scored where the model is not whole (a pipeline stage). A collective."""

    def evaluate(self, world, model, tokenizer, split, cfg, stage=None) -> dict:
        """``mlx-dp eval``'s result on a split. A collective."""

    def describe(self, result: dict) -> str:
        """``mlx-dp eval``'s line for people."""


class ObjectiveBase:
    """Defaults for what most objectives share: no reference, no generation, nothing extra on the bar.

    Args:
        method: The recipe's ``method`` section.
        nll (TokenLoss | None): How token losses are computed. Default: MLX's own loss.
    """

    needs_reference = False
    on_policy = False
    rollout_seconds = 0.0  # this rank's seconds making the current update's rows (an on-policy objective's)

    def __init__(self, method, nll: TokenLoss | None = None):
        self.method = method
        self.nll = nll or TokenLoss()

    def check(self, cfg) -> None:
        pass

    @classmethod
    def rows_per_item(cls, method) -> int:
        return 1

    @classmethod
    def row_length(cls, cfg) -> int:
        return cfg.data.max_seq_length

    def prepare(self, world, model, tokenizer, splits: dict, cache_dir, settings: dict, stage=None) -> dict:
        return {}

    def rollout(self, model, take, step: int, hosted: int = 1) -> list:
        return take()

    def split(self, batch, parts: int) -> list:
        """Consecutive rows (an item is a row)."""
        from dataclasses import replace

        cuts = _cuts(batch.inputs.shape[0], parts)
        real = len(batch.indices)
        return [replace(batch, inputs=batch.inputs[a:b], targets=batch.targets[a:b], mask=batch.mask[a:b],
                        segments=None if batch.segments is None else batch.segments[a:b],
                        tokens=int(batch.mask[a:b].sum()), indices=batch.indices[min(a, real):min(b, real)])
                for a, b in cuts]

    def resumable_after(self, step: int) -> bool:
        return True

    def progress(self, record: dict) -> dict:
        return {}

    def validation_note(self, record: dict) -> str:
        return ""
