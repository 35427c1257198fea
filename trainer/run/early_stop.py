"""Early stopping (``eval.early_stop_patience``): a plateaued run ends as completed, with its best adapters.

After each evaluation the watched metric (``eval.early_stop_metric``: the
validation loss, or one of the objective's validation metrics) either improves
on the best so far by at least ``eval.early_stop_min_delta``, or it does not.
An improving evaluation is saved as a checkpoint (so the best weights exist on
disk, as the HF Trainer's ``load_best_model_at_end`` needs its saves aligned
with its evaluations); after ``patience`` evaluations in a row without one, the
run ends. Whether it ends, or completes its steps, the final
``adapters.safetensors`` is the best evaluation's, and the console says which
update that was.

The count lives in the training state (``TrainingState.early_stop``), so a
resumed run stops where the uninterrupted one would. The metric is summed over
ranks before anyone reads it: every rank takes the same decision.
"""

from pathlib import Path

from .. import log
from ..errors import ConfigError
from ..state import checkpoint


class EarlyStop:
    """The watched metric's best value, its update and checkpoint, and evaluations since it improved.

    Args:
        cfg (trainer.config.load.Config): The recipe (``eval``).
        state (trainer.state.progress.TrainingState): Where the count is kept (and resumed from).
        has_valid (bool): The run has a validation split.

    Raises:
        ConfigError: Early stopping asked for without evaluations to watch.
    """

    def __init__(self, cfg, state, has_valid: bool):
        e = cfg.eval
        self.patience, self.delta, self.metric, self.state = e.early_stop_patience, e.early_stop_min_delta, \
            e.early_stop_metric, state
        self.lower = "loss" in self.metric or "perplexity" in self.metric
        if self.patience is not None and (not has_valid or not e.every):
            raise ConfigError("eval.early_stop_patience watches the evaluations during training: it needs a "
                              "validation split and eval.every > 0")

    @property
    def enabled(self) -> bool:
        return self.patience is not None

    def observe(self, record: dict) -> bool:
        """Count one evaluation; whether it improved on the best (its checkpoint is then to be saved)."""
        if not self.enabled:
            return False
        if self.metric not in record:
            raise ConfigError(f"eval.early_stop_metric {self.metric} is not a validation metric of this objective; "
                              f"it logs {', '.join(sorted(k for k in record if k.startswith('val_')))}")
        value, kept = float(record[self.metric]), self.state.early_stop or {"since": 0}
        best = kept.get("best")
        better = best is None or (value < best - self.delta if self.lower else value > best + self.delta)
        if better:
            kept = {"best": value, "step": self.state.step, "since": 0,
                    "checkpoint": str(Path(checkpoint.CHECKPOINTS) / checkpoint.step_dir_name(self.state.step))}
        else:
            kept["since"] += 1
        self.state.early_stop = kept
        return better

    def plateaued(self) -> bool:
        return self.enabled and self.state.early_stop is not None and self.state.early_stop["since"] >= self.patience

    def reason(self) -> str:
        kept = self.state.early_stop
        return (f"early stop: {self.metric} did not improve by {self.delta:g} for {self.patience} evaluation(s); "
                f"the final adapters are update {kept['step']}'s ({self.metric} {kept['best']:.4f})")

    def record(self) -> dict:
        """The best evaluation, for metrics.jsonl."""
        kept = self.state.early_stop
        return {"metric": self.metric, "best": kept["best"], "best_step": kept["step"], "since": kept["since"],
                "checkpoint": kept["checkpoint"]}

    def keep(self, run_dir: Path) -> set:
        """The best evaluation's checkpoint, which pruning spares."""
        kept = self.state.early_stop
        return {Path(run_dir) / kept["checkpoint"]} if self.enabled and kept else set()

    def finish(self, run_dir: Path, adapter_config: dict) -> None:
        """Rank 0: the best evaluation's adapters become the run's ``adapters.safetensors``."""
        kept = self.state.early_stop
        if not self.enabled or not kept:
            return
        best = Path(run_dir) / kept["checkpoint"]
        weights = checkpoint.load_arrays(best / "adapters.safetensors", "weights")
        checkpoint.save_adapters(Path(run_dir), weights, adapter_config)
        log.info(f"the final adapters are the best evaluation's: update {kept['step']} ({self.metric} "
                 f"{kept['best']:.4f}), from {best}")
