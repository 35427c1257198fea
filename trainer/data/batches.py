"""Global, length-grouped batches and each rank's slice of them. Pure numpy.

The order of samples is a pure function of (sample lengths, global batch,
seed, epoch). Every rank computes the *same* global micro-batches and then
takes its own strided slice, so:

* N ranks at per-rank batch b see exactly the global batches that one process
  at batch N*b sees, in the same order;
* within an epoch the ranks' shards are disjoint and together cover every
  sample (the last global batch of an epoch may be partial; ranks short of
  rows get all-padding rows with an empty loss mask);
* a global micro-batch may be split unevenly (``trainer.data.balance``: a
  faster rank takes more rows); the union of the ranks' rows is the same;
* every rank pads to the global batch's width;
* every rank knows the global token count of every batch without
  communicating, which is what the loss is normalised by.
"""

from dataclasses import dataclass

import numpy as np

from .balance import rows_of
from ..state.progress import DataPosition

# Samples are shuffled, then sorted by length inside groups of this many
# global batches, so a batch holds similar lengths (little padding) while
# batches still vary from epoch to epoch.
LENGTH_GROUP_BATCHES = 64


@dataclass(frozen=True)
class Batch:
    """One rank's micro-batch, ready for the model.

    Attributes:
        inputs: (rows, width-1) int32 tokens fed to the model.
        targets: (rows, width-1) int32 next tokens.
        mask: (rows, width-1) float32, 1 where a target counts in the loss.
        tokens: loss tokens in this rank's rows.
        global_tokens: loss tokens in the whole global micro-batch (all ranks).
        indices: sample indices of this rank's rows (no padding rows).
        segments: (rows, width-1) int32 sample id per position when samples
            are packed (attention stays within a sample), else ``None``.
    """

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    tokens: int
    global_tokens: int
    indices: np.ndarray
    segments: np.ndarray | None = None
    real_tokens: int = 0  # non-padding tokens in this rank's rows (for the padded share)


def epoch_batches(lengths: np.ndarray, micro_batch: int, seed: int, epoch: int,
                  shuffle: bool = True, members: np.ndarray | None = None) -> list[np.ndarray]:
    """Split one epoch into global micro-batches of sample indices.

    Args:
        lengths (np.ndarray): Token length of every sample.
        micro_batch (int): Sequences per global micro-batch (per-rank batch x ranks).
        seed (int): Data-order seed.
        epoch (int): Epoch number; each epoch reshuffles.
        shuffle (bool): Shuffle samples and batch order. ``False`` gives a
            fixed, length-sorted order (for evaluation). Default: ``True``.
        members (np.ndarray | None): The epoch's sample indices, repeats
            allowed (a mix's picks, ``trainer.data.mix``). Default: ``None``
            (every sample once).

    Returns:
        list[np.ndarray]: Index arrays, each sorted by decreasing length; all
        have ``micro_batch`` entries except possibly the last.
    """
    members = np.arange(len(lengths)) if members is None else members
    n = len(members)
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = members[rng.permutation(n)]
        group = micro_batch * LENGTH_GROUP_BATCHES
    else:
        order = members
        group = n
    batches = []
    for start in range(0, n, group):
        idx = order[start:start + group]
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        batches.extend(idx[i:i + micro_batch] for i in range(0, len(idx), micro_batch))
    full = [b for b in batches if len(b) == micro_batch]
    partial = [b for b in batches if len(b) < micro_batch]
    if shuffle:
        full = [full[i] for i in rng.permutation(len(full))]
    return full + partial


