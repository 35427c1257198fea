"""Local path or Hugging Face hub id: one rule for models and datasets.

``model.path`` and ``data.path`` take either a local path or a hub id
(``org/name``). A path that exists is local. Otherwise a value is taken for a
hub id only if it has the hub's shape and nothing marks it as a local path
(``./``, ``/``, ``~``, a data file extension).

This module imports nothing from MLX.
"""

import re
from pathlib import Path

# Extensions of local data files: "org/name.jsonl" is a file that is missing, not a hub id.
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".safetensors", ".yaml", ".yml")


def looks_like_hub_id(text: str) -> bool:
    """True for ``org/name`` (letters, digits, ``_.-``) that nothing marks as a local path."""
    if text.startswith((".", "/", "~")):
        return False
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and Path(text).suffix.lower() not in FILE_SUFFIXES
