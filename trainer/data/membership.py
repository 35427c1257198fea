"""Which ranks' share of each global micro-batch this process computes, when fewer ranks run than planned.

A job planned for N ranks keeps its global batch, its data order and its updates
when a host is missing (``mlx-dp launch --restarts K --min-ranks M``): the
global micro-batches are still made for N ranks (``trainer.data.batches``), and
each of the N rows-shares, a *nominal rank*, is computed by one of the ranks
that run. A running rank keeps its own nominal rank and takes over missing ones
in turn; it computes them one after the other, each at the recipe's
``training.batch_size`` (so memory per forward stays what it was), and sums
their gradients before the reduction, as accumulation does. The loss is
normalised by the global token count as always, so the update is the one N
ranks would make, to float rounding (the order of the sum differs). Only the
time per update grows.

Pure Python; nothing here communicates.
"""

from dataclasses import dataclass

from ..errors import DistributedError


@dataclass(frozen=True)
class Membership:
    """This process's nominal ranks.

    Attributes:
        nominal: Ranks the global batch is made for.
        size: Ranks running.
        hosted: The nominal ranks this process computes, its own first.
    """

    nominal: int
    size: int
    hosted: tuple

    @property
    def degraded(self) -> bool:
        """Fewer ranks run than the global batch is made for."""
        return self.size < self.nominal

    @classmethod
    def of(cls, rank: int, size: int, nominal: int | None = None, present: tuple = ()) -> "Membership":
        """The nominal ranks of running rank ``rank`` of ``size``.

        Args:
            rank (int): This process's rank among those running.
            size (int): Ranks running.
            nominal (int | None): Ranks planned (``None``: ``size``).
            present (tuple): The nominal rank of each running rank (empty:
                running rank r is nominal rank r).

        Raises:
            DistributedError: The launcher's description does not add up.
        """
        nominal = size if nominal is None else nominal
        present = tuple(present) or tuple(range(size))
        if nominal < size or len(present) != size or len(set(present)) != size or \
                not all(0 <= p < nominal for p in present):
            raise DistributedError(f"the launcher described {size} running rank(s) as nominal ranks {list(present)} "
                                   f"of {nominal}, which does not add up; start the job again without --min-ranks")
        missing = sorted(set(range(nominal)) - set(present))
        taken = tuple(m for j, m in enumerate(missing) if j % size == rank)
        return cls(nominal=nominal, size=size, hosted=(present[rank],) + taken)

    def describe(self) -> str:
        """One line for people."""
        return (f"{self.size} of {self.nominal} ranks running: the global batch, the data order and the updates "
                f"stay those of {self.nominal} ranks; this rank computes the rows of nominal rank(s) "
                f"{', '.join(map(str, self.hosted))} (slower, not different)")
