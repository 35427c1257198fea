"""Setting up one training run: model, data, optimizer, resume, agreement, reducer, step.

:func:`build_run` returns a :class:`Run` holding everything the loop
(``trainer.run.loop``) needs. The order matters in two places, marked below:
a resume restores the optimizer state *before* the step functions are
compiled (``mx.compile`` captures ``optimizer.state`` as it is then), and
every rank must agree on the recipe, data and weights *before* the first
gradient is sent.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .. import __version__
from ..cluster import health
from ..state import checkpoint
from ..model import fused
from ..model.attention import resolve_block, use_blocks
from ..data.balance import Balancer
from ..data.batches import BatchStream, batches_per_epoch
from ..config.load import Config
from ..data.tokenized import load_splits
from ..data.pairs import load_pair_splits
from .report import format_bytes
from ..data.membership import Membership
from ..model.load import (adapter_config, apply_method, backward_order, count_parameters, enable_grad_checkpoint,
                          load_base, trainable_parameters)
from ..objectives.base import make_objective
from ..step.optimizer import build_optimizer
from ..data.pair_batches import batch_stream
from ..parallel import MiB, GradientReducer, World, check_agreement, digest, plan_buckets
from ..parallel.scatter import ShardedReducer, ShardPlan
from ..step.zero import ShardedOptimizer
from ..state.progress import TrainingState
from ..step.grads import StepFunctions
from ..env import restart_env
from ..errors import DataError, UserError
from .hooks import RunOptions
from .resume import Resumed, restore


def versions() -> dict:
    """Versions that must match on every rank and that a checkpoint records."""
    import mlx_lm

    return {"trainer": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}


@dataclass
class Run:
    """Everything one training run holds; the loop reads and advances it."""

    cfg: Config
    world: World
    run_dir: Path
    model: object  # mlx.nn.Module
    tokenizer: object
    adapter_config: dict
    splits: dict  # split name -> TokenizedSplit
    stream: BatchStream
    optimizer: object  # mlx.optimizers.Optimizer
    reducer: GradientReducer
    fns: StepFunctions
    state: TrainingState
    balancer: Balancer
    options: RunOptions
    last_compute_s: list | None = None  # each rank's compute seconds on the latest measured update
    compiled_shapes: set = field(default_factory=set)  # micro-batch shapes the step has been compiled for
    resumed: Resumed | None = None  # what a resume found (reported in metrics.jsonl)
    membership: Membership | None = None  # the nominal ranks this process computes (fewer running than planned)

    @property
    def total_steps(self) -> int:
        return self.state.total_steps

    def weights(self) -> dict:
        return trainable_parameters(self.model)


def planned_steps(cfg: Config, num_samples: int, world_size: int) -> int:
    """Optimizer updates of the run: ``training.steps``, or what ``training.epochs`` amounts to."""
    t = cfg.training
    if t.steps is not None:
        return t.steps
    micro_per_epoch = batches_per_epoch(num_samples, t.batch_size * world_size)
    return max(1, math.ceil(t.epochs * micro_per_epoch / t.grad_accumulation))


def build_run(cfg: Config, world: World, resume=None, options: RunOptions | None = None,
              allow_changes: bool = False, membership: Membership | None = None) -> Run:
    """Set up a run on this rank (every rank calls it; it contains collectives).

    Args:
        cfg (Config): The resolved recipe.
        world (World): The group.
        resume (str | bool | None): ``True``: the newest checkpoint in
            ``checkpoint.dir``; a path: that checkpoint; ``None``: start fresh.
        options (RunOptions | None): Hooks and the benchmark's switches. Default: ``None``.
        allow_changes (bool): Resume even though the recipe or the data
            changed since the checkpoint (``--allow-changes``). Default: ``False``.
        membership (Membership | None): The nominal ranks this process computes
            when fewer run than planned (``trainer.data.membership``). Default:
            ``None`` (every rank runs).
    """
    options = options or RunOptions()
    members = membership or Membership.of(world.rank, world.size)
    nominal = members.nominal  # the global batch, the data order and the balance split are made for these
    if members.degraded:
        world.print0(f"[mlx-dp] {members.describe()}")
    run_dir = cfg.checkpoint.run_dir
    world.print0(f"[mlx-dp] resolved recipe:\n{cfg.to_yaml()}")
    if world.is_main:
        checkpoint.check_writable(run_dir)
        removed = checkpoint.clean_stale_temporaries(run_dir)
        if removed:
            world.print0(f"[mlx-dp] removed {len(removed)} temporary file(s) left by an earlier run that died: "
                         + ", ".join(removed[:4]) + (" ..." if len(removed) > 4 else ""))
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    model, tokenizer, adapter_cfg = _load_model(cfg, world)
    splits = _load_data(cfg, world, tokenizer)
    reference = _attach_reference(cfg, world, model, splits)  # before a checkpoint's weights are loaded
    t = cfg.training
    dataset = splits["train"].fingerprint()
    state = TrainingState(world_size=nominal, batch_size=t.batch_size, grad_accumulation=t.grad_accumulation,
                          total_steps=planned_steps(cfg, len(splits["train"]), nominal), versions=versions(),
                          recipe_digest=digest(cfg.to_yaml()), dataset=dataset, job=restart_env().job)
    _check_enough_data(cfg, world, splits["train"], state)
    if cfg.data.packing:
        from ..data.packing import outlook

        warning = outlook(splits["train"], t.batch_size * nominal, cfg.data.pad_multiple,
                          blocked=resolve_block(t.attention_block) > 0)
        if warning:
            world.print0(f"[mlx-dp] WARNING: {warning}")
    stream = batch_stream(splits["train"], t.batch_size, members.hosted[0], nominal, t.seed, cfg.data.pad_multiple,
                          prefetch=cfg.data.prefetch, hosted=members.hosted)
    optimizer = build_optimizer(t, state.total_steps)
    balancer = _balancer(cfg, world, nominal)
    saved_optimizer, resumed = None, None
    if resume is not None:
        # The optimizer state goes in place in _step_functions, before mx.compile captures it.
        state, saved_optimizer, resumed = restore(cfg, world, run_dir, resume, model, stream, state,
                                                  trainable_parameters(model), dataset, allow_changes,
                                                  note=world.print0)
        balancer = _restored_balancer(balancer, state, world, nominal)
    balancer.timed = cfg.logging.compute_timings and world.size > 1
    # Speeds are measured per running rank and the split is per nominal rank: while ranks are
    # missing, keep the split as it is (it changes how rows are dealt, never the update).
    balancer.frozen = members.degraded

    # Nothing has been sent yet: stop here unless every rank holds the same recipe, data and weights.
    check_agreement(world, {
        "recipe": state.recipe_digest, **versions(), "dataset": dataset,
        "nominal ranks": f"{nominal} ({members.size} running)",
        "trainable shapes": digest(*[f"{k}{v.shape}{v.dtype}" for k, v in trainable_parameters(model).items()]),
        "trainable values": _weights_digest(model), **reference,
    })
    reducer = _build_reducer(cfg, world, model, splits["train"], options.reducer)
    if t.grad_checkpoint:
        enable_grad_checkpoint(model)
    fns = _step_functions(cfg, model, optimizer, reducer, saved_optimizer)
    return Run(cfg=cfg, world=world, run_dir=run_dir, model=model, tokenizer=tokenizer, adapter_config=adapter_cfg,
               splits=splits, stream=stream, optimizer=optimizer, reducer=reducer, fns=fns, state=state,
               balancer=balancer, options=options, resumed=resumed, membership=members)


def _load_model(cfg: Config, world: World):
    """The base model with the recipe's method applied; identical adapters on every rank come from the seed."""
    health.phase("loading the model", watched=False)  # a download can take any time
    model, tokenizer, _ = load_base(cfg.model)
    apply_method(model, cfg.method, cfg.training.seed)
    # mlx_lm.load hands the model over in eval mode, where dropout does nothing: train in training mode,
    # as mlx-lm's trainer does (model.train()), so method.dropout acts. Evaluation switches back and forth.
    model.train()
    trainable, total = count_parameters(model)
    world.print0(f"[mlx-dp] {cfg.method.type}: {trainable / 1e6:.3f}M trainable of {total / 1e6:.3f}M parameters")
    block = resolve_block(cfg.training.attention_block)
    on = fused.resolve(cfg.training.fused_exp)
    if use_blocks(model, block, fused=on) and block:
        world.print0(f"[mlx-dp] attention: causal, {block} queries at a time (training.attention_block)")
    swiglu = fused.use_fused(model, on)
    if on:
        world.print0(f"[mlx-dp] fused exp: loss, attention{', SwiGLU' if swiglu else ''} (training.fused_exp)")
    return model, tokenizer, adapter_config(cfg.method, cfg.model.path, len(model.layers))