def batches_per_epoch(num_samples: int, micro_batch: int) -> int:
    """Global micro-batches in one epoch (the last may be partial)."""
    return -(-num_samples // micro_batch)


def rank_rows(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's rows of a length-sorted global batch: every world_size-th.

    Striding a length-sorted batch gives every rank a similar token count.
    """
    return batch[rank::world_size]


def padded_width(max_length: int, pad_multiple: int) -> int:
    """Row width (tokens) so that the model input width is a multiple of pad_multiple."""
    inputs = max(1, max_length - 1)
    return 1 + -(-inputs // pad_multiple) * pad_multiple


def make_batch(split, batch: np.ndarray, rank: int, world_size: int, rows: int,
               pad_multiple: int, row_split: list[int] | None = None) -> Batch:
    """Assemble this rank's padded arrays for one global micro-batch.

    Args:
        split: A tokenized split (see ``trainer.data.tokenized.TokenizedSplit``): it has
            ``lengths``, ``loss_counts``, ``sample(i)``, ``target_mask(i)`` and
            ``segment_ids(i)`` (``None`` unless samples are packed).
        batch (np.ndarray): The global micro-batch's sample indices.
        rank (int): This rank.
        world_size (int): Number of ranks.
        rows (int): Rows this rank computes; short ranks get padding rows.
        pad_multiple (int): See :func:`padded_width`.
        row_split (list[int] | None): Rows of a full global micro-batch per
            rank (``trainer.data.balance``); ``None``: the even, strided split.
            Default: ``None``.
    """
    width = padded_width(int(split.lengths[batch].max()), pad_multiple)
    mine = rank_rows(batch, rank, world_size) if row_split is None else rows_of(batch, rank, row_split)
    tokens = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width - 1), np.float32)
    segments = None
    for row, i in enumerate(mine):
        sample = split.sample(i)
        tokens[row, :len(sample)] = sample
        mask[row, :len(sample) - 1] = split.target_mask(i)
        seg = split.segment_ids(i)
        if seg is not None:
            if segments is None:
                # Padding positions get their own segment id so they attend nowhere real.
                segments = np.full((rows, width - 1), -1, np.int32)
            segments[row, :len(sample) - 1] = seg[:-1]
    counts = split.loss_counts[batch]
    return Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=mask,
                 tokens=int(split.loss_counts[mine].sum()), global_tokens=int(counts.sum()),
                 indices=mine, segments=segments, real_tokens=int(split.lengths[mine].sum()))


class BatchStream:
    """Endless stream of this rank's micro-batches over epochs, with a resumable position.

    The position (:class:`~trainer.state.progress.DataPosition`) is the next
    global micro-batch to serve; it is all a checkpoint needs to continue the
    data order exactly.

    Rows per rank follow :attr:`row_split` (even unless :meth:`set_split`
    changes it); the global micro-batches do not depend on it.

    Args:
        split: A tokenized split (see :func:`make_batch`).
        per_rank_batch (int): Mean rows per rank per micro-batch.
        rank (int): This rank.
        world_size (int): Number of ranks.
        seed (int): Data-order seed.
        pad_multiple (int): See :func:`padded_width`.
        shuffle (bool): Shuffle per epoch (``False``: fixed length order). Default: ``True``.
        prefetch (bool): Build the next micro-batch on a background thread while
            the caller computes. The order is unchanged: a prefetched batch is served
            only if it is the one (epoch, index, row split) the stream would build
            next, else it is built anew. Default: ``False``.
        hosted (tuple | None): The ranks whose rows this process computes, when it
            stands in for missing ones (``trainer.data.membership``); ``rank`` and
            ``world_size`` are then nominal. :meth:`take` serves one micro-batch per
            hosted rank. Default: ``None`` (``(rank,)``).
        world (trainer.parallel.World | None): Unused: every rank knows the global
            counts from the plan. (A stream that reads only its own share sums them
            over the group: ``trainer.data.stream_batches``.) Default: ``None``.
    """

    def __init__(self, split, per_rank_batch: int, rank: int, world_size: int, seed: int,
                 pad_multiple: int, shuffle: bool = True, prefetch: bool = False, hosted: tuple | None = None,
                 world=None):
        self.split = split
        self.rows = per_rank_batch
        self.rank = rank
        self.hosted = tuple(hosted) if hosted else (rank,)
        self.world_size = world_size
        self.micro_batch = per_rank_batch * world_size  # sequences per global micro-batch
        self.row_split = [per_rank_batch] * world_size
        self.seed = seed
        self.pad_multiple = pad_multiple
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._plan = None
        self._plan_epoch = None
        self._view = split  # what the epoch's batches index: the split, or a mix's rows packed for the epoch
        self.prefetch = prefetch
        self._pool = None
        self._ahead = None  # (key, future) of the batch built ahead

    def _batches(self) -> list[np.ndarray]:
        if self._plan_epoch != self.epoch:
            self._view, members = self.split.epoch_view(self.seed, self.epoch)  # a mix picks the epoch's samples
            self._plan = epoch_batches(self._view.lengths, self.micro_batch, self.seed, self.epoch, self.shuffle,
                                       members)
            self._plan_epoch = self.epoch
        return self._plan

    def set_split(self, row_split: list[int]) -> None:
        """Rows per rank of the next micro-batches (they must add up to the micro-batch)."""
        if sum(row_split) != self.micro_batch or len(row_split) != self.world_size:
            raise ValueError(f"split {row_split} does not deal {self.micro_batch} rows to {self.world_size} ranks")
        self.row_split = list(row_split)
        self.rows = row_split[self.hosted[0]]

    def position(self) -> DataPosition:
        return DataPosition(epoch=self.epoch, index=self.index, micro_batch=self.micro_batch)

    def restore(self, position: DataPosition) -> str | None:
        """Continue from a saved position; returns a note when the order cannot continue exactly.

        With the same micro-batch size the order continues exactly. With
        another one (a resume on another world size with the same global
        batch, e.g. 2 ranks x 4 -> 4 ranks x 2 with accumulation halved) the
        epoch's batches are different ones, so the stream continues at the
        same fraction of the same epoch.
        """
        self.epoch = position.epoch
        self._ahead = None
        if position.micro_batch == self.micro_batch:
            self.index = position.index
            return None
        self.index = position.index * position.micro_batch // self.micro_batch
        return (f"micro-batches changed from {position.micro_batch} to {self.micro_batch} sequences: "
                "this epoch continues at the same fraction, in a slightly different order")

    def __iter__(self):
        return self

    def _build(self, split, batch: np.ndarray, row_split: tuple) -> list[Batch]:
        """The hosted ranks' micro-batches of ``batch`` (indices into ``split``, the epoch's view) under
        ``row_split`` (reads no mutable state: it runs on a thread)."""
        even = len(set(row_split)) == 1
        return [make_batch(split, batch, rank, self.world_size, row_split[rank], self.pad_multiple,
                           None if even else list(row_split)) for rank in self.hosted]

    def _next_group(self) -> list[Batch]:
        """One global micro-batch: a micro-batch per hosted rank."""
        plan = self._batches()
        if self.index >= len(plan):
            self.epoch += 1
            self.index = 0
            plan = self._batches()
        key = (self.epoch, self.index, tuple(self.row_split))
        ahead, self._ahead = self._ahead, None
        view = self._view
        fresh = ahead is None or ahead[0] != key
        group = self._build(view, plan[self.index], key[2]) if fresh else ahead[1].result()
        self.index += 1
        if self.prefetch and self.index < len(plan):
            from concurrent.futures import ThreadPoolExecutor

            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="mlx-dp-batches")
            nxt = (self.epoch, self.index, key[2])
            self._ahead = (nxt, self._pool.submit(self._build, view, plan[self.index], key[2]))
        return group

    def __next__(self) -> Batch:
        if len(self.hosted) != 1:
            raise RuntimeError("a stream that hosts several ranks serves them with take()")
        return self._next_group()[0]

    def take(self, count: int) -> list[Batch]:
        """The next ``count`` global micro-batches' rows for every hosted rank, micro-batch by micro-batch
        (``[mb0 of hosted[0], mb0 of hosted[1], ..., mb1 of hosted[0], ...]``)."""
        return [batch for _ in range(count) for batch in self._next_group()]

    def close(self) -> None:
        """Stop the prefetch thread (it holds no state a checkpoint needs)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._ahead = None, None

    def epoch_progress(self) -> float:
        """Epochs completed, fractional."""
        return self.epoch + self.index / max(1, len(self._batches()))
