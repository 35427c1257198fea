"""Where a split's rows come from, and reading them: files, directories of split files, hub datasets.

A :class:`Source` names one split's rows; :func:`load_rows` reads them with
``datasets`` and names the file and line of bad bytes or rows. A local file is
known by a hash of its bytes (:func:`content_digest`): ``datasets`` alone knows
it by path and modification time, so a file replaced in place would be served
from the old cache. Tokenizing is ``trainer.data.tokenized``'s.
"""

import dataclasses
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..config.load import DataConfig
from .hub import close_match, hub_offline, looks_like_hub_id, mistyped_local_path
from ..errors import DataError
from ..library import resolve as resolve_builtin

SPLIT_FILE_NAMES = {
    "train": ("train",),
    "valid": ("valid", "validation", "val", "dev"),
    "test": ("test",),
}
HUB_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "val", "dev"), "test": ("test",)}
EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
READ_CHUNK = 8 * 1024 * 1024
TEXT_BUILDERS = ("json", "csv")


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """Where one split's rows come from."""

    split: str
    description: str  # a file path or "hub-id[split]" for messages
    builder: str  # "json", "parquet", "csv" or a hub id
    data_files: str | None = None
    hub_split: str | None = None
    hub_name: str | None = None
    hub_kwargs: tuple = ()  # extra load_dataset keyword arguments


def _file_source(split: str, path: Path) -> Source:
    builder = EXTENSIONS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"data file {path} has an unsupported extension; use .jsonl, .json, .parquet or .csv")
    return Source(split, str(path), builder, data_files=str(path))


def source_parts(cfg: DataConfig) -> list[tuple[DataConfig, dict[str, Source]]]:
    """Every part of the data: each hub dataset of a ``data.hf_dataset`` list (its ``*_feature`` column names
    override the data section's), or the one ``data.path``, with its split sources; with ``data.mix``, each
    source's. A split concatenates the parts, as mlx-lm does (a mix then picks each epoch's samples:
    ``trainer.data.mix``)."""
    if cfg.mix is not None:
        from .mix import mix_parts

        return [found for part in mix_parts(cfg) for found in source_parts(part)]
    parts = []
    for entry in cfg.hf_datasets() or [None]:
        part = cfg
        if entry is not None:
            features = {k: v for k, v in entry.items() if k.endswith("_feature")}
            part = dataclasses.replace(cfg, hf_dataset=entry, **features)
        parts.append((part, resolve_sources(part)))
    return parts


def resolve_sources(cfg: DataConfig) -> dict[str, Source]:
    """Map split names (train, valid, test) to their sources.

    ``data.path`` may be a file (the train split), a directory holding
    ``train``/``valid``/``test`` files, a hub id, or a built-in dataset
    (``builtin:tiny-task``). ``data.hf_dataset`` (one entry here) takes a hub
    id with explicit split expressions, like mlx-lm's.
    """
    if cfg.hf_dataset is not None:
        hf = cfg.hf_dataset
        # mlx-lm's defaults: 80% to train, the last 10% to validate, no test split
        splits = {"train": hf.get("train_split", "train[:80%]"), "valid": hf.get("valid_split", "train[-10%:]"),
                  "test": hf.get("test_split")}
        return {s: Source(s, f"{hf['path']}[{expr}]", hf["path"], hub_split=expr, hub_name=hf.get("name"),
                          hub_kwargs=tuple(sorted((hf.get("config") or {}).items())))
                for s, expr in splits.items() if expr}
    path = Path(os.path.expanduser(resolve_builtin(cfg.path)))
    if path.is_file():
        return {"train": _file_source("train", path)}
    if path.is_dir():
        sources = {}
        for split, names in SPLIT_FILE_NAMES.items():
            for name in names:
                hits = [path / f"{name}{ext}" for ext in EXTENSIONS if (path / f"{name}{ext}").is_file()]
                if hits:
                    sources[split] = _file_source(split, hits[0])
                    break
        if "train" not in sources:
            raise DataError(f"data.path {path} has no train file (train.jsonl, train.parquet or train.csv)")
        return sources
    typo = mistyped_local_path(cfg.path)
    if typo:
        raise DataError(f"data.path {cfg.path}: {typo}")
    if looks_like_hub_id(cfg.path):
        return {s: Source(s, f"{cfg.path}[{s}]", cfg.path, hub_split=s) for s in SPLIT_FILE_NAMES}
    raise DataError(f"data.path {cfg.path} does not exist (and is not a hub id like org/name)"
                   + close_match(cfg.path))


