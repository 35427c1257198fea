"""``train()``: set up a run, then iterate, step, report, evaluate and save.

Read top to bottom: :func:`train` builds a :class:`~trainer.run.setup.Run`
(``trainer.run.setup``) inside the envelope that keeps it honest
(``trainer.run.guard``); :func:`fit` schedules updates. The maths of an update
is in ``trainer.step``; what the loss teaches is the run's objective
(``trainer.objectives``); every collective is in ``trainer.parallel``.
"""

import json
import time
from functools import partial
from pathlib import Path

import mlx.core as mx

from .. import log
from ..cluster import health
from ..config.load import Config
from ..errors import UserError
from ..state import checkpoint
from ..state.rundir import open_append
from .early_stop import EarlyStop
from .guard import RunGuard
from .hooks import RunOptions
from .report import MetricWindow, open_reporter
from .setup import Run, build_run


def train(cfg: Config, resume=None, options: RunOptions | None = None, allow_changes: bool = False,
          overwrite: bool = False) -> dict:
    """Run a recipe on this process's rank.

    Args:
        cfg (Config): The resolved recipe.
        resume (str | bool | None): ``True`` resumes from the newest intact
            checkpoint in ``checkpoint.dir``; a path resumes from that checkpoint.
            Default: ``None`` (start fresh).
        options (RunOptions | None): Hooks for tests and the benchmarks'
            switches. Default: ``None`` (plain training).
        allow_changes (bool): Resume even though the recipe or data changed
            since the checkpoint (``--allow-changes``; the changes are
            recorded in ``metrics.jsonl``). Default: ``False``.
        overwrite (bool): Write into a ``checkpoint.dir`` that holds other files, or start an
            earlier run there over (``--overwrite``). Default: ``False``.

    Returns:
        dict: Final step, whether it stopped early (and the signal that
        asked, 0 if none), and the last val loss.
    """
    with RunGuard(cfg, resume, overwrite) as guard:
        run = build_run(cfg, guard.world, guard.resume, options, allow_changes, guard.membership)
        guard.started(run, open_reporter(run))
        return guard.finished(fit(run, guard.reporter))


def fit(run: Run, reporter) -> dict:
    """Train until ``run.total_steps`` updates are done or every rank agreed to stop.

    Returns:
        dict: ``step``, ``stopped``, the last ``val_loss``, and the ``reason`` it ended early (early stopping).
    """
    cfg, world, state = run.cfg, run.world, run.state
    early = EarlyStop(cfg, state, "valid" in run.splits)
    val_loss, plateau = None, False
    if cfg.eval.at_start and state.step == 0:
        val_loss, _ = validate(run, reporter)  # the base model's; early stopping counts evaluations of training
    window, timings = MetricWindow(), _timings_file(run)
    tic = last_save = time.perf_counter()
    every_s = cfg.checkpoint.every_minutes * 60 if cfg.checkpoint.every_minutes else None
    while state.step < run.total_steps:
        health.phase("compute", state.step + 1)
        # Rank 0's clock asks for a time-based save; the request rides with the gradients, so all ranks agree.
        save_due = every_s is not None and world.is_main and time.perf_counter() - last_save >= every_s
        micro, out = _next_update(run, state.step + 1, save_due)
        health.phase("sync", state.step + 1)
        mx.eval(run.model.state, run.optimizer.state, mx.random.state, out["loss_sum"], out["grad_norm"],
                out["finite"], out["stop"], out["save"], out["compute_s"])  # note: the step's one blocking sync point
        state.step += 1
        _clear_cache(cfg.training.clear_cache_threshold)
        toc = time.perf_counter()
        window.add(out, micro, toc - tic)
        _rebalance(run, out, micro, reporter)
        _log_timing(timings, run, out, toc - tic)
        # A checkpoint resumes exactly only where the objective allows it (between an on-policy objective's
        # generations): a stop or a timed save waits for the next such update.
        resumable = run.objective.resumable_after(state.step)
        last = state.step == run.total_steps
        stopping = out["stop"].item() > 0 and resumable  # evaluated above; the same on all ranks
        reporter.advance(1)
        if state.step % cfg.logging.every == 0 or last or stopping:
            report(run, window, out, reporter)
            window = MetricWindow()
        tic, val_loss, improved = toc, None, False
        if "valid" in run.splits and ((cfg.eval.every and state.step % cfg.eval.every == 0) or last):
            val_loss, record = validate(run, reporter)
            improved, plateau = early.observe(record), early.plateaued()  # the same on every rank: summed metrics
            tic = time.perf_counter()  # validation time is not training throughput
        timed_save = out["save"].item() > 0 and resumable  # evaluated above; the same on every rank
        if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or last or stopping or timed_save \
                or improved or plateau:  # the best evaluation's weights are kept on disk
            save(run, val_loss, reporter, early.keep(run.run_dir))
            tic = last_save = time.perf_counter()  # nor is saving
        if stopping:
            log.info(f"stop requested: saved update {state.step} to {run.run_dir}; continue with --resume")
            return {"step": state.step, "stopped": True}
        if plateau:
            log.info(early.reason())
            reporter.log({"step": state.step, "event": "early_stop", "reason": early.reason(), **early.record()})
            break
    if world.is_main:
        early.finish(run.run_dir, run.adapter_config)
    return {"step": state.step, "stopped": False, "val_loss": val_loss, "reason": early.reason() if plateau else None}


