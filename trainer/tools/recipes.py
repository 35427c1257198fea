"""The recipe library (``trainer.library``): list, find by name, copy.

A recipe's first comment line is its one-line summary. Wherever a command
takes a recipe (``mlx-dp train tiny-lora``, ``mlx-dp recipes cp tiny-lora
my.yaml``), a file path wins, then a library recipe of that name.
"""

import difflib
import shutil
from pathlib import Path

from ..errors import ConfigError
from ..library import recipes_dir


def all_recipes(root: Path | None = None) -> list[Path]:
    """Every recipe file under the library (or ``root``), recursively, sorted."""
    root = root or recipes_dir()
    return sorted(p for p in root.rglob("*.yaml") if p.is_file())


def summary(path: Path) -> str:
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") and text.lstrip("#").strip():
            return text.lstrip("#").strip()
        if text and not text.startswith("#"):
            break
    return ""


def recipe_name(path: Path, root: Path | None = None) -> str:
    """A library recipe's name (its path under the library, without ``.yaml``); a path for any other file."""
    root = root or recipes_dir()
    try:
        return str(Path(path).resolve().relative_to(root.resolve()).with_suffix(""))
    except ValueError:
        return str(path)


def list_recipes(root: Path | None = None) -> list[tuple[str, str]]:
    """(name, one-line summary) of every recipe."""
    return [(recipe_name(p, root), summary(p)) for p in all_recipes(root)]


def find_recipe(name: str, root: Path | None = None) -> Path:
    """A recipe by path, else by library name (``qwen3-0.6b-lora``) or file name.

    Raises:
        ConfigError: Neither a file nor a library recipe; names the closest recipe.
    """
    direct = Path(name)
    if direct.is_file():
        return direct
    for path in all_recipes(root):
        if name in (recipe_name(path, root), path.stem, path.name):
            return path
    close = difflib.get_close_matches(name, [recipe_name(p, root) for p in all_recipes(root)], n=1)
    hint = f"; did you mean {close[0]}?" if close else "; mlx-dp recipes list shows the library"
    raise ConfigError(f"recipe {name} is neither a file nor a recipe of the library{hint}")


def copy_recipe(name: str, dest: str, root: Path | None = None, ranks: int = 1) -> Path:
    """Copy a recipe to ``dest`` (a file or a directory) for editing; never overwrites.

    An ``mlx_lm.lora`` config (recognised by its keys) is written out as the
    recipe it translates to for ``ranks`` ranks (``trainer.config.mlx_lm``).
    """
    from ..config.mlx_lm import translation_of

    source = find_recipe(name, root)
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise ConfigError(f"{target} already exists; choose another destination")
    translated = translation_of(source, world_size=ranks)
    target.parent.mkdir(parents=True, exist_ok=True)
    if translated is None:
        shutil.copyfile(source, target)
    else:
        target.write_text(translated.recipe_yaml())
    return target
