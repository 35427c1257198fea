"""Batches of preference pairs: a pair's chosen and rejected answers stay together on one rank.

The global micro-batches are ``trainer.data.batches``' own, over *pairs*: a
pure function of (pair lengths, pairs per global micro-batch, seed, epoch),
length-grouped by the longer answer of each pair, so padding stays low. Each
rank takes its pairs of a global micro-batch as it takes rows for SFT (the
strided deal, or ``trainer.data.balance``'s uneven split), then lays them out
as ``2 x rows`` sequences: the chosen answers first, the rejected answers in
the same order after them. Every rank knows the global pair and token counts
of every micro-batch without communicating, which is what the preference
losses are normalised by (``trainer.objectives.base``). Pure numpy.
"""

from dataclasses import dataclass

import numpy as np

from .balance import rows_of
from .batches import Batch, BatchStream, padded_width, rank_rows


@dataclass(frozen=True)
class PairBatch(Batch):
    """One rank's pairs of a global micro-batch (``Batch``'s arrays hold ``2 x rows`` sequences).

    Attributes:
        pairs: real pairs on this rank (the rest of its ``rows`` are padding).
        global_pairs: pairs in the whole global micro-batch.
        global_chosen_tokens: answer tokens of the chosen answers of the whole global micro-batch.
        reference: ``(2 x rows,)`` float32 reference log-probs per sequence (zeros without a reference).
        valid: ``(rows,)`` float32, 1 for a real pair, 0 for a padding pair.
    """

    pairs: int = 0
    global_pairs: int = 0
    global_chosen_tokens: int = 0
    reference: np.ndarray | None = None
    valid: np.ndarray | None = None


def make_pair_batch(split, batch: np.ndarray, rank: int, world_size: int, rows: int, pad_multiple: int,
                    row_split: list[int] | None = None) -> PairBatch:
    """Assemble this rank's padded arrays for one global micro-batch of pairs.

    Args:
        split (trainer.data.pairs.PairSplit): The pairs.
        batch (np.ndarray): The global micro-batch's pair indices.
        rank (int): This rank.
        world_size (int): Number of ranks.
        rows (int): Pairs this rank computes; a rank short of pairs gets padding pairs.
        pad_multiple (int): See ``trainer.data.batches.padded_width``.
        row_split (list[int] | None): Pairs of a full global micro-batch per rank
            (``trainer.data.balance``); ``None``: the even, strided split. Default: ``None``.
    """
    width = padded_width(int(split.lengths[batch].max()), pad_multiple)
    mine = rank_rows(batch, rank, world_size) if row_split is None else rows_of(batch, rank, row_split)
    tokens = np.zeros((2 * rows, width), np.int32)
    mask = np.zeros((2 * rows, width - 1), np.float32)
    reference = np.zeros(2 * rows, np.float32)
    for half, side in enumerate((split.chosen, split.rejected)):
        for k, i in enumerate(mine):
            sample = side.sample(i)
            tokens[half * rows + k, :len(sample)] = sample
            mask[half * rows + k, :len(sample) - 1] = side.target_mask(i)
        if split.reference is not None:
            reference[half * rows:half * rows + len(mine)] = split.reference[mine, half]
    valid = np.zeros(rows, np.float32)
    valid[:len(mine)] = 1.0
    return PairBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=mask,
                     tokens=int(split.loss_counts[mine].sum()), global_tokens=int(split.loss_counts[batch].sum()),
                     indices=mine, real_tokens=int(split.chosen.lengths[mine].sum() + split.rejected.lengths[mine].sum()),
                     pairs=len(mine), global_pairs=len(batch),
                     global_chosen_tokens=int(split.chosen.loss_counts[batch].sum()), reference=reference, valid=valid)


class PairStream(BatchStream):
    """``BatchStream`` over pairs: the same order, positions, prefetch and balance; pair batches.

    ``per_rank_batch`` counts pairs (each is two sequences).
    """

    def _build(self, split, batch: np.ndarray, row_split: tuple) -> list[PairBatch]:
        even = len(set(row_split)) == 1
        return [make_pair_batch(split, batch, rank, self.world_size, row_split[rank], self.pad_multiple,
                                None if even else list(row_split)) for rank in self.hosted]


def batch_stream(split, *args, **kwargs) -> BatchStream:
    """The stream for a split: :class:`PairStream` for preference pairs, ``BatchStream`` otherwise."""
    from .pairs import PairSplit

    return (PairStream if isinstance(split, PairSplit) else BatchStream)(split, *args, **kwargs)
