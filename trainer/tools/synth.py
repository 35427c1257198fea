"""Random-weight models with the shapes of real ones, built offline.

Recipes for real models (Qwen3, Llama 3.2, Gemma 3, Mistral) are checked "by
shape" in CI: the model's real ``config.json`` (kept in ``data/archs/``), cut to
a few layers and to the vocabulary of a tiny local tokenizer, filled with random
weights and trained for a few steps. Nothing is downloaded: the architecture
comes from the JSON file, the model class from mlx-lm, the tokenizer from a
local folder. Benchmarks use the same path to build a >=100M-parameter model of
realistic shape.

Usage::

    from trainer import synth
    config = synth.reduce_config(synth.load_arch("qwen3-0.6b"), num_layers=2,
                                 vocab_size=synth.tokenizer_vocab_size("data/tiny-llama"))
    path = synth.make_random_model(config, "/tmp/qwen3-2l", "data/tiny-llama", seed=0)
    # mlx_lm.load(path) now returns a working model and tokenizer.

Weights are fp32 by default, not the ``torch_dtype`` (bfloat16) of the real
file: on the Linux CPU backend bf16 matmuls run on MLX's own slow kernel, and
fp32 can use the optional OpenBLAS route (``trainer.tools.fastblas``).
"""

import copy
import difflib
import json
import shutil
import zlib
from pathlib import Path

ARCHS_DIR = Path(__file__).resolve().parents[2] / "data" / "archs"

# Files of a tokenizer folder that describe the tokenizer, never the model.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt",
)

# Config keys holding token ids. They name tokens of the real tokenizer, so they
# are dropped when the vocabulary is replaced: mlx-lm then uses the special
# tokens of the tokenizer that is actually there (an eos id of 106 would
# otherwise stop generation at whatever token 106 is in the tiny tokenizer).
_TOKEN_ID_SUFFIXES = ("_token_id", "_token_index")


class SynthError(ValueError):
    """A synthetic model was asked for with arguments that cannot work."""


def arch_names() -> list:
    """Names of the architectures in ``data/archs/`` (file stems, sorted)."""
    return sorted(p.stem for p in ARCHS_DIR.glob("*.json"))


def _read_arch(name: str) -> dict:
    path = ARCHS_DIR / f"{name}.json"
    if not path.is_file():
        hint = difflib.get_close_matches(name, arch_names(), n=1)
        more = f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(arch_names())}"
        raise SynthError(f"no architecture {name!r} in {ARCHS_DIR}{more}")
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
        SynthError: No file in ``data/archs`` records that hub id.
    """
    for name in arch_names():
        info = arch_info(name)
        if model_path == info.get("qlora_hub_id"):
            return name, True
        if model_path in (info.get("hub_id"), info.get("mlx_hub_id")):
            return name, False
    raise SynthError(f"no architecture in {ARCHS_DIR} records the hub id {model_path}")


def _text_config(config: dict) -> dict:
    """The dict holding the language model's keys (``text_config`` for multimodal files)."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def _args_fields(config: dict) -> set:
    """Names mlx-lm's ModelArgs for this config accepts (its defaults fill missing keys)."""
    import inspect

    from mlx_lm.utils import _get_classes

    text = _text_config(config)
    _, args_class = _get_classes({"model_type": text.get("model_type", config["model_type"])})
    return set(inspect.signature(args_class).parameters)


