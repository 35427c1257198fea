"""mlx_lm.lora configs read as they are (trainer/config/mlx_lm.py), and data.hf_dataset as a list.

The mapping is checked key by key against what mlx-lm 0.32 would train (its own
defaults, its global batch, its micro-batch iterations, its schedule), and the
schedule value by value against mlx-lm's own ``build_schedule``.
"""

import json
import re

import mlx.core as mx
import pytest
import yaml

from conftest import ROOT, TINY_DATA, TINY_MODEL, mlx_dp, one_error_line, read_status
from trainer.config.mlx_lm import DEFAULTS, is_mlx_lm_config, translate
from trainer.config.load import build_config
from trainer.errors import ConfigError


def test_mlx_lm_defaults_are_its_own():
    from mlx_lm.lora import CONFIG_DEFAULTS

    for key, value in CONFIG_DEFAULTS.items():
        if key != "optimizer_config":
            assert DEFAULTS[key] == value, key


def test_recognised_by_its_keys():
    assert is_mlx_lm_config({"model": "Qwen/Qwen3-0.6B", "train": True})
    assert is_mlx_lm_config({"iters": 10, "adapter_path": "a"})
    assert not is_mlx_lm_config({"model": {"path": "x"}, "data": {"path": "y"}})
    assert not is_mlx_lm_config(["model"])


def test_a_config_becomes_the_same_work_on_n_ranks():
    config = {"model": str(TINY_MODEL), "data": str(TINY_DATA), "batch_size": 8, "iters": 100,
              "grad_accumulation_steps": 2, "steps_per_report": 10, "steps_per_eval": 40, "save_every": 50,
              "val_batches": -1, "optimizer": "adamw", "learning_rate": 2e-4, "fine_tune_type": "dora",
              "lora_parameters": {"rank": 16, "scale": 5.0, "dropout": 0.1, "keys": ["self_attn.q_proj"]},
              "report_to": "wandb", "project_name": "p", "test": True}
    t = translate(config, "c.yaml", world_size=2)
    cfg = build_config(t.recipe, source="c.yaml")
    assert cfg.training.batch_size == 4 and cfg.training.grad_accumulation == 2  # 8 global = 4 x 2 ranks
    assert cfg.training.steps == 50, "100 micro-batches of 2 per update"
    assert (cfg.logging.every, cfg.eval.every, cfg.checkpoint.every) == (5, 20, 25)
    assert cfg.eval.max_batches is None and cfg.eval.batch_size == 4 and cfg.eval.at_start
    assert cfg.training.optimizer == "adamw" and cfg.training.weight_decay == 0.01, "mlx's AdamW default"
    assert (cfg.method.type, cfg.method.rank, cfg.method.scale, cfg.method.dropout) == ("dora", 16, 5.0, 0.1)
    assert cfg.method.keys == ["self_attn.q_proj"] and cfg.method.num_layers == -1  # 16 > the tiny model's 4
    assert cfg.data.long_samples == "truncate" and cfg.data.mask_prompt is False  # mlx-lm's own behaviour
    assert cfg.checkpoint.dir == "adapters" and cfg.logging.wandb and cfg.logging.wandb_project == "p"
    text = "\n".join(t.notes)
    assert "batch_size 8 is mlx-lm's global batch: training.batch_size 4 per rank on 2 ranks" in text
    assert "iters 100 are micro-batches in mlx-lm: training.steps 50 optimizer updates" in text
    assert "mlx-dp eval c.yaml" in text


