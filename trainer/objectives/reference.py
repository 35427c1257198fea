"""DPO's reference: the answers' log-probs under the model before tuning, computed once and cached.

DPO compares each answer's log-prob under the policy with its log-prob under
the reference, the model before tuning. Those reference log-probs never
change, so they are computed once per pair, before the first update, and
kept with the tokenized data: a training update then runs no reference
forward, and no method needs a second copy of the model in memory. For LoRA
and DoRA the reference is the base with the adapters switched off
(:func:`adapters_off`: each adapted layer is replaced by its base layer for the
pass); for a full fine-tune it is the model as loaded, before any update or
checkpoint is loaded into it. Either way, a frozen copy of the weights is
never held.

* **Sharded:** pairs are cut into fixed chunks of :data:`CHUNK_PAIRS` pairs in
  length order; chunk ``k`` is computed by rank ``k mod N``, and one sum over
  ranks gives every rank every value. A chunk's batch never depends on the
  number of ranks, so the values are bit-identical on 1 or N ranks.
* **Cached:** ``<data.cache_dir or HF_DATASETS_CACHE>/mlx-dp-reference/<key>.npy``,
  beside the tokenized data. The key hashes the tokenized pairs (the rows, the
  tokenizer and the data settings), the base weights as loaded (values, names,
  dtypes), the numerics settings (attention blocks, fused exp, padding) and the
  MLX version, so a changed model, data or recipe never reuses stale values,
  while a resumed or repeated run reads them back. Beside each file, a
  manifest (``<key>.json``) records the bytes' sha256, the shape, dtype, key
  and versions; a cache that fails a check (no manifest, another checksum,
  another shape, values that are not finite) is computed again, with a line
  that says why.

Cost: one forward pass per pair (chosen and rejected), about a third of a
training step's compute per pair, paid once per key. A run that trains on
fewer pairs than that (far under one epoch of a large set) would compute less
with a reference forward in every update; its recipe should take a slice of
the set instead (``train_split: "train[:8000]"``).
"""

import hashlib
import io
import json
import os
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import log
from ..errors import ModelError
from .base import TokenLoss, sequence_logps
from ..data.pair_batches import make_pair_batch

REFERENCE_VERSION = 2
CHUNK_PAIRS = 32  # pairs per reference batch; fixed, so every value is computed the same way on any world size


def _adapted_classes() -> dict:
    """mlx-lm's adapter layers and the attribute holding each one's base layer."""
    from ..tuner import DoRAEmbedding, DoRALinear, LoRAEmbedding, LoRALinear, LoRASwitchLinear

    return {LoRALinear: "linear", LoRASwitchLinear: "linear", DoRALinear: "linear", LoRAEmbedding: "embedding",
            DoRAEmbedding: "embedding"}


def _child(node, part: str):
    return node[int(part)] if isinstance(node, list) else node[part]


@contextmanager
def adapters_off(model):
    """Within the block, every LoRA or DoRA layer of ``model`` is its base layer (the adapters are off).

    The adapter modules are put back on exit; nothing is copied.
    """
    classes, swapped = _adapted_classes(), []
    for name, module in model.named_modules():
        base = classes.get(type(module))
        if base is None or not name:
            continue
        *path, key = name.split(".")
        parent = model
        for part in path:
            parent = _child(parent, part)
        swapped.append((parent, int(key) if isinstance(parent, list) else key, module, module[base]))
    for parent, key, _, base_layer in swapped:
        parent[key] = base_layer
    try:
        yield model
    finally:
        for parent, key, module, _ in swapped:
            parent[key] = module


def base_digest(model) -> str:
    """Hash of the base model as loaded (adapters off): its config and code version, and the weights' names,
    shapes, dtypes and bytes (a changed ``config.json`` or an mlx-lm that computes the model differently
    gives other log-probs from the same weights)."""
    try:
        import xxhash

        h = xxhash.xxh3_128()
    except ImportError:
        h = hashlib.blake2b(digest_size=16)
    import mlx_lm

    h.update(f"{type(model).__module__}.{type(model).__name__} {getattr(model, 'args', None)!r} "
             f"mlx-lm {mlx_lm.__version__}".encode())
    with adapters_off(model):
        params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    for name, value in params:
        h.update(f"{name}{value.shape}{value.dtype}".encode())
        h.update(memoryview(np.asarray(value.view(mx.uint8))))  # note: sync point, evaluates each weight once
    return h.hexdigest()


