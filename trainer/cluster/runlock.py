"""One run per run directory: a lock file in ``checkpoint.dir``.

Two runs writing into one ``checkpoint.dir`` destroy each other: their
checkpoints replace one another, ``metrics.jsonl`` interleaves, and both end
"completed". Rank 0 of a run therefore creates ``checkpoint.dir/run.lock``
(``O_EXCL``: one creator wins) holding its host, pid, start time and a run id,
before it writes anything there, and removes it at the end.

A lock is *stale*, and is taken over with a note, when its process is gone:
on this host when its pid no longer runs; from another host (a shared
filesystem) when it has not been refreshed for :data:`STALE_S` (the holder
touches it every :data:`REFRESH_S`); and under ``mlx-dp launch --restarts``
when an earlier attempt of the same launch holds it (the launcher ended that
attempt; its host may be asleep, or its process not yet reaped over ssh).

Every rank of a run learns whether rank 0 got the lock (one small gather), so
a run that lost the race writes nothing into the other run's directory, not
even ``status.json``.
"""

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .. import log
from ..state.checkpoint import process_alive
from ..env import restart_env
from ..errors import CheckpointError

LOCK_NAME = "run.lock"
REFRESH_S = 30.0
STALE_S = 600.0


@dataclass
class Holder:
    """Who holds a lock, as its file says."""

    host: str = "?"
    pid: int = 0
    started: str = "?"
    run_id: str = ""
    age_s: float = 0.0  # since the holder last refreshed it
    job: str = ""  # mlx-dp launch --restarts: the launch, and which attempt of it holds the lock
    attempt: int = 0

    def alive(self) -> bool:
        restart = restart_env()
        if self.job and self.job == restart.job and self.attempt < restart.attempt:
            return False  # an earlier attempt of this very job, ended by the launcher (its host may be asleep)
        if self.host == socket.gethostname():
            return self.pid > 0 and process_alive(self.pid)
        return self.age_s < STALE_S

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.started}"


def read_holder(run_dir: Path) -> Holder | None:
    """The lock's holder, or ``None`` without a lock file."""
    path = Path(run_dir) / LOCK_NAME
    try:
        text, age = path.read_text(), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError:
        return Holder(age_s=0.0)  # unreadable: assume alive rather than break someone's run
    try:
        data = json.loads(text)
        return Holder(str(data["host"]), int(data["pid"]), str(data.get("started", "?")), str(data.get("run_id", "")),
                      age, str(data.get("job", "")), int(data.get("attempt", 0)))
    except (ValueError, KeyError, TypeError):
        return Holder(age_s=age)  # half-written: alive while young, stale when old


def held_by_another(run_dir: Path, run_id: str | None = None) -> bool:
    """Whether a live run other than ``run_id`` holds ``run_dir``'s lock."""
    holder = read_holder(run_dir)
    return holder is not None and holder.run_id != run_id and holder.alive()


@dataclass
class RunLock:
    """A held lock; :meth:`release` removes it (only if it is still ours)."""

    path: Path
    run_id: str
    closed: threading.Event = field(default_factory=threading.Event)

    def _refresh(self) -> None:
        while not self.closed.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self.closed.set()
        holder = read_holder(self.path.parent)
        if holder is not None and holder.run_id == self.run_id:
            self.path.unlink(missing_ok=True)


def acquire(run_dir: Path) -> tuple[RunLock, str | None]:
    """Lock ``run_dir`` for this process; return the lock and a note if a stale one was taken over.

    Raises:
        CheckpointError: Another live run holds it (naming its host and pid).
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"checkpoint.dir {run_dir} is not writable: {e.strerror or e}") from None
    run_id = uuid.uuid4().hex[:12]
    restart = restart_env()
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "job": restart.job,
                         "attempt": restart.attempt}) + "\n"
    note = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(run_dir)
            if holder is not None and holder.alive():
                raise CheckpointError(
                    f"checkpoint.dir {run_dir} is in use by another run ({holder.describe()}); wait for it, stop "
                    f"it, or choose another checkpoint.dir (if no run uses it, delete {path})") from None
            note = (f"took over the lock of a run that is gone ({holder.describe() if holder else 'no holder'}) "
                    f"in {run_dir}")
            path.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise CheckpointError(f"checkpoint.dir {run_dir} is not writable: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(record)
        except OSError as e:  # a full disk
            path.unlink(missing_ok=True)
            raise CheckpointError(f"could not write {path}: {e.strerror or e}") from None
        lock = RunLock(path, run_id)
        threading.Thread(target=lock._refresh, daemon=True, name="mlx-dp-lock").start()
        return lock, note
    raise CheckpointError(f"checkpoint.dir {run_dir}: another run took its lock at the same moment; "
                          "choose another checkpoint.dir")


def acquire_for_group(world, run_dir: Path, before=None, after=None) -> tuple[RunLock | None, str]:
    """Rank 0 locks ``run_dir``; every rank learns the run id (a collective).

    Args:
        world: The group.
        run_dir (Path): ``checkpoint.dir``.
        before (callable | None): ``before(run_dir)`` on rank 0 before the lock is taken (whether
            the folder may be written at all: ``trainer.state.rundir``). Default: ``None``.
        after (callable | None): ``after(run_dir)`` on rank 0 once the lock is held (whether an
            earlier run may be replaced); it may raise, and the lock is then let go. Default: ``None``.

    Returns:
        tuple: ``(lock or None on other ranks, run id)``.

    Raises:
        CheckpointError: On rank 0, when another run holds the directory, or ``before``/``after`` refuse it.
        CheckpointError: On the other ranks too, in that case: the same mistake with the same exit status,
            whichever rank a launcher hears from first.
    """
    lock, error = None, None
    if world.is_main:
        try:
            if before is not None:
                before(run_dir)
            lock, note = acquire(run_dir)
            if note:
                log.note(note)
            if after is not None:
                after(run_dir)
        except CheckpointError as e:
            error = e
            if lock is not None:
                lock.release()
                lock = None
    token = lock.run_id.encode() if lock else b""
    run_id = world.all_gather_bytes(token, phase="lock")[0].decode()
    if error is not None:
        raise error
    if not run_id:
        raise CheckpointError(f"rank 0 could not lock {run_dir}; see its message")
    return lock, run_id
