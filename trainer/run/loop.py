"""``train()``: set up a run, then iterate, step, report, evaluate and save.

Read top to bottom: :func:`train` joins the group, starts the watchdog and
builds a :class:`~trainer.run.setup.Run` (``trainer.run.setup``); :func:`fit`
schedules updates. The maths of an update is in ``trainer.step.grads``; every
collective is in ``trainer.parallel``.
"""

import errno
import json
import signal
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import maybe_set_recommended_wired_limit

from ..cluster import connect, health, runlock
from ..cluster import status as status_file
from ..cluster.hostfile import check_ring_hostfile
from ..cluster.peers import PeerMonitor
from ..state import checkpoint
from ..config.load import Config
from ..objectives.evaluate import validation
from .report import MetricWindow, NullReporter, Reporter, start_wandb
from ..data.membership import Membership
from ..parallel import refuse_lone_rank
from ..step.grads import run_update
from ..env import restart_env
from ..errors import CheckpointError, DistributedError, Stopped, UserError
from .hooks import RunOptions
from .pick import restart_resume, shared_resume
from .setup import Run, build_run


def fit(run: Run, reporter) -> dict:
    """Train until ``run.total_steps`` updates are done or every rank agreed to stop.

    Returns:
        dict: ``step``, ``stopped`` and the last ``val_loss``.
    """
    cfg, world, state = run.cfg, run.world, run.state
    val_loss = None
    if cfg.eval.at_start and state.step == 0:
        val_loss = validate(run, reporter)
    window, timings = MetricWindow(), _timings_file(run)
    tic = last_save = time.perf_counter()
    every_s = cfg.checkpoint.every_minutes * 60 if cfg.checkpoint.every_minutes else None
    while state.step < run.total_steps:
        health.phase("compute", state.step + 1)
        # Rank 0's clock asks for a time-based save; the request rides with the gradients, so all ranks agree.
        save_due = every_s is not None and world.is_main and time.perf_counter() - last_save >= every_s
        micro, out = _update(run, state.step + 1, save_due)
        health.phase("sync", state.step + 1)
        mx.eval(run.model.state, run.optimizer.state, mx.random.state, out["loss_sum"], out["grad_norm"],
                out["finite"], out["stop"], out["save"], out["compute_s"])  # note: the step's one blocking sync point
        state.step += 1
        _clear_cache(cfg.training.clear_cache_threshold)
        toc = time.perf_counter()
        window.add(out, micro, toc - tic)
        _rebalance(run, out, micro, reporter)
        _log_timing(timings, run, out, toc - tic)
        last, stopping = state.step == run.total_steps, out["stop"].item() > 0  # evaluated above; same on all ranks
        reporter.advance(1)
        if state.step % cfg.logging.every == 0 or last or stopping:
            report(run, window, out, reporter)
            window = MetricWindow()
        tic, val_loss = toc, None
        if "valid" in run.splits and ((cfg.eval.every and state.step % cfg.eval.every == 0) or last):
            val_loss = validate(run, reporter)
            tic = time.perf_counter()  # validation time is not training throughput
        timed_save = out["save"].item() > 0  # evaluated above; the same on every rank
        if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or last or stopping or timed_save:
            save(run, val_loss, reporter)
            tic = last_save = time.perf_counter()  # nor is saving
        if stopping:
            world.print0(f"[mlx-dp] stop requested: saved update {state.step} to {run.run_dir}; continue with --resume")
            return {"step": state.step, "stopped": True}
    return {"step": state.step, "stopped": False, "val_loss": val_loss}


def _clear_cache(threshold: int) -> None:
    """Give MLX's cached buffers back once the update is done, as mlx-lm's trainer does (``_clear_cache``)."""
    if threshold >= 0 and mx.get_cache_memory() > threshold:
        mx.clear_cache()


