"""Random-weight models with the shapes of real ones, built offline (the lab's).

Recipes for real models (Qwen3, Llama 3.2, Gemma 3, Mistral) are checked "by
shape" in CI: the model's real ``config.json`` (the product's
``trainer.tools.archs``), cut to a few layers and to the vocabulary of a tiny
local tokenizer, filled with random weights and trained for a few steps.
Nothing is downloaded: the architecture comes from the JSON file, the model
class from mlx-lm, the tokenizer from a local folder. Benchmarks use the same
path to build a >=100M-parameter model of realistic shape.

Usage::

    from lab import synth
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
import shutil
from pathlib import Path

from trainer.tools.archs import (ArchError, arch_for_model_path, arch_info, arch_names, archs_dir,  # noqa: F401
                                 build_model, load_arch, text_config, tied)

SynthError = ArchError  # a synthetic model asked for with arguments that cannot work

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


def _args_fields(config: dict) -> set:
    """Names mlx-lm's ModelArgs for this config accepts (its defaults fill missing keys)."""
    import inspect

    from mlx_lm.utils import _get_classes

    text = text_config(config)
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
    text = text_config(config)
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
    text = text_config(config)
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
    text = text_config(config)
    # Set at both levels: mlx-lm's gemma3 takes the top-level value (default
    # 262208) and overwrites text_config's with it.
    for target in {id(config): config, id(text): text}.values():
        target["vocab_size"] = vocab_size
        for key in [k for k in target if k.endswith(_TOKEN_ID_SUFFIXES)]:
            del target[key]


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
    real_layers = text_config(config)["num_hidden_layers"]
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
    have = text_config(config).get("vocab_size", config.get("vocab_size"))
    if have is None or have < needed:
        raise SynthError(f"config vocab_size {have} is smaller than the tokenizer's "
                         f"{needed} tokens; pass vocab_size={needed} to reduce_config")

    model = build_model(config, seed=seed, dtype=dtype)
    config = copy.deepcopy(config)
    for target in (config, text_config(config)):
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
