"""The model: mlx-lm's loader, LoRA/DoRA layers from mlx-lm's tuner, or full training.

Nothing here re-implements mlx-lm: loading (local directory or hub id, plain
or quantized), the adapter layers and the adapter file format are mlx-lm's,
so checkpoints load with ``mlx_lm.load(base, adapter_path=run_dir)``.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config.load import MethodConfig, ModelConfig
from ..data.hub import close_match, hub_offline, in_hub_cache, looks_like_hub_id, mistyped_local_path
from ..errors import ModelError
from ..library import resolve as resolve_builtin

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def resolve_model_path(path: str) -> str:
    """The path to load: a local directory, a hub id, or a built-in model's folder; else a clear error.

    A local-looking path (``./x``, ``/x``, ``x/y/z``) must exist; an
    ``org/name`` that does not exist locally is passed to the hub;
    ``builtin:NAME`` is the library's (``trainer.library``).
    """
    path = resolve_builtin(path)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"model.path {path} has no config.json; it is not an mlx-lm model directory")
        return str(local)
    typo = mistyped_local_path(path)
    if typo:
        raise ModelError(f"model.path {path}: {typo}")
    if looks_like_hub_id(path):
        if hub_offline() and not in_hub_cache(path):
            raise ModelError(f"model.path {path} is neither a local directory nor in the hub cache, and "
                             "HF_HUB_OFFLINE=1 forbids downloading it")
        return path
    raise ModelError(f"model.path {path} does not exist (and is not a hub id like org/name)"
                    + close_match(path))


def load_base(cfg: ModelConfig, lazy: bool = False):
    """Load the base model and tokenizer with mlx-lm.

    Args:
        cfg (ModelConfig): The recipe's model section.
        lazy (bool): Leave the weights unread until they are evaluated (a pipeline stage reads only its own
            blocks'; mlx-lm's ``lazy``). Default: ``False``.

    Returns:
        tuple: ``(model, tokenizer, model_config)``; ``model_config`` is the
        model's config.json as a dict.
    """
    from mlx_lm.utils import load

    path = resolve_model_path(cfg.path)
    try:
        model, tokenizer, model_config = load(
            path, return_config=True, tokenizer_config={"trust_remote_code": cfg.trust_remote_code},
            trust_remote_code=cfg.trust_remote_code, lazy=lazy)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:  # RuntimeError: truncated safetensors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "download" if not Path(path).exists() else "load"
        raise ModelError(f"could not {where} model {cfg.path}: {first}") from None
    except Exception as e:  # hub errors (offline, gated, missing) come in many types
        if Path(path).exists():
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not download model {cfg.path} from the Hugging Face hub: {first}") from None
    if cfg.dtype is not None:
        dtype = DTYPES[cfg.dtype]
        model.set_dtype(dtype, predicate=lambda d: mx.issubdtype(d, mx.floating))
    return model, tokenizer, model_config


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def lora_parameters(method: MethodConfig) -> dict:
    """mlx-lm's ``lora_parameters`` dict for this recipe."""
    params = {"rank": method.rank, "scale": method.scale, "dropout": method.dropout}
    if method.keys is not None:
        params["keys"] = list(method.keys)
    return params


def apply_method(model: nn.Module, method: MethodConfig, seed: int) -> None:
    """Freeze the base and make the recipe's parameters trainable, in place.

    Adapter initial values come from ``mx.random`` seeded with ``seed``, so
    every rank creates identical adapters (checked later by the agreement step).

    Args:
        model (nn.Module): An mlx-lm model.
        method (MethodConfig): lora, dora or full, with its settings.
        seed (int): Seed for adapter initialisation.
    """
    from ..tuner import linear_to_lora_layers

    layers = model.layers
    if method.num_layers > len(layers):
        raise ModelError(f"method.num_layers={method.num_layers} but the model has only {len(layers)} layers")
    num_layers = len(layers) if method.num_layers == -1 else method.num_layers
    model.freeze()
    if method.type == "full":
        if is_quantized(model):
            raise ModelError("method.type=full needs an unquantized base model; use lora or dora on a "
                             "quantized base (QLoRA)")
        if num_layers == len(layers):
            model.unfreeze()  # everything, embeddings and head included
        else:
            for layer in layers[-num_layers:]:
                layer.unfreeze()
        return
    mx.random.seed(seed)
    try:
        linear_to_lora_layers(model, num_layers, lora_parameters(method), use_dora=method.type == "dora")
    except ValueError as e:
        raise ModelError(f"cannot apply {method.type} to this model: {e}") from None
    if method.keys is not None:
        adapted = {k.rsplit(".", 1)[0] for k, _ in tree_flatten(model.trainable_parameters())}
        if not adapted:
            raise ModelError(f"method.keys {method.keys} matched no layer of the model")


