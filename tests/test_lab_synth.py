"""Tests of the lab's random-model builders (scripts/lab/synth.py): real architectures, reduced, with random weights.

Run: ``pytest tests/test_lab_synth.py`` (about half a minute on 2 CPU cores).
Uses ``data/tiny-llama``'s tokenizer when it exists, else trains a throwaway
byte-level BPE tokenizer in a temporary folder.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from lab import synth

TINY_LLAMA = Path(__file__).parent.parent / "data" / "tiny-llama"

# Published parameter counts (model cards, hub file listings). Gemma 3 4B is
# 4.3B with its SigLIP vision tower, which mlx-lm does not build: 3.88B text.
PUBLISHED_PARAMS = {
    "qwen3-0.6b": 0.60e9, "qwen3-4b": 4.02e9, "qwen3-8b": 8.19e9,
    "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9,
    "gemma-3-1b": 1.00e9, "gemma-3-4b": 3.88e9, "mistral-7b": 7.25e9,
}


def _train_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer with a chat template, like data/tiny-llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog.",
                             "Hello world, how are you today?"] * 20, trainer)
    tok.save(str(out / "tokenizer.json"))
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "chat_template": template}))
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    if (TINY_LLAMA / "tokenizer_config.json").is_file():
        return TINY_LLAMA
    return _train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def vocab(tokenizer_dir):
    return synth.tokenizer_vocab_size(tokenizer_dir)


def _small(name, vocab, **overrides):
    """A 2-layer reduction of a real architecture."""
    return synth.reduce_config(synth.load_arch(name), num_layers=2, vocab_size=vocab, **overrides)


def test_every_arch_file_is_a_real_config_with_its_hub_ids():
    assert set(synth.arch_names()) >= set(PUBLISHED_PARAMS)
    for name in synth.arch_names():
        config = synth.load_arch(name)
        info = synth.arch_info(name)
        assert not [k for k in config if k.startswith("_")]
        assert info["hub_id"] and info["source"], name
        assert "4bit" in info["qlora_hub_id"], name


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_full_configs_have_the_published_size(name):
    count = synth.count_params(synth.load_arch(name))
    assert count == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_reduce_config_cuts_layers_and_vocab_but_keeps_the_layer_shape(name):
    real = synth.load_arch(name)
    before = json.dumps(real, sort_keys=True)
    small = synth.reduce_config(real, num_layers=2, vocab_size=512)
    assert json.dumps(real, sort_keys=True) == before  # the input is not modified

    real_text = real.get("text_config", real)
    text = small.get("text_config", small)
    assert text["num_hidden_layers"] == 2 and text["vocab_size"] == 512
    assert small["vocab_size"] == 512
    kept = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rope_theta", "rope_scaling", "rope_local_base_freq", "rms_norm_eps",
            "tie_word_embeddings", "sliding_window", "query_pre_attn_scalar", "model_type"}
    for key in kept & set(real_text):
        assert text[key] == real_text[key], key
    # Token ids belong to the real tokenizer, which is not there.
    assert not [k for k in {**small, **text} if k.endswith(("_token_id", "_token_index"))]


def test_reduce_config_keeps_real_vocab_when_not_given():
    small = synth.reduce_config(synth.load_arch("qwen3-0.6b"), num_layers=3)
    assert small["vocab_size"] == 151936 and small["eos_token_id"] == 151645
    assert small["max_window_layers"] == 3


def test_reduce_config_cuts_per_layer_lists():
    real = dict(synth.load_arch("qwen3-0.6b"), layer_types=["full_attention"] * 28)
    assert synth.reduce_config(real, num_layers=3)["layer_types"] == ["full_attention"] * 3


@pytest.mark.parametrize("layers, pattern", [(1, 1), (2, 2), (5, 5), (6, 6), (8, 6)])
def test_reduced_gemma_keeps_a_global_attention_layer(layers, pattern):
    real = dict(synth.load_arch("gemma-3-1b"), layer_types=["x"] * 26)
    small = synth.reduce_config(real, num_layers=layers)
    assert small["sliding_window_pattern"] == pattern
    assert small["layer_types"][pattern - 1] == "full_attention"
    assert small["layer_types"].count("full_attention") == layers // pattern


def test_two_layer_gemma_has_one_sliding_and_one_global_layer():
    model = synth.build_model(synth.reduce_config(synth.load_arch("gemma-3-1b"), num_layers=2,
                                                  vocab_size=512))
    caches = [type(c).__name__ for c in model.make_cache()]
    assert caches == ["RotatingKVCache", "KVCache"]


def test_reduce_config_overrides_and_rejects_unknown_keys():
    small = synth.reduce_config(synth.load_arch("mistral-7b"), intermediate_size=256)
    assert small["intermediate_size"] == 256 and small["hidden_size"] == 4096
    # A key only mlx-lm's ModelArgs knows (gemma3's text_config omits the heads).
    gemma = synth.reduce_config(synth.load_arch("gemma-3-4b"), num_attention_heads=2)
    assert gemma["text_config"]["num_attention_heads"] == 2
    with pytest.raises(synth.SynthError, match="intermediate_size"):
        synth.reduce_config(synth.load_arch("mistral-7b"), intermediate_sise=256)
    with pytest.raises(synth.SynthError, match="num_layers"):
        synth.reduce_config(synth.load_arch("mistral-7b"), num_layers=33)


@pytest.mark.parametrize("name, divisor", [("qwen3-8b", 4), ("mistral-7b", 8), ("gemma-3-4b", 4)])
def test_width_divisor_keeps_head_dim_and_gqa_ratio(name, divisor):
    real = synth.reduce_config(synth.load_arch(name), num_layers=2, vocab_size=512)
    narrow = synth.reduce_config(synth.load_arch(name), num_layers=2, vocab_size=512,
                                 width_divisor=divisor)
    attn = synth.build_model(narrow).layers[0].self_attn
    full_attn = synth.build_model(real).layers[0].self_attn
    head_dim = attn.q_proj.weight.shape[0] // attn.n_heads
    assert head_dim == full_attn.q_proj.weight.shape[0] // full_attn.n_heads
    assert attn.n_heads * divisor == full_attn.n_heads
    assert attn.n_heads // attn.n_kv_heads == full_attn.n_heads // full_attn.n_kv_heads
    assert synth.count_params(narrow) < synth.count_params(real) / divisor
    with pytest.raises(synth.SynthError, match="width_divisor"):
        synth.reduce_config(synth.load_arch(name), width_divisor=3)


def test_layers_for_params_picks_the_smallest_model_of_that_size():
    qwen = synth.load_arch("qwen3-0.6b")
    layers = synth.layers_for_params(qwen, 100e6, vocab_size=1024)
    size = lambda n: synth.count_params(synth.reduce_config(qwen, n, 1024))
    assert size(layers) >= 100e6 > size(layers - 1)
    with pytest.raises(synth.SynthError):
        synth.layers_for_params(qwen, 1e12)


def test_unknown_arch_names_a_close_match():
    with pytest.raises(synth.SynthError, match="qwen3-0.6b"):
        synth.load_arch("qwen3-0.6")


# Narrowed where needed so that each build stays around a second.
@pytest.mark.parametrize("name, overrides", [
    ("qwen3-0.6b", {}),                         # tied embeddings, qk-norm
    ("gemma-3-1b", {}),                         # gemma3_text: tying decided by sanitize
    ("gemma-3-4b", {"width_divisor": 4}),       # multimodal file, text_config nesting
    ("mistral-7b", {"width_divisor": 8}),       # mapped to llama, untied lm_head, no head_dim
])
def test_random_model_loads_and_generates(tmp_path, tokenizer_dir, vocab, name, overrides):
    config = _small(name, vocab, **overrides)
    out = synth.make_random_model(config, tmp_path / name, tokenizer_dir, seed=0)

    saved = json.loads((out / "config.json").read_text())
    assert saved.get("text_config", saved)["num_hidden_layers"] == 2
    assert saved["torch_dtype"] == "float32"  # what the file holds, not the real bfloat16
    assert (out / "tokenizer_config.json").is_file()
    weights = mx.load(str(out / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in weights.values())
    has_head = any(k.endswith("lm_head.weight") for k in weights)
    assert has_head == (name == "mistral-7b")  # the others tie, as the real files do

    model, tokenizer = mlx_lm.load(str(out))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, vocab)
    text = mlx_lm.generate(model, tokenizer, "Hello", max_tokens=4)
    assert isinstance(text, str)


def test_quantized_model_loads_with_quantized_layers_and_trains(tmp_path, tokenizer_dir, vocab):
    config = _small("qwen3-0.6b", vocab, intermediate_size=512)
    out = synth.make_random_model(config, tmp_path / "q4", tokenizer_dir, quantize_bits=4)
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization"]["bits"] == 4 and saved["quantization"]["group_size"] == 64

    model, _ = mlx_lm.load(str(out))
    attn = model.layers[0].self_attn
    assert isinstance(attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.layers[1].mlp.down_proj, nn.QuantizedLinear)

    # One QLoRA step changes the adapters and nothing else.
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 8, "scale": 10.0, "dropout": 0.0})
    x = mx.array([[1, 5, 9, 13, 17, 21, 25, 29]])
    loss_fn = lambda m: nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()
    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    names = [k for k, _ in tree_flatten(grads)]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)
    assert loss.item() > 0


def _weights(tmp_path, tokenizer_dir, config, seed, name):
    out = synth.make_random_model(config, tmp_path / name, tokenizer_dir, seed=seed)
    return mx.load(str(out / "model.safetensors"))


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tokenizer_dir, vocab):
    config = _small("qwen3-0.6b", vocab, intermediate_size=256)
    first = _weights(tmp_path, tokenizer_dir, config, 0, "a")
    again = _weights(tmp_path, tokenizer_dir, config, 0, "b")
    other = _weights(tmp_path, tokenizer_dir, config, 1, "c")
    assert first.keys() == again.keys() == other.keys()
    for key, value in first.items():
        assert mx.array_equal(value, again[key]), key
        if value.ndim >= 2:  # norms start at 1 whatever the seed
            assert not mx.array_equal(value, other[key]), key


def test_a_layer_has_the_same_weights_whatever_the_depth(vocab):
    two = synth.build_model(_small("qwen3-0.6b", vocab, intermediate_size=256), seed=3)
    three = synth.build_model(synth.reduce_config(synth.load_arch("qwen3-0.6b"), num_layers=3,
                                                  vocab_size=vocab, intermediate_size=256), seed=3)
    assert mx.array_equal(two.layers[1].self_attn.q_proj.weight,
                          three.layers[1].self_attn.q_proj.weight)


def test_weights_follow_the_hugging_face_initialisation(vocab):
    model = synth.build_model(_small("llama-3.2-1b", vocab, intermediate_size=256))
    assert model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.layers[0].input_layernorm.weight.min().item() == 1.0
    # Gemma's norms compute x * (1 + w): w starts at 0, not at mlx-lm's 1.
    gemma = synth.build_model(_small("gemma-3-4b", vocab, width_divisor=4))
    layer = gemma.layers[0]
    for norm in (layer.input_layernorm, layer.post_feedforward_layernorm, layer.self_attn.q_norm):
        assert mx.all(norm.weight == 0).item()


def test_a_width_that_would_stay_unquantized_is_refused(tmp_path, tokenizer_dir, vocab):
    config = _small("qwen3-0.6b", vocab, hidden_size=96, intermediate_size=256)
    with pytest.raises(synth.SynthError, match="group_size"):
        synth.make_random_model(config, tmp_path / "m", tokenizer_dir, quantize_bits=4)


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path, tokenizer_dir, vocab):
    config = _small("qwen3-0.6b", vocab - 1, intermediate_size=256)
    with pytest.raises(synth.SynthError, match="vocab_size"):
        synth.make_random_model(config, tmp_path / "m", tokenizer_dir)
