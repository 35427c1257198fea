"""One pipeline stage of an mlx-lm model: its own layers, and nothing of the others in memory.

``parallel.pipeline`` makes every rank a stage holding a contiguous run of the
decoder's blocks (:func:`plan_stages`). The model is loaded lazily (mlx-lm's
``lazy=True``: a weight is read from disk only when evaluated), the recipe's
method is applied to the whole model (so adapters are initialised in the same
order, from the same seed, as in one process), and then :func:`cut` turns it
into this rank's stage, in place:

* the blocks of other stages keep their place in ``layers`` but lose every
  parameter and pass their input through, so the stage's parameters keep the
  names they have in the whole model (a checkpoint's adapters are mlx-lm's);
* the embedding (on every stage but the first) makes zeros of the right shape,
  and the first block of the stage takes the activations received from the
  stage before instead; the last block of every stage but the last hands its
  output to the pipeline; the final norm and the output head (every stage but
  the last) do nothing, cheaply. Tied embeddings stay whole on the last stage,
  which needs them as its head.

The model's own ``__call__`` then runs unchanged on every stage: whatever the
architecture does between the embedding and the blocks (Gemma's scaling, the
masks) or after them (soft-capping) still happens where it happens in one
process. What is replaced is swapped by class, per instance, as
``trainer.model.routing`` routes: no other model in the process changes.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError, ModelError


@dataclass(frozen=True)
class StagePlan:
    """The blocks of each stage: ``bounds[s] = (start, stop)``; this rank is stage ``rank``."""

    bounds: tuple
    rank: int

    @property
    def stages(self) -> int:
        return len(self.bounds)

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.stages - 1

    @property
    def mine(self) -> tuple:
        return self.bounds[self.rank]

    def describe(self) -> str:
        return ", ".join(f"stage {s}: blocks {a}-{b - 1}" for s, (a, b) in enumerate(self.bounds))


def plan_stages(layers: int, stages: int, rank: int, stage_layers=None, weights=None) -> StagePlan:
    """Contiguous runs of blocks per stage: as given (``parallel.stage_layers``), in proportion to ``weights``
    (``parallel.balance``: a bigger Mac takes more), or even.

    Raises:
        ConfigError: A split that does not cover the model, or a stage with no block.
    """
    if stage_layers is not None:
        counts = list(stage_layers)
        if len(counts) != stages or sum(counts) != layers or min(counts) < 1:
            raise ConfigError(f"parallel.stage_layers {counts} must give each of the {stages} stages at least one "
                              f"block, {layers} in all (the model's count)")
    else:
        if layers < stages:
            raise ConfigError(f"the model has {layers} blocks, fewer than the {stages} pipeline stages; run on at "
                              f"most {layers} ranks")
        share = [1.0] * stages if weights is None else [float(w) for w in weights]
        counts = _proportional(layers, share)
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return StagePlan(tuple(bounds), rank)


def _proportional(total: int, weights: list) -> list:
    """``total`` blocks in proportion to ``weights``, each stage at least one (largest remainders)."""
    scale = (total - len(weights)) / sum(weights)
    exact = [1 + w * scale for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _parts(model: nn.Module):
    """The embedding, blocks and final norm of an mlx-lm decoder (``model.model``), or one sentence why not."""
    inner = model["model"] if "model" in model else None
    if inner is None or not all(k in inner for k in ("embed_tokens", "layers", "norm")):
        kind = getattr(model, "model_type", type(model).__module__)
        raise ModelError(f"parallel.pipeline splits decoders built as model.embed_tokens, model.layers and "
                         f"model.norm (Llama, Qwen, Mistral, Gemma, Phi-3 and most of mlx-lm's); {kind} is not one")
    return inner


def activation_dtype(model: nn.Module):
    """The dtype of the activations between blocks (the embedding's output), read without evaluating anything."""
    embed = _parts(model).embed_tokens
    return embed.scales.dtype if isinstance(embed, nn.QuantizedEmbedding) else embed.weight.dtype


def _empty(module: nn.Module) -> None:
    """Drop a module's parameters and children (unevaluated, lazily loaded weights are never read)."""
    for key in list(module.keys()):
        del module[key]


def _swap(module: nn.Module, name: str, methods: dict) -> None:
    """Give this one instance a subclass of its class with ``methods`` replaced."""
    cls = type(module)
    module.__class__ = type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__, "_stage_role": name})


class StageIO:
    """What the pipeline hands a stage (``received``) and takes from it (``sent``), per forward."""

    def __init__(self):
        self.received = None
        self.sent = None


def cut(model: nn.Module, plan: StagePlan, tied: bool) -> StageIO:
    """Make ``model`` this rank's stage in place (see the module docstring); returns its input and output hooks.

    Args:
        model (nn.Module): An mlx-lm model, loaded lazily, with the method applied.
        plan (StagePlan): The stages and this rank's.
        tied (bool): The output head is the embedding (``tie_word_embeddings``).
    """
    inner, io = _parts(model), StageIO()
    start, stop = plan.mine
    layers = inner.layers
    for index, layer in enumerate(layers):
        if not start <= index < stop:
            _empty(layer)
            _swap(layer, "skipped", {"__call__": lambda self, h, *args, **kwargs: h})
    if not plan.first:
        _swap(layers[start], "input", {"__call__": _taking(io, type(layers[start]).__call__)})
    if not plan.last:
        _swap(layers[stop - 1], "output", {"__call__": _giving(io, type(layers[stop - 1]).__call__)})
        _swap(inner.norm, "skipped", {"__call__": lambda self, h: h})
        _empty(inner.norm)
        if "lm_head" in model:
            _empty(model.lm_head)
            _swap(model.lm_head, "skipped", {"__call__": lambda self, h: mx.zeros((*h.shape[:-1], 1), h.dtype)})
    _cut_embedding(inner.embed_tokens, plan, tied)
    return io


def _cut_embedding(embed: nn.Module, plan: StagePlan, tied: bool) -> None:
    """The embedding makes zeros past the first stage; as the tied head it stays whole on the last stage only."""
    if plan.first and (plan.last or not tied):
        return
    quantized = isinstance(embed, nn.QuantizedEmbedding)
    dims = embed.weight.shape[1] * 32 // embed.bits if quantized else embed.weight.shape[1]
    dtype = embed.scales.dtype if quantized else embed.weight.dtype
    methods = {}
    if not plan.first:
        methods["__call__"] = lambda self, x: mx.zeros((*x.shape, dims), dtype)
    if tied and not plan.last:
        methods["as_linear"] = lambda self, h: mx.zeros((*h.shape[:-1], 1), h.dtype)
    keep = tied and plan.last  # the head of the last stage
    if not keep and not plan.first:
        _empty(embed)
    _swap(embed, "embedding", methods)


def _taking(io: StageIO, call):
    def __call__(self, h, *args, **kwargs):
        return call(self, io.received, *args, **kwargs)  # what the stage before sent, not the embedding's zeros

    return __call__


def _giving(io: StageIO, call):
    def __call__(self, h, *args, **kwargs):
        out = call(self, h, *args, **kwargs)
        io.sent = out
        return out

    return __call__
