"""``mlx-dp export``: fuse adapters into the base model, as a model directory mlx-lm loads.

This is mlx-lm's own fuse path (``mlx_lm.fuse``): load the base with the
adapters, replace each adapter layer by its ``fuse()`` result, save with
``mlx_lm.utils.save``. It is repeated here only because ``mlx_lm.fuse``
exposes it as a command-line ``main()``, not as a function.
"""

from pathlib import Path

from ..errors import CheckpointError


def export(cfg, out: str, checkpoint: str | None = None, dequantize: bool = False) -> Path:
    """Write the fused model to ``out`` and return its path.

    Args:
        cfg (trainer.core.config.Config): The recipe (model.path names the base).
        out (str): Destination directory (created; must not hold a model already).
        checkpoint (str | None): Adapters to fuse: a run directory or a
            ``checkpoints/step_*`` directory; default ``checkpoint.dir``.
        dequantize (bool): Write a dequantized (full-precision) model from a
            quantized (QLoRA) base. Default: ``False``.
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, save

    from ..core.model import load_base, resolve_model_path

    source = Path(checkpoint or cfg.checkpoint.dir)
    if not (source / "adapters.safetensors").is_file():
        raise CheckpointError(f"no adapters.safetensors in {source}; train first or pass --checkpoint")
    target = Path(out)
    if (target / "config.json").exists():
        raise CheckpointError(f"{target} already holds a model; choose another --out")
    model, tokenizer, config = load_base(cfg.model)
    load_adapters(model, str(source))
    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    save(target, resolve_model_path(cfg.model.path), model, tokenizer, config, donate_model=False)
    return target
