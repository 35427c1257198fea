"""Setting up one training run: model, objective, data, optimizer, resume, agreement, update, step.

:func:`build_run` returns a :class:`Run` holding everything the loop
(``trainer.run.loop``) needs. The order matters in two places, marked below:
a resume restores the optimizer state *before* the step is compiled
(``mx.compile`` captures ``optimizer.state`` as it is then), and every rank
must agree on the recipe, data and weights *before* the first gradient is sent.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .. import __version__, log
from ..cluster import health
from ..config.load import Config
from ..data.balance import Balancer
from ..data.batches import BatchStream, batches_per_epoch
from ..data.membership import Membership
from ..errors import ConfigError, DataError, UserError
from ..model import chunked, fused, heads
from ..model.attention import resolve_block, use_blocks
from ..model.checkpointing import checkpoint_blocks
from ..model.load import adapter_config, apply_method, backward_order, count_parameters, load_base, \
    trainable_parameters
from ..objectives.base import Objective, TokenLoss
from ..objectives.registry import make_objective
from ..parallel import World, check_agreement, digest
from ..state import checkpoint
from ..state.progress import TrainingState
from ..step.optimizer import build_optimizer
from ..step.step import Step
from ..step.updates import make_update
from ..env import restart_env, runtime
from .hooks import RunOptions
from .resume import Resumed, restore
from .stages import make_stage, pipeline_step


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
    objective: Objective
    splits: dict  # split name -> the objective's tokenized split
    stream: BatchStream
    optimizer: object  # mlx.optimizers.Optimizer
    step: Step
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


def planned_steps(cfg: Config, num_samples: int | None, world_size: int) -> int:
    """Optimizer updates of the run: ``training.steps``, or what ``training.epochs`` amounts to.

    ``num_samples`` is ``None`` for a stream of unknown length (``data.streaming`` without ``data.stream_rows``).
    """
    t = cfg.training
    if t.steps is not None:
        return t.steps
    if num_samples is None:
        raise ConfigError(f"training.epochs={t.epochs:g} needs the length of the training set, which a stream does "
                          "not know before reading it: set training.steps, or data.stream_rows (its rows)")
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
    pipeline = cfg.parallel.pipeline
    # A pipeline is one replica whose stages read the same batches: the data plan of one process.
    members = Membership.of(0, 1) if pipeline else membership or Membership.of(world.rank, world.size)
    if members.degraded:
        log.info(members.describe())
    log.info(f"resolved recipe:\n{cfg.to_yaml()}")
    _prepare_run_dir(cfg, world)
    model, tokenizer, adapter_cfg, objective = _load_model(cfg, lazy=pipeline)
    stage = make_stage(cfg, world, model) if pipeline else None  # only this stage's blocks are read from disk
    splits = _load_data(cfg, world, tokenizer, objective, members.nominal)
    state = _fresh_state(cfg, splits["train"], members.nominal)
    _check_enough_data(cfg, objective, splits["train"], state, world.size if pipeline else 0)  # before long passes
    reference = _prepare_objective(cfg, world, model, tokenizer, splits, objective, stage)  # before a checkpoint
    t = cfg.training
    stream = objective.stream(splits["train"], t.batch_size, members.hosted[0], members.nominal, t.seed,
                              cfg.data.pad_multiple, prefetch=cfg.data.prefetch, hosted=members.hosted,
                              world=None if pipeline else world)
    optimizer = build_optimizer(t, state.total_steps)
    balancer, saved_optimizer, resumed = _balancer(cfg, world, members.nominal), None, None
    trainable = trainable_parameters(model) if stage is None else stage.shapes()
    if resume is not None:
        # The optimizer state goes in place in _build_step, before mx.compile captures it.
        state, saved_optimizer, resumed = restore(cfg, world, cfg.checkpoint.run_dir, resume, model, stream, state,
                                                  trainable, state.dataset, allow_changes)
        balancer = _restored_balancer(balancer, state, world, members.nominal)
    balancer.timed = cfg.logging.compute_timings and world.size > 1 and not pipeline
    # Speeds are measured per running rank and the split is per nominal rank: while ranks are
    # missing, keep the split as it is (it changes how rows are dealt, never the update).
    balancer.frozen = members.degraded
    _agree(world, state, members, trainable, None if stage else model, reference)
    if stage is None:
        step = _build_step(cfg, world, model, splits["train"], objective, optimizer, saved_optimizer, options)
    else:
        step = pipeline_step(cfg, world, model, objective, optimizer, saved_optimizer, stage, state.step)
    return Run(cfg=cfg, world=world, run_dir=cfg.checkpoint.run_dir, model=model, tokenizer=tokenizer,
               adapter_config=adapter_cfg, objective=objective, splits=splits, stream=stream, optimizer=optimizer,
               step=step, state=state, balancer=balancer, options=options, resumed=resumed, membership=members)


def _prepare_run_dir(cfg: Config, world: World) -> None:
    """Rank 0 checks ``checkpoint.dir``, sweeps a dead writer's temporaries and records the recipe."""
    if not world.is_main:
        return
    run_dir = cfg.checkpoint.run_dir
    checkpoint.check_writable(run_dir)
    removed = checkpoint.clean_stale_temporaries(run_dir)
    if removed:
        log.info(f"removed {len(removed)} temporary file(s) left by an earlier run that died: "
                 + ", ".join(removed[:4]) + (" ..." if len(removed) > 4 else ""))
    checkpoint.write_text(run_dir / "config.yaml", cfg.to_yaml())


