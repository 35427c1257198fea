"""Every recipe key refuses a wrong type and an impossible value: exit 2, one line naming the key, no traceback.

Each value goes through the real CLI (``trainer.cli.main``) as a command-line override of a tiny recipe, so
the line must also blame the override rather than the recipe file. The config is checked before anything
loads: training is replaced by a failure here, so a value that slips through fails its case at once.
"""

import json
import types
import typing
from typing import Literal

import pytest

from conftest import tiny_recipe
from trainer.cli import main
from trainer.config.load import describe_keys
from trainer.config.schema import SECTION_CLASSES


class Valid:
    """A key for which every value of the right type is valid; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason


class With:
    """An impossible ``value`` that needs other overrides (``extra``) to be reached."""

    def __init__(self, value, *extra: str):
        self.value, self.extra = value, extra


# One entry per key of `mlx-dp recipes keys`: a value (or a list of values) no run can take, or Valid(why).
OUT_OF_RANGE = {
    "model.path": "",
    "model.dtype": "int4",
    "model.trust_remote_code": Valid("true or false: both are settings"),
    "method.type": "qlora",
    "method.rank": [0, 2**31],
    "method.scale": [0, -1.0],
    "method.dropout": [1.0, -0.1],
    "method.num_layers": [0, -2],
    "method.keys": [[], [""]],
    "method.objective": "ppo",
    "method.beta": -0.1,
    "method.label_smoothing": [0.5, -0.1],
    "method.orpo_lambda": -1,
    "method.group_size": [1, 2**31],
    "method.max_completion_tokens": 0,
    "method.temperature": [-0.1, 101],
    "method.epsilon": [0, 1.0],
    "method.epsilon_high": [0, -1],
    "method.updates_per_generation": 0,
    "method.loss_type": "ppo",
    "method.rewards": [[], With([{"kind": "nope"}], "method.objective=grpo"),
                       With([{"function": "no_such_module:f"}], "method.objective=grpo")],
    "eval.early_stop_patience": [0, 2**31],
    "eval.early_stop_min_delta": -0.1,
    "eval.early_stop_metric": "loss",
    "data.path": "",
    "data.hf_dataset": [With({"path": "x", "trian_split": "a"}, "data.path=null"), With([], "data.path=null"),
                        With({"path": "x", "train_split": 3}, "data.path=null")],
    "data.format": "xml",
    "data.text_feature": "",
    "data.prompt_feature": "",
    "data.completion_feature": "",
    "data.chat_feature": " ",
    "data.chosen_feature": "",
    "data.rejected_feature": "",
    "data.system_feature": "",
    "data.mask_prompt": Valid("true or false: both are settings"),
    "data.max_seq_length": [1, 2**31],
    "data.long_samples": "keep",
    "data.pad_multiple": 0,
    "data.packing": Valid("true or false: both are settings"),
    "data.prefetch": Valid("true or false: both are settings"),
    "data.pack_length": [1, 129],  # the tiny recipe's max_seq_length is 128
    "data.cache_dir": "",
    "data.mix": [With([], "data.path=null"), With([{"path": "a.jsonl", "wieght": 3}], "data.path=null"),
                 With([{"weight": 1}], "data.path=null"), With([{"path": "a.jsonl", "weight": 0}], "data.path=null"),
                 With([{"path": "a.jsonl", "hf_dataset": {"path": "x/y"}}], "data.path=null"),
                 [{"path": "a.jsonl"}]],  # beside data.path
    "data.epoch_size": [0, 2**31, 10],  # 10: without data.mix
    "data.streaming": Valid("true or false: both are settings"),
    "data.stream_rows": [0, 2**31, 10],  # 10: without data.streaming
    "data.stream_window": [0, 2**31],
    "training.batch_size": [0, 2**31],
    "training.grad_accumulation": 0,
    "training.steps": [0, -1, 2**31],
    "training.epochs": [0, -1.5, 1e10],
    "training.learning_rate": [0, -1e-4, 10**400],
    "training.optimizer": "lion",
    "training.weight_decay": -0.1,
    "training.betas": [[0.9, 1.0], [0.9], [-0.1, 0.9]],
    "training.eps": [0, -1e-8],
    "training.momentum": [1.0, -0.5],
    "training.lr_schedule": "exponential",
    "training.warmup_steps": [-1, 2**31],
    "training.warmup_init": With(-1.0, "training.warmup_steps=3"),
    "training.min_learning_rate": -1e-5,
    "training.max_grad_norm": [0, -1.0],
    "training.grad_checkpoint": Valid("true or false: both are settings"),
    "training.attention_block": [-1, 2**31],
    "training.fused_exp": "on",
    "training.clear_cache_threshold": [-2, 2**63, "never"],
    "training.skip_nonfinite": Valid("true or false: both are settings"),
    "training.chunked_loss": Valid("true or false: both are settings"),
    "training.seed": [-1, 2**64, 2**70],
    "eval.every": [-1, 2**31],
    "eval.at_start": Valid("true or false: both are settings"),
    "eval.max_batches": 0,
    "eval.batch_size": 0,
    "eval.split": "train",
    "eval.exact_match": Valid("true or false: both are settings"),
    "eval.max_new_tokens": [0, 2**31],
    "checkpoint.dir": "",
    "checkpoint.every": -1,
    "checkpoint.every_minutes": [0, -5.0],
    "checkpoint.keep_last": 0,
    "checkpoint.keep_best": Valid("true or false: both are settings"),
    "logging.every": 0,
    "logging.progress_bar": Valid("true or false: both are settings"),
    "logging.per_rank_timings": Valid("true or false: both are settings"),
    "logging.compute_timings": Valid("true or false: both are settings"),
    "logging.wandb": Valid("true or false: both are settings"),
    "logging.wandb_project": "",
    "logging.wandb_run_name": "",
    "parallel.backend": "gloo",
    "parallel.overlap": Valid("true or false: both are settings"),
    "parallel.bucket_mb": [0, -1.0],
    "parallel.first_bucket_mb": 0,
    "parallel.comm_stream": "side",
    "parallel.comm_dtype": "int8",
    "parallel.timeout_s": [0, 1e12],
    "parallel.peer_silence_s": [0, 1e12],
    "parallel.allow_world_size_change": Valid("true or false: both are settings"),
    "parallel.shard_optimizer": Valid("true or false: both are settings"),
    "parallel.pipeline": Valid("true or false: both are settings"),
    "parallel.pipeline_microbatches": [0, 2**31],
    "parallel.stage_layers": [[], [0, 3]],
    "parallel.balance": [[], [1, 0], [2, -1]],
}
KEYS = [key for key, _, _ in describe_keys()]


def _hint(key: str):
    section, name = key.split(".")
    return typing.get_type_hints(SECTION_CLASSES[section])[name]


def _kinds(hint) -> set:
    """The Python types of the YAML values a type hint takes."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return {type(a) for a in typing.get_args(hint)}
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(hint)))
    if origin in (list, dict):
        return {origin}
    return {float, int} if hint is float else {hint}