def _load_data(cfg: Config, world: World, tokenizer) -> dict:
    """Tokenized splits; rank 0 fills the tokenization cache, the others then read it."""
    health.phase("loading data", watched=False)  # tokenizing a large dataset can take any time
    load = load_splits if cfg.method.objective == "sft" else load_pair_splits
    splits = world.rank0_first(lambda: load(cfg.data, tokenizer, show_progress=world.is_main))
    for note in splits["train"].notes:
        world.print0(f"[mlx-dp] {splits['train'].source}: {note}")
    if "valid" not in splits:
        world.print0("[mlx-dp] no validation split: skipping validation")
    return splits


def _attach_reference(cfg: Config, world: World, model, splits: dict) -> dict:
    """DPO: every split's reference log-probs (``trainer.objectives.reference``), as an agreement item."""
    if cfg.method.objective != "dpo":
        return {}
    from ..objectives import reference

    # The reference pass sums values over ranks, pair by pair: first make sure every rank holds the same recipe
    # and pairs, or ranks with different data would wait on each other's sums without end.
    check_agreement(world, {"recipe": digest(cfg.to_yaml()), **versions(),
                            **{f"{name} pairs": split.fingerprint() for name, split in sorted(splits.items())}})
    health.phase("reference log-probs", watched=False)  # one forward pass over the pairs
    settings = {"attention_block": resolve_block(cfg.training.attention_block),
                "fused_exp": fused.resolve(cfg.training.fused_exp), "pad_multiple": cfg.data.pad_multiple}
    found = reference.attach(world, model, splits, cfg.data.cache_dir, settings, note=world.print0)
    for name, how in found.items():
        world.print0(f"[mlx-dp] reference log-probs of the {name} pairs: {how['reference']} ({how['file']})")
    return {"reference log-probs": digest(*[splits[name].reference.tobytes() for name in sorted(found)])}