def _update(run: Run, step: int, save: bool = False) -> tuple[list, dict]:
    """This rank's micro-batches of update ``step`` under the current split, and the update (lazy).

    Standing in for missing ranks (``trainer.data.membership``), it computes
    each global micro-batch's rows of every rank it hosts.
    """
    hooks = run.options.hooks
    run.stream.set_split(run.balancer.split)
    micro = hooks.before_update(step, run.stream.take(run.cfg.training.grad_accumulation))
    shapes = {b.inputs.shape for b in micro} - run.compiled_shapes
    run.compiled_shapes |= shapes
    # A new shape compiles the step first: that time says nothing of this rank's speed, so it is not
    # measured (its zero voids the measurement on every rank, and the next update measures instead).
    measure = partial(hooks.compute_seconds, step) if run.balancer.wants_measure(step) and not shapes else None
    return micro, run_update(run.fns, run.reducer, micro, stop=health.stop_requested(), measure=measure, save=save,
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
        reporter.note(f"[mlx-dp] update {run.state.step}: {note}")


def validate(run: Run, reporter) -> float | None:
    """Validation loss (and a preference objective's metrics) on every rank (a collective); ``None`` without a
    valid split."""
    split = run.splits.get("valid")
    if split is None:
        return None
    health.phase("eval", run.state.step)
    e = run.cfg.eval
    record = validation(run.world, run.model, split, run.fns.objective, e.batch_size or run.cfg.training.batch_size,
                        run.cfg.data.pad_multiple, e.max_batches)
    reporter.log({"step": run.state.step, **record})
    accuracy = record.get("val_preference_accuracy")
    reporter.note(f"[mlx-dp] step {run.state.step}: val loss {record['val_loss']:.4f}"
                  + (f", preference accuracy {accuracy:.1%}" if accuracy is not None else ""))
    return record["val_loss"]


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
               "lr": f"{record['learning_rate']:.2e}"}
    if "reward_accuracy" in record:  # preference objectives: what users watch
        postfix.update(acc=f"{record['reward_accuracy']:.0%}", margin=f"{record['reward_margin']:.2f}")
    reporter.advance(0, postfix)


def save(run: Run, val_loss: float | None, reporter) -> None:
    """Rank 0 writes a resumable checkpoint and refreshes the top-level adapters; then every rank waits."""
    health.phase("save", run.state.step)
    sharding = run.fns.sharding  # sharded: every rank takes part in gathering the optimizer state
    optimizer_state = sharding.full_state() if sharding is not None else run.optimizer.state
    if run.world.is_main:
        state = run.state
        state.data = run.stream.position()
        state.rng_key = tuple(int(x) for x in mx.random.state[0].tolist())
        state.balance = run.balancer.to_dict()
        path = run.run_dir / checkpoint.CHECKPOINTS / checkpoint.step_dir_name(state.step)
        state.note_val_loss(val_loss, str(path))
        weights = run.weights()
        checkpoint.save_checkpoint(run.run_dir, state, weights, optimizer_state, run.adapter_config,
                                   run.cfg.to_yaml(), on_partial=lambda: run.options.hooks.mid_save(state.step))
        checkpoint.save_adapters(run.run_dir, weights, run.adapter_config)
        keep = {Path(state.best.path)} if (state.best and run.cfg.checkpoint.keep_best) else set()
        checkpoint.prune(run.run_dir, run.cfg.checkpoint.keep_last, keep)
        reporter.checkpoint(path)
    run.world.barrier(phase="save")  # nobody runs ahead while rank 0 writes


def _timings_file(run: Run):
    """``metrics.rank<r>.jsonl`` when ``logging.per_rank_timings`` asks for it (every rank writes its own)."""
    if not run.cfg.logging.per_rank_timings:
        return None
    run.run_dir.mkdir(parents=True, exist_ok=True)
    return open(run.run_dir / f"metrics.rank{run.world.rank}.jsonl", "a")


