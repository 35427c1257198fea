"""Recipe loading: strict keys, types, values, precedence, and every shipped recipe."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from trainer.config.load import build_config, load_config
from trainer.errors import ConfigError
from trainer.library import recipes_dir
from trainer.tools.recipes import all_recipes

BASE = {"model": {"path": "data/tiny-llama"}, "data": {"path": "data/tiny-task"}}


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_typo_names_key_file_and_close_match(tmp_path):
    path = write(tmp_path, yaml.safe_dump({**BASE, "training": {"batch_sise": 4}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert "training.batch_sise" in str(e.value) and "did you mean training.batch_size" in str(e.value)


def test_wrong_type_and_impossible_value(tmp_path):
    path = write(tmp_path, yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match=r"training.batch_size must be an integer, got 'four'"):
        load_config(path, ["training.batch_size=four"])
    with pytest.raises(ConfigError, match="training.batch_size must be at least 1"):
        load_config(path, ["training.batch_size=0"])
    with pytest.raises(ConfigError, match="method.type must be one of .*did you mean lora"):
        load_config(path, ["method.type=lorra"])
    with pytest.raises(ConfigError, match="training.max_grad_norm must be a number or null, got True"):
        load_config(path, ["training.max_grad_norm=true"])


def test_unknown_section_and_missing_required(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'trainig'.*did you mean training"):
        build_config({**BASE, "trainig": {}})
    with pytest.raises(ConfigError, match="model section"):
        build_config({"data": {"path": "x"}})
    with pytest.raises(ConfigError, match="model.path is required"):
        build_config({"model": {}, "data": {"path": "x"}})


def test_overrides_are_typed_and_take_precedence(tmp_path):
    path = write(tmp_path, yaml.safe_dump({**BASE, "training": {"steps": 50, "learning_rate": 1e-4}}))
    cfg = load_config(path, ["training.steps=200", "training.learning_rate=3e-3", "method.keys=[self_attn.q_proj]",
                             "training.max_grad_norm=null"])
    assert cfg.training.steps == 200 and isinstance(cfg.training.steps, int)
    assert cfg.training.learning_rate == pytest.approx(3e-3)
    assert cfg.method.keys == ["self_attn.q_proj"]
    assert cfg.training.max_grad_norm is None
    # epochs on the command line replaces the recipe's steps
    cfg = load_config(path, ["training.epochs=2"])
    assert cfg.training.epochs == 2.0 and cfg.training.steps is None
    with pytest.raises(ConfigError, match="exactly one of training.steps and training.epochs"):
        build_config({**BASE, "training": {"steps": 3, "epochs": 1}})


def test_not_yaml_and_empty(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_config(write(tmp_path, "model:\n  path: [unclosed\n"))
    with pytest.raises(ConfigError, match="is empty"):
        load_config(write(tmp_path, "\n  \n", "empty.yaml"))
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_frozen_and_round_trips(tmp_path):
    cfg = build_config(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.batch_size = 3
    again = build_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_every_recipe_validates():
    recipes = all_recipes()
    assert len(recipes) >= 11, f"recipes missing under {recipes_dir()}: {recipes}"
    for path in recipes:
        cfg = load_config(path)
        assert cfg.model.path and (cfg.data.path or cfg.data.hf_dataset), path


def test_recipes_are_found_at_any_depth(tmp_path):
    # torchtune's config test globs one folder deep; a recipe in a subfolder must not be missed
    deep = tmp_path / "team" / "qwen" / "v2"
    deep.mkdir(parents=True)
    for path in (tmp_path / "top.yaml", tmp_path / "team" / "mid.yaml", deep / "deep.yaml"):
        path.write_text(yaml.safe_dump(BASE))
    (deep / "notes.txt").write_text("not a recipe")
    found = all_recipes(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["team/mid.yaml", "team/qwen/v2/deep.yaml",
                                                                    "top.yaml"]
    from trainer.tools.recipes import find_recipe

    assert find_recipe("team/qwen/v2/deep", tmp_path) == deep / "deep.yaml"


def test_balance_setting(tmp_path):
    # YAML 1.1 reads a bare `off` as false; the recipe still means the even split
    path = write(tmp_path, yaml.safe_dump(BASE) + "parallel:\n  balance: off\n")
    assert load_config(path).parallel.balance == "off"
    assert load_config(path, ["parallel.balance=auto"]).parallel.balance == "auto"
    assert load_config(path, ["parallel.balance=[3, 1]"]).parallel.balance == [3.0, 1.0]
    with pytest.raises(ConfigError, match="parallel.balance must be one of 'off', 'auto' or a list of numbers, "
                                          "got 'fast'"):
        load_config(path, ["parallel.balance=fast"])
    with pytest.raises(ConfigError, match="positive speed for every rank"):
        load_config(path, ["parallel.balance=[1, 0]"])


def test_a_section_given_twice_is_refused_with_its_lines(tmp_path):
    path = write(tmp_path, "model:\n  path: m\ndata:\n  path: d\ntraining:\n  steps: 3\ntraining:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"key 'training' appears twice \(lines 5 and 7\)"):
        load_config(path)
    # a key repeated inside a section too; `<<` merges stay allowed
    with pytest.raises(ConfigError, match="key 'steps' appears twice"):
        load_config(write(tmp_path, "model: {path: m}\ndata: {path: d}\ntraining:\n  steps: 3\n  steps: 4\n"))
    merged = load_config(write(tmp_path, "model: {path: m}\ndata: {path: d}\n"
                                         "training: {<<: {steps: 3, seed: 1}, seed: 2}\n", "merge.yaml"))
    assert merged.training.steps == 3 and merged.training.seed == 2


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_learning_rate_must_be_finite(tmp_path, value):
    path = write(tmp_path, yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match="training.learning_rate must be a finite number"):
        load_config(path, [f"training.learning_rate={value}"])
    with pytest.raises(ConfigError, match="parallel.timeout_s must be a finite number"):
        load_config(path, [f"parallel.timeout_s={value}"])


def test_nested_aliases_are_bounded_and_messages_stay_short(tmp_path):
    import time

    levels = ["  a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 9):  # 9**9 (387M) values once expanded
        levels.append(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    path = write(tmp_path, "model: {path: m}\ndata: {path: d}\ntraining:\n" + "\n".join(levels) + "\n  betas: *a8\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="holds more than 10000 values") as e:
        load_config(path)
    assert time.monotonic() - start < 2 and len(str(e.value)) < 300
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(write(tmp_path, "model: {path: &r [*r]}\ndata: {path: d}\n", "rec.yaml"))
    # under the bound but long: the message shows the start of the value, not all of it
    long = write(tmp_path, "model: {path: m}\ndata: {path: d}\ntraining:\n  betas: [" + ", ".join(["[1, 2]"] * 3000)
                 + "]\n", "long.yaml")
    with pytest.raises(ConfigError, match=r"training.betas\[0\] must be a number") as e:
        load_config(long)
    assert len(str(e.value)) < 300
    with pytest.raises(ConfigError, match="must be one of") as e:
        load_config(write(tmp_path, yaml.safe_dump(BASE), "b.yaml"), ["method.type=" + "x" * 100000])
    assert len(str(e.value)) < 400


def test_recipes_are_found_by_name_and_builtins_by_their_name(tmp_path, monkeypatch):
    from trainer.errors import ConfigError
    from trainer.library import resolve
    from trainer.tools import recipes

    monkeypatch.chdir(tmp_path)  # from any directory
    assert recipes.find_recipe("tiny-lora") == recipes_dir() / "tiny-lora.yaml"
    assert load_config(recipes.find_recipe("tiny-lora")).model.path == "builtin:tiny-llama"
    assert Path(resolve("builtin:tiny-llama")) == recipes_dir().parent / "data" / "tiny-llama"
    assert resolve("data/x") == "data/x", "any other path is the user's"
    with pytest.raises(ConfigError, match="did you mean tiny-lora"):
        recipes.find_recipe("tiny-lroa")
    with pytest.raises(ConfigError, match="builtin:tiny-llam is not a built-in file of mlx-dp; the built-ins are "
                                          "builtin:tiny-corpus, builtin:tiny-llama, builtin:tiny-preference, "
                                          "builtin:tiny-prompts, builtin:tiny-task"):
        resolve("builtin:tiny-llam")
    with pytest.raises(ConfigError, match="not a built-in"):
        resolve("builtin:../recipes")
    copied = recipes.copy_recipe("tiny-lora", str(tmp_path))
    assert copied == tmp_path / "tiny-lora.yaml" and "builtin:tiny-task" in copied.read_text()
    with pytest.raises(ConfigError, match="already exists"):
        recipes.copy_recipe("tiny-lora", str(tmp_path))
