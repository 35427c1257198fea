"""``train()``: set up, then iterate, step, report, evaluate and save.

Read top to bottom: :func:`train` builds a :class:`Run` (model, data,
optimizer, buckets, checks every rank agrees on), then :meth:`Run.fit`
schedules updates. The maths of an update is in ``trainer.step``; every
collective is in ``trainer.parallel``.
"""

import json
import math
import os
import time
from pathlib import Path

import mlx.core as mx

from . import __version__, checkpoint, health
from .batches import BatchStream, batches_per_epoch
from .config import Config
from .data import load_splits
from .errors import DataError, DistributedError, UserError
from .evaluate import evaluate_loss
from .metrics import NullReporter, Reporter, format_bytes, start_wandb
from .model import (adapter_config, apply_method, backward_order, count_parameters, enable_grad_checkpoint,
                    load_base, trainable_parameters)
from .optim import build_optimizer
from .hostfile import check_ring_hostfile
from .parallel import (MiB, GradientReducer, World, check_agreement, digest, init_world, plan_buckets,
                       resolve_comm_stream)
from .peers import PeerMonitor
from .step import StepFunctions, run_update


def versions() -> dict:
    import mlx_lm

    return {"trainer": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}


def _total_steps(cfg: Config, num_samples: int, world: World) -> int:
    t = cfg.training
    if t.steps is not None:
        return t.steps
    micro_per_epoch = batches_per_epoch(num_samples, t.batch_size * world.size)
    return max(1, math.ceil(t.epochs * micro_per_epoch / t.grad_accumulation))


