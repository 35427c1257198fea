"""data.hf_dataset (split expressions, column names) and wandb in offline mode."""

import json
import struct

import pytest

from conftest import mlx_dp, tiny_recipe
from trainer.config.load import build_config
from trainer.errors import ConfigError

pytestmark = pytest.mark.e2e  # every test here starts real processes


def test_hf_dataset_splits_and_column_mapping(tmp_path):
    import datasets

    rows = [{"question": f"what does pet {i} eat?", "answer": f"pet {i} eats fish."} for i in range(50)]
    folder = tmp_path / "qa"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    recipe = tiny_recipe(tmp_path, data={"path": None, "hf_dataset": {
        "path": str(folder), "train_split": "train[:40]", "valid_split": "train[40:]",
        "prompt_feature": "question", "completion_feature": "answer"}}, training={"steps": 2})
    result = mlx_dp("train", str(recipe), "eval.at_start=true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "40 training samples" in result.stdout
    with pytest.raises(ConfigError, match="unknown key data.hf_dataset.trian_split; did you mean data.hf_dataset.train_split"):
        build_config({"model": {"path": "m"}, "data": {"hf_dataset": {"path": "x", "trian_split": "train"}}})


def wandb_records(path):
    """Records of a .wandb file (LevelDB log format: 32 KiB blocks of CRC-framed chunks of protobufs).

    wandb 0.31 keeps an offline run's metrics only in this file; its Python reader is gone.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def test_wandb_offline_run_holds_the_metrics(tmp_path):
    recipe = tiny_recipe(tmp_path, logging={"wandb": True, "wandb_project": "mlx-dp-test", "every": 1},
                         training={"steps": 3})
    result = mlx_dp("train", str(recipe), env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wandb: offline run" in result.stdout
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "only rank 0 creates a run"
    history, config = [], {}
    for record in wandb_records(next(runs[0].glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif kind == "run":
            config.update({"/".join(i.nested_key) or i.key: i.value_json for i in record.run.config.update})
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]
    for h, m in zip(history, [m for m in metrics if "train_loss" in m]):
        assert h["train_loss"] == pytest.approx(m["train_loss"]) and h["tokens_per_s"] == pytest.approx(m["tokens_per_s"])
    assert "val_loss" in history[-1] and history[-1]["checkpoint_step"] == 3
    assert history[1]["checkpoint"].endswith("checkpoints/step_0000002")
    assert {"world_size", "global_batch", "training"} <= set(config)
