"""Loading a trained run's adapters (or fine-tuned weights) into the recipe's model, for eval and export.

The recipe says what was trained; the checkpoint's ``adapter_config.json``
says what is in the file. They must agree: mlx-lm's ``load_adapters``
silently builds whatever the file says, so a recipe with LoRA rank 16
evaluated a rank-8 checkpoint without a word. Here the two are compared
first and a difference is refused in one line; then the recipe's method is
applied (as training did) and the weights are checked, shape by shape,
before they are loaded. A checkpoint directory with a manifest is verified
against its checksums; a truncated or foreign file is one clear line too.
"""

import json
from pathlib import Path

from ..state import checkpoint
from ..model.load import adapter_config, apply_method, trainable_parameters
from ..errors import CheckpointError, short

FILES = ("adapters.safetensors", "adapter_config.json")


def _differences(saved: dict, expected: dict, model_layers: int) -> list[str]:
    """Recipe keys whose values differ from what the checkpoint was trained with."""
    out = []
    if saved.get("fine_tune_type", "lora") != expected["fine_tune_type"]:
        out.append(f"method.type={expected['fine_tune_type']} (it holds {saved.get('fine_tune_type', 'lora')})")
    layers = saved.get("num_layers")
    if layers == -1:  # mlx-lm writes -1 for "every layer"
        layers = model_layers
    if layers is not None and layers != expected["num_layers"]:
        out.append(f"method.num_layers covering {expected['num_layers']} layers (it holds {layers})")
    if expected["fine_tune_type"] != "full" and saved.get("fine_tune_type", "lora") != "full":
        mine, theirs = expected["lora_parameters"], saved.get("lora_parameters") or {}
        for key in ("rank", "scale", "keys"):
            if key in theirs and theirs[key] != mine.get(key):
                out.append(f"method.{key}={short(mine.get(key), 40)} (it holds {short(theirs[key], 40)})")
    return out


def load_trained(model, cfg, source: Path) -> None:
    """Apply the recipe's method to ``model`` and load the trained weights from ``source``, in place.

    Args:
        model (mlx.nn.Module): The base model, as ``load_base`` returned it.
        cfg (trainer.config.load.Config): The recipe the run was trained with.
        source (Path): A run directory or one of its ``checkpoints/step_*``.

    Raises:
        CheckpointError: A file is missing, damaged or truncated, or the
            checkpoint holds another method, rank or model than the recipe.
    """
    source = Path(source)
    for name in FILES:
        if not (source / name).is_file():
            raise CheckpointError(f"no {name} in {source}; train first or pass --checkpoint")
    if (source / checkpoint.MANIFEST).is_file():
        problem = checkpoint.verify(source)
        if problem:
            raise CheckpointError(f"checkpoint {source} is damaged: {problem}")
    try:
        saved = json.loads((source / "adapter_config.json").read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{source / 'adapter_config.json'} cannot be read ({short(str(e), 80)})") from None
    expected = adapter_config(cfg.method, cfg.model.path, len(model.layers))
    differences = _differences(saved, expected, len(model.layers))
    if differences:
        raise CheckpointError(f"checkpoint {source} was trained with another method than the recipe says: "
                              f"the recipe has {'; '.join(differences)}; use the recipe it was trained with")
    weights = checkpoint.load_arrays(source / "adapters.safetensors", "weights")
    apply_method(model, cfg.method, cfg.training.seed)
    checkpoint.check_weights_match(weights, trainable_parameters(model), source)
    model.load_weights(list(weights.items()), strict=False)
