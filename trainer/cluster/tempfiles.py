"""The temporary files of a launch's ranks on this machine: made in a private folder, gone when it ends.

Where MLX's scripts put their temporary files: each rank's script makes a
pidfile and, for the ring backend, its hostfile with a bare ``mktemp``, in the
system's temporary folder, and a rank that dies before its Python starts, or a
launcher killed outright, leaves them there. For ranks on this machine they go
into a private folder of this launch instead (:func:`launch_folder`), which the
supervisor empties when an attempt ends and the launch removes when it exits;
a launch also sweeps the folders that dead launchers left behind.
"""

import calendar
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT_PREFIX = "mlx-dp-launch-"  # <tempdir>/mlx-dp-launch-<uid>/: the launch folders of one user
FOLDER_NAME = re.compile(r"(\d+)-(\d+)-[A-Za-z0-9_]+")


def private_mktemp(folder: str) -> str:
    """Bash that makes the script's bare ``mktemp`` create its files in ``folder``, named ``tmp.*`` as before.

    A function defined ahead of MLX's script, rather than an edit of its text, so
    that nothing the user wrote (an ``--env`` value, the command) can be changed.
    It lives only in the script's shell: the command is exec'd as a program and
    never sees it. Should the folder be gone, the files go where MLX puts them.
    """
    template = shlex.quote(os.path.join(folder, "tmp.XXXXXXXXXX"))
    return f"mktemp() {{ command mktemp {template} 2>/dev/null || command mktemp; }}; "


def _start_token(pid: int) -> str | None:
    """When process ``pid`` started, as digits that tell it from a later process with the same pid.

    Linux: clock ticks after boot (``/proc``); elsewhere (macOS): seconds since
    the epoch, from ``ps -o lstart``. ``""``: no such process (or only its
    zombie); ``None``: it cannot be told.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # state is field 3, start 22
        return "" if fields[0] == "Z" else fields[19]
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return ""
    except (OSError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except PermissionError:
        pass
    try:
        text = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5,
                              env={**os.environ, "LC_ALL": "C", "TZ": "UTC0"}).stdout.strip()
        return str(calendar.timegm(time.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y")))
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def _launcher_gone(name: str) -> bool:
    """Whether the launcher that made the launch folder ``name`` has ended (when in doubt: it has not)."""
    pid, started = FOLDER_NAME.fullmatch(name).group(1, 2)
    now = _start_token(int(pid))
    if now is None or (now and started == "0"):  # its start time, or ours when it was made, is unknown
        return False
    return now != started


def sweep(root: str) -> list[str]:
    """Remove the launch folders in ``root`` whose launcher has ended; return their paths.

    Only this user's folders named as :func:`launch_folder` names them are
    touched, and a symbolic link is never followed (``rmtree`` does not follow
    the links inside either).
    """
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not FOLDER_NAME.fullmatch(entry.name) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            continue
        if _launcher_gone(entry.name):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def empty_folder(folder: str) -> None:
    """Remove what is in ``folder`` (a launch folder, between attempts), never following a link."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def _private_root(tempdir: str) -> tuple[str | None, str]:
    """``<tempdir>/mlx-dp-launch-<uid>``, made if missing, and private; or ``None`` and why it cannot be used."""
    root = os.path.join(tempdir, f"{ROOT_PREFIX}{os.geteuid()}")
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        return None, f"cannot make {root} ({e.strerror or e})"
    try:
        info = os.lstat(root)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            return None, f"{root} is not a folder of this user's"
        if info.st_mode & 0o077:
            os.chmod(root, 0o700)
    except OSError as e:
        return None, f"cannot use {root} ({e.strerror or e})"
    return root, ""


@contextmanager
def launch_folder(warn=None, tempdir: str | None = None):
    """A private folder for the temporary files of this launch's ranks on this machine; removed at exit.

    ``<tempdir>/mlx-dp-launch-<uid>/<pid>-<start time>-<random>/``, mode 0o700.
    Each rank's script makes its pidfile and, for the ring backend, its hostfile
    there (``RankSpec.temp_dir``); the supervisor empties the folder when an
    attempt ends (every attempt under ``--restarts``), and it is removed when the
    block ends: normally, on an error, or on SIGTERM or SIGHUP, which end the
    block as ``SystemExit(128 + N)`` while no supervisor has caught them. Before,
    the folders of launchers that have ended (killed with SIGKILL, say) are swept.

    Remote ranks (ssh) keep MLX's bare ``mktemp`` in their host's temporary
    folder: their pidfile is removed over ssh when the rank ends
    (``relay.Rank.finish``), their ring hostfile by the trainer once MLX has read
    it (``trainer.env.consume_hostfile``). Nothing is swept there: a remote rank
    that dies before its Python starts leaves its hostfile, and a launcher killed
    outright leaves its remote ranks' pidfiles (nothing of it runs there to remove them).

    Args:
        warn (Callable[[str], None] | None): Told, in one sentence, why no private
            folder could be made; the block then gets ``None`` (files go where MLX puts
            them). Default: ``None`` (silent).
        tempdir (str | None): Default: ``None`` (``tempfile.gettempdir()``).

    Yields:
        str | None: The folder.
    """
    handlers, folder = _exit_on_signals(), None
    try:
        root, why = _private_root(tempdir or tempfile.gettempdir())
        if root is None:
            if warn is not None:
                warn(f"{why}; temporary files of the ranks go where mlx.launch puts them")
        else:
            sweep(root)
            folder = tempfile.mkdtemp(prefix=f"{os.getpid()}-{_start_token(os.getpid()) or 0}-", dir=root)
        yield folder
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _exit_on_signals() -> dict:
    """SIGTERM and SIGHUP raise ``SystemExit(128 + N)`` (so ``finally`` runs); the handlers they replace."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}


