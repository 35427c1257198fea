"""``status.json``: the run's state, true at every moment, and which rank may write it.

The file in ``checkpoint.dir`` says ``running``, ``completed``, ``stopped``
(by a signal; resumable) or ``failed``, with the reason, the update, and
the rank, host and pid that wrote it. Scripts read it because launchers'
exit codes cannot be trusted (``mlx.launch`` exits 0 when a rank fails).

While a run trains, rank 0 rewrites it every :data:`HEARTBEAT_S` with the
current update and a ``heartbeat`` time (:class:`Heartbeat`), so a reader
always sees how far the run is. A process killed outright (SIGKILL, a power
cut) cannot write its end: :func:`read` then finds ``running`` with a pid that
is gone or a heartbeat too old, and calls the run ``lost`` (``mlx-dp status
DIR`` and the next run in that directory say so).

Who writes, so that the file stays true:

1. Only a run that holds ``checkpoint.dir`` (``trainer.cluster.runlock``).
   Before the lock is settled (while ranks connect), a rank writes only
   where no other live run holds the lock; a run that lost the lock writes
   nothing.
2. Rank 0 writes every state; the other ranks write ``failed`` only, for
   the failures they detect (rank 0 may be the one that died).
3. The first end of a run is final, with one exception: the first *cause*
   wins over an earlier *consequence*. A rank that only saw a peer vanish
   ("lost rank 0") records a consequence; the rank that failed (a full disk,
   a bad row) records the cause, which replaces it, whichever came first. Once
   a cause is recorded (or a run completed or stopped), later records of
   other processes of that run are refused and only printed: a rank that wakes
   from SIGSTOP after the watchdog ended the job would blame rank 0 for a loss
   it caused.
4. A command refused before it trains (a different global batch on
   ``--resume``, a recipe error) leaves a finished run's record alone: this
   run has not written ``running`` yet, and an earlier run's end stands;
   except under ``mlx-dp launch --restarts``, where an attempt's end replaces
   an earlier attempt's of the same launch.
5. Between attempts of ``mlx-dp launch --restarts``, the launcher itself
   writes ``restarting`` (during the backoff), or how the launch ended there
   (:func:`write_for_launcher`), with its own pid: a launcher killed during a
   backoff reads as lost.

The file is written padded to :data:`RECORD_BYTES` from the start, so later
records fit in its own blocks: on a full disk a record is rewritten in place
(an atomic write needs a second file's worth of free space).
"""

import json
import os
import socket
import threading
import time
from pathlib import Path

from .. import log
from ..errors import UserError
from ..state.rundir import open_update, write_atomic
from ..state.checkpoint import process_alive
from ..env import launch_env, restart_env
from . import runlock

STATUS = "status.json"
TERMINAL = ("completed", "stopped", "failed")
LIVE = ("running", "restarting")  # a process still answers for these: gone, the record reads as lost
HEARTBEAT_S = 5.0  # rank 0 refreshes a running run's record this often (a 4 KB write)
LOST_AFTER_S = 60.0  # a running record older than this, from a process not seen alive, is a lost run
RECORD_BYTES = 4096  # the file's size, padded with spaces: later records rewrite it in place

_run = {"id": None, "owner": None, "started": time.time(), "started_training": False, "ended": False,
        "restarts": []}
_lock = threading.Lock()


def set_run(run_id: str) -> None:
    """This run holds ``checkpoint.dir`` under ``run_id`` (every rank learns it at start)."""
    _run.update(id=run_id, owner=True)


def disown() -> None:
    """This run does not hold ``checkpoint.dir`` (another run does): never write there."""
    _run.update(owner=False)


def reset() -> None:
    """Forget the run (a new run in the same process, as tests do)."""
    _run.update(id=None, owner=None, started=time.time(), started_training=False, ended=False, restarts=[])


