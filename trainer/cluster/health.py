"""No silent hangs, nothing lost: signals and the watchdog (and ``status.json`` via ``trainer.cluster.status``).

* SIGINT, SIGTERM and SIGHUP (a closed terminal) ask for a clean stop: the
  request travels with the next gradient reduction so every rank stops at the
  same update, and rank 0 saves a checkpoint first (``trainer.run.loop``);
  the process then exits ``128 + signal``. A second Ctrl-C aborts at once and
  records ``failed`` with the reason ``interrupted``.
* A watchdog thread ends the process when the training loop makes no
  progress for ``parallel.timeout_s`` (a peer stopped or hung, for which MLX
  has no collective timeout), sooner (``parallel.peer_silence_s``) when it
  waits for a peer whose heartbeats have stopped (a Mac asleep), or when a
  signal arrived while the main thread is blocked in a collective and cannot
  act on it. It names the rank, the update and the phase, and the stalled
  peers where :mod:`trainer.cluster.peers` knows them.
* Under ``mlx-dp launch --restarts``, a failing rank also hands the launcher
  its reason and the ranks it blames (:func:`report_failure`), so a restart
  can say why and leave an unreachable host out.

Both are installed before the ranks connect (:func:`install` takes no group
yet; :func:`attach` adds it), so a signal or a hang while the group forms
ends with words and a status too.

MLX releases the GIL while it waits in ``mx.eval``, so this thread keeps
running when the main thread is blocked in an ``all_sum``; Python signal
handlers do not (they run on the main thread), which is why signals are also
seen through ``signal.set_wakeup_fd`` here.
"""

import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .. import log, parallel
from ..env import REPORT_MARKER, launch_env, restart_env
from . import status as status_file

WATCHDOG_EXIT = 4
LOST_PEER_EXIT = 3  # the exit code of trainer.errors.DistributedError
SIGNAL_GRACE_S = 20.0  # how long a signalled rank may stay blocked before it is ended
ABORT_GRACE_S = 3.0  # after a second Ctrl-C: time for the main thread to record it before the watchdog does
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
CONNECTING = "connecting"

_state = {
    "world": None, "run_dir": None, "timeout": None, "phase": "setup", "step": 0, "watched": False,
    "since": time.monotonic(), "stop": False, "signal": 0, "signal_at": None, "signals": 0,
    "thread": None, "pipe": None, "old_handlers": {}, "old_wakeup": -1, "peers": None, "describe": None,
    "silence": 600.0,
}


class _Monitor:
    """Told by ``trainer.parallel`` before each blocking collective."""

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
    again = name == CONNECTING and _state["phase"] == CONNECTING and _state["watched"]
    _state["phase"] = name
    _state["watched"] = watched
    if step is not None:
        _state["step"] = step
    if not again:  # the group's first exchanges count as one wait, however many collectives they take
        _state["since"] = time.monotonic()
    peers = _state["peers"]
    if peers is not None:
        peers.beat(_state["step"], name)


def current_step() -> int:
    return _state["step"]


def stop_requested() -> bool:
    """True once SIGINT, SIGTERM or SIGHUP arrived, or :func:`request_stop` (the loop then stops cleanly)."""
    return _state["stop"]


def stop_signal() -> int:
    """The signal that asked this rank to stop (0: none, or a stop requested without one)."""
    return _state["signal"]


def request_stop() -> None:
    """Ask for a clean stop after the current update, as SIGTERM does."""
    _state["stop"] = True


def status(world, run_dir: Path, state: str, step: int = 0, reason: str | None = None,
           consequence: bool = False) -> None:
    """Write ``status.json`` where the rules of :mod:`trainer.cluster.status` allow it."""
    status_file.write(world, run_dir, state, step, reason, consequence=consequence)


def _me() -> str:
    world = _state["world"]
    if world is not None:
        return f"rank {world.rank} ({world.host})"
    return f"rank {launch_env().rank} ({socket.gethostname()})"