def _clear_cache(threshold) -> None:
    """Give MLX's cached buffers back once the update is done, as mlx-lm's trainer does (``_clear_cache``).

    ``auto``: after every update on a GPU (on a Mac the memory goes back to macOS, which shares it), never on a
    CPU, where the next update would only allocate the same buffers again (docs/RESULTS.md, "Emptying MLX's
    cache").
    """
    if threshold == "auto":
        threshold = 0 if mx.default_device().type == mx.gpu else -1
    if threshold >= 0 and mx.get_cache_memory() > threshold:
        mx.clear_cache()


def _next_update(run: Run, step: int, save: bool = False) -> tuple[list, dict]:
    """This rank's micro-batches of update ``step`` under the current split, and the update (lazy).

    Standing in for missing ranks (``trainer.data.membership``), it computes
    each global micro-batch's rows of every rank it hosts.
    """
    hooks = run.options.hooks
    run.stream.set_split(run.balancer.split)
    # An on-policy objective makes this update's rows now, from the policy as it is (GRPO completes the
    # stream's prompts); the others train on the stream's rows as they are.
    take = partial(run.stream.take, run.cfg.training.grad_accumulation)
    micro = hooks.before_update(step, run.objective.rollout(run.model, take, step, len(run.stream.hosted)))
    shapes = {b.inputs.shape for b in micro} - run.compiled_shapes
    run.compiled_shapes |= shapes
    # A new shape compiles the step first: that time says nothing of this rank's speed, so it is not
    # measured (its zero voids the measurement on every rank, and the next update measures instead).
    # An on-policy objective's generation is this rank's compute too (a slower Mac generates slower).
    made = run.objective.rollout_seconds
    measure = (lambda s: hooks.compute_seconds(step, s + made)) if run.balancer.wants_measure(step) and not shapes \
        else None
    return micro, run.step(micro, stop=health.stop_requested(), measure=measure, save=save,
                           hosted=len(run.stream.hosted))


def _rebalance(run: Run, out: dict, micro: list, reporter) -> None:
    """After a measured update, every rank feeds the same compute times to its balancer."""
    if not run.balancer.wants_measure(run.state.step):
        return
    seconds = out["compute_s"].tolist()  # evaluated with the step; the same list on every rank
    note = run.balancer.observe(seconds, [b.inputs.shape[1] for b in micro])
    if all(s > 0 for s in seconds):
        run.last_compute_s = seconds
    if note:
        log.info(f"update {run.state.step}: {note}")


def validate(run: Run, reporter) -> tuple[float | None, dict]:
    """The objective's validation loss and its record (metrics), on every rank (a collective); ``(None, {})``
    without a valid split."""
    split = run.splits.get("valid")
    if split is None:
        return None, {}
    health.phase("eval", run.state.step)
    e = run.cfg.eval
    record = run.objective.validate(run.world, run.model, split, e.batch_size or run.cfg.training.batch_size,
                                    run.cfg.data.pad_multiple, e.max_batches, run.membership,
                                    run.step.scorer(run.objective, len(run.objective.stats)))
    reporter.log({"step": run.state.step, **record})
    log.info(f"step {run.state.step}: val loss {record['val_loss']:.4f}{run.objective.validation_note(record)}")
    return record["val_loss"], record