def _fresh_state(cfg: Config, train, nominal: int) -> TrainingState:
    t = cfg.training
    # An epoch's items: a mix's epoch size, packed rows, or a stream's given rows (None: unknown)
    items = train.epoch_items(t.seed)
    return TrainingState(world_size=nominal, batch_size=t.batch_size, grad_accumulation=t.grad_accumulation,
                         total_steps=planned_steps(cfg, items, nominal), versions=versions(),
                         recipe_digest=digest(cfg.to_yaml()), dataset=train.fingerprint(), job=restart_env().job)


def _load_model(cfg: Config, lazy: bool = False):
    """The base model with the recipe's method applied, and the objective computed with this run's kernels.

    Identical adapters on every rank come from the seed.
    """
    health.phase("loading the model", watched=False)  # a download can take any time
    model, tokenizer, _ = load_base(cfg.model, lazy=lazy)  # lazy: a pipeline stage reads its own blocks
    apply_method(model, cfg.method, cfg.training.seed)
    # mlx_lm.load hands the model over in eval mode, where dropout does nothing: train in training mode,
    # as mlx-lm's trainer does (model.train()), so method.dropout acts. Evaluation switches back and forth.
    model.train()
    trainable, total = count_parameters(model)
    log.info(f"{cfg.method.type}: {trainable / 1e6:.3f}M trainable of {total / 1e6:.3f}M parameters")
    block = resolve_block(cfg.training.attention_block)
    on = fused.resolve(cfg.training.fused_exp)
    if use_blocks(model, block, fused=on) and block:
        log.info(f"attention: causal, {block} queries at a time (training.attention_block)")
    swiglu = fused.use_fused(model, on)
    if on:
        log.info(f"fused exp: loss, attention{', SwiGLU' if swiglu else ''} (training.fused_exp)")
    objective = make_objective(cfg, TokenLoss(fused=on, chunked=_chunked_loss(cfg, model, lazy)))
    return model, tokenizer, adapter_config(cfg.method, cfg.model.path, len(model.layers)), objective


def _agree(world: World, state, members: Membership, trainable: dict, model, reference: dict) -> None:
    """Nothing has been sent yet: stop here unless every rank holds the same recipe, data and weights
    (``model`` None: a pipeline's stages hold different weights; they agree on every stage's names and shapes)."""
    check_agreement(world, {
        "recipe": state.recipe_digest, **versions(), "dataset": state.dataset,
        "nominal ranks": f"{members.nominal} ({members.size} running)",
        "trainable shapes": digest(*[f"{k}{v.shape}{v.dtype}" for k, v in trainable.items()]),
        **({"trainable values": _weights_digest(model)} if model is not None else {}), **reference,
    })


