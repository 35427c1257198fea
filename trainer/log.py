"""One rank-aware logger: every line mlx-dp prints for people goes through here.

As nanochat's ``print0``: a message is written once, by rank 0, with the
``[mlx-dp]`` prefix, so no call site checks ranks or builds a prefix. The few
messages every rank must print (what only that rank saw) go through
:func:`each`, which names the rank. While rank 0's progress bar is open,
lines go through the bar (:func:`route`), so they do not break it.

The rank is the group's once it is formed (:func:`set_rank`), else the
launcher's (``trainer.env``).
"""

import sys

from .env import launch_env

PREFIX = "[mlx-dp]"
_state = {"rank": None, "write": None}


def set_rank(rank: int | None) -> None:
    """The group formed: this process is ``rank`` (``None``: read the launcher's environment again)."""
    _state["rank"] = rank


def rank() -> int:
    """This process's rank: the group's, or the launcher's before the group forms."""
    return _state["rank"] if _state["rank"] is not None else launch_env().rank


def route(write) -> None:
    """Send rank 0's lines to ``write(text)`` (a progress bar's), or back to stdout with ``None``."""
    _state["write"] = write


def _emit(text: str, file) -> None:
    write = _state["write"]
    try:
        if write is not None and file is sys.stdout:
            write(text)
        else:
            print(text, file=file, flush=True)
    except OSError:  # a closed terminal (SIGHUP): the run goes on without it
        pass


def info(message: str) -> None:
    """A line for people, printed once, by rank 0."""
    if rank() == 0:
        _emit(f"{PREFIX} {message}", sys.stdout)


def note(message: str) -> None:
    """Something worth knowing that changes nothing, printed by rank 0."""
    info(f"note: {message}")


def warn(message: str) -> None:
    """Something that may cost the user (speed, memory, a surprise), printed by rank 0 on stderr."""
    if rank() == 0:
        _emit(f"{PREFIX} WARNING: {message}", sys.stderr)


def each(message: str, name_rank: bool = True) -> None:
    """What this rank alone saw, printed by every rank on stderr, naming the rank (unless the message does)."""
    _emit(f"{PREFIX} rank {rank()}: {message}" if name_rank else f"{PREFIX} {message}", sys.stderr)


def urgent(message: str) -> None:
    """Rank 0's line from a signal handler: straight to stderr, on a line of its own, never through the bar
    (the interrupted code may hold the bar's lock)."""
    if rank() == 0:
        try:
            print(f"\n{PREFIX} {message}", file=sys.stderr, flush=True)
        except OSError:
            pass


def format_bytes(n: float) -> str:
    """``1.5 GB``-style sizes for messages (powers of 1000, as macOS shows memory)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
