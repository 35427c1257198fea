"""Split an mlx-lm causal LM into its trunk (everything up to the final norm) and its output head.

Why this exists: the chunked cross-entropy (:mod:`trainer.model.chunked`) must compute the
logits itself, a few hundred tokens at a time, so it needs the hidden states
*before* the output projection and an exact description of that projection:
which weight, any scaling, any soft-capping. mlx-lm has no such interface; each
``Model.__call__`` spells its head out in code.

How: :func:`split_head` reads the source of the model class's ``__call__`` and
accepts it only when it is one of the templates surveyed in mlx-lm 0.32.2
(:data:`_TEMPLATES`; docs/RESULTS.md, "The chunked loss", lists which models follow which). The template
says where the trunk is, how the model chooses between ``lm_head`` and the tied
embedding, and what it does to the logits. A model whose ``__call__`` is
anything else (an unknown architecture, a new mlx-lm that changed the code, a
DoRA-adapted head) gets ``None``, and the caller keeps the plain loss: a wrong
split would train silently wrong, a missing one only costs memory.
:func:`verify_split` checks a split against the model on a few tokens; call it
once at setup.

The head is resolved from its container on every use, not captured: LoRA
conversion (``linear_to_lora_layers``) may replace ``lm_head`` after the split.
"""

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn


def _lora() -> tuple:
    """mlx-lm's adapter classes (the head is LoRA-wrapped only when method.keys names it), imported when a head
    is first opened: ``mlx_lm.tuner`` pulls in transformers, seconds that commands which never train should
    not pay."""
    from ..tuner import LoRAEmbedding, LoRALinear

    return LoRALinear, LoRAEmbedding


# ---------------------------------------------------------------------------- the head


@dataclass(frozen=True)
class Projection:
    """One linear term of the logits: ``scale * (x @ W.T)`` with ``x`` computed by autodiff-visible ops.

    ``arrays`` holds the weight as the model stores it: for ``dense``, ``(W,)`` with W of shape
    (out, in) (``nn.Linear``, ``nn.Embedding``, LoRAEmbedding's ``lora_a``) or, with ``transposed``,
    (in, out) (LoRALinear's ``lora_b``); for ``quantized``, ``(w, scales, biases)`` (``biases`` may
    be ``None``: e.g. the ``mxfp4`` mode) and ``quant`` = ``(group_size, bits, mode)``.
    ``trainable``: the weight gets a gradient (full fine-tuning, or a LoRA ``B`` matrix).
    """

    x: mx.array
    kind: str  # "dense" or "quantized"
    arrays: tuple
    scale: float = 1.0
    transposed: bool = False
    quant: tuple = ()
    trainable: bool = False


@dataclass(frozen=True)
class Terms:
    """The head, opened up for one batch of hidden states: ``logits = post(sum(projections) + bias)``."""

    projections: tuple
    bias: Optional[mx.array]
    bias_trainable: bool
    logit_scale: float
    logit_divisor: float
    softcap: Optional[float]
    final_scale: float = 1.0  # then times this (one over a sampling temperature)


def _trainable(module: nn.Module, name: str) -> bool:
    return name in module.trainable_parameters()


_PLAIN = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)


def _supported(module: nn.Module) -> bool:
    """What :func:`_projections` can open. Exact types only: a subclass (DoRA's classes, anything
    custom) may compute something else."""
    kind = type(module)
    if kind in _PLAIN:
        return True
    LoRALinear, LoRAEmbedding = _lora()
    if kind is LoRALinear:
        return type(module.linear) in (nn.Linear, nn.QuantizedLinear)
    if kind is LoRAEmbedding:
        return type(module.embedding) in (nn.Embedding, nn.QuantizedEmbedding)
    return False


