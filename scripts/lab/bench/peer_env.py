"""The peer's own environment for the side-by-side benchmarks: made once, with pip, beside ours.

A peer (mlx-lm-lora) must never run in our environment: it pins its own
dependencies, and we would measure a mix. :func:`ensure_peer_python` makes a
virtual environment at ``DIR`` for ``DIR/bin/python`` when it is missing, and
installs the peer with the same ``mlx`` and ``mlx-lm`` versions as ours (so
both sides run the same kernels; the versions are recorded in every result).
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from trainer.errors import UserError


def pins() -> list[str]:
    """Our ``mlx`` (the CPU wheel where ours is one) and ``mlx-lm`` versions, as pip requirements."""
    out = []
    for name in ("mlx", "mlx-lm"):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        extra = "[cpu]" if name == "mlx" and _installed("mlx-cpu") else ""
        out.append(f"{name}{extra}=={version}")
    return out


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def ensure_peer_python(python: str, requirement: str) -> Path:
    """``python`` if it exists; else a new venv at its ``../..`` with ``requirement`` and :func:`pins` installed.

    Raises:
        UserError: ``python`` is not ``DIR/bin/python``, or the venv or install failed.
    """
    path = Path(python)
    if path.is_file():
        return path
    if path.parent.name != "bin":
        raise UserError(f"no peer Python at {python}; give --peer-python DIR/bin/python to have one made at DIR")
    home = path.parent.parent
    print(f"[bench] making the peer's environment: {home} with {requirement} {' '.join(pins())}", flush=True)
    steps = [[sys.executable, "-m", "venv", str(home)],
             [str(home / "bin" / "python"), "-m", "pip", "install", "-q", requirement, *pins()]]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"{' '.join(argv[:4])} ... failed: {done.stderr.strip()[-300:]}")
    if not path.is_file():
        raise UserError(f"the new environment at {home} has no {path.name}")
    return path
