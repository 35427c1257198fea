"""Sample packing: short samples share a row; attention and loss stay within a sample.

``data.packing: true`` packs tokenized samples into rows of at most
``data.max_seq_length`` tokens (best-fit decreasing), so far fewer tokens are
padding. Each row carries a segment id per token:

* the loss mask is each sample's own mask, and the target that would cross
  into the next sample is excluded;
* attention is block-diagonal: mlx-lm models build their mask from the cache
  object they are given (``cache.make_mask``), so :class:`SegmentMask` is
  passed as a stateless stand-in for the cache. It returns a causal mask that
  also forbids attending across segments and passes keys and values through.
  Positions are not reset per sample: RoPE depends only on relative
  positions, which are the same within a sample wherever it sits in the row.
"""

import bisect
from dataclasses import dataclass, field

import numpy as np


def pack_rows(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Group sample indices into rows of at most ``capacity`` tokens.

    Best-fit decreasing: longest samples first, each into the row with the
    least room that still fits it. Deterministic for given lengths.
    """
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row id)
    for i in order:
        need = int(lengths[i])
        pos = bisect.bisect_left(free, (need, -1))
        if pos < len(free):
            room, row = free.pop(pos)
            rows[row].append(int(i))
            bisect.insort(free, (room - need, row))
        else:
            rows.append([int(i)])
            bisect.insort(free, (capacity - need, len(rows) - 1))
    return rows


@dataclass
class PackedSplit:
    """A tokenized split whose 'samples' are packed rows of several samples.

    It offers the interface ``trainer.core.batches`` uses (``lengths``,
    ``loss_counts``, ``sample``, ``target_mask``, ``segment_ids``).
    """

    base: object  # the unpacked TokenizedSplit
    rows: list[list[int]]
    name: str = ""
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.name = self.base.name
        self.source = self.base.source
        lengths = self.base.lengths
        self.lengths = np.array([int(lengths[r].sum()) for r in self.rows], np.int64)
        counts = self.base.loss_counts
        self.loss_counts = np.array([int(counts[r].sum()) for r in self.rows], np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, i: int) -> np.ndarray:
        return np.concatenate([self.base.sample(j) for j in self.rows[i]])

    def target_mask(self, i: int) -> np.ndarray:
        parts = []
        for j in self.rows[i]:
            # the sample's own targets, then 0 for the target that would be the next sample's first token
            parts.append(np.append(self.base.target_mask(j), np.float32(0)))
        return np.concatenate(parts)[:-1]

    def segment_ids(self, i: int) -> np.ndarray:
        return np.concatenate([np.full(int(self.base.lengths[j]), k, np.int32) for k, j in enumerate(self.rows[i])])

    def fingerprint(self) -> str:
        return self.base.fingerprint()

    def total_tokens(self) -> int:
        return int(self.lengths.sum())


def pack(split, capacity: int) -> PackedSplit:
    """Pack a tokenized split into rows of at most ``capacity`` tokens."""
    rows = pack_rows(split.lengths, capacity)
    packed = PackedSplit(split, rows)
    packed.notes = list(split.notes) + [
        f"packed {len(split)} samples into {len(rows)} rows of up to {capacity} tokens "
        f"({packed.total_tokens() / (len(rows) * capacity):.0%} full)"]
    return packed


class SegmentMask:
    """Stands in for mlx-lm's per-layer cache to give packed rows a block-diagonal causal mask.

    Args:
        segments (mx.array): (batch, length) int32 segment id of each input
            position; padding has its own id.
    """

    offset = 0  # no cached tokens: positions start at 0

    def __init__(self, segments):
        self.segments = segments

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        import mlx.core as mx

        seg = self.segments
        positions = mx.arange(n)
        allowed = positions[None, :] <= positions[:, None]  # causal
        if window_size is not None:
            allowed = mx.logical_and(allowed, positions[:, None] - positions[None, :] < window_size)
        same = seg[:, :, None] == seg[:, None, :]  # (batch, query, key)
        return mx.logical_and(allowed[None], same)[:, None]  # (batch, 1, query, key)

    def update_and_fetch(self, keys, values):
        return keys, values

    @property
    def state(self):
        return []
