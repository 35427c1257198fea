"""One optimizer update, end to end: the gradient of each micro-batch, their sum, then the update kind.

All the maths of an update lives here and in the update kinds
(``trainer.step.updates``); ``trainer.run.loop`` only schedules it, and the
benchmarks time this same code. The objective's loss is a *sum* scaled by one
over a count of the whole update (``trainer.objectives.base``), so gradients
summed over micro-batches and ranks are the gradient of the global objective:
N ranks at batch b compute the same update as one process at batch N*b.
"""

import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ..objectives.base import Objective
from .updates import Update


class Gradient:
    """The compiled forward and backward of one micro-batch under an objective.

    ``gradient(scale, *arrays)`` takes ``objective.arrays(batch)`` and returns
    ``(stats, grads)``: the objective's vector of sums and the gradient of its
    loss terms, each times its ``scale``.

    Args:
        model (nn.Module): The model with its trainable parameters set.
        objective (Objective): What the loss teaches.
    """

    def __init__(self, model: nn.Module, objective: Objective):
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

        self._grads = grads

    def __call__(self, scale, *arrays) -> tuple:
        return self._grads(scale, *arrays)


class Step:
    """One whole update over this rank's micro-batches: their gradients, summed, then the update kind.

    Args:
        model (nn.Module): The model with its trainable parameters set.
        objective (Objective): What the loss teaches.
        update (Update): What happens once the gradients exist (replicated or sharded).
        gradient (Gradient | None): The compiled gradient to use (the benchmarks share one
            between steps). Default: ``None`` (compiled here).
    """

    def __init__(self, model: nn.Module, objective: Objective, update: Update, gradient: Gradient | None = None):
        self.model, self.objective, self.update = model, objective, update
        self.grads = gradient or Gradient(model, objective)

    def __call__(self, micro_batches: list, stop: bool = False, measure=None, save: bool = False,
                 hosted: int = 1) -> dict:
        """One optimizer update over ``micro_batches`` (this rank's share).

        Args:
            micro_batches (list): ``grad_accumulation`` micro-batches (per hosted rank).
            stop (bool): This rank wants to stop after this update (a signal arrived).
                Summed over ranks with the gradients, so every rank learns of it at the
                same update. Default: ``False``.
            measure (callable | None): Time this rank's compute: its gradients are evaluated
                before any is sent (no overlap on this update), and ``measure(seconds)``
                gives the figure shared with every rank. Default: ``None``.
            save (bool): This rank asks for a checkpoint after this update (rank 0's clock:
                ``checkpoint.every_minutes``); summed like ``stop``. Default: ``False``.
            hosted (int): Nominal ranks this process computes (``trainer.data.membership``):
                ``micro_batches`` then holds, per global micro-batch, one micro-batch per hosted
                rank, each drawing the random numbers its own process would have. Default: ``1``.

        Returns:
            dict: Lazy arrays ``stats`` (the objective's sums over ranks and micro-batches;
            ``loss_sum``, their first), ``grad_norm``, ``finite``, ``stop`` and ``save`` (ranks
            that asked) and ``compute_s`` (each rank's measured compute seconds, zeros when not
            measured), plus the int ``tokens`` (global loss tokens), the ``counts`` the
            objective's metrics divide by and the ``objective``. The caller evaluates them.
        """
        start = time.perf_counter()
        world = self.update.reducer.world
        globals_ = micro_batches[::hosted]  # each global micro-batch once (a process may host several ranks)
        ranks = world.size if self.update.reducer.averages else 1
        grads, local = self._accumulate(micro_batches, self.objective.scales(globals_, ranks), hosted)
        seconds = [0.0] * world.size
        if measure is not None:
            mx.eval(grads, local)  # note: sync point, so the time is compute alone, without communication
            seconds[world.rank] = measure(time.perf_counter() - start)
        # The loss sums (and the objective's statistics), the stop and save flags and the compute times
        # ride with the last gradient bucket: the logged loss, the finiteness check, the stop and save
        # decisions and the balance split are then global, at no extra collective.
        k = len(self.objective.stats)
        extra = mx.concatenate([local, mx.array([float(stop), float(save), *seconds], mx.float32)])
        flat = dict(tree_flatten(grads))
        del grads  # the reducer drops each gradient once it is in a bucket: let MLX free it then
        world.waiting("sync")  # everything is dispatched; the update below waits for the peers' buckets
        extra, norm, finite = self.update.apply(flat, extra, k)
        return {"loss_sum": extra[0], "stats": extra[:k], "grad_norm": norm, "finite": finite, "stop": extra[k],
                "save": extra[k + 1], "compute_s": extra[k + 2:],
                "tokens": sum(b.global_tokens for b in globals_), "counts": self.objective.counts(globals_),
                "objective": self.objective}

    def _accumulate(self, micro_batches: list, scale, hosted: int) -> tuple:
        """This rank's gradients and statistics summed over its micro-batches (the last one's lazy)."""
        acc, local, key = None, mx.zeros(len(self.objective.stats), mx.float32), None
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            if hosted > 1:  # every nominal rank starts a micro-batch from the same random state, as its process would
                if i % hosted == 0:
                    key = mx.random.state[0].tolist()  # note: sync point, only while standing in for missing ranks
                else:
                    mx.random.seed((int(key[0]) << 32) | int(key[1]))  # sets the key to these two words
            stats, grads = self.grads(scale, *self.objective.arrays(batch))
            local = local + stats
            grads = grads if acc is None else tree_map(mx.add, acc, grads)
            acc = None
            if i < last:
                acc = grads
                # note: sync point per micro-batch, so only one micro-batch's graph is alive
                mx.eval(acc, local)
        return grads, local

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (its shards only, when sharded)."""
        return self.update.state_bytes()

    def scorer(self, objective, size: int):
        """How validation scores a batch here: ``None``, this rank's own compiled loss (``trainer.objectives.evaluate``)."""
        return None