def _projections(module: nn.Module, x: mx.array):
    """The linear terms and bias of ``module`` (as an output head) applied to ``x``; ``None`` if unsupported."""
    if not _supported(module):
        return None
    kind = type(module)
    if kind is nn.Linear or kind is nn.Embedding:
        bias = module.get("bias") if kind is nn.Linear else None
        return [Projection(x, "dense", (module.weight,), trainable=_trainable(module, "weight"))], (
            bias, bias is not None and _trainable(module, "bias"))
    if kind is nn.QuantizedLinear or kind is nn.QuantizedEmbedding:
        bias = module.get("bias") if kind is nn.QuantizedLinear else None
        arrays = (module.weight, module.scales, module.get("biases"))
        quant = (module.group_size, module.bits, module.mode)
        bias_trainable = bias is not None and _trainable(module, "bias")
        return [Projection(x, "quantized", arrays, quant=quant)], (bias, bias_trainable)
    LoRALinear, LoRAEmbedding = _lora()
    if kind is LoRALinear:
        # LoRALinear: linear(x) + scale * (dropout(x) @ A) @ B. The rank-r input goes through
        # autodiff (A and the dropout), the vocabulary-wide product through the chunked loss.
        base = _projections(module.linear, x)
        low = Projection(module.dropout(x) @ module.lora_a, "dense", (module.lora_b,), scale=module.scale,
                         transposed=True, trainable=_trainable(module, "lora_b"))
        return base[0] + [low], base[1]
    if kind is LoRAEmbedding:
        # LoRAEmbedding.as_linear: embedding.as_linear(x) + scale * (dropout(x) @ B.T) @ A.T
        base = _projections(module.embedding, x)
        low = Projection(module.dropout(x) @ module.lora_b.T, "dense", (module.lora_a,), scale=module.scale,
                         trainable=_trainable(module, "lora_a"))
        return base[0] + [low], base[1]
    return None


class Head:
    """The output projection of a model, with its post-processing.

    ``head(hidden)`` computes the logits exactly as the model does (same ops, same dtype);
    :meth:`terms` opens it up for :func:`trainer.model.chunked.chunked_cross_entropy`.

    Attributes:
        tied (bool): The projection is the input embedding (``.as_linear``).
        hidden_divisor (float | None): The hidden states are divided by this first (MiniCPM's
            ``hidden_size / dim_model_base``).
        logit_scale (float): The logits are multiplied by this (Cohere's ``logit_scale``).
        logit_divisor (float): Then divided by this (Granite's ``logits_scaling``; a division, as
            the model does it, so that :func:`verify_split` can ask for exact equality).
        softcap (float | None): Then ``softcap * tanh(logits / softcap)`` (Gemma 2).
    """

    def __init__(self, container: nn.Module, path: str, tied: bool, hidden_divisor: Optional[float] = None,
                 logit_scale: float = 1.0, logit_divisor: float = 1.0, softcap: Optional[float] = None):
        self._container = container
        self._path = path
        self.tied = tied
        self.hidden_divisor = hidden_divisor
        self.logit_scale = float(logit_scale)
        self.logit_divisor = float(logit_divisor)
        self.softcap = None if softcap is None else float(softcap)

    @property
    def module(self) -> nn.Module:
        """The weight's module now (``lm_head`` or the embedding, possibly LoRA-wrapped)."""
        module = self._container
        for part in self._path.split("."):
            module = getattr(module, part)
        return module

    def _input(self, hidden: mx.array) -> mx.array:
        return hidden if self.hidden_divisor is None else hidden / self.hidden_divisor

    def __call__(self, hidden: mx.array) -> mx.array:
        module = self.module
        x = self._input(hidden)
        out = module.as_linear(x) if self.tied else module(x)
        if self.logit_scale != 1.0:
            out = out * self.logit_scale
        if self.logit_divisor != 1.0:
            out = out / self.logit_divisor
        if self.softcap is not None:
            out = mx.tanh(out / self.softcap) * self.softcap
        return out

    def supported(self) -> bool:
        """Whether the current head module can be opened up (False for e.g. a DoRA-wrapped head)."""
        return _supported(self.module)

    def terms(self, hidden: mx.array) -> Terms:
        """The head applied to ``hidden`` ([N, D]) as linear terms (read now: LoRA may have replaced modules)."""
        opened = _projections(self.module, self._input(hidden))
        if opened is None:
            raise TypeError(f"chunked loss: cannot open an output head of type {type(self.module).__name__}")
        projections, (bias, bias_trainable) = opened
        return Terms(tuple(projections), bias, bias_trainable, self.logit_scale, self.logit_divisor, self.softcap)

    def __repr__(self):
        extras = [f"hidden / {self.hidden_divisor}"] if self.hidden_divisor is not None else []
        extras += [f"* {self.logit_scale}"] if self.logit_scale != 1.0 else []
        extras += [f"/ {self.logit_divisor}"] if self.logit_divisor != 1.0 else []
        extras += [f"softcap {self.softcap}"] if self.softcap is not None else []
        described = [f"{'tied ' if self.tied else ''}{self._path}: {type(self.module).__name__}", *extras]
        return f"Head({', '.join(described)})"


