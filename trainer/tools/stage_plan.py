"""``mlx-dp recipes memory RECIPE --macs 4x64GB``: does data parallelism fit these Macs, and if not, which pipeline?

For a recipe and a set of Macs it says whether data parallelism fits (every rank
holds the whole model: ``trainer.tools.memory_plan``, with the optimizer state
sharded where that helps), and if not, the fewest pipeline stages
(``parallel.pipeline``) that fit, on the largest Macs, with the blocks each
stage takes and its memory. Bytes are counted on the recipe's real
architecture, built lazily, as ``memory_plan`` counts them. A stage holds:

* its blocks' weights, plus the embedding on the first stage and the final
  norm and head on the last (a tied head: the embedding there too);
* its adapters' gradients and optimizer state;
* what GPipe with recomputation keeps (``trainer.step.pipeline``): every part's
  received activations or returned gradients (``b s h`` in the activation
  dtype over the micro-batch), one part's activations through its own blocks
  (``34 (b/p) s h`` per block), and on the last stage one part's share of
  the loss's activations (``memory_plan``'s head term).

The split is the trainer's own (``trainer.model.stages.plan_stages``): in
proportion to each Mac's memory, as ``parallel.balance: auto`` splits. Where
that leaves a stage over its Mac and another split fits, the plan gives that
split as ``parallel.stage_layers``.
"""

import dataclasses
import math
import re
from dataclasses import dataclass

from ..errors import ConfigError
from . import archs
from . import memory_plan as mp


def parse_macs(text: str) -> list:
    """``"4x64GB"``, ``"64GB,32GB"`` or ``"2x64,2x32"`` as a list of gigabytes, largest first."""
    macs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        found = re.fullmatch(r"(?:(\d+)\s*[x×*]\s*)?(\d+(?:\.\d+)?)\s*(?:GB|G)?", item, re.IGNORECASE)
        if not found or float(found.group(2)) <= 0 or (found.group(1) and int(found.group(1)) < 1):
            raise ConfigError(f"--macs {text!r}: {item!r} is not a count and size like 4x64GB or 32GB")
        macs += [float(found.group(2))] * int(found.group(1) or 1)
    if not macs:
        raise ConfigError("--macs needs at least one Mac, like 4x64GB or 64GB,32GB")
    return sorted(macs, reverse=True)


@dataclass
class Parts:
    """Bytes of a recipe's model by part: embedding, each block, the final norm and head; trainable per block."""

    embed: int
    blocks: list
    head: int  # final norm and lm_head (a tied head: the embedding again)
    trainable: list  # per block
    text: dict  # the text config (hidden size, vocabulary)
    activation_bytes: int  # bytes of one activation element
    loss: int  # the loss's activations for a whole micro-batch (memory_plan's head term)


def model_parts(cfg) -> Parts:
    from mlx.utils import tree_flatten

    model, config = mp.built_model(cfg)

    def size(module, trainable=False):
        tree = module.trainable_parameters() if trainable else module.parameters()
        return sum(v.nbytes for _, v in tree_flatten(tree))

    inner = model["model"]
    embed = size(inner.embed_tokens)
    head = size(inner.norm) + (size(model.lm_head) if "lm_head" in model else embed)
    blocks = [size(layer) for layer in inner.layers]
    trainable = [size(layer, True) for layer in inner.layers]
    dtype = cfg.model.dtype or config.get("torch_dtype") or "bfloat16"
    text = archs.text_config(config)
    weights, trainable_bytes = sum(blocks) + embed + head, sum(trainable)
    plain = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, grad_checkpoint=False))
    whole = mp.estimate(plain, 1, False, (weights, trainable_bytes, text))  # its activations less its blocks'
    rows, s, h = mp.rows_per_micro_batch(cfg), mp.row_length(cfg), text["hidden_size"]
    loss = whole.activations - 34 * rows * s * h * len(blocks)
    return Parts(embed, blocks, head, trainable, text, 4 if dtype == "float32" else 2, loss)


