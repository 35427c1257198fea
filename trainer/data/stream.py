"""Streaming (``data.streaming``): the training split read while training, each rank its own share.

The set is never read whole, by any rank. Rank ``r`` of ``N`` reads its share
(``trainer.data.shares``) a *window* at a time: ``data.stream_window``
micro-batches of rows, tokenized as they are read (mlx-lm's formats, the
``max_seq_length`` policy and packing as without streaming), grouped by length
inside the window and served as micro-batches in an order drawn from (seed,
epoch, rank, window). Memory holds one window per rank, whatever the size of
the set.

What streaming gives up, and what it keeps:

* **Global counts take one collective per update.** Without streaming every
  rank knows every global micro-batch and its token count from the data plan;
  here a rank knows only its own rows. So :meth:`RowStream.take` sums one short
  float list over ranks per update (``World.all_sum``, phase ``stream``): each
  rank's loss tokens per micro-batch, whether its share is used up, and its
  position. The loss is still normalised by the global token count, but N ranks
  at batch b no longer see what one process at N*b sees (each reads its share).
* **An epoch ends for every rank together.** A rank whose share is used up
  gets padding rows (no loss) until every share is; then all start the next
  epoch at the same update. Shares are equal in bytes (JSONL) or rows (Parquet).
* **The length is unknown.** The schedule and the progress bar need
  ``training.steps``, or ``data.stream_rows`` (the rows, if you know them) to
  turn ``training.epochs`` into updates; ``epoch`` in metrics.jsonl counts
  finished epochs plus the share of the current one read (bytes or rows).
* **Resume is exact.** Every rank's position (its window's start, which window
  of the epoch, micro-batches served from it) travels with the per-update sum,
  so rank 0 holds all of them when it writes a checkpoint; on resume each rank
  reads its window again and skips what it had served. A resume on another
  number of ranks or rows per rank is refused: the shares would be others.

This module imports no MLX (the collective is ``World``'s).
"""

import dataclasses
import hashlib
import os

import numpy as np

from .. import log
from ..errors import DataError
from .shares import HubShare, JsonlShare, ParquetShare
from .tokenized import TokenizedSplit, _check_row, _processor, detect_format

STREAM_TAG = 0x737472  # keeps the windows' orders apart from the other uses of the seed
PACK_SAMPLE_ROWS = 1024  # rows at the start of the set that choose a packed row length (data.pack_length: 0)
DIGEST_BLOCKS, DIGEST_BLOCK = 16, 1 << 16  # a streamed file is known by these blocks, not by all its bytes