def cache_key(split, weights: str, settings: dict) -> str:
    """The cache key of ``split``'s reference log-probs: data, base weights, numerics settings, versions."""
    parts = [REFERENCE_VERSION, CHUNK_PAIRS, split.fingerprint(), weights, sorted(settings.items()), mx.__version__]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def cache_path(cache_dir: str | None, key: str) -> Path:
    """Where the values of ``key`` live: beside the tokenized data, in the datasets cache."""
    if cache_dir is None:
        import datasets

        cache_dir = datasets.config.HF_DATASETS_CACHE
    return Path(cache_dir).expanduser() / "mlx-dp-reference" / f"{key}.npy"


def chunks(split) -> list[np.ndarray]:
    """Pair indices in fixed chunks of :data:`CHUNK_PAIRS`, longest first (little padding)."""
    order = np.argsort(-split.lengths, kind="stable")
    return [order[i:i + CHUNK_PAIRS] for i in range(0, len(order), CHUNK_PAIRS)]


def compute(world, model, split, pad_multiple: int, nll: TokenLoss | None = None, stage=None) -> np.ndarray:
    """Reference log-probs of every pair, ``(pairs, 2)`` float32, sharded over ranks (a collective).

    Args:
        world (trainer.parallel.World): The group; every rank must call this.
        model: The model before tuning (adapters at their initial values or absent).
        split (trainer.data.pairs.PairSplit): The pairs.
        pad_multiple (int): Padding granularity (``data.pad_multiple``).
        nll (TokenLoss | None): How token losses are computed (the run's kernels). Default: MLX's own.
        stage (trainer.run.stages.Stage | None): This rank's stage of a pipeline: every chunk goes through
            every stage and its values come from the last. Default: ``None`` (chunks dealt over ranks).
    """
    values = np.zeros((len(split), 2), np.float32)
    was_training = model.training
    model.eval()
    try:
        with adapters_off(model), (nll or TokenLoss()).scoring() as nll:
            # Compiled as the training step is: the run's fused kernels are written for mx.compile, and the
            # chunks' widths are multiples of pad_multiple, so few shapes are traced.
            logps_of = mx.compile(partial(sequence_logps, model, nll=nll), inputs=[model.state],
                                  outputs=[model.state])
            if stage is not None:  # not compiled: a stage's input arrives from the stage before, each chunk anew
                logps_of = _through(stage, partial(sequence_logps, nll=nll))
            for k, indices in enumerate(chunks(split)):
                if k % world.size != world.rank and stage is None:
                    continue
                batch = make_pair_batch(split, indices, 0, 1, len(indices), pad_multiple)
                logps = np.array(logps_of(mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask)))
                # (above: a sync point per chunk keeps memory at one chunk)
                values[indices, 0], values[indices, 1] = logps[:len(indices)], logps[len(indices):]
    finally:
        model.train(was_training)
    if world.size > 1:  # every value is nonzero on one rank only: the float64 sum is exact
        summed = world.all_sum(values.ravel().tolist(), phase="reference", watched=False)
        values = np.asarray(summed, np.float32).reshape(values.shape)
    return values


def _through(stage, logps):
    """``logps(model, inputs, targets, mask)`` through a pipeline's stages: the last stage's values, zeros on
    the others (so the sum over ranks below is the one value)."""
    def run(*arrays):
        return stage.runner.score(lambda model, a: logps(model, *a), arrays, arrays[0].shape[0])

    return run


