"""No silent hangs, nothing lost: run status, signals and the watchdog.

* ``status.json`` in ``checkpoint.dir`` records the run's state: running,
  completed, stopped (by a signal, resumable) or failed, with the reason and
  the update it happened at.
* SIGINT/SIGTERM ask for a clean stop: the request travels with the next
  gradient reduction so every rank stops at the same update, and rank 0
  saves a checkpoint first (see ``trainer.run.loop``).
* A watchdog thread ends the process when the training loop makes no
  progress for ``parallel.timeout_s`` (a peer stopped or hung, for which MLX
  has no collective timeout), or when a signal arrived while the main thread
  is blocked in a collective and cannot act on it. It names the rank, the
  update and the phase, and the stalled peers where :mod:`trainer.cluster.peers`
  knows them.

MLX releases the GIL while it waits in ``mx.eval``, so this thread keeps
running when the main thread is blocked in an ``all_sum``; Python signal
handlers do not (they run on the main thread), which is why signals are also
seen through ``signal.set_wakeup_fd`` here.
"""

import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

from ..core import parallel
from ..core.checkpoint import write_json

WATCHDOG_EXIT = 4
SIGNAL_GRACE_S = 20.0  # how long a signalled rank may stay blocked before it is ended

_state = {
    "world": None, "run_dir": None, "timeout": None, "phase": "setup", "step": 0, "watched": False,
    "since": time.monotonic(), "stop": False, "signal_at": None, "signals": 0,
    "thread": None, "pipe": None, "old_handlers": {}, "old_wakeup": -1, "peers": None,
}


class _Monitor:
    """Told by ``trainer.core.parallel`` before each blocking collective."""

    def phase(self, name: str, step: int | None = None, watched: bool = True) -> None:
        phase(name, step, watched)


def phase(name: str, step: int | None = None, watched: bool = True) -> None:
    """Record progress: the loop entered ``name`` (at update ``step``).

    Args:
        name (str): What the rank is doing now.
        step (int | None): The update it is at. Default: ``None`` (unchanged).
        watched (bool): Whether the watchdog's timeout applies; ``False`` for
            work of unbounded length on this rank alone (a model download).
            Default: ``True``.
    """
    _state["phase"] = name
    _state["watched"] = watched
    if step is not None:
        _state["step"] = step
    _state["since"] = time.monotonic()
    peers = _state["peers"]
    if peers is not None:
        peers.beat(_state["step"], name)


def current_step() -> int:
    return _state["step"]


def stop_requested() -> bool:
    """True once SIGINT or SIGTERM arrived (the loop then stops cleanly)."""
    return _state["stop"]


def request_stop() -> None:
    """Ask for a clean stop after the current update, as SIGTERM does."""
    _state["stop"] = True


def status(world, run_dir: Path, state: str, step: int = 0, reason: str | None = None) -> None:
    """Write ``status.json``. Rank 0 writes every state; other ranks write failures too,
    since rank 0 may be the one that died."""
    if world is None or not (world.is_main or state == "failed"):
        return
    record = {"state": state, "step": step, "rank": world.rank, "host": world.host, "world_size": world.size,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if reason:
        record["reason"] = reason
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(run_dir) / "status.json", record)
    except OSError as e:
        print(f"[mlx-dp] rank {world.rank}: could not write {run_dir}/status.json: {e}", file=sys.stderr)


def describe_failure(error: BaseException) -> str:
    """A sentence for an exception from MLX's distributed backend; else the exception's text."""
    text = str(error)
    world = _state["world"]
    if "connection to a peer was lost" in text or ("[ring]" in text and "lost" in text):
        peers = _state["peers"]
        lost = peers.lost_ranks() if peers is not None else []
        who = (", ".join(f"rank {r}" for r in lost) if lost else
               ("rank " + str(1 - world.rank)) if world is not None and world.size == 2 else "a peer")
        me = f"rank {world.rank} ({world.host})" if world is not None else "this rank"
        return (f"lost {who} during {_state['phase']} at update {_state['step']}: {me} stops. "
                f"Resume from the last checkpoint with --resume")
    return text


def failing() -> None:
    """The run is failing: later signals should not announce a clean stop."""
    _state["failing"] = True


def _on_signal(signum, frame) -> None:
    _state["signals"] += 1
    if _state.get("failing"):
        return
    if _state["stop"] and signum == signal.SIGINT:
        raise KeyboardInterrupt  # second Ctrl-C: stop now
    _state["stop"] = True
    world = _state["world"]
    if world is not None and world.is_main:
        print(f"\n[mlx-dp] {signal.Signals(signum).name}: stopping after this update and saving a checkpoint "
              "(Ctrl-C again to abort)", file=sys.stderr, flush=True)