def sampled_digest(path: str) -> str:
    """A hash of a file's size and of :data:`DIGEST_BLOCKS` blocks spread over it (first and last included).

    Ranks compare it before training and a resume compares it with the
    checkpoint's: it catches another file or an edit that moves bytes, at the
    cost of a few reads instead of reading the whole set (which streaming
    avoids). An edit that keeps the size and misses every block goes unseen.
    """
    size = os.path.getsize(path)
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        for k in range(DIGEST_BLOCKS):
            f.seek(max(0, (size - DIGEST_BLOCK) * k // (DIGEST_BLOCKS - 1)))
            h.update(f.read(DIGEST_BLOCK))
    return h.hexdigest()


def window_batches(lengths: np.ndarray, rows: int, seed: int, epoch: int, rank: int, window: int) -> list:
    """One window's micro-batches of ``rows`` samples: sorted by length, in an order drawn from the arguments.

    Full micro-batches come in a shuffled order, a partial one last (as
    ``trainer.data.batches.epoch_batches`` does for an epoch).
    """
    rng = np.random.default_rng([seed, STREAM_TAG, epoch, rank, window])
    order = rng.permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    batches = [order[i:i + rows] for i in range(0, len(order), rows)]
    full = [b for b in batches if len(b) == rows]
    return [full[i] for i in rng.permutation(len(full))] + [b for b in batches if len(b) < rows]


class TokenStream:
    """The training split of ``data.streaming``: where its rows are and how a window of them becomes samples.

    It stands where a tokenized split stands in a run (``notes``, ``source``,
    ``fingerprint``), but holds no rows: :class:`RowStream` reads them.

    Args:
        source (trainer.data.sources.Source): The training split's rows.
        cfg (DataConfig): The data section.
        tokenizer: mlx-lm's tokenizer.
    """

    name = "train"
    mix = None  # a stream is never mixed (data.mix needs the sources' sizes)

    def __init__(self, source, cfg, tokenizer):
        self.kind = "jsonl" if source.data_files and source.data_files.lower().endswith(".jsonl") else \
            "parquet" if source.builder == "parquet" else "hub" if source.data_files is None else None
        if self.kind is None:
            raise DataError(f"data.streaming reads .jsonl and .parquet files and hub datasets, not "
                            f"{source.description}; convert it to JSONL or set data.streaming=false")
        if source.hub_split and "[" in source.hub_split:
            raise DataError(f"data.streaming reads whole hub splits, not the slice {source.hub_split}; name a split "
                            "(train_split: train) or set data.streaming=false")
        self.source_of, self.cfg, self.tokenizer = source, cfg, tokenizer
        self.source, self.notes = source.description, ["streamed: rows are read and tokenized as training needs them"]
        self._format, self._processors, self._capacity, self._dropped, self._total = None, {}, None, 0, None

    def epoch_items(self, seed: int) -> int | None:
        """Rows of one epoch when ``data.stream_rows`` gives them, else ``None`` (unknown)."""
        return self.cfg.stream_rows

    def share(self, rank: int, world_size: int):
        """Rank ``rank`` of ``world_size``'s share (``trainer.data.shares``)."""
        if self.kind == "jsonl":
            return JsonlShare(self.source_of.data_files, rank, world_size)
        if self.kind == "parquet":
            return ParquetShare(self.source_of.data_files, rank, world_size)
        return HubShare(self.source_of, rank, world_size, self.cfg.cache_dir)

    def fingerprint(self) -> str:
        """What every rank must agree on and a resume must find again: the rows (sampled) and the settings."""
        from .tokenized import TOKENIZE_VERSION, tokenizer_fingerprint

        c = self.cfg
        rows = sampled_digest(self.source_of.data_files) if self.kind != "hub" else self.source
        settings = [rows, tokenizer_fingerprint(self.tokenizer), c.format, c.text_feature, c.prompt_feature,
                    c.completion_feature, c.chat_feature, c.mask_prompt, c.max_seq_length, c.long_samples,
                    c.packing, c.pack_length, TOKENIZE_VERSION]
        return hashlib.sha1(repr(settings).encode()).hexdigest()

    def fraction(self, rank: int, world_size: int, position: int) -> float:
        """How far into its share a rank whose window starts at ``position`` is (0 where unknown)."""
        if self.kind == "hub":
            total = self.cfg.stream_rows
            return min(1.0, position * world_size / total) if total else 0.0
        if self._total is None:  # bytes of a JSONL file, rows of a Parquet one
            self._total = os.path.getsize(self.source_of.data_files) if self.kind == "jsonl" else \
                self.share(0, 1).rows
        total = self._total
        begin, end = total * rank // world_size, total * (rank + 1) // world_size
        return float(np.clip((position - begin) / max(end - begin, 1), 0.0, 1.0))

    def window_rows(self, rows: int) -> int:
        """Rows of one window at ``rows`` samples per micro-batch."""
        return self.cfg.stream_window * rows

    def window(self, rows: list, share, packing: bool = True) -> tuple:
        """A window's rows as ``(split, ids)``: a tokenized split (packed rows with ``data.packing``, unless
        ``packing`` is false) and the id of each of its rows (its first sample's where packed)."""
        ids, tokens, prompts = [], [], []
        for row_id, row in rows:
            sample, prompt = self._tokenize(row, row_id, share)
            ids.append(row_id)
            tokens.append(sample)
            prompts.append(prompt)
        split, kept = self._samples(np.asarray(ids, np.int64), tokens, prompts)
        if not (packing and self.cfg.packing) or not len(split):
            return split, kept
        from .packing import pack

        packed = pack(split, self.capacity())
        return packed, kept[[row[0] for row in packed.rows]]

    def _tokenize(self, row: dict, row_id: int, share) -> tuple:
        """``(tokens, prompt length)`` of one row, by mlx-lm's dataset classes, as without streaming."""
        if self._format is None:
            self._format = detect_format(list(row), self.cfg, self.source_of)
        problem = _check_row(row, self._format, self.cfg)
        if problem:
            raise DataError(f"{share.where(row_id)}: {problem}")
        if self._format not in self._processors:
            self._processors[self._format] = _processor(self._format, self.tokenizer, self.cfg)
        try:
            tokens, offset = self._processors[self._format].process(row)
        except Exception as e:  # noqa: BLE001 (mlx-lm's and the tokenizer's errors, said in one line)
            raise DataError(f"{share.where(row_id)}: cannot tokenize ({str(e)[:160]})") from None
        return list(tokens), int(offset)

    def _samples(self, ids: np.ndarray, tokens: list, prompts: list) -> tuple:
        """The window's samples under ``data.max_seq_length`` and ``data.long_samples`` (as
        ``trainer.data.tokenized.to_split``), and the ids of those kept."""
        lengths = np.array([len(t) for t in tokens], np.int64)
        prompt = np.array(prompts, np.int64)
        keep = np.ones(len(lengths), bool)
        if self.cfg.long_samples == "drop":
            keep &= lengths <= self.cfg.max_seq_length
        lengths = np.minimum(lengths, self.cfg.max_seq_length)
        keep &= (lengths - np.maximum(prompt, 1)) > 0
        self._note_drops(int((~keep).sum()))
        kept = np.flatnonzero(keep)
        flat = np.concatenate([np.asarray(tokens[i][:lengths[i]], np.int32) for i in kept]) if len(kept) else \
            np.zeros(0, np.int32)
        starts = np.concatenate([[0], np.cumsum(lengths[kept])[:-1]]).astype(np.int64)
        return TokenizedSplit("train", self.source, flat, starts, lengths[kept], prompt[kept]), ids[kept]

    def _note_drops(self, dropped: int) -> None:
        """Say once that samples are dropped as they are read (a stream cannot count them in advance)."""
        if dropped and not self._dropped:
            log.info(f"{self.source}: samples over data.max_seq_length={self.cfg.max_seq_length} tokens (or with no "
                     "token to learn) are dropped as they are read (data.long_samples)")
        self._dropped += dropped

    def capacity(self) -> int:
        """The packed row length: ``data.pack_length``, or chosen from the rows at the start of the set (the
        same on every rank and on resume)."""
        if self._capacity is None:
            from .packing import pack_length

            self._capacity = self.cfg.pack_length
            if not self._capacity:
                share = self.share(0, 1)
                sample, _ = self.window(share.read(share.start, PACK_SAMPLE_ROWS)[0], share, packing=False)
                share.close()
                if not len(sample):
                    raise DataError(f"the first {PACK_SAMPLE_ROWS} rows of {self.source} hold no usable sample to "
                                    "choose a packed row length from; set data.pack_length")
                self._capacity = pack_length(sample.lengths, self.cfg.max_seq_length, self.cfg.pad_multiple)
        return self._capacity


class ShareReader:
    """One nominal rank's place in its share: the window being served, and how much of it is served.

    Args:
        split (TokenStream): What the rows are.
        share: The rank's share (``trainer.data.shares``).
        rank (int): The nominal rank (it seeds the windows' orders).
        rows (int): Samples (or packed rows) per micro-batch.
        seed (int): Data-order seed.
    """

    def __init__(self, split: TokenStream, share, rank: int, rows: int, seed: int):
        self.split, self.share, self.rank, self.rows, self.seed = split, share, rank, rows, seed
        self.reset(0)

    def reset(self, epoch: int) -> None:
        """Back to the share's start for ``epoch``; nothing is read yet."""
        self.epoch, self.window, self.start, self.next = epoch, -1, None, None
        self.view, self.ids, self.batches, self.served, self.ended = None, None, [], 0, False

    def _load(self) -> None:
        """Read, tokenize and order the next window."""
        begin = self.share.start if self.next is None else self.next
        rows, self.next, self.ended = self.share.read(begin, self.split.window_rows(self.rows))
        self.start, self.window, self.served = begin, self.window + 1, 0
        self.view, self.ids = self.split.window(rows, self.share)
        self.batches = window_batches(self.view.lengths, self.rows, self.seed, self.epoch, self.rank,
                                      self.window) if len(self.view) else []

    def next_batch(self):
        """``(view, indices, ids)`` of the next micro-batch, or ``None`` once the share is used up."""
        while self.served >= len(self.batches):
            if self.ended:
                return None
            self._load()
        self.served += 1
        return self.view, self.batches[self.served - 1], self.ids

    def position(self) -> list:
        """``[window start, window, served, used up]``: what a checkpoint keeps of this rank."""
        used_up = self.ended and self.served >= len(self.batches)
        return [-1 if self.start is None else int(self.start), self.window, self.served, int(used_up)]

    def restore(self, epoch: int, start: int, window: int, served: int) -> None:
        """Continue where :meth:`position` was taken: read that window again and skip what was served."""
        self.reset(epoch)
        if window >= 0:
            self.next, self.window = start, window - 1
            self._load()
            self.served = served


def stream_splits(cfg, tokenizer, splits: tuple, show_progress: bool, load) -> dict:
    """The splits of a streaming run: the training split as a :class:`TokenStream` (nothing read yet), the
    others loaded whole by ``load(cfg, tokenizer, splits, show_progress)`` as without streaming (a validation
    split is read once and held).

    Raises:
        DataError: The training data cannot be streamed, in one sentence.
    """
    from .sources import source_parts

    parts = source_parts(cfg)
    if len(parts) != 1:
        raise DataError("data.streaming reads one dataset; give one data.hf_dataset (not a list) or set "
                        "data.streaming=false")
    part, sources = parts[0]
    if "train" not in sources:
        raise DataError(f"no training split found for {cfg.path or cfg.hf_dataset}")
    whole = dataclasses.replace(cfg, streaming=False, stream_rows=None)
    hub = part.hf_dataset
    if hub is not None and "[" in str(hub.get("valid_split", "train[-10%:]")):  # mlx-lm's default: a slice of train
        log.info(f"data.streaming: no validation on {hub.get('valid_split', 'train[-10%:]')} (a slice of a split loads "
                 "that split whole); give data.hf_dataset.valid_split a split of its own to validate")
        whole = dataclasses.replace(whole, hf_dataset={**hub, "valid_split": None})
    rest = tuple(s for s in splits if s != "train")
    out = load(whole, tokenizer, rest, show_progress) if rest else {}
    if "train" in splits:
        out["train"] = TokenStream(sources["train"], part, tokenizer)
    return out