def adapter_config(method: MethodConfig, model_path: str, num_model_layers: int) -> dict:
    """The ``adapter_config.json`` that mlx-lm's ``load_adapters`` reads."""
    num_layers = num_model_layers if method.num_layers == -1 else method.num_layers
    config = {"fine_tune_type": method.type, "num_layers": num_layers, "model": resolve_builtin(model_path)}
    if method.type != "full":
        config["lora_parameters"] = lora_parameters(method)
    return config


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` trains mlx-lm adapters (LoRA, DoRA), whose base is the model with them off."""
    from ..tuner import DoRAEmbedding, DoRALinear, LoRAEmbedding, LoRALinear, LoRASwitchLinear

    kinds = (LoRALinear, LoRASwitchLinear, DoRALinear, LoRAEmbedding, DoRAEmbedding)
    return any(isinstance(m, kinds) for _, m in model.named_modules())


def trainable_parameters(model: nn.Module) -> dict[str, mx.array]:
    """Flat ``{name: array}`` of what training updates."""
    return dict(tree_flatten(model.trainable_parameters()))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights counted as mlx-lm does.

    mlx-lm's ``get_total_parameters`` reads ``weight`` of every quantized module, which a pipeline
    stage has dropped from the blocks it does not hold (``trainer.model.stages``): counted here, a
    module without its weights counts what it still has.
    """
    def count(module: nn.Module) -> int:
        if hasattr(module, "bits") and "weight" in module:  # packed: 32 // bits values per uint32
            return module.weight.size * 32 // module.bits + (module.bias.size if "bias" in module else 0)
        return sum(v.size for _, v in tree_flatten(module.parameters()))

    leaves = tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    trainable = sum(v.size for v in trainable_parameters(model).values())
    return trainable, sum(count(m) for _, m in leaves)


def backward_order(model: nn.Module, inputs: mx.array) -> list[str]:
    """Trainable parameter names in the order backward produces their gradients.

    Backward visits modules in the reverse of their first call in forward,
    so this traces one forward pass (only building the lazy graph, nothing
    is evaluated) and records when each module is first called. A parameter
    whose module is never called through ``__call__`` (a tied embedding used
    as the output head, say) is placed by its first call, or last if none:
    its gradient is complete only when backward has visited every use.

    Why not mlx's parameter order: ``mlx.nn.average_gradients`` buckets in
    parameter (forward) order, so its first bucket waits for the very last
    gradient of backward.

    Args:
        model (nn.Module): The model with its trainable parameters set.
        inputs (mx.array): A (batch, length) int32 token array.
    """
    first_call: dict[str, int] = {}
    modules = [(name, m, type(m)) for name, m in model.named_modules()]
    recording: dict[type, type] = {}

    def recorder(cls: type, name_of) -> type:
        # A subclass of the module's class that notes the first call of each instance: only this
        # model's modules change class for the trace, and they get their own back at once.
        if cls not in recording:
            def __call__(self, *args, **kwargs):
                name = name_of(self)
                if name not in first_call:
                    first_call[name] = len(first_call)
                return cls.__call__(self, *args, **kwargs)

            recording[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        return recording[cls]

    names = {id(m): name for name, m, _ in modules}
    was_training = model.training
    model.eval()  # no dropout: tracing must not consume random numbers
    try:
        for _, module, cls in modules:
            module.__class__ = recorder(cls, lambda m: names[id(m)])
        model(inputs)
    finally:
        for _, module, cls in modules:
            module.__class__ = cls
        model.train(was_training)

    trainable = list(trainable_parameters(model))

    def owner_call(param: str) -> int:
        module = param.rsplit(".", 1)[0]
        while module:
            if module in first_call:
                return first_call[module]
            module = module.rsplit(".", 1)[0] if "." in module else ""
        return -1  # never called: its gradient is complete only at the very end

    forward = sorted(range(len(trainable)), key=lambda i: (owner_call(trainable[i]), i))
    return [trainable[i] for i in reversed(forward)]