def _chunked_loss(cfg: Config, model, lazy: bool) -> bool:
    """Whether the loss goes a chunk of tokens at a time (``training.chunked_loss``), its split checked once.

    The split of the model into trunk and head is checked against the model's own logits on a few
    tokens (exactly equal: the same ops); a model that fails, or whose head cannot be opened, keeps
    the plain loss, and the log says so. A pipeline's model is not whole yet (``lazy``): each stage's
    loss asks for itself, and a stage whose head is not its own keeps the plain loss.
    """
    if not cfg.training.chunked_loss:
        return False
    if lazy:
        return True
    split = heads.split_head(model)
    why = None if split is not None else "its output head is not one the chunked loss can open"
    if split is not None:
        model.eval()
        try:
            heads.verify_split(model, split, mx.arange(1, 9)[None])
        except ValueError as error:
            why = str(error)
        finally:
            model.train()
    if why is not None:
        log.info(f"loss: the plain cross-entropy, holding the logits ({type(model).__module__}: {why})")
        return False
    vocab = model(mx.arange(1, 9)[None]).shape[-1]  # a shape: nothing is computed
    log.info(f"loss: chunked, {chunked.default_chunk_tokens(vocab)} tokens at a time (training.chunked_loss)")
    return True


def _load_data(cfg: Config, world: World, tokenizer, objective: Objective, nominal: int) -> dict:
    """Tokenized splits; rank 0 fills the tokenization cache, the others then read it."""
    health.phase("loading data", watched=False)  # tokenizing a large dataset can take any time
    if cfg.data.streaming and cfg.parallel.balance != "off" and nominal > 1:
        raise ConfigError("parallel.balance splits each global micro-batch between ranks, but with data.streaming "
                          "each rank reads its own share; set parallel.balance=off")
    splits = world.rank0_first(lambda: objective.load(cfg.data, tokenizer, ("train", "valid"), world.is_main))
    train = splits["train"]
    for note in train.notes:
        log.info(f"{train.source}: {note}")
    if "valid" not in splits:
        log.info("no validation split: skipping validation")
    if train.mix is not None:  # the counts of every epoch, said at start and kept in metrics.jsonl
        _record_mix(cfg, world, train.mix, objective.items)
    if cfg.data.packing and not cfg.data.streaming:
        from ..data.packing import outlook

        warning = outlook(train.epoch_view(cfg.training.seed, 0)[0], cfg.training.batch_size * nominal,
                          cfg.data.pad_multiple, blocked=resolve_block(cfg.training.attention_block) > 0)
        if warning:
            log.warn(warning)
    return splits


def _record_mix(cfg: Config, world: World, plan, items: str) -> None:
    """Print ``data.mix``'s counts per epoch, and append them to ``metrics.jsonl`` (rank 0)."""
    import json
    import time

    from ..state.rundir import open_append

    log.info(plan.describe(items))
    if world.is_main:
        with open_append(cfg.checkpoint.run_dir / "metrics.jsonl") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **plan.record()}) + "\n")


def _prepare_objective(cfg: Config, world: World, model, tokenizer, splits: dict, objective: Objective,
                       stage=None) -> dict:
    """What the objective computes or keeps before training (DPO's reference log-probs), as agreement items."""
    if objective.needs_reference:
        # The reference pass sums values over ranks, item by item: first make sure every rank holds the same
        # recipe and data, or ranks with different data would wait on each other's sums without end.
        check_agreement(world, {"recipe": digest(cfg.to_yaml()), **versions(),
                                **{f"{name} {objective.items}": split.fingerprint() for name, split in sorted(splits.items())}})
        health.phase("reference log-probs", watched=False)  # one forward pass over the data
    return objective.prepare(world, model, tokenizer, splits, cfg.data.cache_dir, reference_settings(cfg),
                             stage=stage)


