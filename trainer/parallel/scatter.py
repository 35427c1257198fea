"""Reduce-scatter and all-gather of gradient buckets, for optimizer state sharded across ranks.

With ``parallel.shard_optimizer`` every bucket's flat gradient is cut into
``world_size`` contiguous shards (:class:`ShardPlan`), and rank ``r`` keeps
the optimizer state of shard ``r`` of every bucket only (DeepSpeed's ZeRO
stage 1). An update then needs:

* a **reduce-scatter** per bucket: rank ``r`` receives the sum over ranks of
  shard ``r``. ``mx.distributed.sum_scatter`` does it on NCCL and JACCL, but
  the ring backend (every Mac over Ethernet or a Thunderbolt bridge) throws
  on it. :func:`ring_reduce_scatter` builds it from ``send``/``recv``: in
  ``N - 1`` steps each rank passes a partial sum to its right neighbour, so
  each rank sends ``(N - 1) / N`` of the bucket, half of what an
  ``all_sum`` moves. Sends run on a stream of their own, so both directions
  of the link carry data at once. On loopback it beat ``all_sum`` plus
  slicing at every bucket size tried, with identical results (measured:
  docs/RESULTS.md, "Bigger models"; ``bench comm`` repeats the comparison).
* an **all-gather** of the updated weight shards (``mx.distributed.all_gather``
  works on every backend), so every rank again holds all the weights.

Every bucket is padded with zeros to a multiple of the world size, so shards
are equal (``all_gather`` needs that) and the gathered bucket is the padded
flat bucket itself, with no copy. The padding's gradients are zero, so its
weights and moments stay zero.

Like the gradient buckets, each bucket's reduce-scatter is dispatched as soon
as backward has produced its gradients. Where the receives run is the
placement's choice (``placement.py``, which also says why every result is
waited for on the host); on a CPU's default stream a receive is posted only
once this rank's own gradients are ready, since the ring's socket threads spin
while it waits. Sends always get a stream of their own on the communication
device, and the additions between a receive and the next send run on the
receive's stream.
"""

from dataclasses import dataclass

import mlx.core as mx

from .buckets import Bucket
from .placement import settle
from .world import World, check_agreement, digest