@pytest.mark.parametrize("config,message", [
    ({"model": "m", "itres": 3}, "unknown mlx_lm.lora config key itres; did you mean iters?"),
    ({"model": "m", "batch_size": 3}, "batch_size 3 is mlx-lm's global batch, which must split evenly over the 2"),
    ({"model": "m", "resume_adapter_file": "a.safetensors"}, "resume_adapter_file has no recipe equivalent"),
    ({"model": "m", "optimizer": "muon"}, "optimizer muon has no recipe equivalent"),
    ({"model": "m", "optimizer_config": {"adam": {"betas": [0.9, 0.9], "lr": 1}}}, "does not take: lr"),
    ({"model": "m", "lr_schedule": {"name": "exponential_decay", "arguments": [1e-4, 0.9]}}, "exponential_decay"),
])
def test_what_cannot_train_alike_is_one_sentence_naming_the_key(config, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        translate(config, "c.yaml", world_size=2)


@pytest.mark.parametrize("config,plan", [
    ({"train": True}, "train"),
    ({}, "train"),  # train left out: mlx-dp train stands for mlx_lm.lora --train
    ({"train": False, "test": True}, "test"),
    ({"train": False}, "nothing"),  # mlx_lm.lora: "Must provide at least one of --train or --test"
    ({"train": True, "iters": 0}, "idle"),  # mlx-lm runs no micro-batch, so no update
    ({"train": True, "iters": 3, "grad_accumulation_steps": 4}, "idle"),  # 3 micro-batches never reach an update
    ({"train": True, "iters": 0, "test": True}, "idle"),
    ({"train": True, "iters": 4, "grad_accumulation_steps": 4, "test": True}, "train"),
])
def test_what_train_does_with_train_test_and_iters_is_mlx_lms(config, plan):
    t = translate({"model": "m", **config}, "c.yaml")
    assert t.plan == plan
    assert (t.plan_note == "") == (plan == "train")
    if plan != "train":
        header = t.recipe_yaml().split("\n\n")[0]
        assert t.plan_note in header and t.as_recipe() in header, "recipes cp says what the config means"
    cfg = build_config(t.recipe)  # the recipe stays a valid one, for recipes cp and mlx-dp eval
    if config.get("test") and plan != "train":  # the eval section scores the test split as mlx-lm's test does
        assert cfg.eval.max_batches == DEFAULTS["test_batches"] and not cfg.eval.exact_match
    else:
        assert cfg.eval.max_batches == DEFAULTS["val_batches"] and cfg.eval.exact_match


def test_train_and_test_keeps_a_note_to_eval_afterwards():
    t = translate({"model": "m", "train": True, "test": True, "test_batches": -1}, "c.yaml")
    assert t.plan == "train"
    assert any("mlx-dp eval c.yaml eval.max_batches=null afterwards" in note for note in t.notes)


@pytest.mark.parametrize("report_to,wandb", [("wandb", True), (" WandB, ", True), ("", False), (",", False)])
def test_report_to_wandb_as_mlx_lm_splits_it(report_to, wandb):
    t = translate({"model": "m", "report_to": report_to, "project_name": "p"}, "c.yaml")
    assert build_config(t.recipe).logging.wandb is wandb


@pytest.mark.parametrize("report_to,message", [
    ("swanlab", "report_to 'swanlab' names swanlab, which mlx-dp does not report to"),
    ("wandb,swanlab", "report_to 'wandb,swanlab' names swanlab, which mlx-dp does not report to"),
    ("tensorboard", "report_to 'tensorboard' names 'tensorboard', which is not a reporter of mlx-lm (wandb, swanlab)"),
    (["wandb"], "report_to must be a string such as wandb, got ['wandb']"),
])
def test_a_reporter_mlx_dp_lacks_is_one_sentence(report_to, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"c.yaml: {message}")):
        translate({"model": "m", "report_to": report_to}, "c.yaml")


@pytest.mark.parametrize("config,message", [
    ({"iters": "ten"}, "iters must be an integer, got 'ten'"),
    ({"iters": -1}, "iters must be >= 0, got -1"),
    ({"train": "yes"}, "train must be true or false, got 'yes'"),
    ({"test": 1}, "test must be true or false, got 1"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"grad_accumulation_steps": 0}, "grad_accumulation_steps must be at least 1, got 0"),
    ({"learning_rate": "fast"}, "learning_rate must be a number, got 'fast'"),
    ({"val_batches": 0}, "val_batches must be -1 (the whole split) or a positive count, got 0"),
    ({"test_batches": -2}, "test_batches must be -1 (the whole split) or a positive count, got -2"),
    ({"steps_per_eval": 0}, "steps_per_eval must be at least 1, got 0"),
    ({"optimizer": ["adam"]}, "optimizer must be a string, got ['adam']"),
    ({"optimizer_config": {"adam": 3}}, "optimizer_config.adam must be a mapping, as mlx-lm's is, got 3"),
    ({"optimizer_config": {"adam": {"betas": "high"}}}, "optimizer_config.adam takes numbers"),
    ({"lora_parameters": {"rank": "eight"}}, "lora_parameters: rank must be an integer, got 'eight'"),
    ({"lr_schedule": {"name": "cosine_decay", "arguments": ["a", 10]}}, "lr_schedule cosine_decay takes numbers"),
    ({"lr_schedule": {"name": "cosine_decay", "arguments": [1e-4]}}, "lr_schedule cosine_decay takes numbers"),
])
def test_a_value_of_the_wrong_kind_is_one_sentence_naming_the_key(config, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"c.yaml: {message}")):
        translate({"model": "m", **config}, "c.yaml")