# --------------------------------------------------------------------------- loading


def _json_detail(text: str, error: json.JSONDecodeError, whole_file: bool = False) -> str:
    """What is wrong with ``text`` at ``error``, in words whose line and column are true for the user's file.

    Python's messages end in "at" for some errors ("Unterminated string starting at"), and a row cut short
    fails past its last character, where a column is no help: such a row (or file) is said to end early.
    """
    def place(line: int, column: int) -> str:
        return f"line {line} column {column}" if whole_file else f"column {column}"

    end = len(text.rstrip())
    unclosed = error.msg.startswith("Unterminated string")
    if unclosed or error.pos >= end:
        last = place(text.count("\n", 0, end) + 1, end - text.rfind("\n", 0, end) - 1)
        what = "file" if whole_file else "row"
        if unclosed:
            return f"the {what} ends at {last} inside a string that opens at {place(error.lineno, error.colno)}"
        return f"the {what} ends at {last} before its JSON is complete"
    message = error.msg.removesuffix(" at")
    return f"{message[0].lower()}{message[1:]} at {place(error.lineno, error.colno)}"


def _bad_json_document(path: str, text: str) -> str | None:
    """Why a ``.json`` file that is one JSON list of rows cannot be read, or ``None``."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        return f"{path} is not valid JSON ({_json_detail(text, e, whole_file=True)})"
    if not isinstance(rows, list):
        return None
    odd = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    return None if odd is None else f"{path} item {odd} is not a JSON object (got {type(rows[odd]).__name__})"


def _first_bad_jsonl_line(path: str) -> str | None:
    """Find the first line of a JSONL file that is not a JSON object, naming its true line and column; a
    ``.json`` file that is one JSON list is checked as a whole instead."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.lower().endswith(".json"):
            text = f.read()
            if text.lstrip().startswith("["):
                return _bad_json_document(path, text)
            f.seek(0)
        for number, line in enumerate(f, 1):
            text = line.rstrip("\r\n")  # the line ending is not the row's: an error there is the row's end
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                return f"{path} line {number} is not valid JSON ({_json_detail(text, e)})"
            if not isinstance(row, dict):
                return f"{path} line {number} is not a JSON object (got {type(row).__name__})"
    return None


def _content_hasher():
    """xxh3 (a dependency of ``datasets``, far faster than blake2b) where present; blake2b otherwise."""
    try:
        import xxhash

        return xxhash.xxh3_128()
    except ImportError:
        return hashlib.blake2b(digest_size=16)


def content_digest(source: Source) -> str:
    """Hash of a local data file's bytes; text files are also checked to be UTF-8 and not blank.

    Raises:
        DataError: Naming the file and line of the first byte that is not
            UTF-8, or saying that the file holds only blank lines.
    """
    path, text = source.data_files, source.builder in TEXT_BUILDERS
    h, blank, lines = _content_hasher(), True, 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            if not chunk.endswith(b"\n"):
                chunk += f.readline()  # whole lines: a multi-byte character is never split
            h.update(chunk)
            if not text:
                continue
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                line_start = chunk.rfind(b"\n", 0, e.start) + 1
                line = lines + chunk.count(b"\n", 0, e.start) + 1
                raise DataError(f"{source.description} line {line} is not "
                                f"valid UTF-8 (byte 0x{chunk[e.start]:02x} at byte {e.start - line_start + 1} of "
                                "the line); save the file as UTF-8") from None
            blank = blank and not chunk.strip()
            lines += chunk.count(b"\n")
    if text and blank:
        raise DataError(f"data file {source.description} holds only blank lines, no rows")
    return h.hexdigest()


