"""Optimizer state sharded across ranks (``parallel.shard_optimizer``; DeepSpeed's ZeRO stage 1).

Each rank keeps the optimizer state (AdamW's two moments, SGD's momentum) of
its own shard of every gradient bucket (``trainer.parallel.scatter``), so
the state per rank falls by the world size. An update:

1. reduce-scatters each bucket: this rank receives its shard summed over ranks;
2. sums one short vector over ranks: the loss, the stop flag, the balance
   timings and each rank's sum of squared gradient shards, so the global
   gradient norm (for clipping) and the non-finite decision are identical on
   every rank;
3. applies the optimizer to this rank's weight shards, bucket by bucket
   (``trainer.step.optimizer.BucketedOptimizer``, as the replicated update does);
4. all-gathers each updated weight shard into its whole bucket and puts it
   into the model.

The optimizers are mlx.optimizers' own, applied to flat shards, which is exact
because AdamW, Adam and SGD work element by element; Adafactor factors each
matrix's second moment by rows and columns, so it cannot be sharded flat.

Checkpoints stay world-size independent: :meth:`ShardedUpdate.full_state`
gathers the shards into the unsharded layout (a collective), which resumes
sharded or not, on any world size.
"""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..errors import ConfigError
from ..parallel.placement import settle
from ..parallel.scatter import ShardedReducer
from .optimizer import BucketedOptimizer, clip_scale

SHARDABLE = (optim.AdamW, optim.Adam, optim.SGD)  # element-wise: a flat shard updates like the whole


def _key(index: int) -> str:
    return f"bucket{index}"