def _config_file(tmp_path, **config) -> str:
    path = tmp_path / "mlxlm.yaml"
    path.write_text(yaml.safe_dump({"model": str(TINY_MODEL), "data": str(TINY_DATA), "batch_size": 4,
                                    "adapter_path": str(tmp_path / "adapters"), **config}))
    return str(path)


@pytest.fixture
def no_training(monkeypatch):
    import trainer.run.loop

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(trainer.run.loop, "train", refuse)


@pytest.mark.parametrize("config,code,said", [
    ({"train": False}, 2, "mlx-dp: error: {path}: train: false and test: false: the config does nothing, which "
                          "mlx_lm.lora refuses too"),
    ({"train": True, "iters": 0}, 0, "[mlx-dp] {path} is an mlx_lm.lora config: iters 0 add up to no optimizer update "
                                     "(grad_accumulation_steps 1): mlx-dp train trains nothing and writes nothing"),
    ({"train": True, "iters": 3, "grad_accumulation_steps": 4}, 0, "mlx-dp train trains nothing and writes nothing"),
])
def test_a_config_that_trains_nothing_says_so_and_writes_nothing(tmp_path, capsys, no_training, config, code, said):
    from trainer.cli import main

    path = _config_file(tmp_path, **config)
    with pytest.raises(SystemExit) as end:
        main(["train", path])
    out = capsys.readouterr()
    assert end.value.code == code, out.err
    assert said.format(path=path) in out.out + out.err and "Traceback" not in out.err
    assert not (tmp_path / "adapters").exists()


@pytest.mark.parametrize("name,arguments,warmup,init", [
    ("cosine_decay", [1e-3, 10, 1e-5], 0, 0.0), ("cosine_decay", [1e-3, 8, 0.0], 2, 1e-6),
    ("linear_schedule", [5e-4, 1e-5, 7], 3, 0.0), ("cosine_decay", [1e-3, 20], 0, 0.0)])
def test_the_schedule_is_mlx_lms_update_by_update(name, arguments, warmup, init):
    from mlx_lm.tuner.utils import build_schedule as theirs

    from trainer.step.optimizer import build_schedule

    entry = {"name": name, "arguments": arguments, **({"warmup": warmup, "warmup_init": init} if warmup else {})}
    updates = arguments[1 if name == "cosine_decay" else 2] + (warmup + 1 if warmup else 0)
    t = translate({"model": "m", "iters": updates, "lr_schedule": entry}, "c.yaml")
    training = build_config(t.recipe).training
    ours, mlx_lm = build_schedule(training, training.steps), theirs(entry)
    for step in range(updates):
        assert float(ours(mx.array(step))) == pytest.approx(float(mlx_lm(mx.array(step))), rel=1e-5, abs=1e-10), step
    assert not any(note.startswith("differs") for note in t.notes)
    longer = translate({"model": "m", "iters": updates + 5, "lr_schedule": entry}, "c.yaml")
    assert any("mlx-lm decays over" in note for note in longer.notes), "a different decay length is said"


