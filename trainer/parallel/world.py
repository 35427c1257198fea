"""The process group: rank helpers, small blocking collectives, and agreement between ranks.

* :class:`World`: the group, ``print0``, and blocking scalar reductions,
  barrier and gathers. Every rank must reach every collective in the same order.
* :func:`check_agreement`: ranks compare what must be identical before training.
"""

import hashlib
import socket
from dataclasses import dataclass

import mlx.core as mx

from ..env import consume_hostfile, drop_blank_hostfile, launch_env
from ..errors import DistributedError
from .placement import Placement, gpu_kind


BROADCAST_CHUNK = 64 << 20  # bytes per all_sum of broadcast_bytes: bounds the extra memory on every rank


class _NullMonitor:
    """Stands in for the watchdog (``trainer.cluster.health``) when none is installed."""

    def phase(self, name: str, step: int | None = None, watched: bool = True):
        pass


_monitor = _NullMonitor()


def set_monitor(monitor) -> None:
    """Install the object told about each blocking phase (the watchdog)."""
    global _monitor
    _monitor = monitor or _NullMonitor()


@dataclass
class World:
    """The process group and this process's place in it."""

    group: "mx.distributed.Group"
    rank: int
    size: int
    host: str
    placement: Placement = Placement(compute="cpu", backend=None)  # where collectives run (init_world sets it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print0(self, *args, **kwargs) -> None:
        """Print on rank 0 only."""
        if self.rank == 0:
            print(*args, **kwargs, flush=True)

    # -- blocking collectives: each is a sync point on every rank ----------------

    def all_sum(self, values: list[float], phase: str = "all_sum", watched: bool = True) -> list[float]:
        """Sum a few floats over ranks, in float64 (exact for counts), where the backend communicates. Blocking.

        ``watched=False`` tells the watchdog that the wait may be long for a good
        reason (a peer doing unbounded work alone); it then only ends the job
        if a peer falls silent.
        """
        if self.size == 1:
            return [float(v) for v in values]
        _monitor.phase(phase, watched=watched)
        # No stream: the backend's own device (placement.py); float64 is summed on the CPU or as ncclDouble.
        x = mx.distributed.all_sum(mx.array(values, dtype=mx.float64), group=self.group)
        return [float(v) for v in x.tolist()]  # note: sync point

    def waiting(self, phase: str = "sync") -> None:
        """Tell the watchdog this rank now waits on its peers (the gradient reduction of an update)."""
        if self.size > 1:
            _monitor.phase(phase)

    def barrier(self, phase: str = "barrier") -> None:
        """Wait until every rank arrives."""
        self.all_sum([1.0], phase=phase)

    def all_gather_bytes(self, data: bytes, phase: str = "all_gather") -> list[bytes]:
        """Gather one short byte string from every rank (rank order). Blocking."""
        if self.size == 1:
            return [data]
        _monitor.phase(phase)
        lengths = mx.distributed.all_gather(mx.array([len(data)], mx.int32), group=self.group)
        width = max(lengths.tolist())
        padded = mx.array(list(data.ljust(width, b"\0")), mx.int32)
        rows = mx.distributed.all_gather(padded, group=self.group).reshape(self.size, width)
        return [bytes(r[:n]) for r, n in zip(rows.tolist(), lengths.tolist())]

    def broadcast_bytes(self, data: bytes | None, phase: str = "broadcast") -> bytes:
        """Rank 0's ``data`` on every rank (the others pass ``None``), in chunks of :data:`BROADCAST_CHUNK`. Blocking.

        MLX has no broadcast: each chunk is an ``all_sum`` of rank 0's bytes with
        the others' zeros (exact in uint8, since only one term is nonzero), with
        no stream given, so the backend sums where it communicates (placement.py).
        """
        if self.size == 1:
            return bytes(data or b"")
        import numpy as np

        size = int(self.all_sum([len(data) if self.rank == 0 else 0], phase=phase)[0])
        out = bytearray()
        for start in range(0, size, BROADCAST_CHUNK):
            n = min(BROADCAST_CHUNK, size - start)
            chunk = (mx.array(np.frombuffer(data, np.uint8, n, start)) if self.rank == 0
                     else mx.zeros(n, mx.uint8))
            _monitor.phase(phase)
            out += np.array(mx.distributed.all_sum(chunk, group=self.group)).tobytes()  # note: sync point per chunk
        return bytes(out)

    def rank0_first(self, fn):
        """Run ``fn`` on rank 0, then on the others (e.g. to fill a shared cache once).

        If rank 0 fails, the others stop with a pointer to rank 0's message
        instead of waiting forever.
        """
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 (re-raised below)
                error = e
        # Rank 0 may tokenize a large dataset or download a model meanwhile: unwatched, not unbounded.
        ok = self.all_sum([0.0 if error else 1.0], phase="rank0_first", watched=False)[0]
        if error is not None:
            raise error
        if ok < 1.0:
            raise DistributedError("rank 0 failed while preparing; see its message above", consequence=True)
        return fn() if self.rank != 0 else result


