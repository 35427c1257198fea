"""The chunked cross-entropy equals the plain one, in value and gradient, on small random mlx-lm models.

Reference: ``(nn.losses.cross_entropy(model(inputs), targets) * mask).sum()``; chunked:
``(chunked_cross_entropy(trunk(inputs), targets, head) * mask).sum()``. Models are float32 and
tiny (vocab 300, 2 layers), chunks small and not dividing the token count, so every path
(ragged last chunk, one chunk, many) runs in well under a minute on two CPU cores.

Tolerances: float32 sums over ~50 tokens and a 2-layer backward, computed in another order.
Values must agree to 2e-6 relative, gradients to 2e-5 of each tensor's largest entry (seen:
values within 1e-7, gradients within 7e-7); bfloat16 models to bfloat16 rounding (1e-2; seen: 0,
the same bfloat16 matmuls run in both).
"""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import cohere, gemma, gemma2, gemma3, gpt2, granite, llama, minicpm, qwen3
from mlx_lm.tuner.utils import linear_to_lora_layers

from trainer.model.chunked import chunked_cross_entropy, default_chunk_tokens
from trainer.model.heads import split_head, verify_split

VOCAB = 300
BATCH, LENGTH = 2, 25  # 50 tokens: chunks of 7 leave a ragged last chunk
VALUE_RTOL = 2e-6
GRAD_RTOL = 2e-5
BF16_RTOL = 1e-2


def small(arch: str, tied: bool = False, **extra) -> nn.Module:
    """A 2-layer float32 model of ``arch`` with random weights."""
    common = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB)
    if arch == "llama":
        model = llama.Model(llama.ModelArgs(model_type="llama", tie_word_embeddings=tied, **common))
    elif arch == "qwen3":
        model = qwen3.Model(qwen3.ModelArgs(model_type="qwen3", tie_word_embeddings=tied, head_dim=16,
                                            max_position_embeddings=512, rope_theta=1e6, **common))
    elif arch == "gemma":
        model = gemma.Model(gemma.ModelArgs(model_type="gemma", head_dim=16, **common))
    elif arch == "gemma2":
        model = gemma2.Model(gemma2.ModelArgs(model_type="gemma2", head_dim=16, final_logit_softcapping=3.0,
                                              **common))
    elif arch == "gemma3":  # the multimodal wrapper around gemma3_text
        text = dict(common, model_type="gemma3_text", head_dim=16, sliding_window=8, sliding_window_pattern=2)
        model = gemma3.Model(gemma3.ModelArgs(model_type="gemma3", text_config=text, vocab_size=VOCAB))
        if tied:  # what loading a checkpoint without lm_head.weight does
            model.language_model.sanitize({})
    elif arch == "cohere":
        args = {k: v for k, v in common.items() if k != "rms_norm_eps"}
        model = cohere.Model(cohere.ModelArgs(model_type="cohere", logit_scale=0.5, **args))
    elif arch == "granite":
        model = granite.Model(granite.ModelArgs(
            model_type="granite", tie_word_embeddings=tied, logits_scaling=6.0, attention_multiplier=0.25,
            embedding_multiplier=2.0, residual_multiplier=0.5, max_position_embeddings=512, attention_bias=False,
            mlp_bias=False, rope_theta=1e4, **common))
    elif arch == "minicpm":
        model = minicpm.Model(minicpm.ModelArgs(
            model_type="minicpm", tie_word_embeddings=tied, dim_model_base=16, scale_depth=1.4, scale_emb=2.0,
            **common))
    else:
        raise ValueError(arch)
    for name, value in extra.items():
        setattr(model, name, value)
    # Norm weights start at 0 or 1 everywhere: randomise them so a wrong norm or scale shows.
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape) if p.ndim == 1 else p, model.parameters()))
    mx.eval(model.parameters())
    return model


