"""Setting up a pipeline run (``parallel.pipeline``): this rank's stage of the model, and its step.

Every rank is a stage; the job is one replica, so every stage reads the same
batches (the data plan of one process) and ``training.batch_size`` is the
batch of the whole pipeline. The model is loaded lazily, the method applied to
the whole of it (the same adapters, from the same seed, as one process makes),
and then cut to this stage's blocks (``trainer.model.stages``): only they are
read from disk. The split is even, ``parallel.stage_layers``, or in proportion
to ``parallel.balance`` (``auto``: to each Mac's memory).
"""

import hashlib
import json
import os
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import log
from ..errors import ConfigError
from ..model.stages import StagePlan, activation_dtype, cut, plan_stages
from ..step.pipeline import PipelineStep, PipelineUpdate, StageRunner


@dataclass
class Stage:
    """This rank's part of the pipeline: the plan, its forward, and every stage's parameter names."""

    plan: StagePlan
    runner: StageRunner
    everyone: dict  # name -> (shape, dtype) of every stage's trainable parameters

    def shapes(self) -> dict:
        """Every stage's trainable parameters as lazy zeros: their names, shapes and dtypes (never evaluated, so
        nothing is allocated), for the checks a checkpoint and the agreement make."""
        return {k: mx.zeros(shape, dtype) for k, (shape, dtype) in self.everyone.items()}

    def joined(self, world, text: str) -> str:
        """One digest of every stage's hex ``text`` (each stage hashes the weights it holds). A collective."""
        mine = bytes.fromhex(text)
        row = [0.0] * (len(mine) * world.size)
        row[world.rank * len(mine):(world.rank + 1) * len(mine)] = [float(b) for b in mine]
        summed = world.all_sum(row, phase="pipeline digest") if world.size > 1 else row
        return hashlib.blake2b(bytes(int(v) for v in summed), digest_size=16).hexdigest()


def machine_memory() -> int:
    """Bytes of memory on this machine (a Mac's unified memory; elsewhere the RAM)."""
    if mx.metal.is_available():
        return int(mx.device_info()["memory_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _weights(cfg, world) -> list | None:
    """Each stage's share of the blocks from ``parallel.balance``: the listed capacities, or each rank's memory."""
    setting = cfg.parallel.balance
    if isinstance(setting, list):
        if len(setting) != world.size:
            raise ConfigError(f"parallel.balance lists {len(setting)} capacities but the pipeline has {world.size} "
                              "stages; give one per stage")
        return setting
    if setting == "auto":
        return [float(m) for m in world.all_sum([machine_memory() if r == world.rank else 0 for r in
                                                 range(world.size)], phase="pipeline plan")]
    return None


def make_stage(cfg, world, model) -> Stage:
    """Cut ``model`` (loaded lazily, the method applied) into this rank's stage; say the split once."""
    from ..model.load import count_parameters

    if world.placement.backend == "nccl":  # mlx/distributed/nccl/nccl.cpp: "[nccl] Send not supported"
        raise ConfigError("parallel.pipeline sends activations between stages with MLX's send and recv, which its "
                          "NCCL backend does not have; launch with --backend ring (or MPI) for a pipeline")

    everyone = {k: (tuple(v.shape), v.dtype) for k, v in tree_flatten(model.trainable_parameters())}
    layers = len(model.layers)
    plan = plan_stages(layers, world.size, world.rank, cfg.parallel.stage_layers, _weights(cfg, world))
    dtype, hidden = activation_dtype(model), _hidden_size(model)
    io = cut(model, plan, tied="lm_head" not in model)
    mx.eval(model.parameters())  # note: sync point; this stage's own weights are read from disk now, and only they
    trainable, total = count_parameters(model)
    log.info(f"pipeline: {world.size} stage(s): {plan.describe()}; {cfg.parallel.pipeline_microbatches} part(s) per "
             f"micro-batch")
    log.each(f"stage {world.rank}: blocks {plan.mine[0]}-{plan.mine[1] - 1}, {trainable / 1e6:.3f}M trainable of "
             f"{total / 1e6:.3f}M parameters held here")
    return Stage(plan=plan, runner=StageRunner(model, io, plan, world, hidden, dtype), everyone=everyone)


def _hidden_size(model) -> int:
    embed = model["model"].embed_tokens
    import mlx.nn as nn

    if isinstance(embed, nn.QuantizedEmbedding):
        return embed.weight.shape[1] * 32 // embed.bits
    return embed.weight.shape[1]


def pipeline_step(cfg, world, model, objective, optimizer, saved_optimizer, stage: Stage,
                  done: int = 0) -> PipelineStep:
    """This stage's update (its own optimizer state) and the step that schedules the parts through the stages;
    ``done``: the updates a resumed run has behind it."""
    update = PipelineUpdate(model, optimizer, world, cfg.training.max_grad_norm, stage.everyone, saved_optimizer)
    return PipelineStep(stage.runner, objective, update, cfg.parallel.pipeline_microbatches, cfg.training.seed, done)


def everyone_digest(stage: Stage) -> str:
    """What every stage must agree on about the parameters: every stage's names, shapes and dtypes."""
    return json.dumps(sorted((k, list(s), str(d)) for k, (s, d) in stage.everyone.items()))
