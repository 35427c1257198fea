"""The training step: token-summed loss, compiled gradient and update functions.

All the maths of an optimizer update lives here; ``trainer.run.loop`` only
schedules it, and the benchmarks time this same code. The loss of a micro-batch is a *sum* of token cross-entropies,
scaled by ``1 / T`` where ``T`` is the number of loss tokens in the whole
update: every rank's micro-batches of this update, summed over ranks. The
data plan makes ``T`` known to every rank without communicating (see
``trainer.data.batches``). Gradients are then summed over micro-batches and ranks,
so N ranks at batch b compute the same update as one process at batch N*b.
Preference objectives (``trainer.objectives.base``) follow the same rule with
their own counts: pairs for per-pair terms, answer tokens for token terms.
"""

import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..data.batches import Batch
from ..objectives.base import SFT, token_loss_sum
from .apply import BucketedUpdate, clip_scale, global_norm


def to_arrays(batch: Batch) -> tuple:
    """The batch as MLX arrays: inputs, targets, mask (and segments when packed)."""
    arrays = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
    return arrays if batch.segments is None else (*arrays, mx.array(batch.segments))


class StepFunctions:
    """Compiled pieces of one optimizer update.

    * ``grads(scale, *arrays)``: forward + backward of one micro-batch
      (``objective.arrays(batch)``: inputs, targets, mask[, segments] for SFT),
      returning ``(stats, grads)``: ``stats`` is the objective's vector of sums
      (for SFT the token loss sum alone); the gradient is of the loss terms,
      each times its ``scale`` (one over its global count).
    * ``update(grads, loss_sum)``: check finiteness, clip, apply the optimizer
      bucket by bucket (``trainer.step.apply``). A non-finite loss or
      gradient norm leaves weights and optimizer state untouched. Inputs are
      already summed over ranks, so every rank takes the same decision.

    With optimizer state sharded across ranks, ``sharding``
    (``trainer.step.zero.ShardedOptimizer``) does the update instead.

    Args:
        model (nn.Module): The model with its trainable parameters set.
        optimizer (optim.Optimizer): The optimizer (initialised here, unless sharded).
        max_grad_norm (float | None): Clip the global norm to this; ``None`` disables.
        groups (list[list[str]] | None): Parameter names updated together, e.g.
            the gradient buckets. Default: ``None`` (one group of everything).
        sharding (ShardedOptimizer | None): The sharded update. Default: ``None``.
        objective: What the loss teaches (``trainer.objectives.base``). Default: ``None`` (SFT).
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, max_grad_norm: float | None,
                 groups: list[list[str]] | None = None, sharding=None, objective=None):
        self.model = model
        self.objective = objective = objective or SFT()
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.sharding = sharding
        if sharding is None:
            optimizer.init(model.trainable_parameters())
            self.groups = groups or [[name for name, _ in tree_flatten(model.trainable_parameters())]]
            self._bucketed = BucketedUpdate(optimizer, self.groups)

        def scaled_loss(scale, *arrays):
            return objective.loss(model, scale, *arrays)

        value_and_grad = nn.value_and_grad(model, scaled_loss)
        # model.state is an output too: nn.value_and_grad calls model.update()
        # while tracing, which would otherwise leave tracers in the model.
        grad_state = [model.state, mx.random.state]

        @partial(mx.compile, inputs=grad_state, outputs=grad_state)
        def grads(scale, *arrays):
            (_, stats), g = value_and_grad(scale, *arrays)
            return stats, g

        self.grads = grads

    def update(self, grads: dict, loss_sum: mx.array):
        """Clip and apply summed gradients (flat ``name -> gradient``; emptied as it goes).

        Returns:
            tuple: ``(norm, finite)``, evaluated.
        """
        norm = global_norm([grads[name] for group in self.groups for name in group])
        finite = mx.logical_and(mx.isfinite(norm), mx.isfinite(loss_sum))
        if not finite.item():  # note: sync point; a skipped update leaves no trace, on every rank alike
            return norm, finite
        scale = clip_scale(norm, self.max_grad_norm)
        self._bucketed.advance()
        params = dict(tree_flatten(self.model.trainable_parameters()))
        for index, group in enumerate(self.groups):
            new = self._bucketed.apply(index, {n: grads.pop(n) for n in group}, {n: params.pop(n) for n in group},
                                       scale)
            self.model.load_weights(list(new.items()), strict=False)
            mx.eval(new)  # note: sync point per bucket, so old and new weights coexist for one bucket only
        return norm, finite

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (its shards only, when sharded)."""
        return sum(v.nbytes for _, v in tree_flatten(self.optimizer.state))


