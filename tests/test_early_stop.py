"""Early stopping: a plateaued run ends as completed, on every rank at the same update, with its best adapters."""

import pytest

from conftest import MLX_DP, launched, mlx_dp, read_metrics, read_status, read_weights, tiny_recipe
from trainer.config.load import load_config
from trainer.errors import ConfigError

# A learning rate the tiny model cannot take: validation gets worse, so the run plateaus within a few evaluations.
HOT = {"training": {"steps": 400, "batch_size": 2, "learning_rate": 3e-3},
       "eval": {"every": 2, "max_batches": 1, "early_stop_patience": 2}, "checkpoint": {"every": 100}}


@pytest.mark.e2e
def test_a_plateau_ends_the_run_completed_on_every_rank_with_the_best_adapters(tmp_path):
    result = launched(2, "train", str(tiny_recipe(tmp_path, **HOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    status = read_status(run_dir)
    assert status["state"] == "completed" and status["step"] < 400, status
    assert status["reason"].startswith("early stop: val_loss did not improve by 0 for 2 evaluation(s)")
    event = next(m for m in read_metrics(run_dir) if m.get("event") == "early_stop")
    assert event["step"] == status["step"] and event["since"] == 2 and event["metric"] == "val_loss"
    best = run_dir / event["checkpoint"]
    assert best.is_dir(), "the best evaluation was saved when it was the best"
    final, kept = read_weights(run_dir), read_weights(best)
    assert all((final[k] == kept[k]).all() for k in final), "the final adapters are the best evaluation's"
    assert f"the final adapters are update {event['best_step']}'s" in result.stdout
    val = [m for m in read_metrics(run_dir) if "val_loss" in m and m["step"] > 0]
    assert min(val, key=lambda m: m["val_loss"])["step"] == event["best_step"]


@pytest.mark.e2e
def test_a_resumed_run_stops_where_the_uninterrupted_one_does(tmp_path):
    whole = mlx_dp("train", str(tiny_recipe(tmp_path / "whole", **HOT)))
    assert whole.returncode == 0, whole.stderr[-3000:]
    recipe = str(tiny_recipe(tmp_path / "parts", **HOT))
    stopped = mlx_dp("train", recipe, faults="stop:step=3")
    assert stopped.returncode == 128 + 15, stopped.stderr[-2000:]  # a clean stop (SIGTERM's status)
    resumed = mlx_dp("train", recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_status(tmp_path / "parts" / "run")["step"] == read_status(tmp_path / "whole" / "run")["step"]


def test_early_stopping_without_evaluations_to_watch_is_one_sentence(tmp_path):
    from trainer.run.early_stop import EarlyStop
    from trainer.state.progress import TrainingState

    cfg = load_config(tiny_recipe(tmp_path, eval={"every": 0, "early_stop_patience": 3}))
    with pytest.raises(ConfigError, match="needs a validation split and eval.every > 0"):
        EarlyStop(cfg, TrainingState(), has_valid=True)
    cfg = load_config(tiny_recipe(tmp_path, eval={"every": 5, "early_stop_patience": 3,
                                                   "early_stop_metric": "val_reward"}))
    with pytest.raises(ConfigError, match="val_reward is not a validation metric of this objective; it logs val_loss"):
        EarlyStop(cfg, TrainingState(), has_valid=True).observe({"val_loss": 1.0})