def shard_bounds(size: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of each rank's shard of a flat array padded to a multiple of ``world_size``.

    Shards are contiguous and equal; the last ones may reach into the padding
    past ``size``.
    """
    width = -(-size // world_size)
    return tuple((r * width, (r + 1) * width) for r in range(world_size))


@dataclass(frozen=True)
class ShardPlan:
    """Each bucket cut into one shard per rank; identical on every rank (checked before any is sent).

    Attributes:
        buckets: The gradient buckets, in the order backward fills them.
        world_size: Ranks.
        bounds: Per bucket, each rank's ``(start, stop)`` in the bucket's padded flat gradient.
    """

    buckets: tuple[Bucket, ...]
    world_size: int
    bounds: tuple[tuple[tuple[int, int], ...], ...]

    @classmethod
    def make(cls, buckets: list[Bucket], world_size: int) -> "ShardPlan":
        return cls(tuple(buckets), world_size, tuple(shard_bounds(sum(b.sizes), world_size) for b in buckets))

    def padding(self, index: int) -> int:
        """Zeros after bucket ``index``'s elements, up to a multiple of the world size."""
        return self.bounds[index][-1][1] - sum(self.buckets[index].sizes)

    def flatten(self, index: int, arrays: list, dtype) -> "mx.array":
        """Bucket ``index``'s arrays as one padded flat array of ``dtype``."""
        parts = [a.reshape(-1).astype(dtype) for a in arrays]
        pad = self.padding(index)
        return mx.concatenate(parts + ([mx.zeros((pad,), dtype)] if pad else []))

    def digest(self) -> str:
        return digest(*[f"{b.names}|{b.shapes}|{b.dtypes}|{bounds}" for b, bounds in zip(self.buckets, self.bounds)])


def ring_reduce_scatter(world: World, flat: mx.array, bounds, streams) -> mx.array:
    """This rank's shard of ``flat`` summed over ranks, from ``send``/``recv`` to ring neighbours.

    Step ``k`` sends the partial sum of shard ``(r - 1 - k) mod N`` to the right
    and receives shard ``(r - 2 - k) mod N`` from the left, adding this rank's
    own part; after ``N - 1`` steps the shard received last is shard ``r``,
    summed over every rank.

    Args:
        world (World): The group.
        flat (mx.array): This rank's flat bucket (lazy).
        bounds: Each rank's ``(start, stop)`` in ``flat``.
        streams (tuple): ``(send_stream, recv_stream or None, stream of the additions)``.

    Returns:
        mx.array: Shard ``rank``, summed; it depends on every send, so
        evaluating it completes this rank's part of the exchange.
    """
    n, r = world.size, world.rank
    send_stream, recv_stream, add_stream = streams
    chunks = [flat[start:stop] for start, stop in bounds]
    right, left = (r + 1) % n, (r - 1) % n
    partial, sent = chunks[(r - 1) % n], []
    for k in range(n - 1):
        sent.append(mx.distributed.send(partial, right, group=world.group, stream=send_stream))
        index = (r - 2 - k) % n
        received = mx.distributed.recv_like(chunks[index], left, group=world.group, stream=recv_stream)
        partial = mx.add(received, chunks[index], stream=add_stream)  # beside the receive: no GPU kernel waits on it
        if k < n - 2:
            # Dispatch this step now. A receive has no inputs, so in one evaluation of the whole
            # chain MLX may queue step 2's receive before step 1's: it would then take the message
            # meant for step 1, and every rank would wait for a send that waits on it (a deadlock).
            mx.async_eval(partial, sent[-1])
    return mx.depends(partial, sent)


def all_gather_shards(world: World, shard: mx.array) -> mx.array:
    """Every rank's (equal) shard of a bucket, in rank order: the whole padded flat bucket."""
    if world.size == 1:
        return shard
    return mx.distributed.all_gather(shard, group=world.group)


def has_sum_scatter(world: World) -> bool:
    """Whether the backend implements ``sum_scatter`` (NCCL, JACCL do; ring does not). A collective."""
    if world.size == 1:
        return False
    try:
        mx.eval(mx.distributed.sum_scatter(mx.zeros((world.size,)), group=world.group))
        return True
    except RuntimeError:
        return False


class ShardedReducer:
    """Reduce-scatters gradient buckets during backward and all-gathers updated weight shards.

    The counterpart of :class:`~trainer.parallel.buckets.GradientReducer`
    for ``parallel.shard_optimizer``: :meth:`reduce_scatter` returns this
    rank's summed shard of every bucket; :meth:`sum_small` sums the few
    scalars of an update (loss, stop flag, the norm's partial sums);
    :meth:`gather` rebuilds whole buckets from updated shards.

    Args:
        world (World): The group.
        plan (ShardPlan): Buckets and shard bounds.
        overlap (bool): Dispatch each bucket as soon as backward produced it. Default: ``True``.
        method (str): ``"auto"`` (``sum_scatter`` where the backend has it, else
            :func:`ring_reduce_scatter`), ``"sendrecv"`` or ``"all_sum"`` (an
            ``all_sum`` and a slice: twice the bytes, kept for comparison).
            Default: ``"auto"``.
        stream (str): Where the reduce-scatter runs (its receives, on the ring), as
            ``parallel.comm_stream``: ``"auto"``, ``"default"`` (the backend's stream) or
            ``"separate"`` (see the module docstring). Default: ``"auto"``.
    """

    averages = False
    sharded = True

    def __init__(self, world: World, plan: ShardPlan, overlap: bool = True, method: str = "auto",
                 stream: str = "auto"):
        self.world, self.plan, self.overlap = world, plan, overlap
        self.buckets = list(plan.buckets)
        self.plan_checked = world.size == 1
        if method == "auto":
            method = "sum_scatter" if has_sum_scatter(world) else "sendrecv"
        if method not in ("sum_scatter", "sendrecv", "all_sum"):
            raise ValueError(f"unknown reduce-scatter method {method!r}")
        self.method = method
        self.streams, self.stream = None, None
        if world.size > 1:
            placement = world.placement
            # parallel.comm_stream as for the gradient buckets: under NCCL `auto` is a stream of its own, so the
            # reduce-scatter overlaps backward instead of queueing on the compute stream.
            self.stream = placement.stream(stream)
            if method == "sendrecv":
                self.streams = (placement.new_stream(), self.stream, placement.host_ops(self.stream))

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def check_plan(self) -> None:
        """Verify, before any gradient is sent, that every rank cuts the same shards. Blocking."""
        check_agreement(self.world, {"optimizer shard plan": self.plan.digest()})
        self.plan_checked = True

    def _scatter(self, flat: mx.array, bounds) -> mx.array:
        start, stop = bounds[self.world.rank]
        if self.world.size == 1:
            return flat
        if self.method == "sendrecv":
            return ring_reduce_scatter(self.world, flat, bounds, self.streams)
        if self.method == "all_sum":
            return mx.distributed.all_sum(flat, group=self.world.group, stream=self.stream)[start:stop]
        return mx.distributed.sum_scatter(flat, group=self.world.group, stream=self.stream)

    def reduce_scatter(self, grads: dict, on_dispatch=None) -> list:
        """This rank's shard of every bucket, summed over ranks (lazy; dispatched bucket by bucket).

        Args:
            grads (dict[str, mx.array]): Flat name-to-gradient map; emptied as buckets are built.
            on_dispatch (callable | None): ``on_dispatch(index, bucket, shard)`` after each dispatch.
        """
        if not self.plan_checked:
            self.check_plan()
        if not self.overlap:
            mx.eval(grads)  # the serial path: finish backward before communicating (sync point)
        shards = []
        for i, (bucket, bounds) in enumerate(zip(self.buckets, self.plan.bounds)):
            flat = self.plan.flatten(i, [grads.pop(n) for n in bucket.names], bucket.comm_dtype)
            shard = self._scatter(flat, bounds)
            mx.async_eval(shard)  # dispatch now: backward for later buckets keeps computing meanwhile
            shards.append(shard)
            if on_dispatch is not None:
                on_dispatch(i, bucket, shard)
        if self.world.size > 1:
            settle(shards)  # note: sync point; the update consumes them: wait here, not in a GPU kernel
        return shards

    def sum_small(self, values: mx.array) -> mx.array:
        """Sum a short float32 vector over ranks, after the shards (evaluated: the update reads it)."""
        if self.world.size == 1:
            return values
        total = mx.distributed.all_sum(values, group=self.world.group)
        settle(total)  # note: sync point (see reduce_scatter)
        return total

    def gather(self, index: int, shard: mx.array) -> mx.array:
        """Bucket ``index`` whole again (padded), from every rank's updated shard (lazy).

        Call :func:`~trainer.parallel.placement.settle` on the result before
        slicing it on a GPU (``trainer.step.zero`` does).
        """
        return all_gather_shards(self.world, shard)