def reference_settings(cfg: Config, training: bool = True) -> dict:
    """What, besides data and weights, changes reference values: the kernels that compute them.

    ``training=False``: ``mlx-dp eval``, which runs MLX's own attention and loss.
    """
    settings = {"attention_block": resolve_block(cfg.training.attention_block) if training else 0,
                "fused_exp": fused.resolve(cfg.training.fused_exp) if training else False,
                "pad_multiple": cfg.data.pad_multiple, "blas": runtime("blas", "mlx")}
    return settings


def _check_enough_data(cfg: Config, objective: Objective, train, state: TrainingState, stages: int = 0) -> None:
    t = cfg.training
    items = train.epoch_items(t.seed)  # None: a stream of unknown length
    world = f"{state.world_size} rank(s)" if not stages else f"one replica in {stages} pipeline stage(s)"
    if items is None:
        log.info(f"world: {world}; global batch = {t.batch_size} x {state.world_size} x "
                 f"{t.grad_accumulation} = {state.global_batch} {objective.unit} per update; training "
                 f"{objective.items} streamed from {train.source} (length unknown); {state.total_steps} updates")
        return
    if items < state.global_batch:
        smaller = [f"lower {key}" for key, value in (("training.batch_size", t.batch_size),
                                                      ("training.grad_accumulation", t.grad_accumulation)) if value > 1]
        raise DataError(
            f"the training set {train.source} has {items} usable {objective.items}, fewer than one global batch "
            f"of {state.global_batch} (training.batch_size={t.batch_size} x {state.world_size} ranks x "
            f"grad_accumulation={t.grad_accumulation}); "
            + ", ".join(smaller + [f"add {objective.items}"] + (["run on fewer ranks"] if state.world_size > 1 else [])))
    log.info(f"world: {world}; global batch = {t.batch_size} x {state.world_size} x "
             f"{t.grad_accumulation} = {state.global_batch} {objective.unit} per update; {items} training "
             f"{objective.items}{' an epoch' if train.mix is not None else ''}; {state.total_steps} updates")


def _balancer(cfg: Config, world: World, nominal: int) -> Balancer:
    """The split of each global micro-batch across the nominal ranks (``parallel.balance``), said at start."""
    setting = cfg.parallel.balance
    if isinstance(setting, list) and len(setting) != nominal:
        raise UserError(f"parallel.balance lists {len(setting)} speeds but the job has {nominal} rank(s); "
                        "give one speed per rank, or use auto")
    balancer = Balancer.from_setting(setting, cfg.training.batch_size * nominal, nominal)
    if world.size > 1 and balancer.mode != "off":
        first = " until the first updates measure each rank's speed" if balancer.mode == "auto" else ""
        log.info(f"{balancer.describe()}{first}")
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
        log.info(f"resumed {balancer.describe()}")
    return balancer


def _weights_digest(model) -> str:
    import numpy as np

    return digest(*[np.array(v.astype(mx.float32)).tobytes() for v in trainable_parameters(model).values()])


def _build_step(cfg: Config, world: World, model, train, objective: Objective, optimizer,
                saved_optimizer: dict | None, options: RunOptions) -> Step:
    """The update kind with its gradient buckets in backward's order (identical on every rank: checked here),
    then the compiled step, after the optimizer state is in place (``mx.compile`` captures it as it is then)."""
    sample = next(iter(objective.stream(train, 1, 0, 1, cfg.training.seed, cfg.data.pad_multiple)))
    order = backward_order(model, mx.array(sample.inputs))
    update = make_update(cfg, world, model, optimizer, order, saved_optimizer, options.reducer)
    if world.size > 1:
        p, reducer = cfg.parallel, update.reducer
        reducer.check_plan()
        stream = "a stream of their own" if world.placement.resolve(p.comm_stream) == "separate" else \
            "the backend's stream"
        log.info(f"gradients: {log.format_bytes(reducer.nbytes)} in {len(reducer.buckets)} bucket(s), "
                 f"{update.describe()} {'during backward' if p.overlap else 'after backward'} on {stream} "
                 f"({world.placement.describe()})")
    if cfg.training.grad_checkpoint:
        checkpoint_blocks(model)
    return Step(model, objective, update)