class Run:
    """Everything one training run holds; built by :func:`train`."""

    def __init__(self, cfg: Config, world: World, resume=None):
        self.cfg, self.world = cfg, world
        self.run_dir = Path(cfg.checkpoint.dir)
        t = cfg.training
        self.global_batch = t.batch_size * world.size * t.grad_accumulation
        world.print0(f"[mlx-dp] resolved recipe:\n{cfg.to_yaml()}")
        if world.is_main:
            checkpoint.check_writable(self.run_dir)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        health.status(world, self.run_dir, "running", step=0)

        # Model: identical adapters on every rank come from the shared seed.
        health.phase("loading the model", watched=False)
        self.model, self.tokenizer, self.model_config = load_base(cfg.model)
        apply_method(self.model, cfg.method, t.seed)
        self.adapter_config = adapter_config(cfg.method, cfg.model.path, len(self.model.layers))
        trainable, total = count_parameters(self.model)
        world.print0(f"[mlx-dp] {cfg.method.type}: {trainable / 1e6:.3f}M trainable of {total / 1e6:.3f}M parameters")

        # Data: rank 0 fills the tokenization cache, the others then read it.
        health.phase("loading data")
        self.splits = world.rank0_first(lambda: load_splits(cfg.data, self.tokenizer, show_progress=world.is_main))
        train = self.splits["train"]
        for note in train.notes:
            world.print0(f"[mlx-dp] {train.source}: {note}")
        if len(train) < self.global_batch:
            raise DataError(
                f"the training set {train.source} has {len(train)} usable samples, fewer than one global batch of "
                f"{self.global_batch} (training.batch_size={t.batch_size} x {world.size} ranks x "
                f"grad_accumulation={t.grad_accumulation}); lower training.batch_size")
        self.total_steps = _total_steps(cfg, len(train), world)
        world.print0(f"[mlx-dp] world: {world.size} rank(s); global batch = {t.batch_size} x {world.size} x "
                     f"{t.grad_accumulation} = {self.global_batch} sequences per update; "
                     f"{len(train)} training samples; {self.total_steps} updates")

        self.optimizer = build_optimizer(t, self.total_steps)
        self.step = 0
        self.stream = BatchStream(train, t.batch_size, world.rank, world.size, t.seed, cfg.data.pad_multiple)
        self.best = None  # (val_loss, checkpoint path)
        if resume is not None:
            self._resume(resume)

        check_agreement(world, {
            "recipe": digest(cfg.to_yaml()), **versions(),
            "dataset": train.fingerprint(),
            "trainable shapes": digest(*[f"{k}{v.shape}{v.dtype}" for k, v in
                                         trainable_parameters(self.model).items()]),
            "trainable values": self._weights_digest(),
        })

        # Buckets in the order backward produces gradients, identical on every rank.
        sample = next(iter(BatchStream(train, 1, 0, 1, t.seed, cfg.data.pad_multiple)))
        order = backward_order(self.model, mx.array(sample.inputs))
        params = trainable_parameters(self.model)
        comm_dtype = getattr(mx, cfg.parallel.comm_dtype) if cfg.parallel.comm_dtype else None
        buckets = plan_buckets(order, {k: v.shape for k, v in params.items()},
                               {k: v.dtype for k, v in params.items()}, int(cfg.parallel.bucket_mb * MiB),
                               int(cfg.parallel.first_bucket_mb * MiB), comm_dtype)
        self.reducer = GradientReducer(world, buckets, overlap=cfg.parallel.overlap,
                                       stream=resolve_comm_stream(cfg.parallel.comm_stream))
        self.reducer.check_plan()
        if world.size > 1:
            world.print0(f"[mlx-dp] gradients: {format_bytes(self.reducer.nbytes)} in {len(buckets)} bucket(s), "
                         f"{'overlapped with backward' if cfg.parallel.overlap else 'reduced after backward'}")
        if t.grad_checkpoint:
            enable_grad_checkpoint(self.model)
        self.fns = StepFunctions(self.model, self.optimizer, t.max_grad_norm)

    def _weights_digest(self) -> str:
        import numpy as np

        weights = trainable_parameters(self.model)
        return digest(*[np.array(v.astype(mx.float32)).tobytes() for v in weights.values()])

    # ------------------------------------------------------------------ resume

    def _resume(self, resume) -> None:
        cfg, world = self.cfg, self.world
        path = checkpoint.find_resume(self.run_dir, resume if isinstance(resume, str) else None)
        ckpt = checkpoint.load_checkpoint(path)
        state = ckpt["state"]
        checkpoint.check_weights_match(ckpt["weights"], trainable_parameters(self.model), path)
        saved_batch = state.get("global_batch")
        if saved_batch != self.global_batch and not cfg.parallel.allow_world_size_change:
            raise UserError(
                f"checkpoint {path} was trained with a global batch of {saved_batch} "
                f"({state.get('world_size')} ranks x {state.get('batch_size')} x {state.get('grad_accumulation')}), "
                f"but this run has {self.global_batch}; keep batch_size x ranks x grad_accumulation equal, or set "
                "parallel.allow_world_size_change=true")
        self.model.load_weights(list(ckpt["weights"].items()), strict=False)
        self.optimizer.state = ckpt["optimizer"]
        # mx.random.state cannot be assigned in mlx 0.32, but its key is two
        # uint32 words and seed(s) sets the key to [s >> 32, s & 0xffffffff].
        hi, lo = (int(x) for x in ckpt["rng"][0].tolist())
        mx.random.seed((hi << 32) | lo)
        self.step = int(state["step"])
        pos = state["data_position"]
        saved_micro = state["batch_size"] * state["world_size"]
        self.stream.epoch = int(pos["epoch"])
        if saved_micro == self.stream.global_batch:  # same global micro-batches: continue exactly
            self.stream.index = int(pos["index"])
        else:  # other micro-batches: same epoch, same share of it done
            self.stream.index = int(pos["index"]) * saved_micro // self.stream.global_batch
            world.print0(f"[mlx-dp] micro-batches changed from {saved_micro} to {self.stream.global_batch} sequences: "
                         "this epoch continues at the same fraction, in a slightly different order")
        self.best = tuple(state["best"]) if state.get("best") else None
        world.print0(f"[mlx-dp] resumed from {path} at update {self.step} (epoch {pos['epoch']}, batch {pos['index']})")

    # ------------------------------------------------------------------ saving

    def save(self, val_loss: float | None, reporter) -> None:
        """Rank 0 writes a resumable checkpoint and refreshes the top-level adapters."""
        if not self.world.is_main:
            return
        t = self.cfg.training
        weights = trainable_parameters(self.model)
        state = {
            "data_position": self.stream.position(), "world_size": self.world.size,
            "batch_size": t.batch_size, "grad_accumulation": t.grad_accumulation,
            "global_batch": self.global_batch, "total_steps": self.total_steps, "val_loss": val_loss,
            "versions": versions(), "recipe_digest": digest(self.cfg.to_yaml()), "best": None,
        }
        if val_loss is not None and (self.best is None or val_loss < self.best[0]):
            self.best = (val_loss, str(self.run_dir / checkpoint.CHECKPOINTS / checkpoint.step_dir_name(self.step)))
        state["best"] = list(self.best) if self.best else None
        crash = health.fault("crash_in_save", self.step) is not None
        path = checkpoint.save_checkpoint(self.run_dir, self.step, weights, self.optimizer.state, list(mx.random.state),
                                          self.adapter_config, state, self.cfg.to_yaml(),
                                          on_partial=(lambda: os._exit(1)) if crash else None)
        checkpoint.save_adapters(self.run_dir, weights, self.adapter_config)
        keep = {Path(self.best[1])} if (self.best and self.cfg.checkpoint.keep_best) else set()
        checkpoint.prune(self.run_dir, self.cfg.checkpoint.keep_last, keep)
        reporter.checkpoint(path)

    # ------------------------------------------------------------------ the loop

    def validate(self):
        split = self.splits.get("valid")
        if split is None:
            return None
        e = self.cfg.eval
        result = evaluate_loss(self.world, self.model, split, e.batch_size or self.cfg.training.batch_size,
                               self.cfg.data.pad_multiple, e.max_batches)
        return result["loss"]

    def fit(self, reporter) -> dict:
        cfg, world, t = self.cfg, self.world, self.cfg.training
        if "valid" not in self.splits:
            world.print0("[mlx-dp] no validation split: skipping validation")
        val_loss = None
        if cfg.eval.at_start and self.step == 0 and "valid" in self.splits:
            val_loss = self.validate()
            reporter.log({"step": 0, "val_loss": val_loss})
            reporter.note(f"[mlx-dp] step 0: val loss {val_loss:.4f}")
        window = self._new_window()
        stop_requested = health.stop_requested
        timings = None
        if cfg.logging.per_rank_timings:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            timings = open(self.run_dir / f"metrics.rank{world.rank}.jsonl", "a")
        tic = time.perf_counter()
        while self.step < self.total_steps:
            health.phase("compute", self.step + 1)
            stall = health.fault("stall", self.step + 1)
            if stall:
                time.sleep(stall)
            micro = [next(self.stream) for _ in range(t.grad_accumulation)]
            stop = stop_requested() or health.fault("stop", self.step + 1) is not None
            out = run_update(self.fns, self.reducer, micro, stop=stop,
                             poison=health.fault("nan", self.step + 1) is not None)
            health.phase("sync", self.step + 1)
            mx.eval(self.model.state, self.optimizer.state, mx.random.state, out["loss_sum"], out["grad_norm"],
                    out["finite"], out["stop"])  # note: the step's one blocking sync point
            self.step += 1
            toc = time.perf_counter()
            window["time"] += toc - tic
            if timings is not None:
                timings.write(json.dumps({"step": self.step, "rank": world.rank, "step_time_s": toc - tic,
                                          "tokens": out["tokens"], "peak_memory_gb": mx.get_peak_memory() / 1e9})
                              + "\n")
                timings.flush()
            tic = toc
            window["loss"] = window["loss"] + out["loss_sum"]
            window["tokens"] += out["tokens"]
            window["steps"] += 1
            window["real"] += sum(b.real_tokens for b in micro)  # this rank's rows; ranks are alike
            window["cells"] += sum(b.inputs.shape[0] * (b.inputs.shape[1] + 1) for b in micro)
            window["nonfinite"] = window["nonfinite"] + (1 - out["finite"].astype(mx.int32))
            last = self.step == self.total_steps
            stopping = out["stop"].item() > 0  # evaluated above; identical on every rank (summed over ranks)
            reporter.advance(1)
            if self.step % cfg.logging.every == 0 or last or stopping:
                self._report(window, out, reporter)
                window = self._new_window()
            val_loss = None
            if "valid" in self.splits and ((cfg.eval.every and self.step % cfg.eval.every == 0) or last):
                health.phase("eval", self.step)
                val_loss = self.validate()
                reporter.log({"step": self.step, "val_loss": val_loss})
                reporter.note(f"[mlx-dp] step {self.step}: val loss {val_loss:.4f}")
                tic = time.perf_counter()  # validation time is not training throughput
            if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or last or stopping:
                health.phase("save", self.step)
                self.save(val_loss, reporter)
                world.barrier(phase="save")  # nobody runs ahead while rank 0 writes
                tic = time.perf_counter()
            if stopping:
                world.print0(f"[mlx-dp] stop requested: saved update {self.step} to {self.run_dir}; "
                             "continue with --resume")
                return {"step": self.step, "stopped": True}
        return {"step": self.step, "stopped": False, "val_loss": val_loss}

    @staticmethod
    def _new_window() -> dict:
        return {"loss": mx.array(0.0, mx.float32), "tokens": 0, "time": 0.0, "steps": 0, "real": 0, "cells": 0,
                "nonfinite": mx.array(0, mx.int32)}

    def _report(self, window: dict, out: dict, reporter) -> None:
        """Read the window's scalars (the only reads of device values) and log them."""
        t = self.cfg.training
        bad = int(window["nonfinite"].item())
        if bad and not t.skip_nonfinite:
            raise UserError(f"non-finite loss or gradient norm in {bad} update(s) up to update {self.step}; "
                            "the updates were not applied. Lower training.learning_rate, set "
                            "training.max_grad_norm, or set training.skip_nonfinite=true to skip such updates")
        loss = window["loss"].item() / max(window["tokens"], 1)
        record = {
            "step": self.step, "epoch": round(self.stream.epoch_progress(), 4), "train_loss": loss,
            "learning_rate": float(self.optimizer.learning_rate.item()),
            "grad_norm": float(out["grad_norm"].item()),
            "tokens_per_s": window["tokens"] / max(window["time"], 1e-9),
            "step_time_s": window["time"] / max(window["steps"], 1),
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "tokens": window["tokens"],
            "world_size": self.world.size, "global_batch": self.global_batch,
            "padded_share": round(1 - window["real"] / max(window["cells"], 1), 4),
        }
        if bad:
            record["skipped_updates"] = bad
        reporter.log(record)
        reporter.advance(0, {"loss": f"{loss:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}",
                             "lr": f"{record['learning_rate']:.2e}"})