def stage_bytes(cfg, parts: Parts, bounds: tuple, first: bool, last: bool) -> dict:
    """One stage's bytes by kind, for the blocks ``bounds`` = (start, end)."""
    a, b = bounds
    tensors = mp.OPTIMIZER_TENSORS[cfg.training.optimizer]
    trainable = sum(parts.trainable[a:b])
    rows, s, h = mp.rows_per_micro_batch(cfg), mp.row_length(cfg), parts.text["hidden_size"]
    pieces = max(1, min(cfg.parallel.pipeline_microbatches, rows))
    part = math.ceil(rows / pieces)
    activations = rows * s * h * parts.activation_bytes + 34 * part * s * h * (b - a) + (
        parts.loss * part // rows if last else 0)
    weights = sum(parts.blocks[a:b]) + (parts.embed if first else 0) + (parts.head if last else 0)
    return {"weights": weights, "state": trainable * (1 + tensors), "activations": activations}


def _fitted(parts: Parts, cfg, capacities: list) -> list | None:
    """Blocks per stage so that the fullest stage's share of its Mac is smallest (a search on that share)."""
    n, layers = len(capacities), len(parts.blocks)

    def fill(share):
        counts, start = [], 0
        for i, cap in enumerate(capacities):
            end, left = start, n - i - 1
            while end < layers - left:
                used = sum(stage_bytes(cfg, parts, (start, end + 1), i == 0, i == n - 1).values())
                if used > share * cap and end > start:
                    break
                if used > share * cap:
                    return None
                end += 1
            if i == n - 1 and end < layers:
                return None
            counts.append(end - start)
            start = end
        return counts if min(counts) >= 1 and sum(counts) == layers else None

    low, high = 0.0, 1.0  # a share over 1 is a stage over its Mac: no split fits
    best = fill(high)
    if best is None:
        return None
    for _ in range(30):
        mid = (low + high) / 2
        found = fill(mid)
        if found is not None:
            best, high = found, mid
        else:
            low = mid
    return best


def plan(cfg, macs: list) -> str:
    """What to run on ``macs`` (gigabytes each): data parallel, or the fewest pipeline stages that fit."""
    usable = [mp.USABLE * m * 1e9 for m in macs]
    n = len(macs)
    lines = [f"on {n} Mac(s) of {', '.join(f'{m:g}' for m in macs)} GB (MLX gets {mp.USABLE:.0%} of each):"]
    # Data parallelism at its leanest: gradient checkpointing on (a pipeline recomputes anyway, so its recipes
    # leave it off), the optimizer state sharded where that helps.
    lean = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, grad_checkpoint=True),
                               parallel=dataclasses.replace(cfg.parallel, pipeline=False))
    plain, sharded = mp.estimate(lean, n, False), mp.estimate(lean, n, True)
    best = sharded if sharded.total < plain.total else plain
    how = " with parallel.shard_optimizer" if best is sharded else ""
    if best.total <= min(usable):
        lines.append(f"  data parallel fits{how}: {best.total / 1e9:.1f} GB per rank; no pipeline needed")
        return "\n".join(lines)
    lines.append(f"  data parallel does not fit: every rank needs {best.total / 1e9:.1f} GB{how}, gradient "
                 f"checkpointing on (weights {best.weights / 1e9:.1f} GB), over the {min(usable) / 1e9:.1f} GB "
                 "of the smallest Mac")
    if n < 2:
        lines.append("  a pipeline needs at least 2 Macs: give --macs every Mac you have")
        return "\n".join(lines)
    parts = model_parts(cfg)
    fewest = None
    for stages in range(2, min(n, len(parts.blocks)) + 1):
        found = _split(cfg, parts, macs, usable, stages)
        if found is None:
            continue
        if fewest is None:
            fewest = stages
            head, rows, _ = found
            lines += [f"  a pipeline of {stages} stages fits (parallel.pipeline: true; launch {stages} ranks on the "
                      f"{stages} largest Macs){head}:", *rows]
        if stages == n and n > fewest:
            lines.append(f"  on all {n} Macs as stages{found[0]}, the fullest stage needs {found[2] / 1e9:.1f} GB: "
                         "more stages share the compute (with parallel.pipeline_microbatches at least the stages)")
    if fewest is None:
        lines.append(f"  no pipeline of up to {min(n, len(parts.blocks))} stages fits: add Macs, lower "
                     "training.batch_size or data.max_seq_length, or quantize the base (QLoRA)")
    return "\n".join(lines)


