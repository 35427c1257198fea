"""Emulate a slower Mac: cap a rank at a fraction of one core with a cgroup v1 CPU quota.

A mixed desk cluster (a MacBook Air next to a Mac Studio) is what
``parallel.balance: auto`` is for. On one Linux machine, a rank is made
slower by the kernel's CFS bandwidth control: a cgroup whose
``cpu.cfs_quota_us`` is ``fraction x cpu.cfs_period_us`` may run for that
share of each period, across all its threads (docs/PLATFORM.md: a quota of 50 ms
per 100 ms put a rank at half a core and doubled a 2-rank step).

    with CpuLimits({1: 0.5}) as limits:          # rank 1 at half a core
        proc = subprocess.Popen(...)
        limits.add(1, proc.pid)                   # all its threads, also later ones

Needs root and the cgroup v1 ``cpu`` controller mounted at ``/sys/fs/cgroup/cpu``
(:func:`check_permitted` says why not, in one sentence). Only the standard library.
"""

import os
import time
from pathlib import Path

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
# A short period makes the capped rank uniformly slower, as a slower Mac is, rather than running at
# full speed for `share` of each 100 ms and then frozen: a frozen rank also stalls its peers inside
# the collectives, which is not what a slower Mac does (with 100 ms, balance auto measured 1.24-1.43x
# over off at rank 1 = 0.5 core where its split predicts 1.45x). 1 ms is the kernel's minimum quota.
PERIOD_US = 10_000
MIN_SHARE = 1000 / PERIOD_US


class CpuLimitError(RuntimeError):
    """A CPU limit cannot be set here; the message is one sentence for people."""


def check_permitted() -> str | None:
    """``None`` when this process can cap CPU with cgroups, else the reason."""
    if not (CPU_ROOT / "cpu.cfs_quota_us").is_file():
        return ("--slow needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu (this machine has "
                "cgroup v2 only, or none)")
    if os.geteuid() != 0:
        return "--slow needs root to create cgroups; run it with sudo"
    return None


def parse_slow(text: str | None) -> dict[int, float]:
    """``"1=0.5,2=0.25"`` -> ``{1: 0.5, 2: 0.25}``: rank -> share of one core, in (0, 1].

    Raises:
        CpuLimitError: A malformed entry or a share outside (0, 1].
    """
    limits = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        rank, _, share = item.partition("=")
        try:
            rank_i, share_f = int(rank), float(share)
        except ValueError:
            raise CpuLimitError(f"--slow {text!r}: give RANK=SHARE pairs such as 1=0.5") from None
        if not MIN_SHARE <= share_f <= 1 or rank_i < 0:
            raise CpuLimitError(f"--slow {item}: the share of a core must be from {MIN_SHARE:g} to 1 for a rank >= 0")
        limits[rank_i] = share_f
    return limits


class CpuLimits:
    """One cgroup per limited rank, removed on exit (also after a failure).

    Args:
        shares (dict[int, float]): Rank -> share of one core.
        name (str): Prefix of the cgroups' names. Default: ``"mlx-dp"``.
    """

    def __init__(self, shares: dict[int, float], name: str = "mlx-dp"):
        self.shares = dict(shares)
        self.groups = {rank: CPU_ROOT / f"{name}-{os.getpid()}-rank{rank}" for rank in self.shares}

    def __enter__(self) -> "CpuLimits":
        if not self.shares:
            return self
        reason = check_permitted()
        if reason:
            raise CpuLimitError(reason)
        try:
            for rank, share in self.shares.items():
                group = self.groups[rank]
                group.mkdir(exist_ok=True)
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(share * PERIOD_US))))
        except OSError as e:
            self.close()
            raise CpuLimitError(f"could not create a CPU cgroup: {e.strerror or e}") from None
        return self

    def add(self, rank: int, pid: int) -> None:
        """Put process ``pid`` (every thread of it) under rank ``rank``'s limit, if it has one."""
        group = self.groups.get(rank)
        if group is not None:
            (group / "cgroup.procs").write_text(str(pid))

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Move any process left back to the root cgroup and remove the groups."""
        for group in self.groups.values():
            if not group.is_dir():
                continue
            for pid in (group / "cgroup.procs").read_text().split():
                try:
                    (CPU_ROOT / "cgroup.procs").write_text(pid)
                except OSError:
                    pass  # it exited meanwhile
            for _ in range(50):  # the kernel lets go of a group shortly after its last task leaves
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)
