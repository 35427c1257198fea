"""``mlx-dp export --gguf FILE``: the fused model as one GGUF file that llama.cpp (and Ollama, LM Studio) run.

This is mlx-lm's GGUF writer (``mlx_lm/gguf.py``, what ``mlx_lm.fuse
--export-gguf`` runs): its vocabulary reader (``HfVocab``), its metadata
(``prepare_metadata``), its tensor names (``translate_weight_names``) and its
q/k row order for llama.cpp's rotary layout (``permute_weights``), saved with
``mx.save_gguf``. Its ``convert_to_gguf`` is not called: the few lines that
tie these together are repeated here, so that the product writes its own
values only where mlx-lm's are wrong for llama.cpp, and changes none of
mlx-lm's module state to do so (patching ``mlx_lm.gguf.prepare_metadata`` in
place would change every other caller's export too). What mlx-lm gets wrong,
each found by loading its output in llama.cpp:

- ``tokenizer.ggml.token_type`` is written as uint32; llama.cpp reads int32
  and refuses the whole file ("invalid gguf type"), so every mlx-lm export fails to load;
- every vocabulary is labelled sentencepiece (``llama``). A byte-level BPE
  vocabulary (Llama 3, GPT-2 style, the built-in tiny model) must be ``gpt2``
  with its merges and pre-tokenizer, or llama.cpp aborts on the first text it
  tokenizes; a sentencepiece-style BPE needs merge-ordered scores, not -1000 for all;
- bf16 norm weights are cast to f16, which llama.cpp's CPU RMSNorm rejects: 1-D tensors are f32 here;
- Llama 3's rope scaling (``rope_type: llama3``) is dropped; llama.cpp needs it as ``rope_freqs.weight``;
- mlx-lm's Mixtral stacks its experts (``switch_mlp``), for which its names
  are wrong; they become llama.cpp's ``ffn_*_exps``;
- ``general.file_type`` says f16 whatever the tensors are.

Supported: what mlx-lm's writer converts, Llama, Mistral and Mixtral (all as
llama.cpp's ``llama`` architecture), unquantized (``--dequantize`` a QLoRA
base) and without biases. Anything else is refused in one sentence.
"""

import json
import math
import os
import re
import tempfile
from pathlib import Path

from ..errors import ModelError

SUPPORTED = ("llama", "mistral", "mixtral")
GGUF_ARCHITECTURE = "llama"  # llama.cpp runs all three as its "llama" architecture

# Byte-level BPE pre-tokenizer regexes llama.cpp knows by name (tokenizer.ggml.pre). An unknown one is
# written as "default", with a note that llama.cpp may split text differently.
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}
_EXPERTS = re.compile(r"block_sparse_moe\.switch_mlp\.(gate|up|down)_proj")


class GGUFError(ModelError):
    """The model cannot be written as GGUF: an architecture, tokenizer or format the writer does not cover."""


