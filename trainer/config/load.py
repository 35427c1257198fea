"""Loading recipes: YAML + ``section.key=value`` overrides into the typed schema, strictly.

A recipe is one YAML file with the sections ``model``, ``method``, ``data``,
``training``, ``eval``, ``checkpoint``, ``logging`` and ``parallel``. Values
come from, in order of precedence: ``section.key=value`` overrides on the
command line, the recipe file, and the defaults in ``trainer.config.schema`` (whose
classes are re-exported here).

An unknown key, a value of the wrong type or an impossible value raises
:class:`~trainer.errors.ConfigError` with the file, the key and, for typos,
the closest valid key; a mistake made by a command-line override names that
override instead of the file (:func:`blame`). This module imports nothing from MLX.
"""

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError, short
from .rules import _suggest
from .schema import (HF_DATASET_KEYS, SECTION_CLASSES, CheckpointConfig, Config, DataConfig, EvalConfig,
                     LoggingConfig, MethodConfig, ModelConfig, ParallelConfig, TrainingConfig)


# A recipe holds a few hundred values; nested aliases ("billion laughs") can
# make a few lines expand to billions, which would spin the loader and print
# error lines of megabytes. Aliases are counted as often as they are used.
MAX_RECIPE_NODES = 10_000
MAX_RECIPE_BYTES = 1_000_000  # a recipe is a few KB; a bigger file is the wrong file (and slow to parse)


