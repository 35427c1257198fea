"""``mlx-dp export``: fuse adapters into the base model, as a model directory mlx-lm loads.

This is mlx-lm's own fuse path (``mlx_lm.fuse``): load the base with the
adapters, replace each adapter layer by its ``fuse()`` result, save with
``mlx_lm.utils.save``. It is repeated here only because ``mlx_lm.fuse``
exposes it as a command-line ``main()``, not as a function.

Nothing is overwritten: ``--out`` must be new or empty and must not be the
run directory; the model is written to a temporary directory beside it and
renamed into place, so a failed export leaves nothing half-written.
"""

import os
import shutil
from pathlib import Path

from ..errors import CheckpointError


def check_destination(out: Path, run_dirs) -> None:
    """Refuse an ``--out`` that holds files, or that is the run directory itself.

    Raises:
        CheckpointError: Naming the directory and a file that would be overwritten.
    """
    target = out.resolve()
    for run_dir in run_dirs:
        if target == Path(run_dir).resolve():
            raise CheckpointError(f"--out {out} is the run directory itself; export into a new directory")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"--out {out} is a file; export into a new directory")
    blocking = next((parent for parent in target.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise CheckpointError(f"--out {out}: {blocking} is a file, so no directory can be made under it")
    if target.is_dir():
        present = sorted(p.name for p in target.iterdir())
        if present:
            raise CheckpointError(f"--out {out} already holds files ({', '.join(present[:3])}"
                                  f"{', ...' if len(present) > 3 else ''}); export into a new or empty directory")


def export(cfg, out: str, checkpoint: str | None = None, dequantize: bool = False) -> Path:
    """Write the fused model to ``out`` and return its path.

    Args:
        cfg (trainer.config.load.Config): The recipe (model.path names the base).
        out (str): Destination directory: new, or empty.
        checkpoint (str | None): Adapters to fuse: a run directory or a
            ``checkpoints/step_*`` directory; default ``checkpoint.dir``.
        dequantize (bool): Write a dequantized (full-precision) model from a
            quantized (QLoRA) base. Default: ``False``.
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, save

    from ..model.load import load_base, resolve_model_path
    from .adapters import load_trained

    source = Path(checkpoint) if checkpoint else cfg.checkpoint.run_dir
    target = Path(out)
    check_destination(target, [source, cfg.checkpoint.run_dir])
    model, tokenizer, config = load_base(cfg.model)
    load_trained(model, cfg, source)
    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp{os.getpid()}"
    try:
        save(staging, resolve_model_path(cfg.model.path), model, tokenizer, config, donate_model=False)
        check_destination(target, [])  # nothing appeared there meanwhile
        os.replace(staging, target)  # an empty directory is replaced; a new one created
    except OSError as e:
        raise CheckpointError(f"could not write the model to {target}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
