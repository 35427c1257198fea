"""Resuming a run: pick an intact checkpoint, check it is the run it claims to continue, load it.

A resume continues *the same* training. So before anything is loaded:

* the checkpoint's files must match the checksums it was written with; a
  damaged newest checkpoint is skipped, with the reason, for the newest
  intact one (``trainer.state.checkpoint.verify``);
* the recipe must be the one it was trained with, apart from keys that may
  legitimately change on resume (:data:`FREE_ON_RESUME`), and the training
  data must hold the same samples. Anything else is refused with a short
  diff unless ``--allow-changes`` is given; the accepted changes are then
  recorded in ``metrics.jsonl`` (``trainer.run.loop``);
* ``training.steps`` must not be below the checkpoint's update.
"""

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import log
from ..state import checkpoint
from ..config.load import Config, yaml_load
from ..errors import CheckpointError, UserError, short
from .pick import LaunchCheckpoints, pick_shared

# Keys a resumed run may change: length, cadence, reporting, parallel settings
# (the global batch is checked on its own), memory-only switches and the cache.
FREE_ON_RESUME_SECTIONS = ("eval", "checkpoint", "logging", "parallel")
FREE_ON_RESUME = ("training.steps", "training.epochs", "training.batch_size", "training.grad_accumulation",
                  "training.grad_checkpoint", "training.attention_block", "training.fused_exp", "training.chunked_loss",
                  "training.clear_cache_threshold",
                  "training.skip_nonfinite",
                  "data.cache_dir")
ALLOW_FLAG = "--allow-changes"


@dataclass
class Resumed:
    """What a resume found, for the loop to report."""

    path: Path
    step: int
    skipped: list[str] = field(default_factory=list)  # "step_0000008: adapters.safetensors does not match ..."
    changes: dict = field(default_factory=dict)  # key -> [checkpoint's value, this run's value]

    def record(self) -> dict:
        """The ``metrics.jsonl`` record of this resume."""
        out = {"step": self.step, "event": "resumed", "checkpoint": str(self.path)}
        if self.skipped:
            out["skipped_checkpoints"] = self.skipped
        if self.changes:
            out["changes"] = self.changes
            out["allowed_by"] = ALLOW_FLAG
        return out


def _flatten(recipe: dict) -> dict:
    return {f"{section}.{key}": value for section, values in recipe.items() if isinstance(values, dict)
            for key, value in values.items()}


def recipe_changes(saved: dict, current: dict) -> dict:
    """Keys whose values differ between two resolved recipes, ignoring :data:`FREE_ON_RESUME`.

    Only keys both recipes hold are compared: a key added to the schema since
    the checkpoint was written was no choice then.

    Returns:
        dict: ``{"section.key": [saved value, current value]}``, in key order.
    """
    old, new = _flatten(saved), _flatten(current)
    changes = {}
    for key in sorted(set(old) & set(new)):
        if key.split(".", 1)[0] in FREE_ON_RESUME_SECTIONS or key in FREE_ON_RESUME:
            continue
        if old.get(key) != new.get(key):
            changes[key] = [old.get(key), new.get(key)]
    return changes


def _describe(changes: dict, limit: int = 6) -> str:
    items = [f"{key} {short(a, 40)} -> {short(b, 40)}" for key, (a, b) in changes.items()]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_continuation(cfg: Config, ckpt: checkpoint.Checkpoint, dataset: str, total_steps: int,
                       allow_changes: bool) -> dict:
    """Refuse a resume that would not continue the checkpoint's training; return accepted changes.

    Args:
        cfg (Config): This run's recipe.
        ckpt (Checkpoint): The checkpoint to continue.
        dataset (str): Fingerprint of this run's training split.
        total_steps (int): Updates this run is planned for.
        allow_changes (bool): Accept recipe and data changes (``--allow-changes``).
    """
    saved = ckpt.state
    if total_steps < saved.step:
        length = "training.steps" if cfg.training.steps is not None else f"training.epochs={cfg.training.epochs}"
        raise CheckpointError(f"checkpoint {ckpt.path} is at update {saved.step}, past this run's {total_steps} "
                              f"updates ({length}); raise training.steps above {saved.step} to continue")
    changes = {}
    recipe_file = ckpt.path / "config.yaml"
    if recipe_file.is_file():
        try:
            changes = recipe_changes(yaml_load(recipe_file.read_text()) or {}, cfg.to_dict())
        except Exception as e:  # noqa: BLE001 (an unreadable recipe copy is reported, not a traceback)
            raise CheckpointError(f"{recipe_file} cannot be read ({short(str(e), 120)})") from None
    data_changed = not any(key.startswith("data.") for key in changes)
    if saved.dataset and saved.dataset != dataset and data_changed:
        changes["training data"] = ["the samples the checkpoint trained on",
                                    f"other samples in {cfg.data.path or cfg.data.hf_dataset}"]
    if changes and not allow_changes:
        raise UserError(f"checkpoint {ckpt.path} was trained with another recipe or data: {_describe(changes)}. "
                        f"Resume with {ALLOW_FLAG} to continue with the new values (recorded in metrics.jsonl), "
                        "or train into another checkpoint.dir")
    return changes