def note_restarts(restarts: list[dict]) -> None:
    """The launch's restarts so far (``mlx-dp launch --restarts``): every record this run writes lists them."""
    _run["restarts"] = list(restarts)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def may_write(run_dir: Path, state: str, rank: int, consequence: bool = False) -> tuple[bool, str]:
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
    if mine:
        return True, ""
    if earlier_run:
        if _run["started_training"] or state == "running":
            return True, ""
        job = restart_env().job
        if job and existing.get("job") == job:
            return True, ""  # an earlier attempt of this launch: this attempt's end is the one to record
        return False, (f"status.json keeps the earlier run's '{existing.get('state')}' (this command stopped before "
                       "it trained)")
    if existing.get("consequence") and not consequence and state == "failed":
        return True, ""  # the cause replaces an earlier follow-on report
    return False, (f"status.json already records '{existing.get('state')}' by rank {existing.get('rank')} "
                   f"({existing.get('host')}): {str(existing.get('reason', ''))[:200]}")


def write(world, run_dir: Path, state: str, step: int = 0, reason: str | None = None,
          consequence: bool = False) -> bool:
    """Write ``status.json`` if the rules allow; return whether it was written.

    Args:
        world (trainer.parallel.World | None): The group; ``None``
            before it formed (the rank then comes from the launcher).
        run_dir (Path): ``checkpoint.dir``.
        state (str): ``running``, ``completed``, ``stopped`` or ``failed``.
        step (int): The update. Default: ``0``.
        reason (str | None): Why it stopped or failed. Default: ``None``.
        consequence (bool): The failure is only what this rank saw of another's (a lost
            peer); the failing rank's own record replaces it. Default: ``False``.
    """
    env = launch_env()
    rank = world.rank if world is not None else env.rank
    with _lock:
        if state == "running" and _run["ended"]:
            return False  # the heartbeat must not undo an end
        allowed, why = may_write(Path(run_dir), state, rank, consequence)
        if not allowed:
            if (state == "failed" and rank != 0) or "already records" in why or "keeps the earlier" in why:
                log.each(f"not recording '{state}' in {run_dir}/{STATUS}: {why}")
            return False
        now = time.time()
        record = {"state": state, "step": step, "rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                  "world_size": world.size if world is not None else env.world_size, "run_id": _run["id"],
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unix_time": round(now, 3)}
        if state == "running":
            record["heartbeat"] = round(now, 3)
        if reason:
            record["reason"] = reason
        if consequence:
            record["consequence"] = True
        job = restart_env().job
        if job:
            record["job"] = job  # the launch: a restart's records continue its list of restarts
        if _run["restarts"]:
            record["restarts"] = _run["restarts"]
        written = _store(Path(run_dir) / STATUS, record, rank)
        if state == "running":
            _run["started_training"] = True
        if state in TERMINAL:
            _run["ended"] = True
        return written


def _text(record: dict) -> bytes:
    text = json.dumps(record, indent=2, default=str) + "\n"
    return (text + " " * max(0, RECORD_BYTES - len(text))).encode()


def _store(path: Path, record: dict, rank: int) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, _text(record))  # never through a planted link
        return True
    except OSError as e:
        if _write_in_place(path, record):
            return True
        log.each(f"could not write {path}: {e.strerror or e}")
        return False


def _write_in_place(path: Path, record: dict) -> bool:
    """Overwrite the existing file's own (padded) blocks: a full disk still allows that."""
    data = _text(record)
    try:
        with open_update(path) as f:
            size = os.fstat(f.fileno()).st_size
            if len(data) > size:
                return False
            f.write(data + b" " * (size - len(data)))
            f.flush()
            os.fsync(f.fileno())
        return True
    except (OSError, UserError):  # no room, or a link: nothing is written
        return False


def write_for_launcher(run_dir: Path, state: str, reason: str, job: str, step: int | None = None) -> bool:
    """``mlx-dp launch --restarts`` records the launch's own state: ``restarting`` during a backoff, or how it ended
    between attempts (``stopped`` by a signal, ``failed`` when it stops restarting).

    Written with the launcher's pid and a heartbeat, so a launcher killed during a backoff reads as ``lost``;
    never where another launch's live run holds ``checkpoint.dir``. The launch's restarts so far are kept.
    Returns whether it was written.
    """
    path = Path(run_dir) / STATUS
    existing = _read(path) or {}
    holder = runlock.read_holder(Path(run_dir))
    if holder is not None and holder.alive() and holder.job != job:
        return False
    now = time.time()
    record = {"state": state, "step": existing.get("step", 0) if step is None else step, "rank": "launcher",
              "host": socket.gethostname(), "pid": os.getpid(), "world_size": existing.get("world_size"),
              "run_id": existing.get("run_id"), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "unix_time": round(now, 3), "heartbeat": round(now, 3), "reason": reason, "job": job}
    if existing.get("job") == job and existing.get("restarts"):
        record["restarts"] = existing["restarts"]
    return _store(path, record, rank=0)


