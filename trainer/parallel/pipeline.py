"""The sends and receives between pipeline stages: activations forward, their gradients back.

Stage ``s`` is rank ``s``; it receives from ``s - 1`` and sends to ``s + 1``
(ring neighbours: the ring backend sends only between neighbours). Every
transfer is one ``send`` or ``recv`` with no stream given, so it runs where
the backend communicates (``placement.py``: the CPU for ring and JACCL), and
every received array is waited for on the host (:func:`~trainer.parallel.placement.settle`)
before any compute consumes it: no GPU command buffer of a Mac ever waits on
a slower stage (the Metal watchdog). Shapes need no exchange: every stage
reads the same batches, so each knows what the others send.

The order of transfers is the schedule's (``trainer.step.pipeline``): a
stage's forward sends go out in the forward phase and its gradients back in
the backward phase, so a receive is always posted for every send, and two
neighbours never both wait in a send to each other.
"""

import time

import mlx.core as mx

from .placement import settle
from .world import World


class StageLink:
    """Transfers between this stage and its neighbours, and the seconds spent waiting in them.

    Args:
        world (World): The group; rank ``s`` is stage ``s``.
    """

    def __init__(self, world: World):
        self.world = world
        self.waited = 0.0

    @property
    def previous(self) -> int:
        return self.world.rank - 1

    @property
    def following(self) -> int:
        return self.world.rank + 1

    def send(self, x: mx.array, dst: int, phase: str) -> None:
        """Send ``x`` to stage ``dst`` and wait until it has gone. Blocking."""
        self.world.waiting(phase)
        start = time.perf_counter()
        mx.eval(mx.distributed.send(x, dst, group=self.world.group))  # note: sync point
        self.waited += time.perf_counter() - start

    def recv(self, shape: tuple, dtype, src: int, phase: str) -> mx.array:
        """An array of ``shape`` and ``dtype`` from stage ``src``, evaluated on the host. Blocking."""
        self.world.waiting(phase)
        start = time.perf_counter()
        x = mx.distributed.recv(shape, dtype, src, group=self.world.group)
        settle(x)  # note: sync point; the stage's compute consumes it only once it is here
        self.waited += time.perf_counter() - start
        return x
