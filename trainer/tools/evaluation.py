"""``mlx-dp eval``: score a trained run (or the base model) on a split, sharded over ranks.

What is scored is the recipe's objective's (``trainer.objectives``); this module
loads the model, its adapters and the split, and runs it on every rank.
"""

import dataclasses
from pathlib import Path

from ..cluster.connect import join
from ..errors import CheckpointError, DataError
from ..model.load import load_base
from ..objectives.registry import make_objective
from ..run.setup import reference_settings
from ..run.stages import make_stage
from .adapters import load_trained


def run_eval(cfg, checkpoint: str | None = None, split_name: str | None = None) -> dict:
    """``mlx-dp eval``: score a trained run (or the base model) on a split, on every rank.

    Args:
        cfg (trainer.config.load.Config): The recipe.
        checkpoint (str | None): Adapters to apply: a run directory or one of
            its ``checkpoints/step_*``; default ``checkpoint.dir``. ``"none"``
            scores the base model.
        split_name (str | None): ``test`` or ``valid``; default ``eval.split``.

    Returns:
        dict: The objective's result, with ``split``, ``checkpoint``, ``world_size`` and
        ``samples``; ``line``: what to print for people.
    """
    objective = make_objective(cfg)  # MLX's own loss and attention: no training routes
    world = join(cfg.parallel.backend, cfg.parallel.timeout_s)
    pipeline = cfg.parallel.pipeline  # every rank a stage: each reads and runs only its own blocks
    model, tokenizer, _ = load_base(cfg.model, lazy=pipeline)
    source = Path(checkpoint) if checkpoint else cfg.checkpoint.run_dir
    if checkpoint != "none" and not (source / "adapters.safetensors").is_file():
        raise CheckpointError(f"no adapters.safetensors in {source}; train first or pass --checkpoint "
                              "(or --checkpoint none for the base model)")
    stage = None
    if pipeline:  # the whole adapters file goes in (it is small), then each stage keeps its own blocks
        if checkpoint != "none":
            load_trained(model, cfg, source)
        stage = make_stage(cfg, world, model)
    split_name = split_name or cfg.eval.split
    data_cfg = dataclasses.replace(cfg.data, packing=False)
    splits = world.rank0_first(lambda: objective.load(data_cfg, tokenizer, (split_name,), world.is_main))
    if split_name not in splits:
        raise DataError(f"{cfg.data.path or cfg.data.hf_dataset} has no {split_name} split")
    if objective.needs_reference:  # the reference is the base: its values with the adapters off
        objective.prepare(world, model, tokenizer, splits, cfg.data.cache_dir, reference_settings(cfg, training=False),
                          stage=stage)
    if checkpoint != "none" and not pipeline:
        load_trained(model, cfg, source)
    split = splits[split_name]
    result = {"split": split_name, "checkpoint": None if checkpoint == "none" else str(source),
              "world_size": world.size, "samples": len(split)}
    result.update(objective.evaluate(world, model, tokenizer, split, cfg, stage=stage))
    result["line"] = objective.describe(result)
    return result