def batch(seed: int = 1):
    key = mx.random.key(seed)
    tokens = mx.random.randint(0, VOCAB, (BATCH, LENGTH + 1), key=key)
    mask = (mx.random.uniform(shape=(BATCH, LENGTH), key=mx.random.split(key)[0]) > 0.2).astype(mx.float32)
    return tokens[:, :-1], tokens[:, 1:], mask


def plain_loss(model, float32_logits=False):
    def loss(inputs, targets, mask):
        logits = model(inputs)
        if float32_logits:
            logits = logits.astype(mx.float32)
        return (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum()
    return loss


def chunked_loss(model, chunk=7, grad_in_forward=None):
    trunk, head = split_head(model)

    def loss(inputs, targets, mask):
        nll = chunked_cross_entropy(trunk(inputs), targets, head, chunk_tokens=chunk, grad_in_forward=grad_in_forward)
        return (nll * mask).sum()
    return loss


def value_and_grads(model, loss, args, compiled=False, seed=0):
    """As the trainer does it: nn.value_and_grad, optionally compiled with the model state as in/out."""
    step = nn.value_and_grad(model, loss)
    if compiled:
        state = [model.state, mx.random.state]
        step = mx.compile(step, inputs=state, outputs=state)
    mx.random.seed(seed)  # dropout draws the same masks in both losses
    value, grads = step(*args)
    mx.eval(value, grads)
    return value, dict(tree_flatten(grads))


def assert_close(reference, got, grad_rtol=GRAD_RTOL, value_rtol=VALUE_RTOL):
    (v0, g0), (v1, g1) = reference, got
    assert abs(v0.item() - v1.item()) <= value_rtol * max(1.0, abs(v0.item())), (v0.item(), v1.item())
    assert g0.keys() == g1.keys()
    assert g0, "no gradients: nothing was trainable"
    for name in g0:
        a, b = g0[name].astype(mx.float32), g1[name].astype(mx.float32)
        scale = max(mx.abs(a).max().item(), 1e-12)
        err = mx.abs(a - b).max().item()
        assert err <= grad_rtol * scale, f"{name}: max error {err:.3g} vs largest entry {scale:.3g}"


def lora(model, keys=None, dropout=0.0, rank=4):
    model.freeze()
    params = {"rank": rank, "scale": 2.0, "dropout": dropout}
    if keys is not None:
        params["keys"] = keys
    mx.random.seed(3)
    linear_to_lora_layers(model, len(model.layers), params)
    # LoRA's B starts at zero, which would leave A's gradient zero: make it random so both are tested.
    updates = [(k, 0.1 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.trainable_parameters())
               if k.endswith("lora_b") or (k.endswith("lora_a") and "embed" in k)]
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())
    return model


# ---------------------------------------------------------------------------- the split


SPLITTABLE = [("llama", False), ("llama", True), ("qwen3", False), ("qwen3", True), ("gemma", True),
              ("gemma2", True), ("gemma3", False), ("gemma3", True), ("cohere", True), ("granite", False),
              ("granite", True), ("minicpm", False), ("minicpm", True)]


@pytest.mark.parametrize("arch,tied", SPLITTABLE)
def test_split_matches_the_model_exactly(arch, tied):
    model = small(arch, tied)
    split = split_head(model)
    assert split is not None
    assert split.head.tied == tied
    assert verify_split(model, split, batch()[0]) == 0.0


def test_split_reads_the_post_processing():
    assert split_head(small("gemma2", True)).head.softcap == 3.0
    assert split_head(small("cohere", True)).head.logit_scale == 0.5
    assert split_head(small("granite")).head.logit_divisor == 6.0
    assert split_head(small("minicpm")).head.hidden_divisor == 4.0


def test_unsurveyed_models_are_not_split():
    args = gpt2.ModelArgs(model_type="gpt2", n_ctx=64, n_embd=64, n_head=4, n_layer=1, n_positions=64,
                          layer_norm_epsilon=1e-5, vocab_size=VOCAB)
    assert split_head(gpt2.Model(args)) is None  # a template nobody surveyed

    class Doubled(llama.Model):  # same class name and module, different __call__
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return 2 * super().__call__(inputs, cache, input_embeddings)

    base = small("llama")
    doubled = Doubled(base.args)
    assert split_head(doubled) is None


