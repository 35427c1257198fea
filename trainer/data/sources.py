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
    override the data section's), or the one ``data.path``, with its split sources. A split concatenates the
    parts, as mlx-lm does."""
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


def _first_bad_jsonl_line(path: str) -> str | None:
    """Find the first line of a JSONL file that is not a JSON object."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path} line {number} is not valid JSON ({e.msg} at column {e.colno})"
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


def load_rows(source: Source, cache_dir: str | None = None, required: bool = True):
    """Load one split as a ``datasets.Dataset``; ``None`` when an optional hub split is absent."""
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        if source.data_files is not None:
            if os.path.getsize(source.data_files) == 0:
                raise DataError(f"data file {source.description} is empty")
            # The config name carries the content hash, so datasets' cache (keyed by path and mtime
            # alone) and everything derived from it (the tokenized rows) follow the bytes.
            ds = datasets.load_dataset(source.builder, f"content-{content_digest(source)[:16]}",
                                       data_files=source.data_files, split="train", cache_dir=cache_dir)
        else:
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
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