def wrong_type(hint):
    """A value of a type the hint does not take."""
    return next(v for v in ("word", 2.5, [1, 2], {"a": 1}) if type(v) not in _kinds(hint))


def _override(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: the override parses back to the same value


def _cases():
    for key in KEYS:
        yield pytest.param(key, [_override(key, wrong_type(_hint(key)))], id=f"{key}-type")
        entry = OUT_OF_RANGE.get(key)
        if entry is None or isinstance(entry, Valid):
            continue
        for i, value in enumerate(entry if isinstance(entry, list) else [entry]):
            case = value if isinstance(value, With) else With(value)
            yield pytest.param(key, [*case.extra, _override(key, case.value)], id=f"{key}-range{i}")


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    import trainer.run.loop

    def no_training(*args, **kwargs):
        raise AssertionError("the config was accepted and training started")

    monkeypatch.setattr(trainer.run.loop, "train", no_training)
    return str(tiny_recipe(tmp_path))


def refused(capsys, argv: list[str]) -> str:
    """Run ``mlx-dp ARGV`` in this process; the one error line it ends with (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as end:
        main(argv)
    err = capsys.readouterr().err
    assert end.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mlx-dp: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_every_key_has_an_out_of_range_entry():
    """A key added to the schema needs an entry here: an impossible value, or why every value is valid."""
    assert sorted(OUT_OF_RANGE) == sorted(KEYS), set(OUT_OF_RANGE) ^ set(KEYS)
    for key, entry in OUT_OF_RANGE.items():
        if _kinds(_hint(key)) == {bool}:
            assert isinstance(entry, Valid), f"{key}: a boolean has no impossible value"


@pytest.mark.parametrize("key, overrides", list(_cases()))
def test_a_wrong_or_impossible_value_is_one_sentence_naming_the_key_and_the_override(capsys, recipe, key,
                                                                                       overrides):
    line = refused(capsys, ["train", recipe, *overrides])
    assert key in line
    assert line.startswith(f"mlx-dp: error: command-line override {overrides[-1][:80]}"), line
    assert recipe not in line, "the recipe file is not to blame"


def test_a_mistake_in_the_file_names_the_file(capsys, tmp_path, monkeypatch, recipe):
    bad = tiny_recipe(tmp_path, name="bad.yaml", training={"seed": -1})
    line = refused(capsys, ["train", str(bad)])
    assert line.startswith(f"mlx-dp: error: {bad}: training.seed must be in [0, 2**64)"), line
    # an override of another key does not take the blame for the file's mistake
    line = refused(capsys, ["train", str(bad), "training.steps=2"])
    assert line.startswith(f"mlx-dp: error: {bad}: training.seed"), line
    # an override that fixes the file's value is fine; one that breaks a good file is blamed
    with pytest.raises(AssertionError, match="training started"):
        main(["train", str(bad), "training.seed=3"])
    line = refused(capsys, ["train", recipe, "training.seed=-1"])
    assert line == ("mlx-dp: error: command-line override training.seed=-1: training.seed must be in [0, 2**64) "
                    "(mx.random.seed takes an unsigned 64-bit seed), got -1"), line


def test_override_mistakes_and_objective_checks_blame_the_override(capsys, recipe):
    line = refused(capsys, ["train", recipe, "training.sed=1"])
    assert line.startswith("mlx-dp: error: command-line override training.sed=1: unknown key training.sed; "
                           "did you mean training.seed?"), line
    assert "override trainig.seed=1 names unknown section" in refused(capsys, ["train", recipe, "trainig.seed=1"])
    # a key the objective does not take, found after the schema (trainer.objectives)
    line = refused(capsys, ["train", recipe, "method.objective=dpo", "data.packing=true"])
    assert line.startswith("mlx-dp: error: command-line override data.packing=true: data.packing packs"), line
    # a value that cannot even be read, and the last override of a key is the one blamed
    assert "cannot be read" in refused(capsys, ["train", recipe, "training.seed=" + "9" * 5000])
    line = refused(capsys, ["train", recipe, "training.seed=1", "training.seed=-2"])
    assert line.startswith("mlx-dp: error: command-line override training.seed=-2:"), line
