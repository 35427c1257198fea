"""Local path or Hugging Face hub id: one rule for models and datasets.

``model.path`` and ``data.path`` take either a local path or a hub id
(``org/name``). A path that exists is local. Otherwise a value is taken for a
hub id only if it has the hub's shape and nothing marks it as a local path
(``./``, ``/``, ``~``, a data file extension, or a first component that is a
directory here: ``data/tiny-lama`` next to ``data/`` is a typo, not a repo).

This module imports nothing from MLX.
"""

import difflib
import os
import re
from pathlib import Path

# Extensions of local data files: "org/name.jsonl" is a file that is missing, not a hub id.
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".safetensors", ".yaml", ".yml")


def looks_like_hub_id(text: str) -> bool:
    """True for ``org/name`` (letters, digits, ``_.-``) that nothing marks as a local path."""
    if text.startswith((".", "/", "~")):
        return False
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and Path(text).suffix.lower() not in FILE_SUFFIXES


def close_match(text: str) -> str:
    """``" (did you mean data/tiny-llama?)"`` for a missing path with a near neighbour; else ``""``."""
    path = Path(text).expanduser()
    parent = path.parent
    if not parent.is_dir():
        return ""
    try:
        names = os.listdir(parent)
    except OSError:
        return ""
    found = difflib.get_close_matches(path.name, names, n=1, cutoff=0.75)
    return f" (did you mean {parent / found[0] if str(parent) != '.' else found[0]}?)" if found else ""


def mistyped_local_path(text: str) -> str | None:
    """Why a missing ``text`` is a mistyped local path rather than a hub id, or ``None``.

    A missing ``org/name`` whose first component is a directory here
    (``data/`` of ``data/tiny-lama``), or that has a close neighbour on disk,
    was meant to be local: say so at once instead of asking the hub (which
    retries for half a minute without a network). Other shapes are never
    taken for hub ids, so they are not asked about here.
    """
    if not looks_like_hub_id(text) or Path(text).exists():
        return None
    first = Path(text).parts[0] if Path(text).parts else ""
    hint = close_match(text)
    if first and Path(first).is_dir():
        return f"no such file or directory{hint}; {first}/ exists here, so it is not taken for a hub id"
    if hint:
        return f"no such file or directory{hint}"
    return None


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: nothing may be downloaded, only the cache read."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def in_hub_cache(repo_id: str, filename: str = "config.json") -> bool:
    """Whether the hub cache holds ``filename`` of model ``repo_id`` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, filename), str)