def test_heads_it_cannot_open_are_not_split():
    model = small("llama")
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["lm_head"]}, use_dora=True)
    assert split_head(model) is None  # DoRA's magnitude normalisation is not a linear term

    tied = small("minicpm", True)  # MiniCPM's tied head reads .weight: only right for a plain Embedding
    nn.quantize(tied, group_size=32, bits=4)
    assert split_head(tied) is None


def test_a_head_changed_after_the_split_is_followed():
    model = small("llama")
    split = split_head(model)
    lora(model, keys=["lm_head", "self_attn.q_proj"])
    assert "LoRALinear" in repr(split.head)
    assert verify_split(model, split, batch()[0]) == 0.0


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize("chunk", [1, 7, 50, 64, None])
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_per_token_values(chunk, grad_in_forward):
    model = small("qwen3", tied=True)
    model.freeze()  # grad_in_forward needs a frozen head
    trunk, head = split_head(model)
    inputs, targets, _ = batch()
    expected = nn.losses.cross_entropy(model(inputs), targets)
    got = chunked_cross_entropy(trunk(inputs), targets, head, chunk_tokens=chunk, grad_in_forward=grad_in_forward)
    assert got.shape == targets.shape and got.dtype == mx.float32
    assert mx.allclose(got, expected, rtol=1e-5, atol=1e-5).item()


def test_default_chunk_tokens():
    assert default_chunk_tokens(151936) == 128  # about 64 MiB of float32 logits per chunk
    assert default_chunk_tokens(262144) == 64
    assert default_chunk_tokens(32000) == 512
    assert default_chunk_tokens(1024) == 4096
    assert default_chunk_tokens(10**7) == 16


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen3", False), ("qwen3", True)])
@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_lora_gradients(arch, tied, grad_in_forward, compiled):
    model = lora(small(arch, tied))
    args = batch()
    reference = value_and_grads(model, plain_loss(model), args, compiled)
    assert_close(reference, value_and_grads(model, chunked_loss(model, 7, grad_in_forward), args, compiled))


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen3", False), ("qwen3", True)])
@pytest.mark.parametrize("compiled", [False, True])
def test_full_finetune_gradients(arch, tied, compiled):
    model = small(arch, tied)  # everything trainable: embedding, head (or the tied embedding as head), norms
    args = batch()
    reference = value_and_grads(model, plain_loss(model), args, compiled)
    got = value_and_grads(model, chunked_loss(model, 7), args, compiled)
    assert_close(reference, got)
    assert ("lm_head.weight" in got[1]) != tied


def test_full_finetune_refuses_grad_in_forward():
    model = small("llama")
    with pytest.raises(ValueError, match="frozen head"):
        value_and_grads(model, chunked_loss(model, 7, grad_in_forward=True), batch())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_qlora_gradients(tied, grad_in_forward):
    model = small("qwen3", tied)
    nn.quantize(model, group_size=32, bits=4)  # the head too: QuantizedLinear, or QuantizedEmbedding.as_linear
    kind = type(split_head(model).head.module)
    assert kind is (nn.QuantizedEmbedding if tied else nn.QuantizedLinear)
    lora(model)
    args = batch()
    reference = value_and_grads(model, plain_loss(model), args, compiled=True)
    assert_close(reference, value_and_grads(model, chunked_loss(model, 7, grad_in_forward), args, compiled=True))


@pytest.mark.parametrize("tied,keys", [(False, ["lm_head", "self_attn.v_proj"]),
                                       (True, ["model.embed_tokens", "self_attn.v_proj"])])
