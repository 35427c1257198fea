"""Seams in the training loop for tests and benchmarks; production runs the no-op :class:`Hooks`.

Fault injection (a stalled rank, a NaN loss, a stop request, a crash halfway
through a save) is installed by the tests, which pass a subclass to
``trainer.run.loop.train`` (``tests/workers/faults.py``). The loop itself
never asks whether a fault is wanted.
"""

from dataclasses import dataclass, field
from typing import Callable


class Hooks:
    """No-op hooks. Subclasses override what they need."""

    def before_update(self, step: int, micro_batches: list) -> list:
        """Called as update ``step`` (1-based) starts computing, with this rank's micro-batches.

        May sleep (a stall), request a stop (``trainer.cluster.health.request_stop``)
        or return altered batches (a poisoned loss). Returns the batches to train on.
        """
        return micro_batches

    def compute_seconds(self, step: int, seconds: float) -> float:
        """This rank's measured compute time of update ``step``, as shared with the other ranks
        (``parallel.balance: auto``). Tests fake slow or fast ranks here."""
        return seconds

    def mid_save(self, step: int) -> None:
        """Called while checkpoint ``step`` is half written (the weights are, the rest is not)."""


@dataclass(frozen=True)
class RunOptions:
    """How to run a recipe beyond what the recipe says (Python API only, not recipe keys).

    Attributes:
        hooks: Seams for tests. Default: no-op :class:`Hooks`.
        reducer: ``make(world, buckets, parallel_config) -> reducer`` that
            replaces the gradient reducer, as PyTorch's DDP communication hooks
            do: an object the caller passes (the lab's benchmarks pass
            baselines that do not reduce). It must offer ``reduce``,
            ``check_plan``, ``nbytes``, ``world`` and ``averages`` like
            :class:`trainer.parallel.GradientReducer`. Default: ``None``.
    """

    hooks: Hooks = field(default_factory=Hooks)
    reducer: Callable | None = None
