"""``mlx-dp eval``: score a trained run (or the base model) on a split, sharded over ranks.

The maths is ``trainer.objectives.evaluate``; this module loads the model, its
adapters and the split, and runs it on every rank.
"""

import dataclasses
from pathlib import Path

from ..cluster.connect import join
from ..data.tokenized import load_splits
from ..objectives.evaluate import evaluate_loss, evaluate_pairs, exact_match
from ..model.load import load_base
from ..objectives.base import make_objective
from ..data.pairs import load_pair_splits
from ..errors import CheckpointError, DataError
from .adapters import load_trained


def run_eval(cfg, checkpoint: str | None = None, split_name: str | None = None) -> dict:
    """``mlx-dp eval``: score a trained run (or the base model) on a split, on every rank.

    Args:
        cfg (trainer.config.load.Config): The recipe.
        checkpoint (str | None): Adapters to apply: a run directory or one of
            its ``checkpoints/step_*``; default ``checkpoint.dir``. ``"none"``
            scores the base model.
        split_name (str | None): ``test`` or ``valid``; default ``eval.split``.
    """
    world = join(cfg.parallel.backend, cfg.parallel.timeout_s)
    model, tokenizer, _ = load_base(cfg.model)
    source = Path(checkpoint) if checkpoint else cfg.checkpoint.run_dir
    if checkpoint != "none" and not (source / "adapters.safetensors").is_file():
        raise CheckpointError(f"no adapters.safetensors in {source}; train first or pass --checkpoint "
                              "(or --checkpoint none for the base model)")
    split_name = split_name or cfg.eval.split
    data_cfg = dataclasses.replace(cfg.data, packing=False)
    load = load_splits if cfg.method.objective == "sft" else load_pair_splits
    splits = world.rank0_first(lambda: load(data_cfg, tokenizer, (split_name,), show_progress=world.is_main))
    if split_name not in splits:
        raise DataError(f"{cfg.data.path or cfg.data.hf_dataset} has no {split_name} split")
    split = splits[split_name]
    if cfg.method.objective == "dpo":  # the reference is the base: its log-probs before the adapters are loaded
        from ..objectives import reference

        # eval runs MLX's own attention and loss (no training routes), and the cache key says so
        settings = {"attention_block": 0, "fused_exp": False, "pad_multiple": cfg.data.pad_multiple}
        reference.attach(world, model, splits, cfg.data.cache_dir, settings, note=world.print0)
    if checkpoint != "none":
        load_trained(model, cfg, source)
    batch = cfg.eval.batch_size or cfg.training.batch_size
    result = {"split": split_name, "checkpoint": None if checkpoint == "none" else str(source),
              "world_size": world.size, "samples": len(split)}
    if cfg.method.objective != "sft":
        result.update(objective=cfg.method.objective)
        result.update(evaluate_pairs(world, model, split, make_objective(cfg.method), batch, cfg.data.pad_multiple,
                                     cfg.eval.max_batches))
        return result
    result.update(evaluate_loss(world, model, split, batch, cfg.data.pad_multiple, cfg.eval.max_batches))
    if cfg.eval.exact_match and (split.prompt_lengths > 0).any():
        limit = None if cfg.eval.max_batches is None else cfg.eval.max_batches * batch * world.size
        scored = exact_match(world, model, tokenizer, split, cfg.eval.max_new_tokens, limit)
        result.update(exact_match=scored["exact_match"], exact_match_samples=scored["samples"])
    return result
