"""Batches of a streamed training split: each rank's own rows, global counts from one sum per update.

:class:`RowStream` stands where ``trainer.data.batches.BatchStream`` stands in a
run (``take``, ``position``, ``restore``, ``epoch_progress``), for
``data.streaming`` (``trainer.data.stream`` says what streaming keeps and
what it gives up). Each nominal rank this process computes has a
:class:`~trainer.data.stream.ShareReader`; an update's micro-batches are read
locally, then one ``World.all_sum`` of a short float list gives every rank the
global loss tokens of each micro-batch, whether every share is used up, and
every rank's position (so rank 0 can write them all into a checkpoint).
"""

import dataclasses

import numpy as np

from ..errors import DataError, UserError
from ..state.progress import DataPosition
from .batches import Batch, BatchStream, make_batch, padded_width
from .stream import ShareReader, TokenStream

PLACE = 4  # numbers per rank in the per-update sum besides its tokens: ShareReader.position()


class RowStream:
    """Endless stream of this rank's micro-batches of a :class:`TokenStream`, with a resumable position.

    Args:
        split (TokenStream): The streamed training split.
        per_rank_batch (int): Rows per rank per micro-batch.
        rank (int): This rank (nominal).
        world_size (int): Nominal ranks: the number of shares.
        seed (int): Data-order seed.
        pad_multiple (int): See ``trainer.data.batches.padded_width``.
        shuffle (bool): Ignored: windows are always served in a seeded order. Default: ``True``.
        prefetch (bool): Read and tokenize the next update's rows on a thread while the step
            computes (the sum over ranks stays on the caller's thread). Default: ``False``.
        hosted (tuple | None): Nominal ranks this process computes (``trainer.data.membership``).
            Default: ``None`` (``(rank,)``).
        world (trainer.parallel.World | None): The group the sum runs over; ``None``: this
            process alone (it must host every share then). Default: ``None``.
    """

    def __init__(self, split: TokenStream, per_rank_batch: int, rank: int, world_size: int, seed: int,
                 pad_multiple: int, shuffle: bool = True, prefetch: bool = False, hosted: tuple | None = None,
                 world=None):
        self.split, self.rows, self.world_size, self.seed = split, per_rank_batch, world_size, seed
        self.pad_multiple, self.prefetch, self.world = pad_multiple, prefetch, world
        self.hosted = tuple(hosted) if hosted else (rank,)
        self.micro_batch = per_rank_batch * world_size
        self.row_split = [per_rank_batch] * world_size
        self.readers = [ShareReader(split, split.share(q, world_size), q, per_rank_batch, seed) for q in self.hosted]
        self.epoch, self.index = 0, 0  # micro-batches served this epoch
        self._places = [[-1, -1, 0, 0] for _ in range(world_size)]  # every rank's position after the last update
        self._used_up = False  # every share is used up: the next update starts the next epoch
        self._pool, self._ahead = None, None  # (count, future) of the next update's rows, read ahead

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return self.take(1)[0]

    def set_split(self, row_split: list[int]) -> None:
        """Rows per rank: each rank reads its own share, so only the even split applies."""
        if any(rows != self.rows for rows in row_split):
            raise UserError("parallel.balance splits each global micro-batch between ranks, but with "
                            "data.streaming each rank reads its own share; set parallel.balance=off")

    def take(self, count: int) -> list[Batch]:
        """The next ``count`` micro-batches of every hosted rank (``[mb0 of hosted[0], mb0 of hosted[1], ...,
        mb1 of hosted[0], ...]``), with their global token counts. A collective: every rank calls it.

        Raises:
            DataError: A whole epoch of every share holds no usable sample.
        """
        fresh = False
        for _ in range(2):
            if self._used_up:
                self._next_epoch()
                fresh = True
            group, total = self._exchange(self._local(count), count)
            if total > 0:
                self.index += count
                self._read_ahead(count)
                return group
            if fresh:
                break
            self._used_up = True  # nobody had a row: every share is used up (the sum says so on every rank)
        raise DataError(f"{self.split.source} holds no usable sample (every row is too long or has no token to "
                        "learn); check data.max_seq_length and the rows")

    def _next_epoch(self) -> None:
        self._wait()
        self.epoch, self.index, self._used_up = self.epoch + 1, 0, False
        for reader in self.readers:
            reader.reset(self.epoch)

    def _wait(self) -> None:
        """Let a read ahead finish (it advances the readers) before they change."""
        if self._ahead is not None:
            self._ahead[1].result()
            self._ahead = None

    def _read_ahead(self, count: int) -> None:
        if self.prefetch and not self._used_up:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="mlx-dp-stream")
            self._ahead = (count, self._pool.submit(self._read, count))

    def _local(self, count: int) -> tuple:
        """This process's micro-batches of the next update and its readers' positions after them."""
        if self._ahead is not None and self._ahead[0] == count:
            local, self._ahead = self._ahead[1].result(), None
            return local
        self._wait()
        return self._read(count)

    def _read(self, count: int) -> tuple:
        """Read ``count`` micro-batches per hosted rank (runs on the read-ahead thread too)."""
        batches = [[self._batch(reader.next_batch()) for reader in self.readers] for _ in range(count)]
        return batches, [reader.position() for reader in self.readers]

    def _batch(self, served) -> Batch:
        """A micro-batch of a window (``(view, indices, ids)``), or padding rows once the share is used up."""
        if served is None:
            width = padded_width(2, self.pad_multiple)
            tokens = np.zeros((self.rows, width), np.int32)
            segments = np.full((self.rows, width - 1), -1, np.int32) if self.split.cfg.packing else None
            return Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=np.zeros((self.rows, width - 1),
                         np.float32), tokens=0, global_tokens=0, indices=np.zeros(0, np.int64), segments=segments)
        view, indices, ids = served
        batch = make_batch(view, indices, 0, 1, self.rows, self.pad_multiple)
        return dataclasses.replace(batch, indices=ids[indices])

    def _exchange(self, local: tuple, count: int) -> tuple:
        """Sum every rank's tokens per micro-batch and its position over ranks; the update's batches with
        their global counts, and the update's total loss tokens."""
        batches, places = local
        width = count + PLACE
        mine = np.zeros((self.world_size, width))
        for h, q in enumerate(self.hosted):
            mine[q, :count] = [batches[k][h].tokens for k in range(count)]
            mine[q, count:] = places[h]
        flat = mine.ravel().tolist()
        # note: a blocking collective per update (one short float64 sum): a rank knows only its own rows
        summed = self.world.all_sum(flat, phase="stream") if self.world is not None else flat
        table = np.asarray(summed).reshape(self.world_size, width)
        tokens = table[:, :count].sum(axis=0)
        self._places = table[:, count:].astype(np.int64).tolist()
        self._used_up = all(place[3] for place in self._places)
        group = [dataclasses.replace(batches[k][h], global_tokens=int(tokens[k]))
                 for k in range(count) for h in range(len(self.hosted))]
        return group, int(tokens.sum())

    def position(self) -> DataPosition:
        """Every rank's place after the last update (the same on every rank: it came with the sum)."""
        return DataPosition(epoch=self.epoch, index=self.index, micro_batch=self.micro_batch,
                            ranks=[list(place) for place in self._places])

    def restore(self, position: DataPosition) -> str | None:
        """Continue from a checkpoint's positions: each hosted rank takes its own back.

        Raises:
            UserError: The checkpoint was not saved streaming on this many ranks at these rows per rank.
        """
        if len(position.ranks) != self.world_size or position.micro_batch != self.micro_batch:
            saved = len(position.ranks)
            shape = f"{saved} rank(s) at {position.micro_batch // saved} rows each" if saved else "without streaming"
            raise UserError(f"this checkpoint was saved {shape}, and a stream resumes only where every rank takes "
                            f"back its own share: resume on {saved or 'the same'} rank(s) with the same "
                            "training.batch_size and data.streaming")
        self._wait()
        self.epoch, self.index, self._places = position.epoch, position.index, [list(p) for p in position.ranks]
        for reader, q in zip(self.readers, self.hosted):
            reader.restore(self.epoch, *position.ranks[q][:3])
        self._used_up = all(place[3] for place in self._places)
        return None

    def epoch_progress(self) -> float:
        """Epochs completed, plus the mean share of the current one read (0 where the length is unknown)."""
        done = [1.0 if place[3] else 0.0 if place[1] < 0 else self.split.fraction(q, self.world_size, place[0])
                for q, place in enumerate(self._places)]
        return self.epoch + float(np.mean(done))

    def close(self) -> None:
        """Stop reading ahead and close the shares."""
        self._wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for reader in self.readers:
            reader.share.close()


def token_stream(split, *args, **options):
    """The stream of next-token data: :class:`RowStream` for a streamed split, ``BatchStream`` otherwise."""
    return (RowStream if isinstance(split, TokenStream) else BatchStream)(split, *args, **options)