def restore(cfg: Config, world, run_dir: Path, resume, model, stream, fresh, trainable: dict,
            dataset: str, allow_changes: bool = False) -> tuple:
    """Load a checkpoint into the model, RNG and data stream; hand back its optimizer state.

    Args:
        cfg, world, run_dir: The run.
        resume (str | bool | LaunchCheckpoints): ``True``: the newest intact
            checkpoint in ``run_dir``; a path: that checkpoint or run directory;
            :class:`LaunchCheckpoints`: the newest intact one a launch wrote.
        model, stream: Filled in place.
        fresh (TrainingState): This run's shape and provenance; its progress
            is set from the checkpoint and it is returned.
        trainable (dict): The model's trainable parameters (to check shapes; a pipeline's: every stage's).
        dataset (str): Fingerprint of the training split.
        allow_changes (bool): See :func:`check_continuation`. Default: ``False``.

    Returns:
        tuple: ``(TrainingState, optimizer state, Resumed)``; the optimizer
        state is unsharded (``trainer.run.setup`` puts it in place before the
        step is compiled).
    """
    ckpt, skipped = pick_shared(world, run_dir, resume if isinstance(resume, str) else None,
                                job=resume.job if isinstance(resume, LaunchCheckpoints) else "")
    for line in skipped:
        log.info(f"skipping damaged checkpoint {line}")
    saved, path = ckpt.state, ckpt.path
    checkpoint.check_weights_match(ckpt.weights, trainable, path)
    if saved.global_batch != fresh.global_batch and not cfg.parallel.allow_world_size_change:
        raise UserError(
            f"checkpoint {path} was trained with a global batch of {saved.global_batch} "
            f"({saved.world_size} ranks x {saved.batch_size} x {saved.grad_accumulation}), "
            f"but this run has {fresh.global_batch}; keep batch_size x ranks x grad_accumulation equal, or set "
            "parallel.allow_world_size_change=true")
    changes = check_continuation(cfg, ckpt, dataset, fresh.total_steps, allow_changes)
    if changes:
        log.info(f"{ALLOW_FLAG}: continuing with {_describe(changes)}")
    if saved.total_steps and saved.total_steps != fresh.total_steps and cfg.training.lr_schedule != "constant":
        log.note(f"the {cfg.training.lr_schedule} schedule now spans {fresh.total_steps} updates "
             f"(the checkpoint was planned for {saved.total_steps})")
    if saved.step == fresh.total_steps:
        log.note(f"checkpoint {path} is already at update {saved.step} = this run's length; "
             "nothing left to train")
    own = dict(tree_flatten(model.trainable_parameters()))  # a pipeline stage's own; otherwise every one
    model.load_weights([(k, v) for k, v in ckpt.weights.items() if k in own], strict=False)
    # mx.random.state cannot be assigned in mlx 0.32, but its key is two
    # uint32 words and seed(s) sets the key to [s >> 32, s & 0xffffffff].
    hi, lo = saved.rng_key
    mx.random.seed((hi << 32) | lo)
    moved = stream.restore(saved.data)
    if moved:
        log.info(f"{moved}")
    log.info(f"resumed from {path} at update {saved.step} (epoch {saved.data.epoch}, batch {saved.data.index})")
    # This run's shape and provenance, the checkpoint's progress.
    fresh.step, fresh.data, fresh.best, fresh.val_loss = saved.step, stream.position(), saved.best, saved.val_loss
    fresh.balance = saved.balance
    return fresh, ckpt.optimizer, Resumed(path=path, step=saved.step, skipped=skipped, changes=changes)