def report(run: Run, window: MetricWindow, out: dict, reporter) -> None:
    """Read the window's scalars (the only reads of device values besides the stop flag) and log them."""
    t = run.cfg.training
    bad = window.skipped()
    if bad and not t.skip_nonfinite:
        raise UserError(f"non-finite loss or gradient norm in {bad} update(s) up to update {run.state.step}; "
                        "the updates were not applied. Lower training.learning_rate, set "
                        "training.max_grad_norm, or set training.skip_nonfinite=true to skip such updates")
    record = {"step": run.state.step, "epoch": round(run.stream.epoch_progress(), 4), **window.summary(),
              "learning_rate": float(run.optimizer.learning_rate.item()), "grad_norm": float(out["grad_norm"].item()),
              "peak_memory_gb": mx.get_peak_memory() / 1e9, "world_size": run.world.size,
              "global_batch": run.state.global_batch}
    if run.world.size > 1:
        record["rows_per_rank"] = list(run.stream.row_split)  # as the last update was split
        if run.last_compute_s is not None:  # the latest measured update's compute time per rank
            record["compute_s_per_rank"] = [round(s, 5) for s in run.last_compute_s]
    if bad:
        record["skipped_updates"] = bad
    reporter.log(record)
    postfix = {"loss": f"{record['train_loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}",
               "lr": f"{record['learning_rate']:.2e}", **run.objective.progress(record)}
    reporter.advance(0, postfix)


def save(run: Run, val_loss: float | None, reporter, keep: set = frozenset()) -> None:
    """Rank 0 writes a resumable checkpoint and refreshes the top-level adapters; then every rank waits."""
    health.phase("save", run.state.step)
    optimizer_state = run.step.update.full_state()  # sharded or staged: every rank takes part in gathering them
    weights = run.step.update.full_weights()
    if run.world.is_main:
        state = run.state
        state.data = run.stream.position()
        state.rng_key = tuple(int(x) for x in mx.random.state[0].tolist())
        state.balance = run.balancer.to_dict()
        path = run.run_dir / checkpoint.CHECKPOINTS / checkpoint.step_dir_name(state.step)
        state.note_val_loss(val_loss, str(path))
        checkpoint.save_checkpoint(run.run_dir, state, weights, optimizer_state, run.adapter_config,
                                   run.cfg.to_yaml(), on_partial=lambda: run.options.hooks.mid_save(state.step))
        checkpoint.save_adapters(run.run_dir, weights, run.adapter_config)
        keep = set(keep) | ({Path(state.best.path)} if (state.best and run.cfg.checkpoint.keep_best) else set())
        checkpoint.prune(run.run_dir, run.cfg.checkpoint.keep_last, keep)
        reporter.checkpoint(path)
        health.report_progress("saved", step=state.step)  # a restart after this one makes progress
    run.world.barrier(phase="save")  # nobody runs ahead while rank 0 writes


def _timings_file(run: Run):
    """``metrics.rank<r>.jsonl`` when ``logging.per_rank_timings`` asks for it (every rank writes its own)."""
    if not run.cfg.logging.per_rank_timings:
        return None
    run.run_dir.mkdir(parents=True, exist_ok=True)
    return open_append(run.run_dir / f"metrics.rank{run.world.rank}.jsonl")


def _log_timing(timings, run: Run, out: dict, seconds: float) -> None:
    if timings is None:
        return
    record = {"step": run.state.step, "rank": run.world.rank, "step_time_s": seconds, "tokens": out["tokens"],
              "rows": run.stream.rows, "split": list(run.stream.row_split),
              "peak_memory_gb": mx.get_peak_memory() / 1e9, "optimizer_state_gb": run.step.state_bytes() / 1e9}
    if run.last_compute_s is not None:
        record["compute_s"] = run.last_compute_s[run.world.rank]  # the latest measured update's
    timings.write(json.dumps(record) + "\n")
    timings.flush()