def reduce_config(config: dict, num_layers: int = 2, vocab_size=None, width_divisor: int = 1,
                  **overrides) -> dict:
    """A copy of a real architecture with fewer layers and a smaller vocabulary.

    Everything that fixes the shape of one layer is kept: hidden size, heads,
    ``head_dim``, kv heads, rope settings, qk-norm, tied embeddings, sliding
    windows. What depends on the layer count is cut consistently:

    - lists with one entry per layer (``layer_types``...) keep their first
      ``num_layers`` entries, and ``max_window_layers`` is capped;
    - Gemma 3 (``sliding_window_pattern`` N: every N-th layer is global) keeps
      its pattern when ``num_layers >= N``; with fewer layers the pattern
      becomes ``num_layers``, so the last layer stays global and the others
      slide. (mlx-lm's gemma3_text indexes its cache at ``pattern - 1``, so a
      pattern longer than the model would crash; all-sliding would test no
      global layer.)

    Args:
        config (dict): A real ``config.json`` (see :func:`load_arch`). Not modified.
        num_layers (int): Decoder layers to keep. Default: ``2``.
        vocab_size (int, optional): The tokenizer's vocabulary size; replaces
            the real one (there is no real tokenizer offline). The token ids the
            config names (bos, eos, pad, image...) belong to the real tokenizer
            and are dropped.
            Default: ``None`` (keep the real vocabulary).
        width_divisor (int): Divide ``hidden_size``, ``intermediate_size`` and
            the numbers of attention and kv heads by this factor, keeping
            ``head_dim``, the GQA ratio and everything else. For CI shape checks
            of 4-8B models, whose full-width layers cost seconds per step on a
            2-core CPU. It must divide all four (e.g. 1, 2, 4 or 8 for Qwen3,
            Llama 3.2 and Mistral; 1, 2 or 4 for Gemma 3 4B; 1 for Gemma 3 1B).
            Default: ``1`` (real width).
        **overrides: Keys of the language model's config to set afterwards,
            e.g. ``intermediate_size=1024`` for a narrower benchmark. A key
            neither in the config nor accepted by mlx-lm's ModelArgs is an error.

    Returns:
        dict: The reduced config.
    """
    config = copy.deepcopy(config)
    text = _text_config(config)
    real_layers = text.get("num_hidden_layers")
    if not isinstance(real_layers, int):
        raise SynthError("the config has no integer num_hidden_layers")
    if not 1 <= num_layers <= real_layers:
        raise SynthError(f"num_layers={num_layers} must be between 1 and {real_layers}")

    text["num_hidden_layers"] = num_layers
    for key, value in text.items():
        if isinstance(value, list) and len(value) == real_layers:
            text[key] = value[:num_layers]
    if isinstance(text.get("max_window_layers"), int):
        text["max_window_layers"] = min(text["max_window_layers"], num_layers)
    _cut_sliding_pattern(text, config, num_layers)

    if vocab_size is not None:
        _set_vocab(config, int(vocab_size))
    if width_divisor != 1:
        _narrow(config, width_divisor)
    if overrides:
        known = set(text) | _args_fields(config)
        for key in overrides:
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                raise SynthError(f"unknown config key {key!r}"
                                 + (f"; did you mean {hint[0]!r}?" if hint else ""))
        text.update(overrides)
    return config


def _cut_sliding_pattern(text: dict, config: dict, num_layers: int) -> None:
    """Keep at least one global-attention layer in a cut Gemma 3 (see reduce_config)."""
    model_type = text.get("model_type", config.get("model_type", ""))
    if not model_type.startswith("gemma3"):
        return
    pattern = text.get("sliding_window_pattern", 6)  # mlx-lm's and HF's default
    if num_layers < pattern:
        text["sliding_window_pattern"] = pattern = num_layers
    if "layer_types" in text:  # newer files spell the same pattern out per layer
        text["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                               for i in range(num_layers)]


_WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def _narrow(config: dict, divisor: int) -> None:
    """Divide the widths of a config in place (see reduce_config's width_divisor)."""
    from mlx_lm.utils import _get_classes

    # The values mlx-lm will use, defaults included: gemma-3-4b's text_config
    # names no heads, and gemma3's ModelArgs fills them in (8 and 4).
    _, args_class = _get_classes(config)
    args = args_class.from_dict(copy.deepcopy(config))
    text_args = getattr(args, "text_config", None)
    effective = text_args if isinstance(text_args, dict) else vars(args)
    text = _text_config(config)
    widths = {key: effective.get(key) for key in _WIDTH_KEYS}
    if widths["num_key_value_heads"] is None:  # llama's default: one kv head per head
        widths["num_key_value_heads"] = widths["num_attention_heads"]
    # Without an explicit head_dim (Mistral) it is hidden_size / heads, which
    # dividing both leaves unchanged.
    for key, value in widths.items():
        if not isinstance(value, int) or divisor < 1 or value % divisor:
            raise SynthError(f"width_divisor={divisor} does not divide {key}={value}")
        text[key] = value // divisor


def _set_vocab(config: dict, vocab_size: int) -> None:
    if vocab_size < 1:
        raise SynthError(f"vocab_size must be positive, got {vocab_size}")
    text = _text_config(config)
    # Set at both levels: mlx-lm's gemma3 takes the top-level value (default
    # 262208) and overwrites text_config's with it.
    for target in {id(config): config, id(text): text}.values():
        target["vocab_size"] = vocab_size
        for key in [k for k in target if k.endswith(_TOKEN_ID_SUFFIXES)]:
            del target[key]


def _tied(config: dict) -> bool:
    """Whether input and output embeddings share weights (Hugging Face's default is yes)."""
    text = _text_config(config)
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
        raise SynthError(f"seed must be in [0, 2**31), got {seed}")
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
        config (dict): A (reduced) config; see :func:`reduce_config`.
        seed (int): Seed of the weights. Default: ``0``.
        dtype (str): Floating dtype of the weights, an ``mlx.core`` name.
            Default: ``"float32"`` (fast on CPU; bf16 is not, see PLATFORM.md).

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
        raise SynthError(f"dtype {dtype!r} is not a floating mlx.core dtype")

    std = _text_config(config).get("initializer_range", config.get("initializer_range", 0.02))
    offset_norms = _offset_norm_weights(model)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if _tied(config) and name.endswith("lm_head.weight"):
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


def count_params(config: dict) -> int:
    """Parameters of the model a config describes, embeddings included, tied ones once.

    Builds the model lazily (nothing is computed), so it is cheap even for
    full-size configs.

    Args:
        config (dict): A config as for :func:`build_model`.

    Returns:
        int: The number of parameters.
    """
    from mlx.utils import tree_flatten

    model = build_model(config)
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def layers_for_params(config: dict, min_params: int, vocab_size=None, **reduce_kwargs) -> int:
    """The fewest layers at which a reduced architecture has at least ``min_params``.

    For benchmarks that want a model of realistic shape and a given size, e.g.
    ``layers_for_params(load_arch("qwen3-0.6b"), 100e6, vocab_size=1024)`` is 7
    (about 15.7M parameters per layer).

    Args:
        config (dict): A real config (see :func:`load_arch`).
        min_params (int): The size to reach, embeddings included.
        vocab_size (int, optional): As for :func:`reduce_config`. Default: ``None``.
        **reduce_kwargs: More arguments of :func:`reduce_config` (``width_divisor``, overrides).

    Returns:
        int: The number of layers to pass to :func:`reduce_config`.
    """
    real_layers = _text_config(config)["num_hidden_layers"]
    for num_layers in range(1, real_layers + 1):
        reduced = reduce_config(config, num_layers, vocab_size, **reduce_kwargs)
        if count_params(reduced) >= min_params:
            return num_layers
    raise SynthError(f"even {real_layers} layers have fewer than {min_params:.3g} parameters")


def tokenizer_vocab_size(tokenizer_dir) -> int:
    """Token ids a tokenizer folder can produce (base vocabulary plus added tokens).

    Args:
        tokenizer_dir (str or Path): A Hugging Face tokenizer folder.

    Returns:
        int: ``len(tokenizer)``; a model's ``vocab_size`` must be at least this.
    """
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))


