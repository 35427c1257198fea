"""Bad input ends with one clear line and a non-zero exit, never a traceback or a hang."""

import pytest
import json
import shutil

from conftest import TINY_MODEL, launched, mlx_dp, one_error_line, tiny_recipe

pytestmark = pytest.mark.e2e  # every test here starts real processes


def test_recipe_that_is_not_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\n data: [\n")
    result = mlx_dp("train", str(bad))
    assert result.returncode == 2 and f"recipe {bad} is not valid YAML at line" in one_error_line(result)


def test_empty_recipe_and_empty_data(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = mlx_dp("train", str(empty))
    assert result.returncode == 2 and "is empty" in one_error_line(result)
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    result = mlx_dp("train", str(tiny_recipe(tmp_path)), f"data.path={data}")
    assert result.returncode == 2 and f"data file {data} is empty" in one_error_line(result)


def test_rows_without_a_usable_field(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "a", "answer": "b"}\n' * 8)
    result = mlx_dp("train", str(tiny_recipe(tmp_path)), f"data.path={data}")
    assert result.returncode == 2 and "have no usable field" in one_error_line(result)


def test_a_malformed_data_file_is_our_one_sentence_alone(tmp_path):
    """Nothing of datasets, pyarrow or pandas (their log lines, a progress bar) comes before our line, and the
    line and column it names are the row's."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "ok one"}\n{"text": "ok two"}\n{"text": "cut short her\n{"text": "ok"}\n')
    table = tmp_path / "rows.csv"
    table.write_text('prompt,completion\na,b\n"c,d\n')
    for path, message in ((data, f"{data} line 3 is not valid JSON (the row ends at column 23 inside a string "
                                 "that opens at column 10)"),
                          (table, f"could not load {table}: Error tokenizing data")):
        result = mlx_dp("train", str(tiny_recipe(tmp_path)), f"data.path={path}")
        assert result.returncode == 2 and message in one_error_line(result)
        printed = result.stdout + result.stderr
        assert "Failed to" not in printed and "Generating train split" not in printed, printed
        assert "ArrowInvalid" not in printed and "pandas" not in printed, printed


def test_all_rows_longer_than_max_seq_length(tmp_path):
    result = mlx_dp("train", str(tiny_recipe(tmp_path)), "data.max_seq_length=4")
    assert result.returncode == 2
    assert "are longer than data.max_seq_length=4 tokens" in one_error_line(result)


def test_checkpoint_from_a_different_model_or_method(tmp_path):
    recipe = str(tiny_recipe(tmp_path, training={"steps": 2}))
    assert mlx_dp("train", recipe).returncode == 0
    result = mlx_dp("train", recipe, "method.rank=8", "--resume")
    assert result.returncode == 2
    assert "does not fit this model and method" in one_error_line(result)


def test_truncated_checkpoint_and_truncated_model(tmp_path):
    recipe = str(tiny_recipe(tmp_path, training={"steps": 2}))
    assert mlx_dp("train", recipe).returncode == 0
    weights = tmp_path / "run" / "checkpoints" / "step_0000002" / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = mlx_dp("train", recipe, "--resume")
    assert result.returncode == 2 and "truncated or corrupt" in one_error_line(result)
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    file = model / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    result = mlx_dp("train", recipe, f"model.path={model}", "checkpoint.dir=" + str(tmp_path / "run2"))
    assert result.returncode == 2 and f"could not load model {model}" in one_error_line(result)


def test_hostfile_check_accepts_a_distributed_config_hostfile(tmp_path):
    # written by the same code mlx.distributed_config --output-hostfile uses (README, cluster guide)
    from mlx._distributed_utils.common import Host, Hostfile
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps(Hostfile([Host(0, "mac1.local", ["192.168.2.1"], []),
                                             Host(1, "mac2.local", ["192.168.2.2"], [])], "ring").to_json()))
    result = mlx_dp("hostfile", "check", str(hostfile))
    assert result.returncode == 0, result.stderr
    assert "2 hosts, each listed once: mac1.local (192.168.2.1), mac2.local (192.168.2.2)" in result.stdout


def test_hostfile_that_lists_a_host_twice(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps({"backend": "ring", "hosts": [
        {"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]},
        {"ssh": "mac1", "ips": ["10.0.0.1"]}]}))
    result = mlx_dp("hostfile", "check", str(hostfile))
    assert result.returncode == 2
    assert f"hostfile {hostfile} lists host mac1 twice (entries 0 and 2)" in one_error_line(result)
    # the per-rank ring hostfile with an address twice is refused before connecting
    ring = tmp_path / "ring.json"
    ring.write_text(json.dumps([["127.0.0.1:45111"], ["127.0.0.1:45111"]]))
    result = mlx_dp("train", str(tiny_recipe(tmp_path)), env={"MLX_HOSTFILE": str(ring), "MLX_RANK": "0"})
    assert result.returncode == 2
    assert "lists 127.0.0.1:45111 for both rank 0 and rank 1" in one_error_line(result)


def test_resume_on_another_world_size_with_the_same_global_batch(tmp_path):
    recipe = str(tiny_recipe(tmp_path, training={"steps": 4}, checkpoint={"every": 2}))
    first = launched(2, "train", recipe, "training.batch_size=1", "training.steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    # 2 ranks x 1 -> 1 rank x 2: same global batch, so it continues
    more = mlx_dp("train", recipe, "training.batch_size=2", "--resume")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "resumed from" in more.stdout
    # a different global batch is refused unless allowed
    refused = mlx_dp("train", recipe, "training.batch_size=4", "training.steps=6", "--resume")
    assert refused.returncode == 2
    assert "global batch of 2" in one_error_line(refused) and "allow_world_size_change" in one_error_line(refused)
    allowed = mlx_dp("train", recipe, "training.batch_size=4", "training.steps=6", "--resume",
                     "parallel.allow_world_size_change=true")
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path):
    import time

    recipe = str(tiny_recipe(tmp_path))
    start = time.monotonic()
    result = mlx_dp("train", recipe, "model.path=data/tiny-lama", env={"HF_HUB_OFFLINE": "0"})
    assert result.returncode == 2 and time.monotonic() - start < 20
    assert "model.path data/tiny-lama: no such file or directory (did you mean data/tiny-llama?)" in \
        one_error_line(result)
    result = mlx_dp("train", recipe, "data.path=data/tiny-tsk", env={"HF_HUB_OFFLINE": "0"})
    assert result.returncode == 2 and "(did you mean data/tiny-task?)" in one_error_line(result)
    # offline, a hub id that is not cached fails at once, in words
    result = mlx_dp("train", recipe, "model.path=nobody/no-such-model")
    assert result.returncode == 2
    assert "is neither a local directory nor in the hub cache, and HF_HUB_OFFLINE=1" in one_error_line(result)
