"""Baseline reducers of the benchmarks, passed to the trainer as ``RunOptions.reducer`` (never training).

* :class:`LocalReducer`: the trainer's buckets, concatenated and split
  locally, with no ``all_sum``: the only difference to training is the
  communication, so a run with it prices what the communication costs (ranks
  then train apart).
* :class:`PassThroughReducer`: no reduction at all: gradients as backward returns them.
* :class:`AverageGradientsReducer`: ``mlx.nn.average_gradients``, as mlx-lm reduces.
"""

import mlx.core as mx
from mlx.utils import tree_flatten

from trainer.parallel import GradientReducer


class LocalReducer(GradientReducer):
    """:class:`~trainer.parallel.GradientReducer` without its ``all_sum``s (ranks train apart)."""

    def __init__(self, world, buckets, overlap: bool = True, stream: str = "auto"):
        super().__init__(world, buckets, overlap=overlap, stream=stream)
        self.plan_checked = True

    def _sum(self, x: "mx.array") -> "mx.array":
        return x

    def check_plan(self) -> None:
        """Nothing is exchanged, so there is nothing to agree on."""


def local_reducer(world, buckets, parallel) -> LocalReducer:
    """``RunOptions.reducer`` of a compute-only run; says so on rank 0."""
    if world.size > 1:
        world.print0("[mlx-dp] WARNING: gradients are not reduced, ranks train apart (a benchmark baseline, "
                     "not training)")
    return LocalReducer(world, buckets, overlap=parallel.overlap, stream=parallel.comm_stream)


class PassThroughReducer:
    """No reduction at all: gradients as backward returns them (a benchmark's compute-only baseline)."""

    averages = False

    def __init__(self, world):
        self.world = world

    def reduce(self, grads: dict, extra: "mx.array | None" = None, on_dispatch=None):
        return grads, extra


class AverageGradientsReducer:
    """``mlx.nn.average_gradients`` behind the reducer interface: the baseline of ``bench comm``.

    It averages rather than sums (``averages = True``: ``Step`` then
    scales the loss by the world size, so the update is the same), and it
    reduces in parameter order inside the step's graph, after backward.

    Args:
        world (World): The group.
    """

    averages = True

    def __init__(self, world):
        self.world = world

    def reduce(self, grads: dict, extra: "mx.array | None" = None, on_dispatch=None):
        from mlx.nn import average_gradients

        if self.world.size == 1:
            return grads, extra
        # it returns a nested tree (it unflattens dotted names): flatten it back like the other reducers
        averaged = dict(tree_flatten(average_gradients(grads, group=self.world.group)))
        total = None if extra is None else mx.distributed.all_sum(extra, group=self.world.group)
        return averaged, total
