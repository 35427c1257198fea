"""The trainer end to end through the real CLI, on one process and on two ranks."""

import json

import numpy as np
import pytest

from conftest import BIN, MLX_DP, TINY_MODEL, launched, mlx_dp, one_error_line, read_weights, run, tiny_recipe

pytestmark = pytest.mark.e2e  # every test here starts real processes

METRIC_KEYS = {"step", "train_loss", "learning_rate", "tokens_per_s", "step_time_s", "peak_memory_gb"}


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_adapters_load(run_dir):
    code = ("import sys; from mlx_lm import load, generate; "
            f"m, t = load({str(TINY_MODEL)!r}, adapter_path={str(run_dir)!r}); "
            "p = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True); "
            "generate(m, t, p, max_tokens=4); print(type(m.layers[0].self_attn.q_proj).__name__)")
    out = run([str(BIN / "python"), "-c", code])
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_one_process_trains_and_writes_everything(tmp_path):
    recipe = tiny_recipe(tmp_path, eval={"every": 2, "at_start": True})
    result = mlx_dp("train", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "global batch = 4 x 1 x 1 = 4 sequences" in result.stdout
    run_dir = tmp_path / "run"
    for name in ("adapters.safetensors", "adapter_config.json", "config.yaml", "metrics.jsonl", "status.json"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if "train_loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert all(METRIC_KEYS <= set(m) for m in train)
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 2, 4]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert json.loads((run_dir / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
    assert assert_adapters_load(run_dir) == "LoRALinear"


def test_two_ranks_under_mlx_launch(tmp_path):
    recipe = tiny_recipe(tmp_path, training={"batch_size": 2, "steps": 3})
    result = run([str(BIN / "mlx.launch"), "-n", "2", "--", MLX_DP, "train", str(recipe)], timeout=400)
    assert result.returncode == 0, result.stderr
    assert "global batch = 2 x 2 x 1 = 4 sequences" in result.stdout
    assert result.stdout.count("global batch =") == 1, "only rank 0 prints"
    run_dir = tmp_path / "run"
    steps = [m["step"] for m in read_metrics(run_dir) if "train_loss" in m]
    assert steps == [1, 2, 3], "metrics must be written once, by rank 0"
    assert all(m["world_size"] == 2 for m in read_metrics(run_dir) if "train_loss" in m)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["rank"] == 0
    assert assert_adapters_load(run_dir) == "LoRALinear"


def test_adapter_dropout_acts_while_training(tmp_path):
    """mlx_lm.load returns a model in eval mode, where dropout is a no-op; training must switch it on."""
    weights = {}
    for dropout in (0.0, 0.5):
        recipe = tiny_recipe(tmp_path / str(dropout), method={"type": "lora", "rank": 4, "scale": 4.0,
                                                              "dropout": dropout}, training={"steps": 2})
        assert mlx_dp("train", str(recipe)).returncode == 0
        weights[dropout] = read_weights(tmp_path / str(dropout) / "run")
    assert any(not np.array_equal(weights[0.0][k], weights[0.5][k]) for k in weights[0.0])


def test_full_fine_tune_writes_weights_mlx_lm_loads(tmp_path):
    recipe = tiny_recipe(tmp_path, method={"type": "full"}, training={"steps": 2, "learning_rate": 1e-4})
    result = mlx_dp("train", str(recipe))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["fine_tune_type"] == "full"
    assert assert_adapters_load(tmp_path / "run") == "Linear"


@pytest.mark.parametrize("override, expected", [
    ("training.batch_sise=4", "unknown key training.batch_sise; did you mean training.batch_size?"),
    ("training.batch_size=four", "training.batch_size must be an integer, got 'four'"),
    ("model.path=/nonexistent/model", "model.path /nonexistent/model does not exist"),
    ("data.path=/nonexistent/data.jsonl", "data.path /nonexistent/data.jsonl does not exist"),
    ("training.batch_size=100000", "fewer than one global batch of 100000"),
])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, override, expected):
    result = mlx_dp("train", str(tiny_recipe(tmp_path)), override)
    assert result.returncode == 2, result.stderr
    assert expected in one_error_line(result)


def test_malformed_row_is_named_by_file_and_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine."}\n' * 5 + '{"text": oops}\n')
    result = mlx_dp("train", str(tiny_recipe(tmp_path)), f"data.path={data}")
    assert result.returncode == 2
    assert f"{data} line 6 is not valid JSON" in one_error_line(result)


def test_bad_input_on_two_ranks_exits_nonzero_without_hanging(tmp_path):
    result = launched(2, "train", str(tiny_recipe(tmp_path)), "training.batch_size=100000", timeout=120)
    assert result.returncode == 2
    assert "fewer than one global batch" in result.stderr and "Traceback" not in result.stderr
