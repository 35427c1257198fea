"""What fits on a Mac: memory per rank of a recipe, computed from its model's config.

``mlx-dp recipes memory [RECIPE ...]`` prints, for each recipe and N = 1, 2
and 4 ranks, the memory one rank needs with the optimizer state whole or
sharded (``parallel.shard_optimizer``), and whether that fits a 16, 32 or
64 GB Mac. The model is the recipe's real architecture (the library's ``data/archs``),
built lazily (nothing is computed or downloaded), with the recipe's method
applied, so weight, adapter and optimizer bytes are counted exactly:

    per rank = W + G + O / S + A

* W: every weight as stored (bf16; a 4-bit base counts its packed weights,
  scales and biases);
* G: the trainable parameters' gradients (their dtype: fp32 adapters, bf16
  for a full fine-tune of a bf16 model);
* O: optimizer state, 2 tensors per trainable parameter for AdamW/Adam (1 for
  SGD); S = N with ``shard_optimizer``, else 1;
* A: activations of one micro-batch of ``batch_size x max_seq_length`` tokens
  (the worst case; a preference objective's batch_size counts pairs, each two
  rows), per layer ``34 b s h`` bytes without gradient
  checkpointing (Korthikanti et al., 2022, half precision, fused attention)
  or ``2 b s h`` with it plus one layer's ``34 b s h``, plus the loss's
  logits: fp32 twice (``8 b s V``) for the plain loss, or with
  ``training.chunked_loss`` (when the model's head splits) the chunks MLX
  allocates ahead, about 16 of ``trainer.model.chunked``'s 64 MiB
  (measured: docs/RESULTS.md, "The chunked loss"), whichever is less.

DPO adds nothing here: its reference log-probs are computed before training
and cached (``trainer.objectives.reference``), so even a full fine-tune holds no
frozen copy of the model (a reference forward in every update would need one
more W for a full fine-tune).

A Mac gives MLX about 75% of its memory by default (macOS's GPU wired limit),
so a recipe "fits" when its total is under 75% of the Mac's memory.
"""

import json
from dataclasses import dataclass
from pathlib import Path

MACS_GB = (16, 32, 64)
USABLE = 0.75  # share of a Mac's memory MLX gets by default
WORLD_SIZES = (1, 2, 4)
OPTIMIZER_TENSORS = {"adamw": 2, "adam": 2, "sgd": 1, "adafactor": 0}  # adafactor: factored, small


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank by part, for one recipe at one world size."""

    weights: int
    grads: int
    optimizer: int  # already divided across ranks when sharded
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def fits(self, mac_gb: int) -> bool:
        return self.total <= USABLE * mac_gb * 1e9


def model_bytes(cfg) -> tuple[int, int, dict]:
    """(weight bytes, trainable bytes, text config) of a recipe's model with its method applied; lazy."""
    from mlx.utils import tree_flatten

    from . import archs

    from ..model.heads import split_head

    model, config = built_model(cfg)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    # "splits": the chunked loss can open the model's head (training.chunked_loss then holds no whole logits)
    return weights, trainable, dict(archs.text_config(config), splits=split_head(model) is not None)


def built_model(cfg) -> tuple:
    """(model, config.json) of a recipe's model with its method applied, built lazily (nothing evaluated)."""
    import mlx.nn as nn

    from ..model.load import apply_method
    from ..library import resolve
    from . import archs

    local = Path(resolve(cfg.model.path)) / "config.json"
    if local.is_file():  # a model on disk: its own config
        config = json.loads(local.read_text())
        quantized = "quantization" in config
    else:  # a hub id: the real config recorded in the library's data/archs
        arch, quantized = archs.arch_for_model_path(cfg.model.path)
        config = archs.load_arch(arch)
    stored = cfg.model.dtype or config.get("torch_dtype") or "bfloat16"
    model = archs.build_model(config, dtype=stored)
    if quantized:
        q = config.get("quantization") or {}
        nn.quantize(model, group_size=q.get("group_size", 64), bits=q.get("bits", 4))
    apply_method(model, cfg.method, cfg.training.seed)
    return model, config


def row_length(cfg) -> int:
    """The longest row a micro-batch can hold (a GRPO row: the prompt and its longest completion)."""
    from ..objectives.registry import objective_class

    return objective_class(cfg).row_length(cfg)


def rows_per_micro_batch(cfg) -> int:
    """Model rows per rank per micro-batch: ``batch_size`` items of the objective's rows each (a pair: 2)."""
    from ..objectives.registry import objective_class

    return cfg.training.batch_size * objective_class(cfg).rows_per_item(cfg.method)