def _log_timing(timings, run: Run, out: dict, seconds: float) -> None:
    if timings is None:
        return
    record = {"step": run.state.step, "rank": run.world.rank, "step_time_s": seconds, "tokens": out["tokens"],
              "rows": run.stream.rows, "split": list(run.stream.row_split),
              "peak_memory_gb": mx.get_peak_memory() / 1e9, "optimizer_state_gb": run.fns.state_bytes() / 1e9}
    if run.last_compute_s is not None:
        record["compute_s"] = run.last_compute_s[run.world.rank]  # the latest measured update's
    timings.write(json.dumps(record) + "\n")
    timings.flush()


RESTART_SILENCE_S = 15.0  # parallel.peer_silence_s under --restarts: a restart costs seconds, a sleeping Mac hours


def _peer_silence_s(cfg: Config) -> float:
    """``parallel.peer_silence_s``, or its default: short when a restart follows, else the whole timeout (a peer
    whose Wi-Fi roams may come back, and without a restart the job would be over)."""
    if cfg.parallel.peer_silence_s is not None:
        return cfg.parallel.peer_silence_s
    return min(RESTART_SILENCE_S, cfg.parallel.timeout_s) if restart_env().restarts > 0 else cfg.parallel.timeout_s


def train(cfg: Config, resume=None, options: RunOptions | None = None, allow_changes: bool = False) -> dict:
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

    Returns:
        dict: Final step, whether it stopped early (and the signal that
        asked, 0 if none), and the last val loss.
    """
    notes = check_ring_hostfile()  # a repeated ip:port would never connect
    refuse_lone_rank()  # before anything is written: such a process has no run of its own
    run_dir = cfg.checkpoint.run_dir
    status_file.reset()
    # Armed before the ranks connect: a signal or a missing rank then ends with words and a status too.
    health.install(None, run_dir, cfg.parallel.timeout_s, describe_connect=_first_exchange_stuck,
                   silence_s=_peer_silence_s(cfg))
    world, lock, reporter, wired, heartbeat = None, None, NullReporter(), None, None
    try:
        world = connect.join(cfg.parallel.backend, cfg.parallel.timeout_s, should_stop=health.stop_signal)
        health.attach(world)
        health.attach(world, PeerMonitor.start(world))
        for note in notes:
            world.print0(f"[mlx-dp] note: {note}")
        try:
            lock, run_id = runlock.acquire_for_group(world, run_dir)
        except UserError:
            status_file.disown()  # another run owns checkpoint.dir: write nothing there
            raise
        status_file.set_run(run_id)
        earlier = status_file.read(run_dir)
        if earlier is not None and earlier.get("state") == "lost":
            world.print0(f"[mlx-dp] note: the earlier run in {run_dir} was lost: {earlier['lost_reason']}")
        restart = restart_env()
        membership = Membership.of(world.rank, world.size, restart.nominal, restart.present)
        restarted = _note_restart(world, run_dir, restart, earlier, membership)
        if restarted is not None:
            resume = restart_resume(run_dir, restart.job, resume)  # this launch's newest checkpoint
        resume = shared_resume(world, resume)  # rank 0's disk holds the checkpoints: its choice is every rank's
        # As mlx-lm's trainer: on a Mac, let MLX keep the recommended working set wired (a no-op elsewhere).
        wired = maybe_set_recommended_wired_limit()
        run = build_run(cfg, world, resume, options, allow_changes, membership)
        reporter = _reporter(run)
        if run.resumed is not None:
            reporter.log(run.resumed.record())
        if restarted is not None:
            reporter.log({"step": run.state.step, **restarted})
        # Set up, checked and agreed: from here this run's records replace an earlier run's end.
        health.status(world, run_dir, "running", step=run.state.step)
        heartbeat = status_file.Heartbeat(world, run_dir, health.current_step)
        result = fit(run, reporter)
        result["signal"] = health.stop_signal()
        reason = None
        if result["stopped"]:
            asked = signal.Signals(result["signal"]).name if result["signal"] else "a stop request"
            reason = f"{asked}: stopped after saving update {result['step']}; continue with --resume"
        health.status(world, run_dir, "stopped" if result["stopped"] else "completed", step=result["step"],
                      reason=reason)
        return result
    except KeyboardInterrupt:
        health.failing()
        health.status(world, run_dir, "failed", step=health.current_step(),
                      reason=f"interrupted: a second Ctrl-C at update {health.current_step()} aborted before a "
                             "checkpoint was saved; --resume continues from the last one")
        raise
    except Stopped as e:
        health.status(world, run_dir, "stopped", step=health.current_step(), reason=str(e))
        raise
    except Exception as e:  # noqa: BLE001 (recorded, then raised as a user error where it is one)
        health.failing()
        error = _as_user_error(e, run_dir)
        lost_peer = isinstance(error, DistributedError) and str(error) != str(e)  # what this rank saw of another's end
        health.status(world, run_dir, "failed", step=health.current_step(), reason=str(error), consequence=lost_peer)
        health.report_failure(str(error), getattr(error, "blamed", ()), final=getattr(error, "final", False))
        if error is e:
            raise
        raise error from None
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        try:
            reporter.close()
        except OSError:  # a full disk fails the last flush too; the error above is the one to report
            pass
        if lock is not None:
            lock.release()
        if wired is not None:
            mx.set_wired_limit(wired)  # the process's own limit again (mlx-lm leaves it set)
        health.uninstall()


def _note_restart(world, run_dir: Path, restart, earlier: dict | None, membership: Membership) -> dict | None:
    """At a restart by ``mlx-dp launch --restarts``: say why, and list it in every status record.

    Returns:
        dict | None: The restart's ``metrics.jsonl`` record (without its step), or
        ``None`` at a launch's first start.
    """
    if restart.attempt <= 0:
        return None
    record = {"event": "restarted", "attempt": restart.attempt, "of": restart.restarts, "cause": restart.cause[:300],
              "ranks": world.size, "nominal_ranks": membership.nominal, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if restart.left_out:
        record["left_out"] = restart.left_out[:300]
    same_launch = earlier is not None and earlier.get("job") == restart.job
    status_file.note_restarts(((earlier or {}).get("restarts", []) if same_launch else [])[-9:] +
                              [{k: v for k, v in record.items() if k != "event"}])
    world.print0(f"[mlx-dp] restart {restart.attempt} of {restart.restarts} after: {restart.cause or 'a failure'}"
                 + (f"; left out: {restart.left_out}" if restart.left_out else ""))
    return record


def _first_exchange_stuck() -> str:
    return ("the ranks connected, but their first exchange did not complete: a rank stopped or died just after "
            "connecting (see the other ranks' messages)")


def _as_user_error(error: Exception, run_dir: Path) -> Exception:
    """A full disk or a lost peer as one line for people; other exceptions unchanged (a bug: traceback)."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = Path(error.filename) if error.filename else Path(run_dir)
        directory = where.parent if error.filename else where
        return CheckpointError(f"could not write {where}: {checkpoint.describe_os_error(error, directory)}")
    reason = health.describe_failure(error)
    return DistributedError(reason) if reason != str(error) else error


def _reporter(run: Run):
    """Rank 0 reports to the bar, metrics.jsonl and wandb; the other ranks to nothing."""
    if not run.world.is_main:
        return NullReporter()
    cfg, wandb_run = run.cfg, None
    if cfg.logging.wandb:
        wandb_run, mode = start_wandb(cfg.logging.wandb_project, cfg.logging.wandb_run_name or run.run_dir.name,
                                      run.run_dir, {**cfg.to_dict(), "world_size": run.world.size,
                                                    "global_batch": run.state.global_batch})
        run.world.print0(f"[mlx-dp] wandb: {mode} run in {run.run_dir / 'wandb'}"
                         + (" (no network or login: offline mode)" if mode == "offline" else ""))
    return Reporter(run.run_dir / "metrics.jsonl", run.total_steps, run.state.step, cfg.logging.progress_bar,
                    wandb_run)
