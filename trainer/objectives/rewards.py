"""GRPO's rewards: built-ins that need no code, and your own functions named ``module:function``.

``method.rewards`` lists them, each a mapping with a ``weight`` (default 1);
a completion's reward is the weighted sum. Built-ins (``kind``):

* ``exact_match``: 1 when the completion equals the row's ``column`` (default
  ``answer``), ignoring case, surrounding space and a final full stop; else 0;
* ``contains``: 1 when the row's ``column`` appears in the completion as a whole word;
* ``number_match``: 1 when the completion's last number equals the last number
  of the row's ``column`` (GSM8K's ``#### 42`` answers included);
* ``format``: 1 when the regular expression ``pattern`` matches the stripped
  completion (``match: search`` by default, or ``full``);
* ``length``: 1 up to ``target`` completion tokens, falling linearly to 0 at twice that.

Your own: ``{function: "my_rewards:score", weight: 0.5}`` imports ``score``
from ``my_rewards.py`` (found in the working directory, which ``mlx-dp launch``
gives every rank, on ``PYTHONPATH``, or installed) and calls ``score(prompt, completion, row)`` with the prompt as the
model saw it, the completion's text and the data row as a dict; it returns a
float. **A recipe that names a function runs that code**: the run says which
functions it loaded. A reward that raises or returns something other than a
finite number stops the run with one sentence naming it and the row.
"""

import importlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError

KINDS = ("exact_match", "contains", "number_match", "format", "length")
KEYS = {"exact_match": {"column"}, "contains": {"column"}, "number_match": {"column"}, "format": {"pattern", "match"},
        "length": {"target"}}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _text(value) -> str:
    return " ".join(str(value).split()).lower().rstrip(".")


def _last_number(text: str) -> float | None:
    found = NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


@dataclass(frozen=True)
class Reward:
    """One reward of ``method.rewards``: its name, weight, and how it scores a completion."""

    name: str
    weight: float
    columns: tuple  # row columns it reads (checked on every row before training)
    score: object  # (prompt, completion, row, tokens) -> float

    def __call__(self, prompt: str, completion: str, row: dict, tokens: int, where: str) -> float:
        """The reward of one completion; a broken one is one sentence naming it and the row."""
        try:
            value = self.score(prompt, completion, row, tokens)
        except Exception as e:  # noqa: BLE001 (the user's code: any failure is theirs to fix)
            raise DataError(f"reward {self.name} raised {type(e).__name__} on {where}: {str(e)[:200]}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"reward {self.name} returned {str(value)[:60]!r} on {where}; a reward is a finite number")
        return float(value)


def _builtin(kind: str, spec: dict, where: str):
    column = spec.get("column", "answer")
    if kind == "exact_match":
        return (column,), lambda p, c, row, n: float(_text(c) == _text(row[column]))
    if kind == "contains":
        return (column,), lambda p, c, row, n: float(
            re.search(rf"(?<!\w){re.escape(_text(row[column]))}(?!\w)", _text(c)) is not None)
    if kind == "number_match":
        return (column,), lambda p, c, row, n: float(_last_number(c) is not None
                                                     and _last_number(c) == _last_number(row[column]))
    if kind == "format":
        try:
            pattern = re.compile(str(spec["pattern"]), re.DOTALL)
        except (KeyError, re.error) as e:
            raise ConfigError(f"{where}: format needs a valid regular expression `pattern` ({e})") from None
        full = spec.get("match", "search") == "full"
        return (), lambda p, c, row, n: float(bool((pattern.fullmatch if full else pattern.search)(c.strip())))
    target = spec.get("target")
    if not isinstance(target, int) or isinstance(target, bool) or target < 1:
        raise ConfigError(f"{where}: length needs `target`, a positive number of tokens")
    return (), lambda p, c, row, n: max(0.0, min(1.0, 2.0 - n / target))


def _import(name: str, where: str, search: list[Path]):
    """``module:function``, imported with the working directory (and ``search``) on the path for the import only."""
    search = [Path.cwd(), *search]
    module_name, _, function = name.partition(":")
    if not module_name or not function:
        raise ConfigError(f"{where}: function must read module:function, got {name!r}")
    added = [str(p) for p in search if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 (whatever the user's module raises on import)
        raise ConfigError(f"{where}: could not import {module_name} ({type(e).__name__}: {str(e)[:160]}); looked "
                          f"in {', '.join(str(p) for p in search)} and the installed packages") from None
    finally:
        for path in added:
            sys.path.remove(path)
    score = getattr(module, function, None)
    if not callable(score):
        raise ConfigError(f"{where}: {module_name} has no function {function}")
    return lambda p, c, row, n: score(p, c, row)


def build_rewards(specs: list, search: list[Path] = ()) -> list[Reward]:
    """``method.rewards`` as :class:`Reward` objects, each checked (a user function is imported here).

    Args:
        specs (list[dict]): The recipe's list.
        search (list[Path]): Folders besides the working one where a user function's module may be.

    Raises:
        ConfigError: A reward that cannot be built, naming its place in the list.
    """
    if not specs:
        raise ConfigError("method.rewards is empty; GRPO needs at least one reward (e.g. {kind: exact_match})")
    rewards = []
    for i, spec in enumerate(specs):
        where = f"method.rewards[{i}]"
        if not isinstance(spec, dict) or ("kind" in spec) == ("function" in spec):
            raise ConfigError(f"{where} must be a mapping with either `kind` ({', '.join(KINDS)}) or `function` "
                              "(module:function)")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{where}.weight must be a finite number, got {weight!r}")
        if "function" in spec:
            extra = set(spec) - {"function", "weight"}
            score, columns, name = _import(str(spec["function"]), where, list(search)), (), str(spec["function"])
        else:
            kind = spec["kind"]
            if kind not in KINDS:
                raise ConfigError(f"{where}.kind must be one of {', '.join(KINDS)}, got {kind!r}")
            extra = set(spec) - {"kind", "weight"} - KEYS[kind]
            columns, score = _builtin(kind, spec, where)
            name = kind
        if extra:
            raise ConfigError(f"unknown key {where}.{sorted(extra)[0]}")
        rewards.append(Reward(name=name, weight=float(weight), columns=columns, score=score))
    return rewards


def check_rows(rewards: list[Reward], split) -> None:
    """Every row has the columns its rewards read, or one sentence names the first that does not."""
    needed = {c for r in rewards for c in r.columns}
    for i in range(len(split)):
        row = split.row(i)
        for column in needed:
            if row.get(column) is None:
                names = ", ".join(r.name for r in rewards if column in r.columns)
                raise DataError(f"{split.locations[i]}: no '{column}' column, which reward {names} reads")