def _hard_exit(message: str) -> None:
    world = _state["world"]
    print(f"[mlx-dp] {message}", file=sys.stderr, flush=True)
    status(world, _state["run_dir"], "failed", step=_state["step"], reason=message)
    os._exit(WATCHDOG_EXIT)


def _watch() -> None:
    world = _state["world"]
    read_fd = _state["pipe"][0]
    while True:
        ready, _, _ = select.select([read_fd], [], [], 1.0)
        now = time.monotonic()
        if ready:
            try:
                os.read(read_fd, 64)
            except OSError:
                return
            if _state["signal_at"] is None:
                _state["signal_at"] = now
        if _state["thread"] is not threading.current_thread():
            return  # uninstalled
        idle = now - _state["since"]
        me = f"rank {world.rank} ({world.host})"
        if _state["signal_at"] is not None and now - _state["signal_at"] > SIGNAL_GRACE_S \
                and now - _state["since"] > SIGNAL_GRACE_S:
            _hard_exit(f"{me} was signalled to stop but is blocked in {_state['phase']} at update "
                       f"{_state['step']} for {idle:.0f}s; {_stalled_peers_text()}ending it")
        if _state["watched"] and idle > _state["timeout"]:
            _hard_exit(f"watchdog: {me} made no progress for {idle:.0f}s (parallel.timeout_s="
                       f"{_state['timeout']:g}) in {_state['phase']} at update {_state['step']}; "
                       f"{_stalled_peers_text()}ending the job")
        # An unwatched phase (rank 0 tokenizing a large dataset while the others wait) may take
        # any time, but not with a peer that has gone silent (stopped, asleep) for the whole timeout.
        peers = _state["peers"]
        if not _state["watched"] and peers is not None and peers.silent_seconds() > _state["timeout"]:
            _hard_exit(f"watchdog: {me} waited {idle:.0f}s in {_state['phase']} at update {_state['step']} "
                       f"while a peer was silent for over parallel.timeout_s={_state['timeout']:g}; "
                       f"{_stalled_peers_text()}ending the job")


def _stalled_peers_text() -> str:
    peers = _state["peers"]
    if peers is None:
        return ""
    text = peers.describe_stalled()
    return f"{text}; " if text else ""


def install(world, run_dir: Path, timeout_s: float, peers=None) -> None:
    """Start the watchdog and signal handling for this rank.

    Args:
        world (trainer.core.parallel.World): The group.
        run_dir (Path): ``checkpoint.dir`` (for ``status.json``).
        timeout_s (float): ``parallel.timeout_s``.
        peers (trainer.cluster.peers.PeerMonitor | None): Heartbeats of the other
            ranks, used to name stalled or lost peers. Default: ``None``.
    """
    _state.update(world=world, run_dir=Path(run_dir), timeout=float(timeout_s), phase="setup", step=0, watched=False,
                  since=time.monotonic(), stop=False, signal_at=None, signals=0, peers=peers, failing=False)
    parallel.set_monitor(_Monitor())
    if threading.current_thread() is threading.main_thread():
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        _state["pipe"] = (read_fd, write_fd)
        _state["old_wakeup"] = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            _state["old_handlers"][sig] = signal.signal(sig, _on_signal)
    else:
        _state["pipe"] = os.pipe()
    thread = threading.Thread(target=_watch, name="mlx-dp-watchdog", daemon=True)
    _state["thread"] = thread
    thread.start()


def uninstall() -> None:
    """Stop watching (end of training); restore signal handlers."""
    thread = _state["thread"]
    _state["thread"] = None
    parallel.set_monitor(None)
    if threading.current_thread() is threading.main_thread() and _state["old_handlers"]:
        for sig, handler in _state["old_handlers"].items():
            signal.signal(sig, handler)
        _state["old_handlers"] = {}
        signal.set_wakeup_fd(_state["old_wakeup"])
    if _state["pipe"] is not None:
        # Wake the watchdog and wait for it before closing its pipe: closing an
        # fd that another thread still reads lets the number be reused by the
        # next open(), and the thread would then eat that file's bytes.
        try:
            os.write(_state["pipe"][1], b"x")
        except OSError:
            pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        for fd in _state["pipe"]:
            try:
                os.close(fd)
            except OSError:
                pass
        _state["pipe"] = None
    peers = _state["peers"]
    if peers is not None:
        peers.close()
        _state["peers"] = None
