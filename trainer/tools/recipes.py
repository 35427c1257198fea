"""The recipe library under ``recipes/``: list and copy.

A recipe's first comment line is its one-line summary.
"""

import shutil
from pathlib import Path

from ..errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def library(root: Path = RECIPES_DIR) -> Path:
    """The recipe directory: ``root``, or, for an install without the repository next to it
    (``pip install`` puts only the package in site-packages), ``./recipes`` of a clone.

    Raises:
        ConfigError: Neither exists.
    """
    if not root.is_dir() and root == RECIPES_DIR and (Path.cwd() / "recipes").is_dir():
        return Path.cwd() / "recipes"
    if not root.is_dir():
        raise ConfigError(f"no recipe library at {root}: it ships in the mlx-dp repository (recipes/); run from "
                          "a clone of it, or give a recipe file's path")
    return root


def all_recipes(root: Path = RECIPES_DIR) -> list[Path]:
    """Every recipe file under ``root``, recursively, sorted."""
    return sorted(p for p in library(root).rglob("*.yaml") if p.is_file())


def summary(path: Path) -> str:
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") and text.lstrip("#").strip():
            return text.lstrip("#").strip()
        if text and not text.startswith("#"):
            break
    return ""


def recipe_name(path: Path, root: Path = RECIPES_DIR) -> str:
    return str(path.relative_to(library(root)).with_suffix(""))


def list_recipes(root: Path = RECIPES_DIR) -> list[tuple[str, str]]:
    """(name, one-line summary) of every recipe."""
    return [(recipe_name(p, root), summary(p)) for p in all_recipes(root)]


def find_recipe(name: str, root: Path = RECIPES_DIR) -> Path:
    """A recipe by name (``qwen3-0.6b-lora``), by file name, or by path."""
    direct = Path(name)
    if direct.is_file():
        return direct
    for path in all_recipes(root):
        if name in (recipe_name(path, root), path.stem, path.name):
            return path
    import difflib

    close = difflib.get_close_matches(name, [recipe_name(p, root) for p in all_recipes(root)], n=1)
    hint = f"; did you mean {close[0]}?" if close else "; see mlx-dp recipes list"
    raise ConfigError(f"no recipe named {name}{hint}")


def copy_recipe(name: str, dest: str, root: Path = RECIPES_DIR) -> Path:
    """Copy a recipe to ``dest`` (a file or a directory) for editing; never overwrites."""
    source = find_recipe(name, root)
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise ConfigError(f"{target} already exists; choose another destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