class ShardedUpdate:
    """This rank's optimizer state and weight shards, and the update that reduce-scatters into them.

    Args:
        model (nn.Module): The model; its trainable parameters are updated in place.
        optimizer (optim.Optimizer): AdamW, Adam or SGD; its state becomes this rank's shards.
        reducer (ShardedReducer): The shard plan and its collectives.
        max_grad_norm (float | None): Clip the global norm to this; ``None`` disables.
        saved_state (dict | None): An unsharded optimizer state to continue from
            (a checkpoint's), of which this rank takes its shards. Default: ``None``.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, reducer: ShardedReducer,
                 max_grad_norm: float | None, saved_state: dict | None = None):
        if not isinstance(optimizer, SHARDABLE):
            raise ConfigError(f"parallel.shard_optimizer needs an element-wise optimizer (adamw, adam or sgd), "
                              f"not {type(optimizer).__name__.lower()}: it factors each matrix's statistics")
        self.model, self.optimizer, self.reducer = model, optimizer, reducer
        self.plan, self.world = reducer.plan, reducer.world
        self.max_grad_norm = max_grad_norm
        self.shards = self._weight_shards()  # this rank's weights, flat; the next update starts from them
        if saved_state is not None:
            self._load_full_state(saved_state)
        optimizer.init(self.shards)
        self._bucketed = BucketedOptimizer(optimizer, [[_key(i)] for i in range(len(self.plan.buckets))])

    def _weight_shards(self) -> dict:
        """This rank's shard of each bucket's weights, flat (copies of the model's)."""
        params = dict(tree_flatten(self.model.trainable_parameters()))
        out = {}
        for i, (bucket, bounds) in enumerate(zip(self.plan.buckets, self.plan.bounds)):
            start, stop = bounds[self.world.rank]
            dtype = params[bucket.names[0]].dtype
            out[_key(i)] = self.plan.flatten(i, [params[n] for n in bucket.names], dtype)[start:stop]
        mx.eval(out)  # note: sync point, once at start: the copies, not the whole flat buckets, stay
        return out

    def describe(self) -> str:
        return "reduce-scattered"

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: its shards."""
        return sum(v.nbytes for _, v in tree_flatten(self.optimizer.state))

    def apply(self, grads: dict, extra: mx.array, loss_terms: int) -> tuple:
        """Reduce-scatter ``grads`` (flat, emptied as it goes), sum ``extra`` over ranks, then update.

        Each rank gets its shard of every bucket summed; the global norm is the sum of the
        ranks' squared shards, which rides in the one small all_sum with ``extra``.

        Returns:
            tuple: ``(extra summed, norm, finite)``, as ``ReplicatedUpdate.apply``.
        """
        shards = self.reducer.reduce_scatter(grads)
        squares = sum(mx.square(s.astype(mx.float32)).sum() for s in shards)
        extra = self.reducer.sum_small(mx.concatenate([extra, squares.reshape(1)]))
        norm, finite = self._apply(shards, extra[:loss_terms].sum(), extra[-1])  # note: syncs per bucket
        return extra[:-1], norm, finite

    def _apply(self, shards: list, loss_sum: mx.array, norm_squared: mx.array):
        """Update this rank's shards and gather every rank's into the model, bucket by bucket.

        Each bucket is evaluated before the next, so old and new weights and
        moments coexist for one bucket at a time (``trainer.step.optimizer``).

        Returns:
            tuple: ``(norm, finite)``, evaluated.
        """
        norm = mx.sqrt(norm_squared)  # summed over ranks from each rank's shards: clip_grad_norm's norm
        finite = mx.logical_and(mx.isfinite(norm), mx.isfinite(loss_sum))
        if not finite.item():  # note: sync point; a skipped update leaves no trace, on every rank alike
            return norm, finite
        scale = clip_scale(norm, self.max_grad_norm)
        self._bucketed.advance()
        previous = None
        for i in range(len(self.plan.buckets)):
            key = _key(i)
            grad = {key: shards[i].astype(self.shards[key].dtype)}
            new = self._bucketed.apply(i, grad, {key: self.shards[key]}, scale)[key]
            whole = self.reducer.gather(i, new)
            # Dispatch this bucket's update and gather; meanwhile put the one before into the model.
            # The gathered bucket is waited for on the host before GPU work slices it (the Metal watchdog).
            mx.async_eval(whole)
            if previous is not None:
                self._load_bucket(*previous)  # note: syncs on the previous bucket
            previous = (i, whole)
        self._load_bucket(*previous)
        return norm, finite

    def _load_bucket(self, index: int, whole: mx.array) -> None:
        """Put gathered bucket ``index`` into the model and keep this rank's shard of it. Blocking."""
        settle(whole)  # note: sync point per bucket; at most two buckets' old and new weights coexist
        bucket = self.plan.buckets[index]
        pos, updates = 0, []
        for name, shape, size, dtype in zip(bucket.names, bucket.shapes, bucket.sizes, bucket.dtypes):
            updates.append((name, whole[pos:pos + size].reshape(shape).astype(dtype)))
            pos += size
        start, stop = self.plan.bounds[index][self.world.rank]
        # This rank's shard is a view of the gathered bucket the model's weights view too: no extra copy.
        self.shards[_key(index)] = whole[start:stop]
        self.model.load_weights(updates, strict=False)
        mx.eval([w for _, w in updates], self.shards[_key(index)])  # note: sync point

    # ------------------------------------------------------------ checkpoints

    def full_weights(self) -> dict:
        """The trainable weights a checkpoint holds (every rank holds them whole after the gather)."""
        return dict(tree_flatten(self.model.trainable_parameters()))

    def full_state(self) -> dict:
        """The optimizer state in the unsharded, flat layout a checkpoint holds. A collective.

        Every rank gathers (one bucket at a time, so the extra memory is one
        bucket's state); the result is the same on every rank.
        """
        state = self.optimizer.state
        flat = {k: v for k, v in state.items() if not isinstance(v, dict)}  # step, learning_rate
        for i, bucket in enumerate(self.plan.buckets):
            for name, shard in state[_key(i)].items():
                whole = self.reducer.gather(i, shard)  # padded; the padding is dropped below
                settle(whole)  # note: sync point; on the host, before any GPU slice waits on the gather
                pos = 0
                for param, shape, size in zip(bucket.names, bucket.shapes, bucket.sizes):
                    flat[f"{param}.{name}"] = whole[pos:pos + size].reshape(shape)
                    pos += size
                mx.eval(flat)  # note: sync point per bucket, so one bucket's gathered state is alive at a time
        return flat

    def _load_full_state(self, full: dict) -> None:
        """Take this rank's shards of an unsharded optimizer state (flat or a tree, as saved)."""
        flat = dict(tree_flatten(full)) if any(isinstance(v, dict) for v in full.values()) else dict(full)
        rank = self.world.rank
        state = {k: v for k, v in flat.items() if "." not in k}  # step, learning_rate
        for i, (bucket, bounds) in enumerate(zip(self.plan.buckets, self.plan.bounds)):
            start, stop = bounds[rank]
            names = sorted({k[len(bucket.names[0]) + 1:] for k in flat if k.startswith(bucket.names[0] + ".")})
            state[_key(i)] = {name: self.plan.flatten(i, [flat[f"{p}.{name}"] for p in bucket.names],
                                                      flat[f"{bucket.names[0]}.{name}"].dtype)[start:stop]
                              for name in names}
        mx.eval(state)  # note: sync point at resume: the whole saved state can be freed now
        self.optimizer.state = state