def _check_quantizable(model, group_size: int) -> None:
    """Refuse a width that mlx-lm's quantize_model would silently leave unquantized."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "to_quantized") and weight is not None and weight.shape[-1] % group_size:
            raise SynthError(f"{name} has input width {weight.shape[-1]}, not a multiple of "
                             f"group_size={group_size}; it would stay unquantized")


def make_random_model(config: dict, out_dir, tokenizer_dir, seed: int = 0,
                      dtype: str = "float32", quantize_bits=None, group_size: int = 64) -> Path:
    """Build, optionally quantize, and save a random model that ``mlx_lm.load`` accepts.

    Saving goes through mlx-lm's own ``save_model``/``save_config``, and 4-bit
    bases through its ``quantize_model``, so the folder looks like an
    ``mlx_lm.convert`` output: ``model.safetensors``, its index, a sorted
    ``config.json`` (with ``quantization`` when quantized, which makes
    ``mlx_lm.load`` rebuild ``QuantizedLinear`` layers) and the tokenizer files.
    The config's ``torch_dtype`` is set to ``dtype``: ``mlx_lm.load`` keeps the
    saved dtype, but ``mlx_lm.convert`` would cast to ``torch_dtype``.

    Args:
        config (dict): A (reduced) config; ``vocab_size`` must cover the tokenizer.
        out_dir (str or Path): Folder to write; created if needed. Model files
            already there are replaced.
        tokenizer_dir (str or Path): Folder whose tokenizer files are copied.
        seed (int): Seed of the weights. Default: ``0``.
        dtype (str): Dtype of the unquantized weights (and of the quantization
            scales). Default: ``"float32"``.
        quantize_bits (int, optional): Quantize linear and embedding layers to
            this many bits (4 for a QLoRA base). Default: ``None`` (no quantization).
        group_size (int): Quantization group size. Default: ``64``.

    Returns:
        Path: ``out_dir``.
    """
    from mlx_lm.utils import quantize_model, save_config, save_model

    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise SynthError(f"{tokenizer_dir} is not a tokenizer folder (no tokenizer_config.json)")
    needed = tokenizer_vocab_size(tokenizer_dir)
    have = _text_config(config).get("vocab_size", config.get("vocab_size"))
    if have is None or have < needed:
        raise SynthError(f"config vocab_size {have} is smaller than the tokenizer's "
                         f"{needed} tokens; pass vocab_size={needed} to reduce_config")

    model = build_model(config, seed=seed, dtype=dtype)
    config = copy.deepcopy(config)
    for target in (config, _text_config(config)):
        for key in ("torch_dtype", "dtype"):  # transformers 5 renamed it "dtype"
            if key in target:
                target[key] = dtype  # say what the file holds, not bfloat16
    if quantize_bits is not None:
        _check_quantizable(model, group_size)
        model, config = quantize_model(model, config, group_size=group_size, bits=quantize_bits)

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("model*.safetensors"):
        stale.unlink()  # mlx_lm.load reads every model*.safetensors it finds
    save_model(out_dir, model)  # note: evaluates (and so draws) every weight
    save_config(config, out_dir / "config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir
