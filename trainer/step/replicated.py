"""The replicated update: every rank sums every gradient and keeps the whole optimizer state.

Plain data parallelism, as mlx-lm and PyTorch's DDP do it: the gradient
buckets are summed over ranks (``trainer.parallel.buckets``), then every rank
applies the same optimizer step to the same weights, bucket by bucket
(``trainer.step.optimizer.BucketedOptimizer``).
"""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..parallel.buckets import Reducer
from .optimizer import BucketedOptimizer, clip_scale, global_norm


class ReplicatedUpdate:
    """Sum gradients over ranks with ``reducer``, then clip and apply the optimizer on every rank.

    Args:
        model (nn.Module): The model; its trainable parameters are updated in place.
        optimizer (optim.Optimizer): The optimizer (initialised here).
        reducer (Reducer): Sums gradient buckets over ranks.
        max_grad_norm (float | None): Clip the global norm to this; ``None`` disables.
        saved_state (dict | None): An optimizer state to continue from (a checkpoint's). Default: ``None``.
        groups (list[list[str]] | None): Parameter names updated together. Default: ``None``
            (the reducer's buckets, or one group of everything without any).
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, reducer: Reducer,
                 max_grad_norm: float | None, saved_state: dict | None = None, groups: list | None = None):
        self.model, self.optimizer, self.reducer, self.max_grad_norm = model, optimizer, reducer, max_grad_norm
        if saved_state is not None:
            optimizer.state = saved_state  # before the compiled pieces capture it
        optimizer.init(model.trainable_parameters())
        self.groups = groups or [list(b.names) for b in reducer.buckets] or \
            [[name for name, _ in tree_flatten(model.trainable_parameters())]]
        self._bucketed = BucketedOptimizer(optimizer, self.groups)

    def describe(self) -> str:
        return "reduced"

    def apply(self, grads: dict, extra: mx.array, loss_terms: int) -> tuple:
        """Sum ``grads`` (flat, emptied as it goes) and the vector ``extra`` over ranks, then update.

        Args:
            grads (dict): This rank's gradients by name (lazy).
            extra (mx.array): Small float32 vector summed with the last bucket; its first
                ``loss_terms`` entries are the loss's sums (a NaN there skips the update).
            loss_terms (int): See ``extra``.

        Returns:
            tuple: ``(extra summed, norm, finite)``; norm and finite evaluated.
        """
        summed, extra = self.reducer.reduce(grads, extra=extra)
        norm, finite = self._apply(summed, extra[:loss_terms].sum())  # note: syncs per bucket
        return extra, norm, finite

    def _apply(self, grads: dict, loss_sum: mx.array):
        """Clip and apply summed gradients bucket by bucket; a non-finite loss or norm skips the update."""
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
        """Bytes of optimizer state this rank holds."""
        return sum(v.nbytes for _, v in tree_flatten(self.optimizer.state))

    def full_state(self) -> dict:
        """The optimizer state a checkpoint holds (this rank's is whole)."""
        return self.optimizer.state

    def full_weights(self) -> dict:
        """The trainable weights a checkpoint holds (this rank's are all of them)."""
        return dict(tree_flatten(self.model.trainable_parameters()))