def check_supported(config: dict, quantized: bool) -> None:
    """Refuse, before anything is written, a model the GGUF writer would get wrong.

    Args:
        config (dict): The model's ``config.json``.
        quantized (bool): The model holds quantized layers (a QLoRA base not dequantized).

    Raises:
        GGUFError: One sentence naming what is unsupported and what is.
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise GGUFError(f"GGUF export supports {', '.join(SUPPORTED)} models (mlx-lm's GGUF writer), and this "
                        f"model is {model_type}; export it with --out and convert that folder with llama.cpp's "
                        "convert_hf_to_gguf.py")
    if quantized:
        raise GGUFError("GGUF export needs full-precision weights and this model is quantized; add --dequantize")
    biases = [key for key in ("attention_bias", "mlp_bias") if config.get(key)]
    if biases:
        raise GGUFError(f"GGUF export does not write bias tensors and this model has {' and '.join(biases)}")
    scaling = _rope_scaling_type(config)
    if scaling not in (None, "default", "linear", "llama3"):
        raise GGUFError(f"GGUF export writes no rope_scaling of type {scaling} (only linear and llama3)")


def _rope_scaling_type(config: dict):
    scaling = config.get("rope_scaling") or {}
    return scaling.get("rope_type") or scaling.get("type")


def _tensor_name(name: str) -> str:
    """llama.cpp's name for an mlx-lm parameter: mlx-lm's mapping, after the stacked Mixtral experts."""
    from mlx_lm.gguf import translate_weight_names

    return translate_weight_names(_EXPERTS.sub(r"ffn_\1_exps", name))


def gguf_tensors(weights: dict, config: dict) -> dict:
    """mlx-lm's parameters as llama.cpp's tensors: q/k rows permuted, names mapped, dtypes llama.cpp takes.

    Args:
        weights (dict): Flat ``name -> mx.array`` of the fused model.
        config (dict): The model's ``config.json``.

    Returns:
        dict: ``gguf name -> mx.array``; 1-D tensors (norms, rope factors) f32, bf16 matrices f16
        (what mlx-lm writes; ``mx.save_gguf`` has no bf16).
    """
    import mlx.core as mx
    from mlx_lm.gguf import permute_weights

    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    out = {}
    for name, value in weights.items():
        if name.endswith("self_attn.q_proj.weight"):
            value = permute_weights(value, heads, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            value = permute_weights(value, heads, kv_heads)
        if value.ndim == 1:
            value = value.astype(mx.float32)
        elif value.dtype == mx.bfloat16:
            value = value.astype(mx.float16)
        out[_tensor_name(name)] = value
    factors = _llama3_rope_factors(config)
    if factors is not None:
        out["rope_freqs.weight"] = mx.array(factors, dtype=mx.float32)
    return out


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _llama3_rope_factors(config: dict):
    """Llama 3's per-frequency rope divisors, as llama.cpp's converter computes them; ``None`` without llama3 scaling.

    mlx-lm applies the same scaling inside its model (``Llama3RoPE``); llama.cpp
    reads it from this tensor, so without it a Llama 3.x file runs with
    unscaled rotary frequencies.
    """
    if _rope_scaling_type(config) != "llama3":
        return None
    scaling = config["rope_scaling"]
    dim, base = _head_dim(config), config.get("rope_theta", 10000.0)
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * base ** (i / dim)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def gguf_metadata(config: dict, tokenizer_dir: Path, tokenizer, vocab_rows: int) -> tuple[dict, list[str]]:
    """mlx-lm's GGUF metadata with llama.cpp's types, tokenizer kind and hyperparameters put right.

    Args:
        config (dict): The model's ``config.json``.
        tokenizer_dir (Path): A folder holding the tokenizer (``tokenizer.json``).
        tokenizer: mlx-lm's tokenizer wrapper (for bos and the chat template).
        vocab_rows (int): Rows of the embedding matrix; llama.cpp wants one token per row.

    Returns:
        tuple: The metadata dict for ``mx.save_gguf`` and notes to print (differences llama.cpp will show).
    """
    import mlx.core as mx
    from mlx_lm.gguf import HfVocab, prepare_metadata

    spec = _read_tokenizer_json(tokenizer_dir)
    metadata = prepare_metadata(config, HfVocab.load(tokenizer_dir))
    _pad_vocabulary(metadata, vocab_rows)
    metadata["tokenizer.ggml.token_type"] = metadata["tokenizer.ggml.token_type"].astype(mx.int32)
    metadata["general.quantization_version"] = mx.array(2, dtype=mx.uint32)
    head_dim = _head_dim(config)
    metadata["llama.rope.dimension_count"] = mx.array(head_dim, dtype=mx.uint32)
    metadata["llama.attention.key_length"] = metadata["llama.attention.value_length"] = \
        mx.array(head_dim, dtype=mx.uint32)
    if _rope_scaling_type(config) == "linear":
        metadata["llama.rope.scaling.type"] = "linear"
        metadata["llama.rope.scaling.factor"] = mx.array(float(config["rope_scaling"]["factor"]))
    notes = _tokenizer_metadata(metadata, spec, tokenizer)
    return metadata, notes


def _read_tokenizer_json(tokenizer_dir: Path) -> dict:
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise GGUFError("GGUF export needs the tokenizer as tokenizer.json (a fast tokenizer), and this model "
                        "has none")
    spec = json.loads(path.read_text())
    kind = (spec.get("model") or {}).get("type")
    if kind != "BPE":
        raise GGUFError(f"GGUF export writes BPE vocabularies (byte-level or sentencepiece-style), and this "
                        f"tokenizer is {kind}")
    return spec


def _pad_vocabulary(metadata: dict, rows: int) -> None:
    """One token per embedding row, as llama.cpp checks: padding rows get ``[PAD{i}]``, as its converter does."""
    import mlx.core as mx

    tokens = metadata["tokenizer.ggml.tokens"]
    if len(tokens) > rows:
        raise GGUFError(f"the tokenizer has {len(tokens)} tokens but the embedding only {rows} rows")
    if len(tokens) == rows:
        return
    extra = rows - len(tokens)
    metadata["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(len(tokens), rows)]
    metadata["tokenizer.ggml.scores"] = mx.concatenate([metadata["tokenizer.ggml.scores"],
                                                        mx.full((extra,), -1000.0)])
    metadata["tokenizer.ggml.token_type"] = mx.concatenate([metadata["tokenizer.ggml.token_type"],
                                                            mx.full((extra,), 4, dtype=mx.uint32)])  # USER_DEFINED


def _walk(node):
    """Every component of a tokenizer.json pipeline part (``Sequence`` entries flattened)."""
    if not isinstance(node, dict):
        return []
    inner = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
    return [node] + [part for child in inner for part in _walk(child)]


def _merges(spec: dict) -> list[str]:
    """tokenizer.json merges as ``"a b"`` strings (newer files hold ``[a, b]`` pairs)."""
    return [" ".join(m) if isinstance(m, list) else m for m in spec["model"].get("merges", [])]


def _tokenizer_metadata(metadata: dict, spec: dict, tokenizer) -> list[str]:
    """Label the vocabulary as llama.cpp must read it; returns notes on differences it will show."""
    import mlx.core as mx

    pre = _walk(spec.get("pre_tokenizer"))
    byte_level = next((p for p in pre if p.get("type") == "ByteLevel"), None)
    notes = []
    if byte_level is not None:
        notes += _byte_level_bpe(metadata, spec, pre, byte_level)
    elif spec["model"].get("byte_fallback"):
        _sentencepiece_bpe(metadata, spec, pre)
    else:
        raise GGUFError("GGUF export writes byte-level BPE or sentencepiece-style BPE with byte fallback, and "
                        "this BPE tokenizer is neither")
    bos = tokenizer.bos_token_id
    # HF may add BOS in a post-processor while add_bos_token reads False: ask the tokenizer what it does
    metadata["tokenizer.ggml.add_bos_token"] = mx.array(bos is not None and tokenizer.encode("a")[:1] == [bos])
    metadata["tokenizer.ggml.add_eos_token"] = mx.array(False)
    if tokenizer.pad_token_id is not None:
        metadata["tokenizer.ggml.padding_token_id"] = mx.array(tokenizer.pad_token_id, dtype=mx.uint32)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        metadata["tokenizer.chat_template"] = tokenizer.chat_template
    return notes


def _byte_level_bpe(metadata: dict, spec: dict, pre: list, byte_level: dict) -> list[str]:
    """GPT-2-style vocabulary: llama.cpp's ``gpt2`` model with merges and a named pre-tokenizer."""
    metadata["tokenizer.ggml.model"] = "gpt2"
    metadata["tokenizer.ggml.merges"] = _merges(spec)
    metadata.pop("tokenizer.ggml.scores", None)  # BPE ranks come from the merges
    split = next((p for p in pre if p.get("type") == "Split"), None)
    notes = []
    if split is None and byte_level.get("use_regex", True):
        metadata["tokenizer.ggml.pre"] = "gpt-2"
    else:
        pattern = ((split or {}).get("pattern") or {}).get("Regex")
        metadata["tokenizer.ggml.pre"] = _PRE_TOKENIZERS.get(pattern, "default")
        if metadata["tokenizer.ggml.pre"] == "default":
            notes.append("llama.cpp does not know this tokenizer's pre-tokenizer, so it may split text "
                         "into words differently than the tokenizer did in training")
    if byte_level.get("add_prefix_space"):
        notes.append("this tokenizer puts a space before the text (ByteLevel add_prefix_space) and llama.cpp "
                     "does not, so prompts there tokenize as in training only when they start with a space")
    return notes


