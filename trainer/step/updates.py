"""The update kinds: what an optimizer update does once the gradients exist, and which one a recipe gets.

Two kinds keep the :class:`Update` contract: :class:`~trainer.step.replicated.ReplicatedUpdate`
(every rank sums every gradient and holds the whole optimizer state) and
:class:`~trainer.step.zero.ShardedUpdate` (ZeRO-1: gradients reduce-scattered,
each rank holds its shard of the optimizer state; ``parallel.shard_optimizer``).
:func:`make_update` is the one place that chooses between them.
"""

from typing import Protocol

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import log
from ..model.load import DTYPES
from ..parallel import MiB, GradientReducer, World, plan_buckets
from ..parallel.scatter import ShardedReducer, ShardPlan
from .replicated import ReplicatedUpdate
from .zero import ShardedUpdate


class Update(Protocol):
    """One update's communication and optimizer step, after this rank's gradients exist.

    Attributes:
        reducer: Its collectives (a ``Reducer``, or ZeRO-1's ``ShardedReducer``).
    """

    reducer: object

    def apply(self, grads: dict, extra: mx.array, loss_terms: int) -> tuple:
        """Reduce ``grads`` and the vector ``extra`` over ranks, clip and apply: ``(extra summed, norm, finite)``."""

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""

    def full_state(self) -> dict:
        """The whole optimizer state, for a checkpoint (a collective where it is sharded)."""

    def full_weights(self) -> dict:
        """Every trainable weight, for a checkpoint (a collective where ranks hold parts: a pipeline)."""

    def describe(self) -> str:
        """How gradients travel, for the start-up line (``reduced``, ``reduce-scattered``)."""


def make_update(cfg, world: World, model, optimizer, order: list, saved_state: dict | None = None,
                make_reducer=None) -> Update:
    """The recipe's update kind, its gradient buckets planned in backward ``order``.

    Args:
        cfg (trainer.config.load.Config): The recipe (``parallel``, ``training.max_grad_norm``).
        world (World): The group.
        model: The model with its trainable parameters set.
        optimizer: The optimizer (its state becomes the update's).
        order (list[str]): Trainable parameter names in the order backward produces their gradients.
        saved_state (dict | None): A checkpoint's optimizer state to continue from. Default: ``None``.
        make_reducer (callable | None): ``(world, buckets, parallel) -> Reducer`` replacing the gradient
            reducer of a replicated update (``RunOptions.reducer``, the benchmarks' baselines). Default: ``None``.
    """
    p, params = cfg.parallel, dict(tree_flatten(model.trainable_parameters()))
    buckets = plan_buckets(order, {k: v.shape for k, v in params.items()}, {k: v.dtype for k, v in params.items()},
                           int(p.bucket_mb * MiB), int(p.first_bucket_mb * MiB),
                           DTYPES[p.comm_dtype] if p.comm_dtype else None)
    clip = cfg.training.max_grad_norm
    if p.shard_optimizer:
        reducer = ShardedReducer(world, ShardPlan.make(buckets, world.size), overlap=p.overlap, stream=p.comm_stream)
        update = ShardedUpdate(model, optimizer, reducer, clip, saved_state=saved_state)
        log.info(f"optimizer state sharded over {world.size} rank(s): {log.format_bytes(update.state_bytes())} per rank")
        return update
    reducer = make_reducer(world, buckets, p) if make_reducer is not None else \
        GradientReducer(world, buckets, overlap=p.overlap, stream=p.comm_stream)
    return ReplicatedUpdate(model, optimizer, reducer, clip, saved_state=saved_state)

