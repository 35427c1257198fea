"""Speed-balanced ranks: how many rows of each global micro-batch each rank computes.

The loss of an update is a sum of token losses divided by the token count of
the whole global batch (``trainer.step.step``), so a global micro-batch may be
split across ranks unevenly and the update stays exactly the one a single
process computes on the whole batch. A faster Mac can therefore take more
rows, and every rank finishes its backward at about the same time.

``parallel.balance`` chooses the split:

* ``off``: every rank takes ``training.batch_size`` rows (the even split);
* a list of relative speeds, one per rank: a fixed split in proportion;
* ``auto``: each rank measures its own compute time (forward and backward,
  no communication, see ``Step(measure=...)``) on a few updates, the
  times travel to every rank with the gradients, and all ranks derive the same
  split from the same numbers. It is re-measured every
  :data:`REMEASURE_EVERY` updates, because another job can slow one Mac.
  A rank that compiles a new shape during a measured update (a new split or
  a new padded width) reports nothing, which voids that measurement on every
  rank; the next update measures again.

Rows of a global micro-batch are sorted by length; :func:`assign_rows` deals
them out so that each rank gets long and short rows in proportion to its
share, so tokens are balanced as well as rows. Shapes stay compile-friendly:
the split changes only when the predicted step time improves by more than
:data:`MIN_GAIN`, so ``mx.compile`` sees few new shapes.

Pure Python and numpy; nothing here communicates.
"""

from dataclasses import dataclass, field

import numpy as np

MEASURE_FIRST = (2, 3, 4)  # update 1 compiles; these three set the first estimate
REMEASURE_EVERY = 16  # then one measured update in this many
MIN_GAIN = 0.03  # change the split only if the predicted step time falls by more than this
SMOOTHING = 0.5  # weight of a new measurement in the running estimate
BARELY_HELPS = 0.25  # a rank below this fraction of the even share "barely helps"