@pytest.mark.parametrize("quantized", [False, True])
def test_lora_on_the_head(tied, keys, quantized):
    """method.keys naming the head: LoRALinear (or LoRAEmbedding.as_linear), with dropout."""
    model = small("llama", tied)
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    lora(model, keys=keys, dropout=0.1)
    args = batch()
    reference = value_and_grads(model, plain_loss(model), args, compiled=True)
    got = value_and_grads(model, chunked_loss(model, 7), args, compiled=True)
    assert_close(reference, got)
    assert any(k.startswith("lm_head.lora" if not tied else "model.embed_tokens.lora") for k in got[1])


@pytest.mark.parametrize("arch,tied", [("gemma2", True), ("cohere", True), ("granite", False), ("granite", True),
                                       ("minicpm", False), ("minicpm", True), ("gemma3", True)])
def test_post_processed_heads(arch, tied):
    """Softcap, logit scales and MiniCPM's hidden divisor, with every weight trainable."""
    model = small(arch, tied)
    args = batch()
    reference = value_and_grads(model, plain_loss(model), args, compiled=True)
    assert_close(reference, value_and_grads(model, chunked_loss(model, 7), args, compiled=True))
    lora(model)
    reference = value_and_grads(model, plain_loss(model), args, compiled=True)
    assert_close(reference, value_and_grads(model, chunked_loss(model, 7), args, compiled=True))


def test_bfloat16_model():
    model = small("qwen3", tied=True)
    model.set_dtype(mx.bfloat16)
    lora(model)
    args = batch()
    got = value_and_grads(model, chunked_loss(model, 7), args)
    assert all(g.dtype == mx.float32 for g in got[1].values())  # LoRA parameters stay float32
    # The chunked loss takes the log-sum-exp of the bfloat16 logits in float32: compare with the
    # plain loss on the same logits cast to float32 (nn.losses.cross_entropy on bfloat16 logits
    # would reduce in bfloat16, itself ~1e-2 away).
    reference = value_and_grads(model, plain_loss(model, float32_logits=True), args)
    assert_close(reference, got, grad_rtol=BF16_RTOL, value_rtol=BF16_RTOL)


def test_compiled_step_is_reused():
    """One trace for every batch of the same shape, with dropout drawing from mx.random.state."""
    model = lora(small("llama", tied=True), dropout=0.1)
    plain, chunked = plain_loss(model), chunked_loss(model, 16)
    state = [model.state, mx.random.state]
    steps = [mx.compile(nn.value_and_grad(model, f), inputs=state, outputs=state) for f in (plain, chunked)]
    for seed in (1, 2, 3):
        args = batch(seed)
        results = []
        for step in steps:
            mx.random.seed(seed)
            value, grads = step(*args)
            mx.eval(value, grads)
            results.append((value, dict(tree_flatten(grads))))
        assert_close(*results)


# ---------------------------------------------------------------------------- memory


def test_peak_memory_is_a_few_chunks():
    """With a memory limit to hold MLX back (trainer/model/chunked.py: it allocates ~100 ops ahead otherwise),
    the chunked loss's peak is a small multiple of one chunk of logits; the plain loss's, of all."""
    vocab, dim, tokens, chunk = 32768, 32, 1024, 32

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(dim, vocab, bias=False)

    from trainer.model.heads import Head

    holder = Holder()
    holder.freeze()
    head = Head(holder, "lm_head", False)
    h = mx.random.normal((tokens, dim))
    t = mx.random.randint(0, vocab, (tokens,))
    mx.eval(holder.parameters(), h, t)
    chunk_bytes = chunk * vocab * 4

    def peak(loss):
        step = mx.grad(lambda h: loss(h).sum())
        mx.eval(step(h))
        base = mx.get_active_memory()
        old = mx.set_memory_limit(base + 4 * chunk_bytes)
        try:
            mx.reset_peak_memory()
            mx.eval(step(h))
            return (mx.get_peak_memory() - base) / chunk_bytes
        finally:
            mx.set_memory_limit(old)

    plain = peak(lambda h: nn.losses.cross_entropy(head(h), t))
    chunked = peak(lambda h: chunked_cross_entropy(h, t, head, chunk_tokens=chunk))
    assert plain >= tokens / chunk  # the whole logits, at least once
    assert chunked <= 6, chunked