def manifest_path(path: Path) -> Path:
    """The manifest beside a cache file: what was written, so that a changed or damaged file is known."""
    return path.with_suffix(".json")


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` atomically: a reader sees the old file, the whole new one, or none."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def _write(path: Path, values: np.ndarray, key: str) -> None:
    """Write the values, then their manifest (the bytes' sha256, shape, dtype, key, versions), each atomically.

    A write cut between the two leaves values that no manifest vouches for, which the next run computes again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, values)
    data = buffer.getvalue()
    manifest = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "shape": list(values.shape),
                "dtype": str(values.dtype), "reference_version": REFERENCE_VERSION, "chunk_pairs": CHUNK_PAIRS,
                "mlx": mx.__version__, "numpy": np.__version__}
    _replace(path, data)
    _replace(manifest_path(path), json.dumps(manifest, indent=1).encode())


def _read(path: Path, pairs: int, key: str) -> tuple[np.ndarray | None, str | None]:
    """The cached values of ``key``, checked before use, or why they cannot be used.

    A cache full of NaN would end every run a few updates in, blaming the
    learning rate; one zeroed to the right shape would train on silently and
    change the results. So the values must be a finite float32 array of the
    split's shape, and their bytes must match the manifest written with them.

    Returns:
        tuple: ``(values, None)``; ``(None, None)`` where there is no cache
        file; ``(None, reason)`` where the cache fails a check (a phrase
        that follows "the cache PATH").
    """
    try:
        data = path.read_bytes()
        values = np.load(io.BytesIO(data), allow_pickle=False)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, EOFError) as e:
        return None, f"is not a readable NumPy array ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if values.shape != (pairs, 2) or values.dtype != np.float32:
        return None, f"holds {values.dtype} values of shape {values.shape}, not float32 of shape ({pairs}, 2)"
    if not np.isfinite(values).all():
        return None, f"holds {int((~np.isfinite(values)).sum())} values that are not finite"
    try:
        manifest = json.loads(manifest_path(path).read_text())
        recorded = manifest["sha256"], manifest["key"]
    except FileNotFoundError:
        return None, f"has no manifest ({manifest_path(path).name}) to vouch for it"
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"has an unreadable manifest ({manifest_path(path).name})"
    if recorded[1] != key:
        return None, "has a manifest written for another key"
    if hashlib.sha256(data).hexdigest() != recorded[0]:
        return None, "does not match the checksum in its manifest (it changed after it was written)"
    return values, None


def _check_computed(values: np.ndarray, name: str) -> None:
    """Refuse reference log-probs that are not finite: training on them fails later, blaming something else.

    Raises:
        ModelError: Naming how many pairs of the split, and the first.
    """
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise ModelError(f"the model before tuning gives {int(bad.sum())} of the {len(values)} {name} pairs a "
                         f"log-prob that is not finite (pair {int(np.argmax(bad))} first), so DPO has no reference "
                         "for them; check the model's weights, or load them in float32 (model.dtype=float32)")


def attach(world, model, splits: dict, cache_dir: str | None, settings: dict, nll: TokenLoss | None = None,
           stage=None) -> dict:
    """Give every pair split its reference log-probs, from the cache or computed (sharded) and cached.

    Every rank must call this with the model *before* any update or
    checkpoint is loaded into it. Ranks agree first on whether every rank
    holds the cache (another machine's disk may not), so all compute
    together or none does. A cache that fails its checks (:func:`_read`)
    counts as absent, and the line that announces the computation says why.

    Args:
        world (trainer.parallel.World): The group.
        model: The model before tuning.
        splits (dict[str, PairSplit]): The splits to fill in place.
        cache_dir (str | None): ``data.cache_dir``.
        settings (dict): What else changes the values (resolved attention
            block, fused exp, padding multiple, the BLAS that multiplies).
        nll (TokenLoss | None): How token losses are computed. Default: MLX's own.
        stage (trainer.run.stages.Stage | None): This rank's stage of a pipeline. Default: ``None``.

    Returns:
        dict: Per split name, ``"cached"`` or ``"computed"``, and its cache file.

    Raises:
        ModelError: The model before tuning gives a pair a log-prob that is not finite.
    """
    weights = base_digest(model) if stage is None else stage.joined(world, base_digest(model))
    done = {}
    for name, split in splits.items():
        key = cache_key(split, weights, settings)
        path = cache_path(cache_dir, key)
        values, problem = _read(path, len(split), key)
        held, bad = world.all_sum([float(values is not None), float(problem is not None)], phase="reference")
        everywhere = held == world.size
        if not everywhere:
            why = ""
            if problem is not None:
                why = f", because the cache {path} {problem}"
            elif bad:
                why = f", because the cache on {int(bad)} other rank(s) failed its checks"
            log.info(f"reference log-probs of {len(split)} {name} pairs: computing them {'again' if bad else 'once'}, "
                     f"over {world.size} {'stage' if stage else 'rank'}(s), with the model before tuning{why}")
            values = compute(world, model, split, settings.get("pad_multiple", 16), nll, stage)
            _check_computed(values, name)
            _write(path, values, key)
        split.reference = values
        done[name] = {"reference": "cached" if everywhere else "computed", "file": str(path)}
    return done
