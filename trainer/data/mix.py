"""Weighted mixes (``data.mix``): which samples of several sources make each epoch.

A mix lists sources, each with a ``weight``: its relative share of every
epoch, normalised (weights 3 and 1 give 3 of every 4 samples). An epoch holds
``data.epoch_size`` samples (by default the sources' total), and source ``i``
gives exactly ``c_i`` of them: ``epoch_size * w_i / sum(w)``, rounded by largest
remainder so that the counts add up. The users of other tools mean other
things by a weight (Axolotl: the fraction of a dataset kept; LLaMA-Factory and
``datasets.interleave_datasets``: sampling probabilities whose counts vary
by seed and rank): here the counts are exact and the same on every rank.

Which samples: source ``i`` takes positions ``[epoch * c_i, (epoch + 1) * c_i)``
of an endless sequence of successive permutations of its samples. A source
weighted down is therefore seen whole, without repeats, before any sample
comes back (across epochs); a source weighted up repeats whole passes and
then a random remainder. The epoch's samples are a pure function of (sizes,
weights, epoch size, seed, epoch), so every rank computes them without
communicating, and a resume needs only (epoch, micro-batch), as without a mix.
The length grouping and the split between ranks are ``trainer.data.batches``'.

Pure numpy; this module imports no MLX.
"""

from dataclasses import dataclass

import numpy as np

from ..errors import DataError

MIX_TAG = 0x6D6978  # keeps a mix's permutations apart from the other uses of the seed


def mix_counts(weights, epoch_size: int) -> np.ndarray:
    """Samples of each source in one epoch: shares of ``epoch_size`` by ``weights``, adding up exactly.

    Largest remainder: each source gets the floor of its exact share, and the
    samples left over go to the largest fractional parts (ties to the earlier
    source).

    Args:
        weights: Positive relative weights, one per source.
        epoch_size (int): Samples per epoch.
    """
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * epoch_size
    counts = np.floor(exact).astype(np.int64)
    left = int(epoch_size - counts.sum())
    order = np.lexsort((np.arange(len(w)), -(exact - counts)))
    counts[order[:left]] += 1
    return counts


def _passes(size: int, seed: int, source: int, start: int, count: int) -> np.ndarray:
    """Positions ``[start, start + count)`` of source ``source``'s endless run of permutations of ``size``."""
    out, position = [], start
    while count > 0:
        k, offset = divmod(position, size)
        order = np.random.default_rng([seed, MIX_TAG, source, k]).permutation(size)
        take = min(count, size - offset)
        out.append(order[offset:offset + take])
        position, count = position + take, count - take
    return np.concatenate(out) if out else np.empty(0, np.int64)


@dataclass(frozen=True)
class MixPlan:
    """How a training split's samples, concatenated source by source, make each epoch.

    Attributes:
        names: Each source, for people.
        sizes: Usable samples of each source, in the split's order.
        weights: Each source's weight.
        epoch_size: Samples per epoch.
    """

    names: tuple
    sizes: tuple
    weights: tuple
    epoch_size: int

    @property
    def counts(self) -> np.ndarray:
        """Samples of each source in every epoch."""
        return mix_counts(self.weights, self.epoch_size)

    def members(self, seed: int, epoch: int) -> np.ndarray:
        """Indices (into the concatenated split) of the samples of ``epoch``, source by source; a sample
        weighted up may appear more than once."""
        offsets = np.cumsum((0,) + tuple(self.sizes[:-1]))
        parts = [offset + _passes(size, seed, i, epoch * int(count), int(count))
                 for i, (size, count, offset) in enumerate(zip(self.sizes, self.counts, offsets))]
        return np.concatenate(parts).astype(np.int64)

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        """The source of each sample index."""
        return np.searchsorted(np.cumsum(self.sizes), indices, side="right")

    def describe(self, items: str = "samples") -> str:
        """The table printed at start: each source's size, weight and share of an epoch."""
        rows = [f"{name}: {size} {items}, weight {weight:g} -> {count} per epoch ({count / size:.2f} passes)"
                for name, size, weight, count in zip(self.names, self.sizes, self.weights, self.counts)]
        return f"data.mix: {self.epoch_size} {items} per epoch; " + "; ".join(rows)

    def record(self) -> dict:
        """The ``metrics.jsonl`` record of the mix (the counts are the same every epoch)."""
        return {"event": "data_mix", "epoch_size": self.epoch_size,
                "sources": [{"source": name, "size": size, "weight": weight, "per_epoch": int(count)}
                            for name, size, weight, count in zip(self.names, self.sizes, self.weights, self.counts)]}


def plan_mix(cfg, pieces: list) -> MixPlan:
    """The plan of ``data.mix`` for the training split made of ``pieces`` (one per source, in order).

    Raises:
        DataError: A source would give no sample to an epoch.
    """
    weights = tuple(float(entry.get("weight", 1.0)) for entry in cfg.mix)
    sizes = tuple(len(piece) for piece in pieces)
    plan = MixPlan(tuple(piece.source for piece in pieces), sizes, weights, cfg.epoch_size or sum(sizes))
    empty = [name for name, count in zip(plan.names, plan.counts) if count == 0]
    if empty:
        raise DataError(f"data.mix gives {empty[0]} no sample in an epoch of {plan.epoch_size} (its weight is too "
                        "small a share); raise its weight or data.epoch_size")
    return plan


def mix_parts(cfg) -> list:
    """One data section per source of ``data.mix``, as if each were the recipe's only dataset."""
    import dataclasses

    parts = []
    for entry in cfg.mix:
        part = dataclasses.replace(cfg, mix=None, epoch_size=None, path=entry.get("path"),
                                   hf_dataset=entry.get("hf_dataset"))
        parts.append(part)
    return parts


class WholeEpochs:
    """What a training split serves each epoch: every sample once, or a mix's picks (:class:`MixPlan`).

    The splits (``TokenizedSplit``, ``PairSplit``, ``PromptSplit``) take this
    as a base; ``trainer.data.packing.PackedSplit`` packs each epoch's picks
    itself. ``mix`` is set on a training split by ``trainer.data.tokenized.load_parts``.
    """

    mix: MixPlan | None = None

    def epoch_view(self, seed: int, epoch: int) -> tuple:
        """``(split, samples)``: the split ``epoch`` is served from and the indices of its samples
        (``None``: each sample once)."""
        return self, (None if self.mix is None else self.mix.members(seed, epoch))

    def epoch_items(self, seed: int) -> int:
        """Items (samples, pairs, prompts) of one epoch."""
        return len(self) if self.mix is None else self.mix.epoch_size