def _check_enough_data(cfg: Config, world: World, train, state: TrainingState) -> None:
    t = cfg.training
    if len(train) < state.global_batch:
        raise DataError(
            f"the training set {train.source} has {len(train)} usable samples, fewer than one global batch of "
            f"{state.global_batch} (training.batch_size={t.batch_size} x {state.world_size} ranks x "
            f"grad_accumulation={t.grad_accumulation}); lower training.batch_size")
    unit = "sequences" if cfg.method.objective == "sft" else "pairs"
    world.print0(f"[mlx-dp] world: {world.size} rank(s); global batch = {t.batch_size} x {state.world_size} x "
                 f"{t.grad_accumulation} = {state.global_batch} {unit} per update; "
                 f"{len(train)} training {'samples' if unit == 'sequences' else 'pairs'}; {state.total_steps} updates")


def _balancer(cfg: Config, world: World, nominal: int) -> Balancer:
    """The split of each global micro-batch across the nominal ranks (``parallel.balance``), said at start."""
    setting = cfg.parallel.balance
    if isinstance(setting, list) and len(setting) != nominal:
        raise UserError(f"parallel.balance lists {len(setting)} speeds but the job has {nominal} rank(s); "
                        "give one speed per rank, or use auto")
    balancer = Balancer.from_setting(setting, cfg.training.batch_size * nominal, nominal)
    if world.size > 1 and balancer.mode != "off":
        first = " until the first updates measure each rank's speed" if balancer.mode == "auto" else ""
        world.print0(f"[mlx-dp] {balancer.describe()}{first}")
    return balancer


