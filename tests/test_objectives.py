"""The objectives' seam: one registry, one contract, and nothing else reading method.objective."""

import ast
import typing

import pytest

from conftest import ROOT, tiny_recipe
from trainer.config.load import load_config
from trainer.config.schema import MethodConfig
from trainer.errors import ConfigError
from trainer.objectives.base import Objective
from trainer.objectives.registry import OBJECTIVES, make_objective


def test_the_schema_lists_exactly_the_registered_objectives():
    names = typing.get_args(typing.get_type_hints(MethodConfig)["objective"])
    assert set(names) == set(OBJECTIVES)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_declares_and_implements_the_contract(name):
    cls = OBJECTIVES[name]
    assert cls.name == name
    declared = {k for k, v in Objective.__annotations__.items()}
    for attribute in declared:
        assert hasattr(cls, attribute), f"{name} does not declare {attribute}"
    methods = [m for m in vars(Objective) if not m.startswith("_") and callable(getattr(Objective, m))]
    for method in methods:
        assert callable(getattr(cls, method, None)), f"{name} has no {method}"
    assert cls.unit in ("sequences", "pairs", "prompts") and cls.rows_per_item(MethodConfig()) >= 1


def test_only_the_registry_reads_the_objective_by_name():
    """At most one module compares method.objective against names (a new objective touches one place)."""
    readers = []
    for path in (ROOT / "trainer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            names = [s for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)
                     or isinstance(s, (ast.Tuple, ast.List, ast.Set))]
            if names and any(isinstance(s, ast.Attribute) and s.attr == "objective" for s in sides):
                readers.append(str(path.relative_to(ROOT)))
    assert readers == [], readers


def test_keys_that_do_not_apply_to_the_objective_are_one_sentence(tmp_path):
    cfg = load_config(tiny_recipe(tmp_path), ["method.objective=dpo", "data.packing=true"])
    with pytest.raises(ConfigError, match=r"^data.packing packs samples of next-token data; method.objective=dpo"):
        make_objective(cfg)
    assert make_objective(load_config(tiny_recipe(tmp_path), ["data.packing=true"])).name == "sft"
