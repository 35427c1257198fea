"""Native code is loaded only from places only this user (or root) can write.

Three places hold native code that this process loads: mlx-dp's cache
(``$MLX_DP_CACHE``, default ``~/.cache/mlx-dp``: the OpenBLAS shim, and with
``MLX_DP_JIT=avx2`` MLX's kernels), and the folder where MLX's CPU backend
compiles its fused kernels and loads them back (``$TMPDIR/mlx``: MLX's own
choice, ``std::filesystem::temp_directory_path() / "mlx"`` in
``mlx/backend/cpu/jit_compiler.cpp``). Anyone who can write there can put a
library there that runs as this user: another user who created ``/tmp/mlx``
first, say.

So, as OpenSSH's ``StrictModes`` does for ``~/.ssh``, a path is trusted only
when it and every folder above it are owned by this user or root and writable
by nobody else (a world-writable folder with the sticky bit, such as ``/tmp``,
is fine above it: there others cannot rename or replace what is ours).
:func:`private_dir` makes such a folder (mode 0700) or says in one sentence
why an existing one cannot be trusted.
"""

import os
import stat
from pathlib import Path

from ..errors import UserError


class UntrustedPath(UserError):
    """A folder or file native code would be loaded from can be written by someone else."""


def _owner(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


def why_untrusted(path: Path, leaf: bool = True) -> str | None:
    """Why ``path`` (and the folders above it) may hold someone else's code, or ``None`` when it cannot.

    Args:
        path (Path): An existing file or folder.
        leaf (bool): ``path`` itself must not be writable by others even with a sticky bit
            (it holds the code). Default: ``True``.
    """
    me = os.geteuid()
    current = Path(os.path.abspath(path))
    first = True
    while True:
        try:
            info = current.lstat()
        except OSError as e:
            return f"{current} cannot be read ({e.strerror or e})"
        if stat.S_ISLNK(info.st_mode):
            target = current.resolve()
            return why_untrusted(target, leaf=first and leaf)
        if info.st_uid not in (me, 0):
            return f"{current} belongs to {_owner(info.st_uid)}, not to you"
        others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
        if others and ((first and leaf) or not sticky):
            return f"{current} can be written by other users (mode {stat.S_IMODE(info.st_mode):o})"
        if current.parent == current:
            return None
        current, first = current.parent, False


def private_dir(path: Path, what: str) -> Path:
    """``path`` as a folder only this user can write: made (0700) if missing, else checked.

    Args:
        path (Path): The folder.
        what (str): What it holds, for the message (``"MLX's compiled kernels"``).

    Raises:
        UntrustedPath: One sentence naming the path that someone else could write.
    """
    path = Path(path)
    if not path.exists():
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:  # made meanwhile, by us or by someone else: checked below
            pass
        except OSError as e:
            raise UntrustedPath(f"cannot make {path} for {what}: {e.strerror or e}") from None
    reason = why_untrusted(path)
    if reason:
        raise UntrustedPath(f"refusing to load {what} from {path}: {reason}; remove it or choose another "
                            "folder (MLX_DP_CACHE for mlx-dp's cache, TMPDIR for MLX's kernels)")
    return path


def check_file(path: Path, what: str) -> Path:
    """``path``, a file about to be loaded, when only this user (or root) can have written it.

    Raises:
        UntrustedPath: One sentence naming the path.
    """
    reason = why_untrusted(Path(path))
    if reason:
        raise UntrustedPath(f"refusing to load {what} {path}: {reason}")
    return Path(path)


def mlx_kernel_dir() -> Path:
    """Where MLX's CPU backend compiles and loads its fused kernels: ``$TMPDIR/mlx`` (MLX's rule)."""
    import tempfile

    return Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / "mlx"