def water_fill(rows: int, speeds: list[float], minimum: int = 1) -> list[int]:
    """Rows per rank that minimise the slowest rank's time, ``rows[i] / speeds[i]``.

    Every rank gets ``minimum`` rows (fewer only when there are fewer rows than
    ranks), then each further row goes to the rank that would finish it
    soonest. Ties go to the lower rank, so the result is deterministic.

    Args:
        rows (int): Rows of the global micro-batch.
        speeds (list[float]): Relative speeds, all positive.
        minimum (int): Rows every rank gets first. Default: ``1``.
    """
    n = len(speeds)
    minimum = min(minimum, rows // n)
    split = [minimum] * n
    for _ in range(rows - minimum * n):
        best = min(range(n), key=lambda i: ((split[i] + 1) / speeds[i], i))
        split[best] += 1
    return split


def predicted_time(split: list[int], speeds: list[float]) -> float:
    """The slowest rank's time for ``split`` at ``speeds`` (rows per unit of speed)."""
    return max(r / s for r, s in zip(split, speeds))


def assign_rows(count: int, split: list[int]) -> list[list[int]]:
    """Deal out positions ``0..count-1`` of a length-sorted batch to ranks in proportion to ``split``.

    Each position goes to the rank furthest behind its share, so every rank
    gets a similar mix of long and short rows. With an even split this is the
    strided deal ``batch[rank::world_size]``. A partial batch (``count`` below
    ``sum(split)``) is dealt in the same proportions, at most ``split[r]`` rows
    to rank ``r``.

    Returns:
        list[list[int]]: Positions per rank; together they cover every
        position exactly once.
    """
    total = sum(split)
    owned: list[list[int]] = [[] for _ in split]
    for k in range(count):
        open_ranks = [r for r in range(len(split)) if len(owned[r]) < split[r]]
        rank = max(open_ranks, key=lambda r: ((k + 1) * split[r] / total - len(owned[r]), -r))
        owned[rank].append(k)
    return owned


@dataclass
class Balancer:
    """The split of each global micro-batch, and (``auto``) the speed estimates behind it.

    Every rank holds one and feeds it the same numbers (the measured compute
    times, summed over ranks with the gradients), so every rank holds the same
    split. :meth:`to_dict` / :meth:`from_dict` make it part of a checkpoint.

    Args:
        mode (str): ``"off"``, ``"auto"`` or ``"fixed"``.
        rows (int): Rows per global micro-batch (``batch_size x world_size``).
        world_size (int): Ranks.
        speeds (list[float]): Relative speeds for ``fixed``; estimates for ``auto``.
    """

    mode: str
    rows: int
    world_size: int
    speeds: list[float] = field(default_factory=list)  # cells per second (auto) or relative (fixed)
    split: list[int] = field(default_factory=list)
    measurements: int = 0
    pending: bool = False  # a measured update was voided: measure the next one
    # Also time each rank's compute under off and fixed splits, on auto's schedule, only to report it
    # (logging.compute_timings; bench scaling --balance compares compute per rank across settings).
    # Opt-in: a measured update evaluates every gradient before the first is sent, so it neither
    # overlaps communication nor frees gradients bucket by bucket (a full fine-tune's peak memory
    # rises by about one gradient copy on those updates). Not saved: the recipe decides it.
    timed: bool = False
    # Fewer ranks run than the split is made for (trainer.data.membership): measure nothing, keep the split.
    frozen: bool = False

    def __post_init__(self):
        if not self.split:
            even = [self.rows // self.world_size] * self.world_size
            self.split = water_fill(self.rows, self.speeds) if self.mode == "fixed" else even

    @classmethod
    def from_setting(cls, setting, rows: int, world_size: int) -> "Balancer":
        """From ``parallel.balance`` (``"off"``, ``"auto"`` or a list of speeds)."""
        if isinstance(setting, list):
            return cls("fixed", rows, world_size, speeds=[float(s) for s in setting])
        if world_size == 1:
            return cls("off", rows, world_size)
        return cls(setting, rows, world_size)

    def wants_measure(self, step: int) -> bool:
        """Whether update ``step`` (1-based) measures each rank's compute time."""
        if self.frozen or (self.mode != "auto" and not self.timed):
            return False
        return self.pending or step in MEASURE_FIRST or (step > MEASURE_FIRST[-1] and step % REMEASURE_EVERY == 0)

    def observe(self, seconds: list[float], widths: list[int]) -> str | None:
        """Take one measured update; return a line to print when the split changes.

        Args:
            seconds (list[float]): Each rank's compute time of the update (the
                same list on every rank); a rank that could not measure gives 0,
                which voids the measurement and asks for another next update.
            widths (list[int]): Padded width of each of the update's micro-batches
                (the same on every rank: ranks pad to the global width).
        """
        if self.mode != "auto":
            return None
        self.pending = not all(s > 0 for s in seconds)
        if self.pending:
            return None
        cells = [rows * sum(widths) for rows in self.split]
        measured = [c / s for c, s in zip(cells, seconds)]  # padded token cells per second
        if self.speeds:
            self.speeds = [SMOOTHING * m + (1 - SMOOTHING) * s for m, s in zip(measured, self.speeds)]
        else:
            self.speeds = measured
        self.measurements += 1
        candidate = water_fill(self.rows, self.speeds)
        if candidate == self.split:
            return None
        if predicted_time(candidate, self.speeds) > (1 - MIN_GAIN) * predicted_time(self.split, self.speeds):
            return None
        self.split = candidate
        return self.describe()

    def describe(self) -> str:
        """The split and the speeds behind it, for people."""
        if self.mode == "off":
            return f"balance off: {self.split[0]} rows per rank"
        unit = " cells/s" if self.mode == "auto" else ""
        speeds = ", ".join(f"rank {r} {s:,.0f}{unit}" if self.mode == "auto" else f"rank {r} {s:g}"
                           for r, s in enumerate(self.speeds))
        text = f"balance {self.mode}: rows per micro-batch {self.split}" + (f" ({speeds})" if speeds else "")
        even = self.rows / self.world_size
        slow = [r for r, n in enumerate(self.split) if n < BARELY_HELPS * even]
        if slow:
            text += (f"; rank {', '.join(map(str, slow))} barely helps (under {BARELY_HELPS:.0%} of an even share): "
                     "the job may be faster without it")
        return text

    def to_dict(self) -> dict:
        return {"mode": self.mode, "rows": self.rows, "world_size": self.world_size, "speeds": list(self.speeds),
                "split": list(self.split), "measurements": self.measurements, "pending": self.pending}

    @classmethod
    def from_dict(cls, data: dict) -> "Balancer":
        return cls(mode=data["mode"], rows=int(data["rows"]), world_size=int(data["world_size"]),
                   speeds=[float(s) for s in data["speeds"]], split=[int(n) for n in data["split"]],
                   measurements=int(data["measurements"]), pending=bool(data.get("pending", False)))


def rows_of(batch: np.ndarray, rank: int, split: list[int]) -> np.ndarray:
    """This rank's sample indices of a length-sorted global micro-batch under ``split``."""
    if len(set(split)) == 1:
        return batch[rank::len(split)]  # the even split: the strided deal
    return batch[assign_rows(len(batch), split)[rank]]