class RecipeShapeError(Exception):
    """Raised while reading YAML: a duplicate key or a recipe that expands too far."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``3e-4`` as a float and refuses a key given twice.

    PyYAML follows YAML 1.1, where a float needs a dot, so learning rates
    written the usual way would load as strings (mlx-lm patches the same).
    PyYAML also lets a second ``training:`` silently replace the first.
    """

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<: *base` merges are meant to be overridden by explicit keys
            if key_node.value in seen:
                raise RecipeShapeError(f"key {short(key_node.value, 40)} appears twice (lines {seen[key_node.value]} "
                                       f"and {key_node.start_mark.line + 1}); give it once")
            seen[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _expanded_size(root, limit: int) -> int:
    """Values ``root`` stands for once every alias is expanded; stops counting past ``limit``.

    Aliases share one node in the composed graph, so counting with a memo
    takes time linear in the text, however far the aliases would expand.
    """
    sizes, active = {}, set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise RecipeShapeError("a YAML alias refers to itself (a recursive value)")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(root)


def yaml_load(text: str):
    """Parse YAML data (never objects) with floats like ``3e-4`` understood.

    Raises:
        RecipeShapeError: A key given twice in one mapping, or more than
            ``MAX_RECIPE_NODES`` values once aliases are expanded.
        yaml.YAMLError: Invalid YAML.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_RECIPE_NODES) > MAX_RECIPE_NODES:
            raise RecipeShapeError(f"it holds more than {MAX_RECIPE_NODES} values (each use of a YAML alias "
                                   "counted); a recipe holds a few hundred")
        return loader.construct_document(node)
    finally:
        loader.dispose()


_SECTION_CLASSES = SECTION_CLASSES
REQUIRED = {("model", "path")}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = type(None) in typing.get_args(tp)
        return " or ".join(_type_name(a) for a in args) + (" or null" if nullable else "")
    if origin is list:
        item = typing.get_args(tp)[0]
        return {str: "a list of strings", float: "a list of numbers", int: "a list of integers"}.get(
            item, f"a list of {_type_name(item)}")
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """Check ``value`` against type hint ``tp``; return it (ints become floats for float keys)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key} must be {_type_name(tp)}, got {short(value)}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value is False and "off" in typing.get_args(tp):
            return "off"  # YAML 1.1 reads a bare `off` as false
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {short(value)}"
                              + _suggest(str(value)[:100], [str(a) for a in typing.get_args(tp)]))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            number = float(value)
        except OverflowError:  # an integer past the largest float
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {short(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported schema type {tp} for {key}")


def _build_section(name: str, values: dict):
    cls = _SECTION_CLASSES[name]
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields_:
            raise ConfigError(f"unknown key {name}.{str(key)[:40]}"
                              + _suggest(str(key), fields_).replace("mean ", f"mean {name}."))
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    for key in fields_:
        if (name, key) in REQUIRED and key not in kwargs:
            raise ConfigError(f"{name}.{key} is required")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value``; the value is parsed as YAML (so 200 is an int)."""
    if "=" not in text:
        raise ConfigError(f"override {short(text)} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {short(text)} must look like section.key=value")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecipeShapeError as e:
        raise ConfigError(f"override {short(dotted, 40)}: {e}") from None
    except (ValueError, RecursionError) as e:  # an integer of more digits than Python converts; deep nesting
        raise ConfigError(f"override {short(dotted, 40)} holds a value that cannot be read: {str(e)[:120]}") from None
    return parts[0], parts[1], value


def read_recipe(path) -> dict:
    """Read a recipe file into nested dicts, with clear errors for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {path} is {size / 1e6:.1f} MB; a recipe is a few KB of YAML (is it the right file?)")
    text = path.read_text()
    if not text.strip():
        raise ConfigError(f"recipe {path} is empty")
    try:
        data = yaml_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or "invalid syntax"
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    except RecipeShapeError as e:
        raise ConfigError(f"recipe {path}: {e}") from None
    except (ValueError, RecursionError) as e:  # an integer of more digits than Python converts; deep nesting
        raise ConfigError(f"recipe {path} holds a value that cannot be read: {str(e)[:120]}") from None
    if data is None:
        raise ConfigError(f"recipe {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections (model, data, training, ...), "
                          f"got {type(data).__name__}")
    return data


def _file_sections(data: dict, source: str) -> dict:
    """The recipe file's sections as fresh dicts, checked to be known sections holding mappings."""
    merged = {}
    for section, values in data.items():
        if section not in _SECTION_CLASSES:
            raise ConfigError(f"{source}: unknown section {short(section, 40)}"
                              + _suggest(str(section)[:100], _SECTION_CLASSES))
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section} must be a mapping of keys, got {short(values)}")
        merged[section] = dict(values)
    return merged


def _apply_overrides(merged: dict, overrides) -> None:
    """Set each ``section.key=value`` of ``overrides`` in ``merged``, in order (the last one wins)."""
    for text in overrides:
        try:
            section, key, value = parse_override(text)
        except ConfigError as e:
            raise ConfigError(f"command-line {e}") from None
        if section not in _SECTION_CLASSES:
            raise ConfigError(f"command-line override {_cut(text)} names unknown section {short(section, 40)}"
                              + _suggest(section, _SECTION_CLASSES))
        if section == "training" and key in ("steps", "epochs"):
            # An override of one length key replaces the recipe's other one.
            other = "epochs" if key == "steps" else "steps"
            if not any(o.split("=", 1)[0].strip() == f"training.{other}" for o in overrides):
                merged.get("training", {}).pop(other, None)
        merged.setdefault(section, {})[key] = value


def _cut(text: str, limit: int = 80) -> str:
    """An override as the user typed it, cut to about ``limit`` characters for a message."""
    return text if len(text) <= limit else text[:limit] + "..."


_KEY_IN_MESSAGE = re.compile(r"\b(" + "|".join(_SECTION_CLASSES) + r")\.(\w+)")


def blame(error: ConfigError, overrides=(), source: str = "<recipe>") -> ConfigError:
    """``error`` headed by where the value it is about came from: the command-line override that set a key the
    message names (outside a "did you mean" hint), else the recipe file ``source``.

    Args:
        error (ConfigError): A message about the merged recipe, without a source.
        overrides (Iterable[str]): The command line's ``section.key=value`` strings. Default: ``()``.
        source (str): The recipe file. Default: ``"<recipe>"``.
    """
    set_by = {}
    for text in overrides:  # the last override of a key is the one that counts
        set_by[tuple(text.split("=", 1)[0].strip().split(".", 1))] = text
    named = str(error).split("; did you mean")[0]
    for section, key in _KEY_IN_MESSAGE.findall(named):
        if (section, key) in set_by:
            return ConfigError(f"command-line override {_cut(set_by[(section, key)])}: {error}")
    return ConfigError(f"{source}: {error}")


def build_config(data: dict, overrides=(), source: str = "<recipe>") -> Config:
    """Validate nested dicts (plus ``section.key=value`` overrides) into a :class:`Config`.

    An error names the command-line override it comes from, or else ``source``.

    Args:
        data (dict): The recipe's sections.
        overrides (Iterable[str]): Command-line overrides, applied last. Default: ``()``.
        source (str): Name used in error messages. Default: ``"<recipe>"``.
    """
    overrides = list(overrides)
    merged = _file_sections(data, source)
    _apply_overrides(merged, overrides)
    if "model" not in merged:
        raise ConfigError(f"{source}: the recipe needs a model section with model.path")
    if "data" not in merged:
        raise ConfigError(f"{source}: the recipe needs a data section with data.path")
    try:
        sections = {name: _build_section(name, values) for name, values in merged.items()}
        return Config(**sections)
    except ConfigError as e:
        raise blame(e, overrides, source) from None


def load_config(path, overrides=()) -> Config:
    """Load a recipe file with overrides; every problem names the file and the key.

    Args:
        path (str | Path): The recipe YAML file.
        overrides (Iterable[str]): ``section.key=value`` strings. Default: ``()``.

    Returns:
        Config: The frozen, validated recipe.
    """
    return build_config(read_recipe(path), overrides, source=str(path))


def describe_keys() -> list[tuple[str, str, str]]:
    """Every recipe key as (``section.key``, default, description), for docs and `recipes keys`."""
    rows = []
    for name, cls in _SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            rows.append((f"{name}.{f.name}", repr(default), f.metadata.get("doc", "")))
    return rows