def estimate(cfg, world_size: int, sharded: bool, sizes=None) -> Estimate:
    """Memory per rank of ``cfg`` at ``world_size`` ranks (see the module docstring).

    Args:
        cfg (Config): The recipe.
        world_size (int): N.
        sharded (bool): With ``parallel.shard_optimizer``.
        sizes (tuple | None): ``model_bytes(cfg)``, to reuse. Default: computed.
    """
    weights, trainable, text = sizes or model_bytes(cfg)
    optimizer = OPTIMIZER_TENSORS[cfg.training.optimizer] * trainable
    if sharded:
        optimizer //= world_size
    b, s = rows_per_micro_batch(cfg), row_length(cfg)
    h, layers, vocab = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
    per_layer = 34 * b * s * h
    stored = per_layer + 2 * b * s * h * layers if cfg.training.grad_checkpoint else per_layer * layers
    return Estimate(weights, trainable, optimizer, stored + logits_bytes(cfg, b * s, vocab, text.get("splits", False)))


LOOKAHEAD_CHUNKS = 16  # chunks of logits MLX's eval loop allocates ahead of the computation (trainer.model.chunked)


def logits_bytes(cfg, tokens: int, vocab: int, splits: bool) -> int:
    """The loss's logits for ``tokens`` tokens: two fp32 copies, or the chunked loss's look-ahead of chunks."""
    from ..model.chunked import default_chunk_tokens

    whole = 8 * tokens * vocab
    if not (cfg.training.chunked_loss and splits):
        return whole
    return min(whole, LOOKAHEAD_CHUNKS * default_chunk_tokens(vocab) * vocab * 4)


def table(recipes: list) -> str:
    """A Markdown table: per recipe, the model state per rank at N = 1, 2, 4 (sharded in brackets),
    the activations, and on which Macs the total fits."""
    from ..config.load import load_config
    from .recipes import recipe_name

    head = ("| recipe | weights + gradients + optimizer, GB per rank at N = " + " / ".join(map(str, WORLD_SIZES))
            + " (sharded) | activations, GB | " + " | ".join(f"{m} GB Mac" for m in MACS_GB) + " |")
    lines = [head, "| --- | --- | --- | " + " | ".join("---" for _ in MACS_GB) + " |"]
    for path in recipes:
        cfg = load_config(path)
        try:
            sizes = model_bytes(cfg)
        except Exception as e:  # noqa: BLE001 (a recipe whose model has no recorded architecture)
            lines.append(f"| `{recipe_name(path)}` | ({type(e).__name__}: {e}) | | " + " | ".join("" for _ in MACS_GB)
                         + " |")
            continue
        plain = {n: estimate(cfg, n, False, sizes) for n in WORLD_SIZES}
        shard = {n: estimate(cfg, n, True, sizes) for n in WORLD_SIZES}
        def state(e):
            return (e.total - e.activations) / 1e9

        cells = " / ".join(f"{state(plain[n]):.2f}" + (f" ({state(shard[n]):.2f})"
                                                       if shard[n].total != plain[n].total else "")
                           for n in WORLD_SIZES)
        cells += f" | {plain[1].activations / 1e9:.1f}"
        fits = []
        for mac in MACS_GB:
            ok = [f"N={n}" + ("" if plain[n].fits(mac) else " sharded") for n in WORLD_SIZES if shard[n].fits(mac)]
            fits.append(", ".join(ok) if ok else "no")
        lines.append(f"| `{recipe_name(path)}` | {cells} | " + " | ".join(fits) + " |")
    return "\n".join(lines)


HEADER = "# Memory"


def header_line(path) -> str:
    """A recipe's ``# Memory`` header line: :func:`estimate` at one rank, the worst case, said as such.

    The recipe headers hold exactly this line (``tests/test_memory_plan.py``), so
    the figures a user reads in a recipe are the ones ``mlx-dp recipes memory`` prints.
    """
    from ..config.load import load_config
    from ..log import format_bytes
    from ..objectives.registry import objective_class

    cfg = load_config(path)
    sizes = model_bytes(cfg)
    one = estimate(cfg, 1, False, sizes)
    fits = next((mac for mac in MACS_GB if one.fits(mac)), None)
    sharded = next((mac for mac in MACS_GB if estimate(cfg, max(WORLD_SIZES), True, sizes).fits(mac)), None)
    where = f"fits a {fits} GB Mac" if fits else (
        f"at {max(WORLD_SIZES)} ranks with parallel.shard_optimizer, a {sharded} GB Mac" if sharded else
        f"over {int(USABLE * MACS_GB[-1])} GB: lower batch_size or max_seq_length")
    b, s = cfg.training.batch_size, row_length(cfg)
    rows = rows_per_micro_batch(cfg)
    batch = f"batch {b}" if rows == b else f"batch {b} {objective_class(cfg).unit} ({rows} rows)"
    return (f"{HEADER} (mlx-dp recipes memory; worst case, every row {s} tokens at {batch}): "
            f"{format_bytes(one.total - one.activations)} weights, gradients and optimizer state + "
            f"{format_bytes(one.activations)} activations per rank; {where}.")