class Trunk:
    """``trunk(inputs, cache=None) -> hidden [B, L, D]``: the model up to (and with) its final norm."""

    def __init__(self, container: nn.Module, path: str):
        self._container = container
        self._path = path

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return getattr(self._container, self._path)(inputs, cache)

    def __repr__(self):
        return f"Trunk({type(self._container).__name__}.{self._path})"


class Split(NamedTuple):
    trunk: Trunk
    head: Head


# ---------------------------------------------------------------------------- the survey

# Spellings of the trunk call and of the wrapper call that mean the same thing when the caller passes
# only (inputs, cache): input_embeddings defaults to None in every surveyed model.
_TRUNK_CALLS = (
    "self.model(inputs, cache, input_embeddings)",
    "self.model(inputs, cache=cache, input_embeddings=input_embeddings)",
    "self.model(inputs, cache=cache)",
    "self.model(inputs, cache)",
)
_WRAPPER_CALLS = (
    "self.language_model(inputs, cache=cache, input_embeddings=input_embeddings)",
    "self.language_model(inputs, cache)",
)


def _canonical(source: str) -> str:
    """The body of a ``__call__`` (or a template), docstring dropped, trunk calls spelled ``TRUNK(...)``."""
    tree = ast.parse(textwrap.dedent(source))
    body = tree.body
    if len(body) == 1 and isinstance(body[0], ast.FunctionDef):
        body = body[0].body
    body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    text = "\n".join(ast.unparse(s) for s in body)
    for call in _TRUNK_CALLS:
        text = text.replace(call, "TRUNK()")
    for call in _WRAPPER_CALLS:
        text = text.replace(call, "WRAPPED()")
    return text


def _tie_by_args(m):
    return bool(m.args.tie_word_embeddings)


def _head_if(tied: bool, m, **post) -> Head:
    return Head(m, "model.embed_tokens", True, **post) if tied else Head(m, "lm_head", False, **post)


def _minicpm(m) -> Optional[Head]:
    if not m.args.tie_word_embeddings:
        return Head(m, "lm_head", False, hidden_divisor=m.args.hidden_size / m.args.dim_model_base)
    # Tied MiniCPM computes `out @ embed_tokens.weight.T`: as_linear only for a plain nn.Embedding
    # (a quantized or LoRA-wrapped embedding would make the model itself compute something else).
    return Head(m, "model.embed_tokens", True) if type(m.model.embed_tokens) is nn.Embedding else None