def _restored_balancer(fresh: Balancer, state: TrainingState, world: World, nominal: int) -> Balancer:
    """The checkpoint's split and speed estimates, when they describe this job's ranks and setting."""
    saved = state.balance
    if not saved or saved["mode"] != fresh.mode or saved["rows"] != fresh.rows or saved["world_size"] != nominal:
        return fresh
    if fresh.mode == "fixed" and saved["speeds"] != fresh.speeds:
        return fresh
    balancer = Balancer.from_dict(saved)
    if balancer.mode != "off" and world.size > 1:
        world.print0(f"[mlx-dp] resumed {balancer.describe()}")
    return balancer


def _weights_digest(model) -> str:
    import numpy as np

    return digest(*[np.array(v.astype(mx.float32)).tobytes() for v in trainable_parameters(model).values()])


def _step_functions(cfg: Config, model, optimizer, reducer, saved_optimizer: dict | None) -> StepFunctions:
    """The compiled step, after the optimizer state is in place (``mx.compile`` captures it as it is then)."""
    t = cfg.training
    if not getattr(reducer, "sharded", False):
        if saved_optimizer is not None:
            optimizer.state = saved_optimizer
        return StepFunctions(model, optimizer, t.max_grad_norm, groups=[list(b.names) for b in reducer.buckets],
                             objective=make_objective(cfg.method))
    sharding = ShardedOptimizer(model, optimizer, reducer, t.max_grad_norm, saved_state=saved_optimizer)
    fns = StepFunctions(model, optimizer, t.max_grad_norm, sharding=sharding, objective=make_objective(cfg.method))
    reducer.world.print0(f"[mlx-dp] optimizer state sharded over {reducer.world.size} rank(s): "
                         f"{format_bytes(fns.state_bytes())} per rank")
    return fns


def _build_reducer(cfg: Config, world: World, model, train, make_reducer=None):
    """Buckets in the order backward produces gradients, identical on every rank (checked here).

    ``make_reducer(world, buckets, parallel_config)`` replaces the reducer
    (``RunOptions.reducer``: the benchmarks' baselines).
    """
    p = cfg.parallel
    sample = next(iter(batch_stream(train, 1, 0, 1, cfg.training.seed, cfg.data.pad_multiple)))
    order = backward_order(model, mx.array(sample.inputs))
    params = trainable_parameters(model)
    buckets = plan_buckets(order, {k: v.shape for k, v in params.items()}, {k: v.dtype for k, v in params.items()},
                           int(p.bucket_mb * MiB), int(p.first_bucket_mb * MiB),
                           getattr(mx, p.comm_dtype) if p.comm_dtype else None)
    if make_reducer is not None:
        reducer = make_reducer(world, buckets, p)
    elif p.shard_optimizer:
        reducer = ShardedReducer(world, ShardPlan.make(buckets, world.size), overlap=p.overlap,
                                 stream=p.comm_stream)
    else:
        reducer = GradientReducer(world, buckets, overlap=p.overlap, stream=p.comm_stream)
    if world.size > 1:
        reducer.check_plan()
        how = "reduce-scattered" if getattr(reducer, "sharded", False) else "reduced"
        stream = "a stream of their own" if world.placement.resolve(p.comm_stream) == "separate" else \
            "the backend's stream"
        world.print0(f"[mlx-dp] gradients: {format_bytes(reducer.nbytes)} in {len(buckets)} bucket(s), {how} "
                     f"{'during backward' if p.overlap else 'after backward'} on {stream} "
                     f"({world.placement.describe()})")
    return reducer
