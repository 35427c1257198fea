"""A run directory is ours, or it is refused; and no file in it is written through a link.

``checkpoint.dir`` receives adapters, checkpoints, ``metrics.jsonl``,
``status.json`` and the recipe. Before a run writes anything there, rank 0
checks that the folder is one it may write (:func:`check_place_and_contents`,
before it takes the folder's lock; :func:`check_earlier_run`, once it holds it):

* never ``/`` or a home directory, whatever the flags;
* new, empty, or an mlx-dp run folder; any other folder with files in it is
  refused unless ``--overwrite`` says to write there anyway;
* owned by this user and writable by nobody else (as for ``MLX_DP_CACHE``):
  in a folder others can write, they can plant a link where a run will write;
* none of the names a run writes is a symbolic link;
* an earlier run that left checkpoints or adapters is continued with
  ``--resume`` (or, under ``mlx-dp launch --restarts``, by a later attempt of
  the same launch); otherwise it is refused in one sentence, or, with
  ``--overwrite``, its files are removed and the run starts over.

Every file is then written without following links: whole files through a
temporary created exclusively (``O_EXCL | O_NOFOLLOW``) and renamed into
place (:func:`write_atomic`), appends with ``O_NOFOLLOW`` (:func:`open_append`).
"""

import errno
import json
import os
import shutil
import stat
from pathlib import Path

from ..errors import CheckpointError

# What a run writes at the top of checkpoint.dir (and what marks a folder as an mlx-dp run's).
RUN_FILES = ("status.json", "run.lock", "metrics.jsonl", "config.yaml", "adapters.safetensors", "adapter_config.json",
             "checkpoints")
MARKERS = ("status.json", "run.lock", "checkpoints")  # only mlx-dp writes these together with its others


def owner_name(uid: int) -> str:
    """A user's name for messages (``uid N`` where the system does not know it)."""
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


def home_dirs() -> set:
    """Every user's home directory on this machine, and this user's."""
    homes = {Path.home().resolve()}
    try:
        import pwd

        homes |= {Path(entry.pw_dir).resolve() for entry in pwd.getpwall() if entry.pw_dir not in ("", "/")}
    except ImportError:
        pass
    return homes


def _refuse(run_dir: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint.dir {run_dir} {why}")


def check_place(run_dir: Path) -> None:
    """Not ``/``, not a home directory, not a file, owned by this user and writable by nobody else."""
    resolved = run_dir.resolve()
    if resolved == Path(resolved.anchor):
        raise _refuse(run_dir, "is the root of the file system; give a folder of its own, e.g. runs/my-run")
    if resolved in home_dirs():
        raise _refuse(run_dir, "is a home directory; give a folder of its own inside it, e.g. ~/runs/my-run")
    if not resolved.exists():
        return
    info = resolved.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise _refuse(run_dir, "is a file, not a folder")
    if info.st_uid != os.geteuid():
        raise _refuse(run_dir, f"belongs to {owner_name(info.st_uid)}, not to you; a run writes only into a folder "
                               "of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _refuse(run_dir, f"can be written by other users (mode {stat.S_IMODE(info.st_mode):o}), who could "
                               f"plant a link where the run writes; run chmod go-w {resolved}")
    for name in RUN_FILES + tuple(p.name for p in resolved.glob("metrics.rank*.jsonl")):
        if (resolved / name).is_symlink():
            raise _refuse(run_dir, f"holds {name} as a symbolic link (to {os.readlink(resolved / name)}); mlx-dp "
                                   "writes no file of a run through a link: remove it")


def is_run_folder(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds an mlx-dp run's files (or nothing)."""
    try:
        names = set(os.listdir(run_dir))
    except FileNotFoundError:
        return True
    except NotADirectoryError as e:  # it, or a folder above it, is a file
        raise CheckpointError(f"checkpoint.dir {run_dir} is not writable: {e.strerror}") from None
    return not names or bool(names & set(MARKERS))


def earlier_run(run_dir: Path) -> str | None:
    """What an earlier run left that a fresh start would replace (its checkpoints, adapters), or ``None``."""
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() \
        else []
    if not steps and not (run_dir / "adapters.safetensors").exists():
        return None
    try:
        record = json.loads((run_dir / "status.json").read_text())
        state = f"{record['state']} at update {record['step']}"
    except (OSError, ValueError, KeyError, TypeError):
        state = "with no readable status.json"
    kept = f"{len(steps)} checkpoint(s), the newest {steps[-1]}" if steps else "its adapters"
    return f"a run ({state}; {kept})"


def check_place_and_contents(run_dir: Path, overwrite: bool) -> None:
    """Before the run takes the folder's lock: a place it may write, holding nothing but an mlx-dp run.

    Raises:
        CheckpointError: One sentence naming the folder and what to do.
    """
    run_dir = Path(run_dir)
    check_place(run_dir)
    if not overwrite and not is_run_folder(run_dir):
        names = sorted(os.listdir(run_dir))
        raise _refuse(run_dir, f"already holds files that are not an mlx-dp run ({', '.join(names[:4])}"
                               f"{', ...' if len(names) > 4 else ''}); choose a new or empty folder, or pass "
                               "--overwrite to write there anyway")


def check_earlier_run(run_dir: Path, resume: bool, overwrite: bool, same_launch: bool = False) -> list[str]:
    """Once the lock is held (no live run is there): refuse to replace an earlier run's checkpoints silently.

    Args:
        run_dir (Path): ``checkpoint.dir``.
        resume (bool): This run continues a checkpoint (``--resume``).
        overwrite (bool): ``--overwrite``: start an earlier run over (its files are removed).
        same_launch (bool): A restart of ``mlx-dp launch --restarts``: the earlier run is this launch's.

    Returns:
        list[str]: What ``overwrite`` removed, for the start-up note.

    Raises:
        CheckpointError: One sentence naming the folder and what to do.
    """
    found = earlier_run(Path(run_dir))
    if found is None or resume or same_launch:
        return []
    if not overwrite:
        raise _refuse(run_dir, f"holds {found}; continue it with --resume (raise training.steps to train longer), "
                               "choose another checkpoint.dir, or pass --overwrite to start over there")
    return clear_run(Path(run_dir))


def clear_run(run_dir: Path) -> list[str]:
    """Remove an earlier run's files (``--overwrite``); other files stay. Returns the names removed."""
    removed = []
    for entry in sorted(run_dir.iterdir()):
        ours = entry.name in RUN_FILES or entry.name.startswith("metrics.rank")
        if not ours or entry.name == "run.lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def _link_error(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} is a symbolic link; mlx-dp writes no file of a run through a link: remove it")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole: a temporary made exclusively (never through a link), fsynced, renamed over it.

    The rename replaces a link at ``path`` itself, never its target; a reader sees the old file or the new
    one, whole.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        os.unlink(tmp)  # a leftover of this pid, or a planted link: removing it never touches a target
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_append(path: Path):
    """``path`` opened for appending text, created if missing, never through a link.

    Raises:
        CheckpointError: ``path`` is a symbolic link.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_error(Path(path)) from None
        raise
    return os.fdopen(fd, "a")


def open_update(path: Path):
    """An existing ``path`` opened for rewriting in place (binary), never through a link."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_error(Path(path)) from None
        raise
    return os.fdopen(fd, "r+b")