def run_update(fns: StepFunctions, reducer, micro_batches: list[Batch], stop: bool = False, measure=None,
               save: bool = False, hosted: int = 1):
    """One optimizer update over ``micro_batches`` (this rank's share).

    Args:
        fns (StepFunctions): Compiled step pieces.
        reducer (trainer.parallel.GradientReducer): Sums gradients over
            ranks (a reducer whose ``averages`` is true divides by the world
            size instead; the loss scale makes up for it).
        micro_batches (list[Batch]): ``grad_accumulation`` micro-batches.
        stop (bool): This rank wants to stop after this update (a signal
            arrived). Summed over ranks with the gradients, so every rank
            learns of it at the same update. Default: ``False``.
        measure (callable | None): Time this rank's compute: its gradients
            are evaluated before any is sent (no overlap on this update), and
            ``measure(seconds)`` gives the figure shared with every rank
            (the identity in training; tests may fake it). Default: ``None``.
        save (bool): This rank asks for a checkpoint after this update (rank 0's
            clock: ``checkpoint.every_minutes``); summed like ``stop``. Default: ``False``.
        hosted (int): Nominal ranks this process computes (``trainer.data.membership``):
            ``micro_batches`` then holds, for each global micro-batch, one micro-batch
            per hosted rank, each drawing the random numbers its own process would
            have drawn. Default: ``1``.

    Returns:
        dict: Lazy arrays ``stats`` (the objective's sums over ranks and
        micro-batches; ``loss_sum``, their first, is the loss sum), ``grad_norm``,
        ``finite``, ``stop`` (ranks that asked to stop), ``save`` (ranks that
        asked for a checkpoint) and ``compute_s`` (each
        rank's measured compute seconds, zeros when not measured), plus the
        int ``tokens`` (global loss tokens of this update), the ``counts`` the
        objective's metrics divide by and the ``objective``. The caller
        evaluates them with the model state.
    """
    start = time.perf_counter()
    objective = fns.objective
    globals_ = micro_batches[::hosted]  # each global micro-batch once (a process may host several ranks)
    total_tokens = sum(b.global_tokens for b in globals_)
    ranks = reducer.world.size if reducer.averages else 1
    scale = objective.scales(globals_, ranks)
    acc, local_loss, key = None, mx.zeros(len(objective.stats), mx.float32), None
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        if hosted > 1:  # every nominal rank starts a micro-batch from the same random state, as its process would
            if i % hosted == 0:
                key = mx.random.state[0].tolist()  # note: sync point, only while standing in for missing ranks
            else:
                mx.random.seed((int(key[0]) << 32) | int(key[1]))  # sets the key to these two words
        stats, grads = fns.grads(scale, *objective.arrays(batch))
        local_loss = local_loss + stats
        grads = grads if acc is None else tree_map(mx.add, acc, grads)
        acc = None
        if i < last:
            acc = grads
            # note: sync point per micro-batch, so only one micro-batch's graph is alive
            mx.eval(acc, local_loss)
    world = reducer.world
    seconds = [0.0] * world.size
    if measure is not None:
        mx.eval(grads, local_loss)  # note: sync point, so the time is compute alone, without communication
        seconds[world.rank] = measure(time.perf_counter() - start)
    # The loss sums (and the objective's statistics), the stop and save flags and the compute times
    # ride with the last gradient bucket: the logged loss, the finiteness check, the stop and save
    # decisions and the balance split are then global, at no extra collective.
    k = len(objective.stats)
    extra = mx.concatenate([local_loss, mx.array([float(stop), float(save), *seconds], mx.float32)])
    flat = dict(tree_flatten(grads))
    del grads  # the reducer drops each gradient once it is in a bucket: let MLX free it then
    world.waiting("sync")  # everything is dispatched; the update below waits for the peers' buckets
    if fns.sharding is not None:
        # Each rank gets its shard of every bucket summed; the global norm is the sum of the
        # ranks' squared shards, which rides in the one small all_sum with the loss and flags.
        shards = reducer.reduce_scatter(flat)
        squares = sum(mx.square(s.astype(mx.float32)).sum() for s in shards)
        extra = reducer.sum_small(mx.concatenate([extra, squares.reshape(1)]))
        norm, finite = fns.sharding.apply(shards, extra[:k].sum(), extra[-1])  # note: syncs per bucket
        extra = extra[:-1]
    else:
        summed, extra = reducer.reduce(flat, extra=extra)
        norm, finite = fns.update(summed, extra[:k].sum())  # note: syncs per bucket; any NaN stat is caught
    return {"loss_sum": extra[0], "stats": extra[:k], "grad_norm": norm, "finite": finite, "stop": extra[k],
            "save": extra[k + 1], "compute_s": extra[k + 2:], "tokens": total_tokens,
            "counts": objective.counts(globals_), "objective": objective}


def make_eval_loss(model: nn.Module):
    """Compiled ``(inputs, targets, mask[, segments]) -> loss_sum`` for validation."""
    return mx.compile(partial(token_loss_sum, model), inputs=[model.state], outputs=[model.state])