def _sentencepiece_bpe(metadata: dict, spec: dict, pre: list) -> None:
    """Sentencepiece-style BPE (Llama 2, Mistral): llama.cpp's ``llama`` model, scored by merge order.

    llama.cpp's sentencepiece tokenizer merges the highest-scoring pair first;
    mlx-lm scores every token -1000, which makes it merge left to right. A
    token's score is minus the rank of the merge that makes it, so pairs merge in
    the order BPE merges them.
    """
    import mlx.core as mx

    rank = {m.replace(" ", ""): -float(i) for i, m in reversed(list(enumerate(_merges(spec))))}
    tokens = metadata["tokenizer.ggml.tokens"]
    metadata["tokenizer.ggml.scores"] = mx.array([rank.get(t, 0.0) for t in tokens], dtype=mx.float32)
    normalizers = _walk(spec.get("normalizer"))
    prepends = any(n.get("type") == "Prepend" for n in normalizers)
    prepends |= any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in pre)
    metadata["tokenizer.ggml.add_space_prefix"] = mx.array(prepends)


def write_gguf(model, tokenizer, config: dict, path: Path) -> tuple[int, list[str]]:
    """Write the (fused, unquantized) ``model`` to ``path`` as GGUF, atomically.

    Args:
        model (mlx.nn.Module): The fused model.
        tokenizer: Its mlx-lm tokenizer wrapper (saved to a temporary folder for mlx-lm's vocabulary reader).
        config (dict): The model's ``config.json``.
        path (Path): Destination file; written as a temporary beside it and renamed into place.

    Returns:
        tuple: The number of tensors written and notes to print.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..model.load import is_quantized

    check_supported(config, is_quantized(model))
    tensors = gguf_tensors(dict(tree_flatten(model.parameters())), config)
    with tempfile.TemporaryDirectory(prefix="mlx-dp-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        metadata, notes = gguf_metadata(config, Path(folder), tokenizer, tensors["token_embd.weight"].shape[0])
    all_f32 = all(t.dtype == mx.float32 for t in tensors.values())
    metadata["general.file_type"] = mx.array(0 if all_f32 else 1, dtype=mx.uint32)  # ALL_F32 or MOSTLY_F16
    staging = path.parent / f".{path.name}.tmp{os.getpid()}.gguf"
    try:
        mx.save_gguf(str(staging), tensors, metadata)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return len(tensors), notes
