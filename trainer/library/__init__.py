"""The recipe library and the built-in files its recipes use: the tiny model, its task, architecture shapes.

A wheel ships them as package data (``trainer/library/recipes`` and
``trainer/library/data``, mapped from the repository's ``recipes/`` and
``data/`` by pyproject.toml); a clone or an editable install reads the
repository's own folders. Recipes name a built-in file as ``builtin:NAME``
(``model.path: builtin:tiny-llama``, ``data.path: builtin:tiny-task``), so a
recipe copied anywhere still finds them, and the recipe, which every rank
compares before training, does not depend on where each machine installed
mlx-dp. :func:`resolve` turns such a name into a path.

Only the standard library is imported here.
"""

from pathlib import Path

from ..errors import ConfigError

BUILTIN = "builtin:"
_HERE = Path(__file__).resolve().parent


def root() -> Path:
    """The folder holding ``recipes/`` and ``data/``: the installed package data, else the repository."""
    if (_HERE / "recipes").is_dir():
        return _HERE
    return _HERE.parents[1]


def recipes_dir() -> Path:
    return root() / "recipes"


def data_dir() -> Path:
    return root() / "data"


def builtins() -> list[str]:
    """Names a recipe may use after ``builtin:`` (the built-in model and datasets)."""
    return sorted(p.name for p in data_dir().iterdir() if p.is_dir() and p.name != "archs")


def is_builtin(path) -> bool:
    return isinstance(path, str) and path.startswith(BUILTIN)


def resolve(path: str) -> str:
    """``builtin:NAME`` as the path of that built-in folder; any other path unchanged.

    Raises:
        ConfigError: No built-in is called NAME (the known ones are named).
    """
    if not is_builtin(path):
        return path
    name = path[len(BUILTIN):].strip("/")
    target = data_dir() / name
    if not name or "/" in name or name.startswith(".") or not target.is_dir():
        known = ", ".join(BUILTIN + n for n in builtins())
        raise ConfigError(f"{path} is not a built-in file of mlx-dp; the built-ins are {known}")
    return str(target)
