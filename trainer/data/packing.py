"""Sample packing: short samples share a row; attention and loss stay within a sample.

``data.packing: true`` packs tokenized samples into rows of at most
``data.pack_length`` tokens (best-fit decreasing), so far fewer tokens are
padding. The row length is chosen from the data unless set
(:func:`pack_length`): every token of a packed row attends over (and masks
out) the whole row before it, so rows much longer than the samples spend
attention on pairs that are then thrown away (attention in query blocks,
``trainer.model.attention``, skips the pairs above the diagonal, not those
across samples below it). A sample longer than the row gets a row of its own.
Each row carries a segment id per token:

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


def pack_length(lengths: np.ndarray, max_seq_length: int, pad_multiple: int) -> int:
    """The packed row length chosen from the data: about 1.5 times the mean sample length.

    Of rows of 1.5, 2 and 3 times the mean, 1.5 trained an epoch of
    variable-length text fastest with attention in blocks, and 3 was no faster
    than no packing (measured: docs/RESULTS.md, "One epoch at N=2 against
    mlx_lm.lora").

    Rounded up so the model input (length - 1) is a multiple of ``pad_multiple``,
    at least the median sample, and capped by ``max_seq_length``.

    Args:
        lengths (np.ndarray): Token length of every sample.
        max_seq_length (int): The cap (``data.max_seq_length``).
        pad_multiple (int): ``data.pad_multiple``.
    """
    target = max(1.5 * float(np.mean(lengths)), float(np.median(lengths)), 2.0)
    width = 1 + -(-(int(np.ceil(target)) - 1) // pad_multiple) * pad_multiple
    return int(min(width, max_seq_length))


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

    It offers the interface ``trainer.data.batches`` uses (``lengths``,
    ``loss_counts``, ``sample``, ``target_mask``, ``segment_ids``).
    """

    base: object  # the unpacked TokenizedSplit
    rows: list[list[int]]
    name: str = ""
    source: str = ""
    notes: list[str] = field(default_factory=list)
    capacity: int = 0  # the row length the rows were packed to

    def __post_init__(self):
        self.name = self.base.name
        self.source = self.base.source
        lengths = self.base.lengths
        self.lengths = np.array([int(lengths[r].sum()) for r in self.rows], np.int64)
        counts = self.base.loss_counts
        self.loss_counts = np.array([int(counts[r].sum()) for r in self.rows], np.int64)
        self._epoch, self._view = None, None  # the (seed, epoch) a mix's rows were last packed for, and them

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

    @property
    def mix(self):
        """The unpacked samples' mix (``trainer.data.mix``), if any."""
        return self.base.mix

    def epoch_view(self, seed: int, epoch: int) -> tuple:
        """``(rows, None)``: these rows, or under a mix (``trainer.data.mix``) the epoch's picks packed anew,
        so that the mix's proportions hold in samples, not in rows (the last epoch's packing is kept)."""
        members = self.base.epoch_view(seed, epoch)[1]
        if members is None:
            return self, None
        if self._epoch != (seed, epoch):
            picks = pack_rows(self.base.lengths[members], self.capacity)
            self._view = PackedSplit(self.base, [[int(members[i]) for i in row] for row in picks], notes=self.notes,
                                     capacity=self.capacity)
            self._epoch = (seed, epoch)
        return self._view, None

    def epoch_items(self, seed: int) -> int:
        """Packed rows of one epoch (under a mix, of the first: they vary a little from epoch to epoch)."""
        return len(self.epoch_view(seed, 0)[0])


def pack(split, capacity: int) -> PackedSplit:
    """Pack a tokenized split into rows of at most ``capacity`` tokens."""
    rows = pack_rows(split.lengths, capacity)
    packed = PackedSplit(split, rows, capacity=capacity)
    longer = int((split.lengths > capacity).sum())
    packed.notes = list(split.notes) + [
        f"packed {len(split)} samples into {len(rows)} rows of {capacity} tokens "
        f"({packed.total_tokens() / np.maximum(packed.lengths, capacity).sum():.0%} full"
        + (f"; {longer} longer samples have rows of their own)" if longer else ")")]
    return packed


def token_slots(lengths: np.ndarray, micro_batch: int, pad_multiple: int, seed: int = 0) -> int:
    """Token slots (rows x padded width) one epoch of length-grouped batches computes."""
    from .batches import epoch_batches, padded_width

    return sum(len(b) * padded_width(int(lengths[b].max()), pad_multiple)
               for b in epoch_batches(lengths, micro_batch, seed, 0))


def outlook(packed: PackedSplit, micro_batch: int, pad_multiple: int, blocked: bool) -> str | None:
    """A warning when packing cannot win: unpacked length-grouped batches are nearly as full.

    Packing saves the padded slots of unpacked batches and compiles fewer row
    widths; it costs attention across the samples sharing a row. Where
    unpacked batches were mostly padding (the tiny task) it won clearly; on
    variable-length text, where length-grouped batches pad little, it still won
    by a little with attention in query blocks (fewer widths to compile did the
    rest) and lost with MLX's whole-row attention (measured: docs/RESULTS.md,
    "Data packing", "The profile" and "One epoch at N=2 against mlx_lm.lora").
    So it is said not to win under 2% saved with blocks (equal lengths: nothing
    to gain), and under 10% with whole rows.

    Args:
        packed (PackedSplit): The packed training split.
        micro_batch (int): Rows of a global micro-batch (unpacked samples or packed rows alike).
        pad_multiple (int): ``data.pad_multiple``.
        blocked (bool): Attention runs in query blocks (``training.attention_block``).
    """
    unpacked = token_slots(packed.base.lengths, micro_batch, pad_multiple)
    rows = token_slots(packed.lengths, micro_batch, pad_multiple)
    saved = 1 - rows / unpacked
    if saved >= (0.02 if blocked else 0.10):
        return None
    return (f"packing cannot win on this data: length-grouped batches without it compute {unpacked} token slots "
            f"an epoch and packed rows {rows} ({saved:+.1%} saved), while packed rows attend across samples; "
            "set data.packing=false")


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