# template (natural Python, canonicalised like the model's source) -> container -> Head | None
_TEMPLATES: dict[str, Callable] = {
    # llama (mistral, xverse), qwen2, qwen3, qwen3_moe, phi3, olmo2, olmo3, smollm3, ministral3, ...
    """
    out = TRUNK()
    if self.args.tie_word_embeddings:
        out = self.model.embed_tokens.as_linear(out)
    else:
        out = self.lm_head(out)
    return out
    """: lambda m: _head_if(_tie_by_args(m), m),
    # mixtral, hunyuan_v1_dense
    """
    out = TRUNK()
    if self.args.tie_word_embeddings:
        return self.model.embed_tokens.as_linear(out)
    else:
        return self.lm_head(out)
    """: lambda m: _head_if(_tie_by_args(m), m),
    # gemma3_text (sanitize() sets the flag and drops lm_head together)
    """
    out = TRUNK()
    if self.tie_word_embeddings:
        out = self.model.embed_tokens.as_linear(out)
    else:
        out = self.lm_head(out)
    return out
    """: lambda m: _head_if(bool(m.tie_word_embeddings), m),
    # kimi_linear
    """
    out = TRUNK()
    if self.lm_head is None:
        return self.model.embed_tokens.as_linear(out)
    return self.lm_head(out)
    """: lambda m: _head_if(m.lm_head is None, m),
    # deepseek, deepseek_v2/v3/v32, glm4, qwen2_moe, kimi's LanguageModel, ...
    """
    out = TRUNK()
    return self.lm_head(out)
    """: lambda m: _head_if(False, m),
    # gpt_oss, deepseek_v41
    """
    return self.lm_head(TRUNK())
    """: lambda m: _head_if(False, m),
    # gemma
    """
    out = TRUNK()
    out = self.model.embed_tokens.as_linear(out)
    return out
    """: lambda m: _head_if(True, m),
    # lfm2, hunyuan
    """
    out = TRUNK()
    return self.model.embed_tokens.as_linear(out)
    """: lambda m: _head_if(True, m),
    # gemma2
    """
    out = TRUNK()
    out = self.model.embed_tokens.as_linear(out)
    out = mx.tanh(out / self.final_logit_softcapping)
    out = out * self.final_logit_softcapping
    return out
    """: lambda m: _head_if(True, m, softcap=m.final_logit_softcapping),
    # cohere, cohere2
    """
    out = TRUNK()
    out = self.model.embed_tokens.as_linear(out)
    out = out * self.model.args.logit_scale
    return out
    """: lambda m: _head_if(True, m, logit_scale=m.model.args.logit_scale),
    # granite, granitemoe (granitemoehybrid too: its trunk call is spelled cache=cache)
    """
    out = TRUNK()
    if self.args.tie_word_embeddings:
        out = self.model.embed_tokens.as_linear(out)
    else:
        out = self.lm_head(out)
    return out / self.logits_scaling
    """: lambda m: _head_if(_tie_by_args(m), m, logit_divisor=m.logits_scaling),
    # minicpm
    """
    out = TRUNK()
    if not self.args.tie_word_embeddings:
        out = self.lm_head(out / (self.args.hidden_size / self.args.dim_model_base))
    else:
        out = out @ self.model.embed_tokens.weight.T
    return out
    """: _minicpm,
}
_TEMPLATES = {_canonical(k): v for k, v in _TEMPLATES.items()}
_WRAPPER = _canonical("return WRAPPED()")  # gemma3, mistral3, kimi_k25, kimi_vl, llama4, qwen3_vl, ...


_SOURCES: dict = {}  # class -> canonical source of its __call__ (read once: a trace may ask many times)


def _call_source(module: nn.Module) -> Optional[str]:
    kind = type(module)
    if kind not in _SOURCES:
        try:
            _SOURCES[kind] = _canonical(inspect.getsource(kind.__call__))
        except (OSError, TypeError, SyntaxError):  # no source (built dynamically), or not Python
            _SOURCES[kind] = None
    return _SOURCES[kind]


def split_head(model: nn.Module) -> Optional[Split]:
    """``(trunk, head)`` of an mlx-lm causal LM, or ``None`` if it does not follow a surveyed template.

    ``trunk(inputs, cache=None)`` returns the hidden states [B, L, D] after the final norm;
    ``head`` (:class:`Head`) turns them into the model's logits. ``None`` also for a head the
    chunked loss cannot open (DoRA, or any module type other than Linear, Embedding, their
    quantized forms and mlx-lm's LoRALinear / LoRAEmbedding).
    """
    container = model
    for _ in range(3):  # wrappers nest at most once in mlx-lm; the bound only guards against cycles
        source = _call_source(container)
        if source is None:
            return None
        if source == _WRAPPER:
            container = container.language_model
            continue
        rule = _TEMPLATES.get(source)
        if rule is None:
            return None
        try:
            head = rule(container)
        except AttributeError:  # a template's attribute is missing: not the model we surveyed
            return None
        if head is None or not head.supported():
            return None
        return Split(Trunk(container, "model"), head)
    return None


def verify_split(model: nn.Module, split: Split, inputs: mx.array, atol: float = 0.0) -> float:
    """The largest ``|model(inputs) - head(trunk(inputs))|`` (in float32); raises if above ``atol``.

    Both sides run the same ops in the same dtype, so the difference is normally exactly 0. Run it
    with the model in eval mode (dropout would draw different masks) on a few tokens.
    """
    expected = model(inputs).astype(mx.float32)
    got = split.head(split.trunk(inputs)).astype(mx.float32)
    if expected.shape != got.shape:
        raise ValueError(f"split head: logits shape {got.shape} != model's {expected.shape}")
    diff = mx.abs(expected - got).max().item()
    if not diff <= atol:  # also catches NaN
        raise ValueError(f"split head: logits differ from the model's by {diff} (> {atol})")
    return diff
