"""Gradient buckets and their reductions, overlapped with backward.

:class:`GradientReducer` fills buckets in the order backward produces
gradients and dispatches each bucket's ``all_sum`` as soon as its gradients
exist (see the class docstring).
"""

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx

from .placement import settle
from .world import World, check_agreement, digest

MiB = 1024 * 1024

@dataclass(frozen=True)
class Bucket:
    """A group of gradients reduced by one ``all_sum``."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    dtypes: tuple  # gradient dtype of each name
    comm_dtype: "mx.Dtype"  # dtype on the wire

    @property
    def nbytes(self) -> int:
        return sum(self.sizes) * self.comm_dtype.size


def plan_buckets(order: list[str], shapes: dict, dtypes: dict, bucket_bytes: int, first_bucket_bytes: int,
                 comm_dtype=None) -> list[Bucket]:
    """Group gradients into buckets in backward order.

    One bucket is open per wire dtype; it closes once it holds at least its
    capacity (``first_bucket_bytes`` for the first bucket closed,
    ``bucket_bytes`` after). Buckets are returned in the order they close,
    which is the order they become ready during backward.

    Args:
        order (list[str]): Parameter names in the order backward produces
            their gradients.
        shapes (dict): Name to shape.
        dtypes (dict): Name to gradient dtype.
        bucket_bytes (int): Capacity of every bucket but the first.
        first_bucket_bytes (int): Capacity of the first bucket.
        comm_dtype (mx.Dtype | None): Reduce every gradient in this dtype;
            ``None`` keeps one bucket set per gradient dtype. Default: ``None``.
    """
    buckets: list[Bucket] = []
    open_: dict = {}

    def close(wire):
        names = open_.pop(wire)
        buckets.append(Bucket(tuple(names), tuple(tuple(shapes[n]) for n in names),
                              tuple(_size(shapes[n]) for n in names), tuple(dtypes[n] for n in names), wire))

    for name in order:
        wire = comm_dtype or dtypes[name]
        open_.setdefault(wire, []).append(name)
        capacity = first_bucket_bytes if not buckets else bucket_bytes
        if sum(_size(shapes[n]) for n in open_[wire]) * wire.size >= capacity:
            close(wire)
    for wire in list(open_):
        close(wire)
    return buckets


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_digest(buckets: list[Bucket]) -> str:
    return digest(*[f"{b.names}|{b.shapes}|{b.dtypes}|{b.comm_dtype}" for b in buckets])


class Reducer(Protocol):
    """What the replicated update (``trainer.step.replicated``) needs of a gradient reducer.

    :class:`GradientReducer` keeps it; so do the lab's baselines, which the
    benchmarks pass as ``RunOptions.reducer`` (as PyTorch's DDP communication hooks).

    Attributes:
        world: The group.
        buckets: The gradient buckets it reduces, in the order backward fills them.
        averages: It returns means over ranks rather than sums (the loss scale then makes up for it).
    """

    world: World
    buckets: list
    averages: bool

    @property
    def nbytes(self) -> int:
        """Bytes it sends per update."""

    def check_plan(self) -> None:
        """Agree with every rank on the bucket plan before any gradient is sent. Blocking."""

    def reduce(self, grads: dict, extra: "mx.array | None" = None, on_dispatch=None) -> tuple:
        """``(grads summed over ranks, extra summed or None)``, lazy; ``grads`` is emptied as it goes."""


class GradientReducer:
    """Sums gradients over ranks in buckets, overlapping with backward.

    With ``overlap=True`` each bucket is concatenated, summed with
    ``all_sum`` and handed to ``mx.async_eval`` in bucket order, before
    anything consumes it. Because MLX evaluates lazily, ``async_eval`` of the
    first bucket schedules only the part of backward that bucket depends on
    (the last layers), and its ``all_sum`` is issued as soon as those
    gradients exist, while the rest of backward is still to run. The
    optimizer update, which consumes the reduced buckets, is only built after
    every bucket has been dispatched.

    Where the ``all_sum`` runs is the world's :class:`~trainer.parallel.placement.Placement`'s
    choice (``stream``; ``Placement.resolve`` says which). Once every bucket is
    dispatched, :meth:`reduce` waits on the host for the sums before anything
    consumes them, so no GPU kernel ever waits on a slow peer (the Metal
    watchdog; see ``placement.py``).

    With ``overlap=False`` (the serial path, kept for comparison) the whole
    backward is evaluated first and the buckets are reduced afterwards.

    Gradients are *summed*, not averaged: the loss is already normalised by
    the global token count (see ``trainer.step.step``). Reduced gradients come back
    as row-major slices of their bucket, which also spares the optimizer the
    slow strided kernels that the transposed weight gradients of backward need.

    Every rank must hold the same bucket plan, or the ``all_sum``s would pair
    different gradients (or hang on different sizes): the first :meth:`reduce`
    checks that with one small gather before any gradient is sent, unless
    :meth:`check_plan` already did.

    Args:
        world (World): The group.
        buckets (list[Bucket]): From :func:`plan_buckets`.
        overlap (bool): See above. Default: ``True``.
        stream (str): ``parallel.comm_stream``: ``"auto"``, ``"separate"`` or ``"default"``. Default: ``"auto"``.
    """

    averages = False  # returns sums over ranks (see Step: the loss scale)

    def __init__(self, world: World, buckets: list[Bucket], overlap: bool = True, stream: str = "auto"):
        self.world = world
        self.buckets = buckets
        self.overlap = overlap
        self.plan_checked = world.size == 1
        if stream not in ("auto", "separate", "default"):
            raise ValueError(f"stream must be 'auto', 'separate' or 'default', not {stream!r}")
        self.stream = world.placement.stream(stream) if world.size > 1 else None

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def check_plan(self) -> None:
        """Verify, before any gradient is sent, that every rank has the same bucket plan. Blocking."""
        check_agreement(self.world, {"gradient bucket plan": plan_digest(self.buckets)})
        self.plan_checked = True

    def _sum(self, x: "mx.array") -> "mx.array":
        return mx.distributed.all_sum(x, group=self.world.group, stream=self.stream)

    def reduce(self, grads: dict, extra: "mx.array | None" = None, on_dispatch=None):
        """Sum flat gradients (and an optional float32 vector ``extra``) over ranks.

        Args:
            grads (dict[str, mx.array]): Flat name-to-gradient map (lazy arrays).
                It is emptied as buckets are built: once nothing else holds a
                gradient, MLX frees it as soon as its bucket is made, so the extra
                memory is the buckets in flight, not a second copy of every gradient.
            extra (mx.array | None): Small float32 vector summed with the last
                bucket, e.g. the step's loss sum. Default: ``None``.
            on_dispatch (callable | None): Called as ``on_dispatch(index,
                bucket, summed)`` right after each bucket is dispatched (the
                benchmark's timeline uses it). Default: ``None``.

        Returns:
            tuple: ``(summed grads dict, summed extra or None)``, both lazy.
        """
        if self.world.size == 1:
            return grads, extra
        if not self.plan_checked:
            self.check_plan()
        if not self.overlap:
            mx.eval(grads, extra)  # serial path: finish backward before communicating (sync point)
        sent = []
        for i, bucket in enumerate(self.buckets):
            flat = mx.concatenate([grads.pop(n).reshape(-1).astype(bucket.comm_dtype) for n in bucket.names])
            carries_extra = extra is not None and i == len(self.buckets) - 1 and bucket.comm_dtype == mx.float32
            if carries_extra:
                flat = mx.concatenate([flat, extra])
            total = self._sum(flat)
            mx.async_eval(total)  # dispatch now: backward for later buckets keeps computing meanwhile
            sent.append((bucket, total, carries_extra))
            if on_dispatch is not None:
                on_dispatch(i, bucket, total)
        extra_total = None
        if extra is not None and not any(c for _, _, c in sent):
            extra_total = self._sum(extra)
            mx.async_eval(extra_total)
        # note: sync point. Every bucket is dispatched; what follows consumes the sums, so wait for them
        # here, on the host, and no GPU command buffer waits on a peer (the Metal watchdog).
        settle([total for _, total, _ in sent] + ([extra_total] if extra_total is not None else []))
        out = {}
        for bucket, total, carries_extra in sent:
            if carries_extra:
                extra_total = total[-extra.size:]
                total = total[:-extra.size]
            offsets, pos = [], 0
            for size in bucket.sizes[:-1]:
                pos += size
                offsets.append(pos)
            parts = mx.split(total, offsets) if offsets else [total]
            for name, shape, dtype, part in zip(bucket.names, bucket.shapes, bucket.dtypes, parts):
                out[name] = part.reshape(shape).astype(dtype)
        return out, extra_total
