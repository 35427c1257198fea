"""Real architectures by shape: the config.json of each model a recipe names, kept in the library.

``mlx-dp recipes memory`` needs the exact shapes of the models the recipes name
(Qwen3, Llama 3.2, Gemma 3, Mistral) without downloading them: their real
``config.json`` files are kept in the library (``data/archs``, with the hub ids
each one stands for), and :func:`build_model` builds mlx-lm's model for one
lazily, with random weights that nothing evaluates, so its parameters can be
counted byte for byte. The lab's random-model builders (``scripts/lab/synth.py``)
build on the same functions.
"""

import copy
import difflib
import json
import zlib

from ..errors import UserError
from ..library import data_dir


class ArchError(UserError):
    """An architecture was asked for that the library does not hold, or with arguments that cannot work."""


def archs_dir():
    """The folder of architecture files (``data/archs`` of the library)."""
    return data_dir() / "archs"


def arch_names() -> list:
    """Names of the architectures in the library (file stems, sorted)."""
    return sorted(p.stem for p in archs_dir().glob("*.json"))


def _read_arch(name: str) -> dict:
    path = archs_dir() / f"{name}.json"
    if not path.is_file():
        hint = difflib.get_close_matches(name, arch_names(), n=1)
        more = f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(arch_names())}"
        raise ArchError(f"no architecture {name!r} in {archs_dir()}{more}")
    with open(path) as f:
        return json.load(f)


def load_arch(name: str) -> dict:
    """The real Hugging Face ``config.json`` of a known architecture.

    Args:
        name (str): File stem in ``data/archs/``, e.g. ``"qwen3-0.6b"``.

    Returns:
        dict: The config, without the ``_``-prefixed bookkeeping keys.
    """
    return {k: v for k, v in _read_arch(name).items() if not k.startswith("_")}


def arch_info(name: str) -> dict:
    """The bookkeeping of an architecture file: hub ids and where the values came from.

    Args:
        name (str): File stem in ``data/archs/``.

    Returns:
        dict: ``hub_id`` (the upstream repo a user puts in ``model.path``),
        ``mlx_hub_id``, ``qlora_hub_id`` (an mlx-community 4-bit repo) and
        ``source``, each present when the file records it.
    """
    return {k[1:]: v for k, v in _read_arch(name).items() if k.startswith("_")}


def arch_for_model_path(model_path: str) -> tuple[str, bool]:
    """(architecture name, quantized?) whose recorded hub ids include ``model_path``.

    Raises:
        ArchError: No file in ``data/archs`` records that hub id.
    """
    for name in arch_names():
        info = arch_info(name)
        if model_path == info.get("qlora_hub_id"):
            return name, True
        if model_path in (info.get("hub_id"), info.get("mlx_hub_id")):
            return name, False
    raise ArchError(f"no architecture in {archs_dir()} records the hub id {model_path}")


def text_config(config: dict) -> dict:
    """The dict holding the language model's keys (``text_config`` for multimodal files)."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def tied(config: dict) -> bool:
    """Whether input and output embeddings share weights (Hugging Face's default is yes)."""
    text = text_config(config)
    return text.get("tie_word_embeddings", config.get("tie_word_embeddings", True))


def _param_key(seed: int, name: str):
    """An RNG key that depends only on the seed and the parameter's name.

    Naming the key after the parameter (rather than drawing in order) keeps a
    layer's weights the same whatever the number of layers. The weights never
    depend on MLX's global RNG state (though constructing the mlx-lm modules,
    whose default initialisation is replaced here, still advances it).
    """
    import mlx.core as mx

    if not 0 <= seed < 2**31:
        raise ArchError(f"seed must be in [0, 2**31), got {seed}")
    return mx.random.key((seed << 32) | zlib.crc32(name.encode()))


def build_model(config: dict, seed: int = 0, dtype: str = "float32"):
    """The mlx-lm model for a config, with random weights drawn from ``seed``.

    Matrices (2-D and up) are drawn from N(0, ``initializer_range``), the
    Hugging Face initialisation (std 0.02 when the config has no value); norm
    weights and biases keep the values mlx-lm constructs them with, except
    Gemma's offset norms, which start at 0 as in Hugging Face. Nothing is
    evaluated here: the arrays are lazy until used or saved.

    Tied embeddings follow the checkpoint convention: where mlx-lm decides tying
    from the weights (gemma3 and gemma3_text tie when ``lm_head.weight`` is
    absent), ``lm_head`` is removed through the model's own ``sanitize``.

    Args:
        config (dict): A config (a real one, or the lab's reduced one).
        seed (int): Seed of the weights. Default: ``0``.
        dtype (str): Floating dtype of the weights, an ``mlx.core`` name.
            Default: ``"float32"`` (fast on a CPU, where bf16 matmuls are slow).

    Returns:
        mlx.nn.Module: The model, in eval mode.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes  # mlx-lm's own model_type -> class lookup

    model_class, args_class = _get_classes(config)
    # A copy: gemma3's ModelArgs writes its defaults into the text_config it is given.
    model = model_class(args_class.from_dict(copy.deepcopy(config)))
    target = getattr(mx, dtype, None)
    if not isinstance(target, mx.Dtype) or not mx.issubdtype(target, mx.floating):
        raise ArchError(f"dtype {dtype!r} is not a floating mlx.core dtype")

    std = text_config(config).get("initializer_range", config.get("initializer_range", 0.02))
    offset_norms = _offset_norm_weights(model)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if tied(config) and name.endswith("lm_head.weight"):
            continue  # the checkpoint of a tied model has no lm_head
        if value.ndim >= 2:
            value = std * mx.random.normal(value.shape, key=_param_key(seed, name))
        elif name in offset_norms:
            value = mx.zeros_like(value)
        weights[name] = value.astype(target)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model


def _offset_norm_weights(model) -> set:
    """Names of norm weights that store the offset from 1 (Gemma's ``x * (1 + w)``).

    Hugging Face initialises them to 0, a scale of 1; mlx-lm constructs them
    as ones (a checkpoint always overwrites them), a scale of 2 in every norm.
    """
    names = set()
    for name, module in model.named_modules():
        kind = type(module)
        if kind.__name__ == "RMSNorm" and kind.__module__.startswith("mlx_lm.models.gemma"):
            names.add(f"{name}.weight")
    return names