# ---------------------------------------------------------------------------- in the trainer


def test_a_temperature_scales_the_logits_last():
    """GRPO's log-probs at a sampling temperature: the chunked loss of logits / T equals the plain one,
    in value and gradient, also after a softcap (Gemma 2: the scale comes after the cap)."""
    for arch, tied in (("llama", False), ("gemma2", True)):
        model = lora(small(arch, tied=tied))
        inputs, targets, mask = batch(5)
        split = split_head(model)

        def plain(inputs, targets, mask):
            return (nn.losses.cross_entropy(model(inputs) * 1.7, targets) * mask).sum()

        def chunked(inputs, targets, mask):
            nll = chunked_cross_entropy(split.trunk(inputs), targets, split.head, chunk_tokens=7, scale=1.7)
            return (nll * mask).sum()

        results = []
        for f in (plain, chunked):
            value, grads = nn.value_and_grad(model, f)(inputs, targets, mask)
            mx.eval(value, grads)
            results.append((value, dict(tree_flatten(grads))))
        assert_close(*results)


def test_token_loss_takes_the_chunked_path_only_where_the_head_opens():
    """The run's TokenLoss: chunked for a surveyed model (also with packed rows' segment masks), equal to
    the plain loss; a model it cannot split gets the plain loss; scoring() turns the gradient work off
    and gives the same values."""
    from trainer.objectives.base import TokenLoss

    model = small("llama", tied=True)
    inputs, targets, _ = batch(7)
    segments = mx.array([[0] * 10 + [1] * 15, [0] * 25], mx.int32)
    for seg in (None, segments):
        plain = TokenLoss()(model, inputs, targets, seg)
        loss = TokenLoss(chunked=True)
        with loss.scoring():
            scored = loss(model, inputs, targets, seg)
        assert loss._grad  # put back
        for got in (loss(model, inputs, targets, seg), scored):
            assert got.shape == plain.shape and got.dtype == mx.float32
            assert mx.allclose(got, plain, rtol=VALUE_RTOL, atol=1e-6).item()
    args = gpt2.ModelArgs(model_type="gpt2", n_ctx=64, n_embd=64, n_head=4, n_layer=1, n_positions=64,
                          layer_norm_epsilon=1e-5, vocab_size=VOCAB)
    other = gpt2.Model(args)  # not surveyed: the plain loss, the same numbers bit for bit
    assert mx.array_equal(TokenLoss(chunked=True)(other, inputs, targets), TokenLoss()(other, inputs, targets)).item()


@pytest.mark.e2e
def test_a_chunked_run_trains_what_the_plain_loss_trains(tmp_path):
    """A real training run (the trainer's compiled step, LoRA, 4 updates of AdamW on the tiny Llama and
    its data): training.chunked_loss on and off give the same losses and adapters, to float rounding."""
    import json
    import subprocess
    import sys

    import numpy as np

    runs = {}
    for on in (True, False):
        out = tmp_path / str(on)
        subprocess.run([sys.executable, "-m", "trainer", "train", "tiny-lora", "training.steps=4",
                        f"training.chunked_loss={str(on).lower()}", f"checkpoint.dir={out}",
                        "eval.every=0", "checkpoint.every=0", "logging.every=1"], check=True, capture_output=True, cwd=tmp_path)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["train_loss"] for r in records if "train_loss" in r]
        runs[on] = (losses, mx.load(str(out / "adapters.safetensors")))
    assert len(runs[True][0]) == 4
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    for name, value in runs[False][1].items():
        np.testing.assert_allclose(np.array(runs[True][1][name]), np.array(value), rtol=1e-4, atol=1e-6)