# ---------------------------------------------------------------------------- while it runs


class Heartbeat:
    """Rank 0 refreshes the ``running`` record with the current update every ``every_s`` seconds.

    Args:
        world: The group (only rank 0 writes).
        run_dir (Path): ``checkpoint.dir``.
        current_step (callable): The update the run is at.
        every_s (float): Default: :data:`HEARTBEAT_S`.
    """

    def __init__(self, world, run_dir: Path, current_step, every_s: float = HEARTBEAT_S):
        self.world, self.run_dir, self.current_step, self.every_s = world, Path(run_dir), current_step, every_s
        self.done = threading.Event()
        self.thread = None
        if world.is_main:
            self.thread = threading.Thread(target=self._beat, daemon=True, name="mlx-dp-status")
            self.thread.start()

    def _beat(self) -> None:
        while not self.done.wait(self.every_s):
            write(self.world, self.run_dir, "running", step=self.current_step())

    def stop(self) -> None:
        self.done.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)


# ---------------------------------------------------------------------------- reading it


def read(run_dir: Path, now: float | None = None) -> dict | None:
    """``status.json`` as it stands, with ``state`` ``lost`` for a run that cannot be running any more.

    A ``running`` record is lost when the process that wrote it is gone (on this
    host; rank 0 writes it, and a run whose rank 0 is gone is over), or when its
    heartbeat is older than :data:`LOST_AFTER_S` (another host, a shared folder). The record gains ``recorded_state`` and
    ``lost_reason`` then. ``None`` when there is no readable record.
    """
    record = _read(Path(run_dir) / STATUS)
    if record is None or record.get("state") not in LIVE:
        return record
    now = time.time() if now is None else now
    beat = float(record.get("heartbeat", record.get("unix_time", 0)) or 0)
    age = now - beat
    here = record.get("host") == socket.gethostname()
    pid = int(record.get("pid", 0) or 0)
    gone = here and pid > 0 and not process_alive(pid)
    if gone or age > LOST_AFTER_S:
        who = f"pid {pid} on {record.get('host')}"
        why = f"its process ({who}) is gone" if gone else f"nothing was heard from {who}"
        return {**record, "state": "lost", "recorded_state": record["state"],
                "lost_reason": f"status.json says {record['state']} at update {record.get('step')}, but {why} and its last "
                               f"heartbeat was {age:.0f} s ago: the run was lost (killed outright, or its machine "
                               "went down); --resume continues from its last checkpoint"}
    return record


def describe(run_dir: Path, record: dict | None) -> str:
    """One line for people about a run directory's record (see :func:`read`)."""
    if record is None:
        return f"{run_dir}: no status.json (no run has written there)"
    state, step = record.get("state"), record.get("step")
    who = f"rank {record.get('rank')} on {record.get('host')}, {record.get('time')}"
    if state == "lost":
        return f"{run_dir}: lost. {record['lost_reason']}"
    if state == "running":
        age = time.time() - float(record.get("heartbeat", record.get("unix_time", 0)) or 0)
        return f"{run_dir}: running, at update {step}; heartbeat {age:.0f} s ago ({who})"
    if state == "restarting":
        return f"{run_dir}: restarting (mlx-dp launch --restarts, pid {record.get('pid')} on {record.get('host')}): " \
               f"{record.get('reason', '')}"
    reason = f": {record['reason']}" if record.get("reason") else ""
    return f"{run_dir}: {state} at update {step} ({who}){reason}"


EXIT_CODES = {"completed": 0, "failed": 1, "lost": 1, "running": 3, "restarting": 3, "stopped": 4}