def _split(cfg, parts: Parts, macs: list, usable: list, stages: int) -> tuple | None:
    """How ``stages`` stages on the largest Macs fit: (what to set, the stage lines, the fullest stage's bytes)."""
    from ..model.stages import plan_stages

    layers, caps = len(parts.blocks), usable[:stages]
    bounds = plan_stages(layers, stages, 0, weights=macs[:stages]).bounds
    rows, used = _table(cfg, parts, bounds, caps)
    if all(u <= cap for u, cap in zip(used, caps)):
        return "; parallel.balance: auto splits by memory", rows, max(used)
    counts = _fitted(parts, cfg, caps)
    if counts is None:
        return None
    bounds = [(sum(counts[:i]), sum(counts[:i + 1])) for i in range(stages)]
    rows, used = _table(cfg, parts, bounds, caps)
    return f" with parallel.stage_layers: {counts}", rows, max(used)


def _table(cfg, parts: Parts, bounds: list, caps: list) -> tuple:
    lines, used = [], []
    for i, (a, b) in enumerate(bounds):
        got = stage_bytes(cfg, parts, (a, b), i == 0, i == len(bounds) - 1)
        total = sum(got.values())
        used.append(total)
        lines.append(f"    stage {i}: blocks {a}-{b - 1} ({b - a}), {got['weights'] / 1e9:.1f} GB weights + "
                     f"{got['state'] / 1e9:.2f} GB adapters, gradients and optimizer state + "
                     f"{got['activations'] / 1e9:.1f} GB activations = {total / 1e9:.1f} GB of {caps[i] / 1e9:.1f}")
    return lines, used


def recipe_header(path) -> str:
    """A recipe's ``# Memory`` header line: ``memory_plan.header_line``, or for a pipeline recipe the fullest
    of ``max(WORLD_SIZES)`` stages on equal Macs, split as ``parallel.balance: auto`` splits them, and the
    smallest Mac each stage then fits."""
    from ..config.load import load_config

    cfg = load_config(path)
    return pipeline_header(cfg, path) if cfg.parallel.pipeline else mp.header_line(path)


def pipeline_header(cfg, path) -> str:
    from ..log import format_bytes
    from ..model.stages import plan_stages
    from .recipes import recipe_name

    parts = model_parts(cfg)
    stages = max(mp.WORLD_SIZES)
    bounds = plan_stages(len(parts.blocks), stages, 0).bounds
    used = [sum(stage_bytes(cfg, parts, b, i == 0, i == stages - 1).values()) for i, b in enumerate(bounds)]
    mac = next((m for m in mp.MACS_GB if max(used) <= mp.USABLE * m * 1e9), None)
    weights = sum(parts.blocks) + parts.embed + parts.head
    where = f"fits {stages} Macs of {mac} GB" if mac else f"over {int(mp.USABLE * mp.MACS_GB[-1])} GB a stage"
    rows = mp.rows_per_micro_batch(cfg)
    return (f"{mp.HEADER} (mlx-dp recipes memory {recipe_name(path)} --macs {stages}x{mac or mp.MACS_GB[-1]}GB; worst "
            f"case, every row {mp.row_length(cfg)} tokens at batch {rows} in {cfg.parallel.pipeline_microbatches} "
            f"parts): {format_bytes(weights)} of weights in all; as {stages} pipeline stages at most "
            f"{format_bytes(max(used))} a stage; {where}.")