def row_location(source: Source, row: int) -> str:
    """Human location of a row: file line for JSONL, row number otherwise."""
    if source.builder == "json" and source.data_files and source.data_files.endswith(".jsonl"):
        seen = -1
        with open(source.data_files, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    seen += 1
                    if seen == row:
                        return f"{source.description} line {number}"
    if source.builder == "csv":
        return f"{source.description} line {row + 2}"
    return f"{source.description} row {row}"


@contextmanager
def quiet_datasets(progress: bool = True):
    """Within the block, ``datasets`` logs nothing and shows progress bars only if ``progress`` (and it did).

    On a malformed file ``datasets`` logs its own error (pyarrow's or pandas' words) and leaves a progress
    bar behind before it raises; the one-line error that follows says the same, naming the line. Both
    settings are the process's, not ours, so they are put back as they were, and an environment variable
    that fixes the bars (``HF_DATASETS_DISABLE_PROGRESS_BARS``) is left to win.
    """
    import datasets
    from datasets.utils import logging as datasets_logging

    level = datasets_logging.get_verbosity()
    hide = not progress and not datasets.utils.are_progress_bars_disabled() and \
        datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    if hide:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            datasets.enable_progress_bars()
        datasets_logging.set_verbosity(level)


def _reason(error: Exception) -> str:
    """The first line of what went wrong, from the innermost error where ``datasets`` wrapped a parser's."""
    while type(error).__name__ == "DatasetGenerationError" and error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_rows(source: Source, cache_dir: str | None = None, required: bool = True):
    """Load one split as a ``datasets.Dataset``; ``None`` when an optional hub split is absent.

    A local file is read without ``datasets``' progress bar (it is quick; the tokenizing bar that follows
    shows progress), so a malformed one ends in our one line alone; a hub split keeps its download bars.

    Raises:
        DataError: The file or split cannot be read, naming the file, line and column where they are known.
    """
    import datasets

    try:
        if source.data_files is not None:
            if os.path.getsize(source.data_files) == 0:
                raise DataError(f"data file {source.description} is empty")
            # The config name carries the content hash, so datasets' cache (keyed by path and mtime
            # alone) and everything derived from it (the tokenized rows) follow the bytes.
            digest = content_digest(source)[:16]
            with quiet_datasets(progress=False):
                ds = datasets.load_dataset(source.builder, f"content-{digest}", data_files=source.data_files,
                                           split="train", cache_dir=cache_dir)
        else:
            with quiet_datasets():
                ds = _load_hub_split(source, cache_dir, required)
            if ds is None:
                return None
    except DataError:
        raise
    except Exception as e:  # datasets wraps parser errors in many types
        if source.builder == "json" and source.data_files:
            bad = _first_bad_jsonl_line(source.data_files)
            if bad:
                raise DataError(bad) from None
        reason = _reason(e)
        if source.data_files is None and hub_offline():
            raise DataError(f"could not load {source.description}: it is not a local path, and HF_HUB_OFFLINE=1 "
                            f"forbids fetching it from the hub ({reason})") from None
        raise DataError(f"could not load {source.description}: {reason}") from None
    if len(ds) == 0:
        raise DataError(f"data file {source.description} has no rows")
    return ds


def _load_hub_split(source: Source, cache_dir, required):
    import datasets

    names = [source.hub_split]
    if source.hub_split in HUB_SPLIT_NAMES:  # plain split names: accept the usual aliases
        names = list(HUB_SPLIT_NAMES[source.hub_split])
    last = None
    for name in names:
        try:
            return datasets.load_dataset(source.builder, source.hub_name, split=name, cache_dir=cache_dir,
                                         **dict(source.hub_kwargs))
        except ValueError as e:  # unknown split name
            last = e
            if "split" not in str(e).lower():
                raise
    if required:
        raise DataError(f"hub dataset {source.builder} has no split {source.hub_split!r} ({last})")
    return None