def refuse_lone_rank() -> None:
    """Refuse a process told it is rank 1 or later with no group to join: it would train alone as if it were one."""
    env = launch_env()
    if env.rank > 0 and not env.launched:
        raise DistributedError(f"this process is rank {env.rank} (MLX_RANK or MPI's rank is set), but no launcher "
                               "prepared a group (no MLX_HOSTFILE, JACCL coordinator, NCCL host or MPI size): it would "
                               "train alone; unset the rank to train in one process, or start the job with "
                               "mlx-dp launch")


def init_world(backend: str = "any") -> World:
    """Join the process group started by the launcher (or a group of one).

    Args:
        backend (str): ``any``, ``ring``, ``jaccl``, ``mpi`` or ``nccl``. Default: ``"any"``.
    """
    drop_blank_hostfile()
    refuse_lone_rank()
    env = launch_env()
    try:
        group = mx.distributed.init(strict=env.launched, backend=backend)
    except RuntimeError as e:
        raise DistributedError(f"could not join the distributed group (backend {backend}): {e}") from None
    consume_hostfile()  # MLX has read it: the launcher's temporary file goes
    chosen = resolve_backend(backend, group.size())
    return World(group=group, rank=group.rank(), size=group.size(), host=socket.gethostname(),
                 placement=Placement.detect(chosen))


# MLX's order for backend "any" (mlx/distributed/distributed.cpp, init): NCCL where CUDA is, then ring,
# MPI and JACCL, each taken only when the launcher prepared its environment.
ANY_ORDER = ("nccl", "ring", "mpi", "jaccl")


def resolve_backend(requested: str, size: int) -> str | None:
    """The backend MLX joined: ``requested``, or for ``any`` the one MLX picks; ``None`` for one process.

    MLX's group does not say which backend it is, so this follows MLX's own
    choice from the launcher's environment.
    """
    if size <= 1:
        return None
    if requested != "any":
        return requested
    prepared = launch_env().prepared
    for name in ANY_ORDER:
        if name in prepared and (name != "nccl" or gpu_kind() == "cuda"):
            return name
    return "ring"


# ---------------------------------------------------------------------- agreement


def digest(*parts) -> str:
    """Short stable hash of strings/bytes, for comparing state across ranks."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:16]


def check_agreement(world: World, items: dict[str, str]) -> None:
    """Stop before training unless every rank holds the same value for every item.

    Args:
        world (World): The group.
        items (dict[str, str]): What must agree, e.g. ``{"recipe": hash, "mlx": "0.32.4"}``.

    Raises:
        DistributedError: Naming each differing item and the ranks and hosts
            that differ from rank 0.
    """
    if world.size == 1:
        return
    payload = "\n".join(f"{k}={v}" for k, v in sorted(items.items())) + f"\nhost={world.host}"
    gathered = world.all_gather_bytes(payload.encode(), phase="agreement")
    tables = [dict(line.split("=", 1) for line in g.decode().splitlines()) for g in gathered]
    problems = []
    for key in sorted(items):
        ref = tables[0].get(key)
        odd = [r for r, t in enumerate(tables) if t.get(key) != ref]
        if odd:
            who = ", ".join(f"rank {r} ({tables[r]['host']}: {tables[r].get(key)})" for r in odd)
            problems.append(f"{key} differs from rank 0 ({tables[0]['host']}: {ref}) on {who}")
    if problems:
        raise DistributedError("ranks disagree before training: " + "; ".join(problems)
                               + ". A stale checkout or a different dataset on one machine is the usual cause.",
                               final=True)  # a restart would find the same difference