def describe_failure(error: BaseException) -> str:
    """A sentence for an exception from MLX's distributed backend; else the exception's text."""
    text = str(error)
    world = _state["world"]
    if "connection to a peer was lost" in text or ("[ring]" in text and "lost" in text):
        peers = _state["peers"]
        lost = peers.lost_ranks() if peers is not None else []
        who = (", ".join(f"rank {r}" for r in lost) if lost else
               ("rank " + str(1 - world.rank)) if world is not None and world.size == 2 else "a peer")
        return f"lost {who} during {_state['phase']} at update {_state['step']}: {_me()} stops. {_next_step()}"
    return text


def _next_step() -> str:
    """What continues the run: mlx-dp launch's next restart, or the user's ``--resume``."""
    restart = restart_env()
    if restart.attempt < restart.restarts:
        return "mlx-dp launch restarts the job from the last checkpoint"
    return "Resume from the last checkpoint with --resume"


def failing() -> None:
    """The run is failing: later signals should not announce a clean stop."""
    _state["failing"] = True


def _detach_from_closed_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails (EIO): send its output nowhere,
    so that the stop can still save its checkpoint. Output to files and pipes is kept."""
    devnull = None
    for fd in _state.get("tty_fds", ()):  # found at install: a hung-up terminal no longer says it is one
        try:
            devnull = devnull if devnull is not None else os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
        except OSError:
            pass
    if devnull is not None:
        os.close(devnull)


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _on_signal(signum, frame) -> None:
    _state["signals"] += 1
    if signum == getattr(signal, "SIGHUP", None):
        _detach_from_closed_terminal()
    if _state.get("failing"):
        return
    if _state["stop"] and signum == signal.SIGINT:
        raise KeyboardInterrupt  # second Ctrl-C: stop now
    _state["stop"] = True
    _state["signal"] = _state["signal"] or signum
    if _state["world"] is not None:
        log.urgent(f"{signal.Signals(signum).name}: stopping after this update and saving a checkpoint "
                   "(Ctrl-C again to abort)")


def report_failure(reason: str, blamed=(), connecting: bool = False, final: bool = False) -> None:
    """Hand ``mlx-dp launch --restarts`` this rank's reason and the ranks it blames (one line it takes off).

    Blamed are the ranks given, else the peers the heartbeats found lost or
    silent; ``final``: a restart would fail the same way. Nothing is printed
    when the launcher does not restart.
    """
    if restart_env().restarts <= 0:
        return
    import json

    peers = _state["peers"]
    blamed = list(blamed) or (peers.suspects() if peers is not None else [])
    report = {"cause": reason[:600], "blamed": [int(r) for r in blamed],
              "connecting": connecting or _state["phase"] == CONNECTING, "step": _state["step"], "final": final}
    try:
        print(REPORT_MARKER + json.dumps(report), file=sys.stderr, flush=True)
    except OSError:
        pass


def report_progress(event: str, **fields) -> None:
    """Tell ``mlx-dp launch --restarts`` how the run goes (one line it takes off): ``run`` (rank 0 holds
    ``checkpoint.dir``, so the launcher may record its restarts there) and ``saved`` (a checkpoint, so a
    repeated failure is one that makes progress). Nothing is printed when the launcher does not restart."""
    if restart_env().restarts <= 0:
        return
    import json

    try:
        print(REPORT_MARKER + json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)
    except OSError:
        pass


def _hard_exit(message: str, state: str = "failed", code: int = WATCHDOG_EXIT) -> None:
    log.each(message, name_rank=False)  # the message names the rank and its host
    report_failure(message)
    status(_state["world"], _state["run_dir"], state, step=_state["step"], reason=message)
    os._exit(code)


def _watch() -> None:
    read_fd = _state["pipe"][0]
    interrupts = 0
    while True:
        ready, _, _ = select.select([read_fd], [], [], 1.0)
        now = time.monotonic()
        data = b""
        if ready:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
        if _state["thread"] is not threading.current_thread():
            return  # uninstalled
        for signum in (b for b in data if b in STOP_SIGNALS):
            if signum == getattr(signal, "SIGHUP", None):
                _detach_from_closed_terminal()  # the main thread may be blocked and not see it yet
            _state["signal_at"] = _state["signal_at"] or now
            interrupts += signum == signal.SIGINT
            if interrupts >= 2 and not _state.get("failing"):
                _state["abort_at"] = _state.get("abort_at") or now
        idle = now - _state["since"]
        me = _me()
        if _state.get("abort_at") and now - _state["abort_at"] > ABORT_GRACE_S:
            _hard_exit(f"interrupted: {me} was aborted by a second Ctrl-C while blocked in {_state['phase']} at "
                       f"update {_state['step']}", code=128 + signal.SIGINT)
        if _state["signal_at"] is not None and now - _state["signal_at"] > SIGNAL_GRACE_S \
                and now - _state["since"] > SIGNAL_GRACE_S:
            _hard_exit(f"{me} was signalled to stop but is blocked in {_state['phase']} at update "
                       f"{_state['step']} for {idle:.0f}s; {_stalled_peers_text()}ending it")
        if _state["watched"] and idle > _state["timeout"]:
            if _state["phase"] == CONNECTING:
                describe = _state["describe"]
                _hard_exit(f"{me} could not form the group within parallel.timeout_s={_state['timeout']:g}: "
                           f"{describe() if describe else 'a rank is missing'}", code=LOST_PEER_EXIT)
            _hard_exit(f"watchdog: {me} made no progress for {idle:.0f}s (parallel.timeout_s="
                       f"{_state['timeout']:g}) in {_state['phase']} at update {_state['step']}; "
                       f"{_stalled_peers_text()}ending the job")
        peers, silence = _state["peers"], _state["silence"]
        if _state["watched"] and peers is not None and idle > silence and peers.silent_seconds() > silence:
            _hard_exit(f"watchdog: {me} waited {idle:.0f}s in {_state['phase']} at update {_state['step']} for a "
                       f"peer whose heartbeats stopped over parallel.peer_silence_s={silence:g} ago; "
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


def install(world, run_dir: Path, timeout_s: float, peers=None, describe_connect=None,
            silence_s: float | None = None) -> None:
    """Start the watchdog and signal handling for this rank.

    Args:
        world (trainer.parallel.World | None): The group, or ``None``
            before it formed (then the phase is ``connecting``; see :func:`attach`).
        run_dir (Path): ``checkpoint.dir`` (for ``status.json``).
        timeout_s (float): ``parallel.timeout_s``.
        peers (trainer.cluster.peers.PeerMonitor | None): Heartbeats of the other
            ranks, used to name stalled or lost peers. Default: ``None``.
        describe_connect (callable | None): Says whom this rank waits for
            when the group does not form in time. Default: ``None``.
        silence_s (float | None): ``parallel.peer_silence_s``. Default: ``None``
            (``timeout_s``).
    """
    _state.update(world=world, run_dir=Path(run_dir), timeout=float(timeout_s), step=0, since=time.monotonic(),
                  silence=float(silence_s if silence_s is not None else timeout_s),
                  phase="setup" if world is not None else CONNECTING, watched=False, stop=False, signal=0,
                  signal_at=None, signals=0, peers=peers, failing=False, abort_at=None, describe=describe_connect)
    parallel.set_monitor(_Monitor())
    _state["tty_fds"] = [fd for fd in (1, 2) if _isatty(fd)]
    if threading.current_thread() is threading.main_thread():
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        _state["pipe"] = (read_fd, write_fd)
        _state["old_wakeup"] = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            _state["old_handlers"][sig] = signal.signal(sig, _on_signal)
    else:
        _state["pipe"] = os.pipe()
    thread = threading.Thread(target=_watch, name="mlx-dp-watchdog", daemon=True)
    _state["thread"] = thread
    thread.start()


def attach(world, peers=None) -> None:
    """The group formed: name ranks by it, and watch its first exchanges as part of connecting."""
    _state.update(world=world, peers=peers)
    phase(CONNECTING)


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
        if peers.strangers:
            log.each(f"the heartbeat channel dropped {peers.strangers} connection(s) or line(s) that did not come "
                     "from this job")
