"""Each rank's share of a streamed training set, read a window at a time without reading the others'.

``data.streaming`` (``trainer.data.stream``) gives rank ``r`` of ``N`` its own
part of the rows and reads it in order; a position in a share is one integer,
so a checkpoint holds it exactly and a resume is one seek:

* a JSONL file (:class:`JsonlShare`): the bytes ``[size*r/N, size*(r+1)/N)``; a
  line belongs to the share that holds its first byte (the rule Hadoop's text
  splits follow), so each line is read by exactly one rank. The position is
  the byte offset of the next line, and a row's id is its line's offset.
  Shares are equal in bytes, not rows;
* a Parquet file (:class:`ParquetShare`): the rows ``[n*r/N, n*(r+1)/N)``, read
  from the row groups that hold them (at most one row group is held in memory).
  The position and a row's id are row numbers;
* a hub dataset (:class:`HubShare`): ``datasets``' streaming with its own split
  between ranks (``split_dataset_by_node``: by files when their count is a
  multiple of the ranks, otherwise every rank reads the whole stream and keeps
  every N-th row). The position is the rows this rank consumed; a resume skips
  them again, which costs a read of them (``datasets`` resumes no faster).

Every share answers ``read(position, count) -> (rows, position after, ended)``
with rows as ``(id, dict)``, and ``where(id)`` for messages. This module imports
no MLX.
"""

import atexit
import itertools
import json
import os

from ..errors import DataError

JSON_ERRORS = (json.JSONDecodeError, UnicodeDecodeError)


def line_number(path: str, offset: int) -> int:
    """The 1-based line that starts at byte ``offset`` (read only when a row is bad)."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            chunk = f.read(min(8 << 20, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count


class JsonlShare:
    """Rank ``rank`` of ``world_size``'s byte range of a JSONL file.

    Args:
        path (str): The file.
        rank (int): This share's rank.
        world_size (int): Shares.
    """

    def __init__(self, path: str, rank: int, world_size: int):
        self.path = path
        self.size = os.path.getsize(path)
        self.begin, self.end = self.size * rank // world_size, self.size * (rank + 1) // world_size
        self._file, self._start = None, None

    @property
    def start(self) -> int:
        """The offset of the share's first line: the first that starts at or after its first byte."""
        if self._start is None:
            if self.begin == 0:
                self._start = 0
            else:
                self._open().seek(self.begin - 1)
                self._file.readline()  # a line that starts before our first byte is the previous share's
                self._start = self._file.tell()
        return self._start

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "rb")
        return self._file

    def read(self, position: int, count: int) -> tuple:
        """Up to ``count`` rows from byte ``position``: ``([(offset, row)], next position, share ended)``.

        Raises:
            DataError: A line is not a JSON object, naming the file and line.
        """
        f, rows, ended = self._open(), [], False
        f.seek(position)
        while len(rows) < count and not ended:
            line = f.readline() if position < self.end else b""
            if line.strip():
                rows.append((position, self._row(line, position)))
            position += len(line)
            ended = not line or position >= self.end
        return rows, position, ended

    def _row(self, line: bytes, offset: int) -> dict:
        try:
            row = json.loads(line)
        except JSON_ERRORS as e:
            reason = "is not valid UTF-8" if isinstance(e, UnicodeDecodeError) else f"is not valid JSON ({e.msg})"
            raise DataError(f"{self.where(offset)} {reason}") from None
        if not isinstance(row, dict):
            raise DataError(f"{self.where(offset)} is not a JSON object (got {type(row).__name__})")
        return row

    def where(self, row_id: int) -> str:
        return f"{self.path} line {line_number(self.path, row_id)}"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ParquetShare:
    """Rank ``rank`` of ``world_size``'s rows of a Parquet file, read from the row groups that hold them."""

    def __init__(self, path: str, rank: int, world_size: int):
        import pyarrow.parquet as pq

        self.path = path
        self._file = pq.ParquetFile(path)
        meta = self._file.metadata
        self.rows = meta.num_rows
        self.start, self.end = self.rows * rank // world_size, self.rows * (rank + 1) // world_size
        self._group_starts = [0]
        for g in range(meta.num_row_groups):
            self._group_starts.append(self._group_starts[-1] + meta.row_group(g).num_rows)
        self._cached = (None, None)  # (row group, its Arrow table): the one row group held in memory

    def _group(self, g: int):
        if self._cached[0] != g:
            self._cached = (g, self._file.read_row_group(g))
        return self._cached[1]

    def read(self, position: int, count: int) -> tuple:
        """Up to ``count`` rows from row ``position``: ``([(row number, row)], next position, share ended)``."""
        import bisect

        stop, rows = min(self.end, position + count), []
        while position < stop:
            g = bisect.bisect_right(self._group_starts, position) - 1
            first = self._group_starts[g]
            take = min(stop, self._group_starts[g + 1]) - position
            rows.extend((position + k, row) for k, row in
                        enumerate(self._group(g).slice(position - first, take).to_pylist()))
            position += take
        return rows, position, position >= self.end

    def where(self, row_id: int) -> str:
        return f"{self.path} row {row_id}"

    def close(self) -> None:
        self._cached = (None, None)


class HubShare:
    """This rank's part of a hub dataset's split, streamed by ``datasets`` (an ``IterableDataset``)."""

    def __init__(self, source, rank: int, world_size: int, cache_dir: str | None = None):
        import datasets
        from datasets.distributed import split_dataset_by_node

        from .sources import quiet_datasets

        with quiet_datasets():
            ds = datasets.load_dataset(source.builder, source.hub_name, split=source.hub_split,
                                       data_files=source.data_files, streaming=True, cache_dir=cache_dir,
                                       **dict(source.hub_kwargs))
        self.description = source.description
        self._rows = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.start, self._iterator, self._at = 0, None, None
        atexit.register(self.close)  # whoever forgets to close it, the process still exits

    def read(self, position: int, count: int) -> tuple:
        """Up to ``count`` rows after ``position`` rows of this share: ``([(row number, row)], next, ended)``."""
        if self._at != position:  # a resume, or a new epoch: skip what was read (reading it again)
            self.close()
            # not IterableDataset.skip: after split_dataset_by_node it skips rows of the whole stream
            self._iterator, self._at = iter(self._rows), position
            next(itertools.islice(self._iterator, position, position), None)
        rows = []
        for row in self._iterator:
            rows.append((position + len(rows), dict(row)))
            if len(rows) == count:
                break
        self._at = position + len(rows)
        return rows, self._at, len(rows) < count

    def where(self, row_id: int) -> str:
        return f"{self.description} row {row_id} of this rank's share"

    def close(self) -> None:
        """End the iterator: a live one over Parquet can hang the interpreter's exit (apache/arrow#45214)."""
        if self._iterator is not None:
            self._iterator.close()  # a generator (IterableDataset.__iter__)
            self._iterator, self._at = None, None