def train(cfg: Config, resume=None) -> dict:
    """Run a recipe on this process's rank.

    Args:
        cfg (Config): The resolved recipe.
        resume (str | bool | None): ``True`` resumes from the newest checkpoint
            in ``checkpoint.dir``; a path resumes from that checkpoint.
            Default: ``None`` (start fresh).

    Returns:
        dict: Final step, whether it stopped early, and the last val loss.
    """
    notes = check_ring_hostfile()  # a repeated ip:port would never connect
    world = init_world(cfg.parallel.backend)
    for note in notes:
        world.print0(f"[mlx-dp] note: {note}")
    run_dir = Path(cfg.checkpoint.dir)
    health.install(world, run_dir, cfg.parallel.timeout_s, peers=PeerMonitor.start(world))
    reporter = NullReporter()
    try:
        run = Run(cfg, world, resume)
        if world.is_main:
            wandb_run = None
            if cfg.logging.wandb:
                wandb_run, mode = start_wandb(cfg.logging.wandb_project, cfg.logging.wandb_run_name or run_dir.name,
                                              run_dir, {**cfg.to_dict(), "world_size": world.size,
                                                        "global_batch": run.global_batch})
                world.print0(f"[mlx-dp] wandb: {mode} run in {run_dir / 'wandb'}"
                             + (" (no network or login: offline mode)" if mode == "offline" else ""))
            reporter = Reporter(run_dir / "metrics.jsonl", run.total_steps, run.step,
                                cfg.logging.progress_bar, wandb_run)
        result = run.fit(reporter)
        health.status(world, run_dir, "stopped" if result["stopped"] else "completed", step=result["step"])
        return result
    except UserError as e:
        health.failing()
        health.status(world, run_dir, "failed", reason=str(e), step=health.current_step())
        raise
    except Exception as e:
        health.failing()
        reason = health.describe_failure(e)
        health.status(world, run_dir, "failed", reason=reason, step=health.current_step())
        if reason != str(e):
            raise DistributedError(reason) from None
        raise
    finally:
        reporter.close()
        health.uninstall()
