"""``status.json``: the run's state, and which rank may write it.

The file in ``checkpoint.dir`` says ``running``, ``completed``, ``stopped``
(by a signal; resumable) or ``failed``, with the reason, the update, and
the rank, host and pid that wrote it. Scripts read it because launchers'
exit codes cannot be trusted (``mlx.launch`` exits 0 when a rank fails).

Who writes, so that the file stays true:

1. Only a run that holds ``checkpoint.dir`` (``trainer.cluster.runlock``).
   Before the lock is settled (while ranks connect), a rank writes only
   where no other live run holds the lock; a run that lost the lock writes
   nothing.
2. Rank 0 writes every state; the other ranks write ``failed`` only, for
   the failures they detect (rank 0 may be the one that died).
3. The first end of a run is final. Once a process other than this one has
   written ``completed``, ``stopped`` or ``failed`` after this process
   started, this process leaves the file alone and only prints its message.
   The first failure recorded is the one nearest its cause: a rank that
   wakes from SIGSTOP after the watchdog ended the job would blame rank 0
   for a loss it caused. A record older than this process belongs to an
   earlier run and is replaced.

If the disk is full, the record is written in place over the old one (an
atomic write needs a second file's worth of free space).
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

from ..core.checkpoint import write_json
from ..env import launch_env
from . import runlock

STATUS = "status.json"
TERMINAL = ("completed", "stopped", "failed")

_run = {"id": None, "owner": None, "started": time.time()}


def set_run(run_id: str) -> None:
    """This run holds ``checkpoint.dir`` under ``run_id`` (every rank learns it at start)."""
    _run.update(id=run_id, owner=True)


def disown() -> None:
    """This run does not hold ``checkpoint.dir`` (another run does): never write there."""
    _run.update(owner=False)


def reset() -> None:
    """Forget the run (a new run in the same process, as tests do)."""
    _run.update(id=None, owner=None, started=time.time())


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def may_write(run_dir: Path, state: str, rank: int) -> tuple[bool, str]:
    """Whether this process may write ``state`` now (the rules above), and why not."""
    if _run["owner"] is False:
        return False, "another run holds this checkpoint.dir"
    if rank != 0 and state != "failed":
        return False, "only rank 0 records this state"
    if _run["owner"] is None and runlock.held_by_another(run_dir):
        return False, "another run holds this checkpoint.dir"
    existing = _read(Path(run_dir) / STATUS)
    if existing is None or existing.get("state") not in TERMINAL:
        return True, ""
    mine = existing.get("pid") == os.getpid() and existing.get("host") == socket.gethostname()
    earlier_run = float(existing.get("unix_time", 0)) < _run["started"]
    if mine or earlier_run:
        return True, ""
    return False, (f"status.json already records '{existing.get('state')}' by rank {existing.get('rank')} "
                   f"({existing.get('host')}): {str(existing.get('reason', ''))[:200]}")


def write(world, run_dir: Path, state: str, step: int = 0, reason: str | None = None) -> bool:
    """Write ``status.json`` if the rules allow; return whether it was written.

    Args:
        world (trainer.core.parallel.World | None): The group; ``None``
            before it formed (the rank then comes from the launcher).
        run_dir (Path): ``checkpoint.dir``.
        state (str): ``running``, ``completed``, ``stopped`` or ``failed``.
        step (int): The update. Default: ``0``.
        reason (str | None): Why it stopped or failed. Default: ``None``.
    """
    env = launch_env()
    rank = world.rank if world is not None else env.rank
    allowed, why = may_write(Path(run_dir), state, rank)
    if not allowed:
        if (state == "failed" and rank != 0) or "already records" in why:
            print(f"[mlx-dp] rank {rank}: not recording '{state}' in {run_dir}/{STATUS}: {why}", file=sys.stderr,
                  flush=True)
        return False
    record = {"state": state, "step": step, "rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
              "world_size": world.size if world is not None else env.world_size, "run_id": _run["id"],
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unix_time": round(time.time(), 3)}
    if reason:
        record["reason"] = reason
    path = Path(run_dir) / STATUS
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
        return True
    except OSError as e:
        if _write_in_place(path, record):
            return True
        print(f"[mlx-dp] rank {rank}: could not write {path}: {e.strerror or e}", file=sys.stderr, flush=True)
        return False


def _write_in_place(path: Path, record: dict) -> bool:
    """Overwrite the existing file's blocks: a full disk still allows that (a small file
    sits in one partly used block). ``False`` if that fails too."""
    try:
        with open(path, "r+b") as f:
            f.write((json.dumps(record, indent=2, default=str) + "\n").encode())
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False