@pytest.mark.e2e
def test_train_and_cp_take_an_mlx_lm_config(tmp_path):
    config = {"model": str(TINY_MODEL), "train": True, "data": str(TINY_DATA), "batch_size": 4, "iters": 3,
              "val_batches": 1, "learning_rate": 1e-4, "adapter_path": str(tmp_path / "adapters"),
              "max_seq_length": 64, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}
    path = tmp_path / "mlxlm.yaml"
    path.write_text(yaml.safe_dump(config))
    result = mlx_dp("train", str(path), "logging.progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is an mlx_lm.lora config; it trains as this recipe" in result.stdout
    assert (tmp_path / "adapters" / "adapters.safetensors").is_file()
    assert read_status(tmp_path / "adapters")["step"] == 3
    from mlx_lm import load

    load(str(TINY_MODEL), adapter_path=str(tmp_path / "adapters"))  # mlx-lm reads what mlx-dp wrote
    out = tmp_path / "recipe.yaml"
    assert mlx_dp("recipes", "cp", str(path), str(out), "--ranks", "2").returncode == 0
    assert yaml.safe_load(out.read_text())["training"]["batch_size"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config, "batchsize": 4}))
    result = mlx_dp("train", str(bad))
    assert result.returncode == 2 and "unknown mlx_lm.lora config key batchsize" in one_error_line(result)


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.e2e
def test_a_config_with_train_false_tests_and_leaves_the_adapters_byte_for_byte(tmp_path):
    """train: false, test: true scores the adapters at adapter_path (as mlx-dp eval does) and writes nothing."""
    base = {"model": str(TINY_MODEL), "data": str(TINY_DATA), "batch_size": 4, "val_batches": 1,
            "learning_rate": 1e-3, "adapter_path": str(tmp_path / "adapters"), "max_seq_length": 64,
            "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}
    trained = tmp_path / "train.yaml"
    trained.write_text(yaml.safe_dump({**base, "train": True, "iters": 2}))
    assert mlx_dp("train", str(trained), "logging.progress_bar=false").returncode == 0
    before = _files(tmp_path / "adapters")
    assert "adapters.safetensors" in before
    tested = tmp_path / "test.yaml"
    tested.write_text(yaml.safe_dump({**base, "train": False, "test": True, "test_batches": 3, "iters": 500}))
    result = mlx_dp("train", str(tested))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: false, test: true: as mlx_lm.lora does, mlx-dp train trains nothing" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("test: loss"))
    evaluated = mlx_dp("eval", str(tested))  # the same path as mlx-dp eval, on the same batches
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert line in evaluated.stdout.splitlines()
    assert "exact match" not in line, "mlx-lm's test scores the loss (and perplexity) only"
    assert _files(tmp_path / "adapters") == before, "nothing at adapter_path changes"
    out = tmp_path / "recipe.yaml"
    copied = mlx_dp("recipes", "cp", str(tested), str(out))
    assert copied.returncode == 0 and "note: train: false, test: true" in copied.stdout
    assert "# train: false, test: true" in out.read_text()


def test_hf_dataset_takes_a_list_like_mlx_lm(tmp_path):
    """Two datasets (local JSON through datasets' own loader) concatenate split by split."""
    from mlx_lm import load

    from trainer.data.tokenized import load_splits

    rows = [json.loads(line) for line in (TINY_DATA / "train.jsonl").read_text().splitlines()][:40]
    for name, part in (("a.jsonl", rows[:20]), ("b.jsonl", rows[20:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    entries = [{"path": "json", "config": {"data_files": str(tmp_path / name)}, "train_split": "train[:15]",
                "valid_split": "train[15:]"} for name in ("a.jsonl", "b.jsonl")]
    _, tokenizer = load(str(TINY_MODEL))
    cfg = build_config({"model": {"path": "x"}, "data": {"hf_dataset": entries, "cache_dir": str(tmp_path / "c")}})
    splits = load_splits(cfg.data, tokenizer, show_progress=False)
    one = build_config({"model": {"path": "x"}, "data": {"hf_dataset": entries[0], "cache_dir": str(tmp_path / "c")}})
    first = load_splits(one.data, tokenizer, show_progress=False)
    assert len(splits["train"]) == 30 and len(splits["valid"]) == 10
    assert splits["train"].sample(3).tolist() == first["train"].sample(3).tolist(), "the first dataset comes first"
    assert " + " in splits["train"].source
    with pytest.raises(ConfigError, match=r"data.hf_dataset\[1\] needs a `path`"):
        build_config({"model": {"path": "x"}, "data": {"hf_dataset": [entries[0], {"name": "x"}]}})
    with pytest.raises(ConfigError, match="empty list"):
        build_config({"model": {"path": "x"}, "data": {"hf_dataset": []}})


def test_every_library_recipe_is_not_mistaken_for_an_mlx_lm_config():
    from trainer.config.load import read_recipe
    from trainer.tools.recipes import all_recipes

    assert all(not is_mlx_lm_config(read_recipe(p)) for p in all_recipes(ROOT / "recipes"))
