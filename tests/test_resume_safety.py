"""A resume continues the same training, or says why not: recipe and data diffs, too few steps, damaged checkpoints."""

import pytest
import json
import shutil

from conftest import TINY_DATA, mlx_dp, one_error_line, tiny_recipe

pytestmark = pytest.mark.e2e  # every test here starts real processes


def metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_changed_recipe_data_or_too_few_steps_are_refused_unless_allowed(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(TINY_DATA, data)
    recipe = str(tiny_recipe(tmp_path, data={"path": str(data)}, training={"steps": 2}))
    assert mlx_dp("train", recipe).returncode == 0
    refused = mlx_dp("train", recipe, "training.steps=4", "training.learning_rate=0.5", "training.seed=3", "--resume")
    assert refused.returncode == 2
    line = one_error_line(refused)
    assert "step_0000002 was trained with another recipe or data: training.learning_rate 0.001 -> 0.5, " \
           "training.seed 0 -> 3. Resume with --allow-changes" in line
    short = mlx_dp("train", recipe, "training.steps=1", "--resume")
    assert short.returncode == 2
    assert "is at update 2, past this run's 1 updates (training.steps); raise training.steps above 2" in \
        one_error_line(short)
    # length, cadence, reporting and parallel keys may change; the recipe comes first even after --resume
    fine = mlx_dp("train", "--resume", recipe, "training.steps=3", "checkpoint.every=1", "eval.every=1",
                  "logging.every=2", "parallel.timeout_s=30")
    assert fine.returncode == 0, fine.stderr[-2000:]
    assert "resumed from" in fine.stdout
    # the same path with other samples in it
    train = data / "train.jsonl"
    train.write_text("".join(reversed(train.read_text().splitlines(keepends=True))))
    refused = mlx_dp("train", recipe, "training.steps=4", "--resume")
    assert refused.returncode == 2 and "training data" in one_error_line(refused)
    allowed = mlx_dp("train", recipe, "training.steps=4", "training.learning_rate=0.002", "--resume", "--allow-changes")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    record = [m for m in metrics(tmp_path) if m.get("event") == "resumed"][-1]
    assert record["step"] == 3 and record["allowed_by"] == "--allow-changes"
    assert record["changes"]["training.learning_rate"] == [0.001, 0.002] and "training data" in record["changes"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    recipe = str(tiny_recipe(tmp_path, training={"steps": 6}, checkpoint={"every": 2, "keep_last": 3}))
    assert mlx_dp("train", recipe).returncode == 0
    root = tmp_path / "run" / "checkpoints"
    weights = root / "step_0000006" / "adapters.safetensors"
    flipped = bytearray(weights.read_bytes())
    flipped[-64] ^= 0xFF  # one byte inside a tensor: the file still loads, only the checksum can tell
    weights.write_bytes(bytes(flipped))
    state = root / "step_0000004" / "optimizer.safetensors"
    state.write_bytes(state.read_bytes()[:200])  # truncated
    result = mlx_dp("train", recipe, "training.steps=7", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipping damaged checkpoint step_0000006: adapters.safetensors does not match its sha256 checksum" \
        in result.stdout
    assert "skipping damaged checkpoint step_0000004: optimizer.safetensors is truncated or corrupt (200 bytes" in result.stdout
    assert "resumed from" in result.stdout and "step_0000002 at update 2" in result.stdout
    record = [m for m in metrics(tmp_path) if m.get("event") == "resumed"][-1]
    assert len(record["skipped_checkpoints"]) == 2
    # a checkpoint named on the command line is not replaced by another one
    weights = root / "step_0000007" / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    named = mlx_dp("train", recipe, "training.steps=8", "--resume", str(root / "step_0000007"))
    assert named.returncode == 2
    assert "step_0000007 is damaged: adapters.safetensors does not match its sha256" in one_error_line(named)
