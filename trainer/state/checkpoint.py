"""Checkpoints that resume exactly, written atomically by rank 0.

Layout of ``checkpoint.dir``::

    adapters.safetensors, adapter_config.json   latest weights, mlx-lm format
    config.yaml                                  the resolved recipe
    metrics.jsonl, status.json                   reports and the run's state
    checkpoints/step_0000100/                    one resumable checkpoint:
        adapters.safetensors, adapter_config.json   (loadable by mlx-lm too)
        optimizer.safetensors                       optimizer state (incl. step)
        state.json                                  TrainingState: progress, RNG, world, versions
        config.yaml                                 the recipe it was trained with
        manifest.json                               sha256 and size of each file above

A checkpoint directory is written under a temporary name, every file is
fsynced, and then it is renamed into place, so a crash mid-save never damages
an earlier checkpoint. Its manifest lets resume tell an intact checkpoint from
one whose bytes changed on disk (:func:`verify`); resume then falls back to
the newest intact one. Arrays are safetensors and metadata JSON; no pickle.

Temporaries carry the writer's pid in their names (``.tmp-step_*-PID``,
``.write-test-PID``, ``.NAME.tmpPID``), so a later run can tell a dead
writer's leftovers from a live one's (:func:`clean_stale_temporaries`).
"""

import errno
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import CheckpointError
from .progress import TrainingState

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"
MANIFEST = "manifest.json"
REQUIRED_FILES = ("adapters.safetensors", "optimizer.safetensors", "state.json")
STALE_TEMP_S = 3600.0  # a temporary this old is a leftover whatever its pid says (pids are reused)
_TEMP_NAMES = (re.compile(r"^\.tmp-step_\d+-(\d+)$"), re.compile(r"^\.write-test-(\d+)$"),
               re.compile(r"^\..+\.tmp(\d+)(\.safetensors)?$"))


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write a file atomically (temporary file, fsync, rename): a reader sees the old or the new one whole."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (:func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _save_arrays(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata or {})
    except RuntimeError as e:  # MLX reports a failed write ("[write] Unable to write ...") without an errno
        raise OSError(errno.ENOSPC if _nearly_full(path.parent) else errno.EIO, str(e)) from None
    _fsync_file(path)


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 1024 * 1024
    except OSError:
        return False


def describe_os_error(e: OSError, directory: Path) -> str:
    """Words for a failed write: a full disk says so, with the space left."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f" ({shutil.disk_usage(directory).free / 1e6:.1f} MB free)"
        except OSError:
            free = ""
        return f"no space left on the device holding {directory}{free}"
    return e.strerror or str(e)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (``True`` when unsure).

    A zombie has ended (only its parent has yet to collect its exit status): a rank whose launcher was
    killed outright lingers so until something reaps it, and it writes nothing any more.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): it exists
        return True


def clean_stale_temporaries(run_dir: Path, max_age_s: float = STALE_TEMP_S) -> list[str]:
    """Remove temporaries left by writers that died (pid gone) or long ago; return their names.

    Only names this module writes are touched (see the module docstring),
    and never one whose writer is alive and recent: another rank of this run
    on the same machine may be writing it.
    """
    run_dir = Path(run_dir)
    removed = []
    now = time.time()
    for folder in (run_dir, run_dir / CHECKPOINTS):
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            match = next((m for m in (p.match(entry.name) for p in _TEMP_NAMES) if m), None)
            if match is None or int(match.group(1)) == os.getpid():
                continue
            try:
                old = now - entry.lstat().st_mtime > max_age_s
            except OSError:
                continue
            if old or not process_alive(int(match.group(1))):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(str(entry.relative_to(run_dir)))
    return removed


def check_writable(run_dir: Path, min_free_bytes: int = 0) -> None:
    """Fail early if the run directory cannot hold checkpoints.

    Args:
        run_dir (Path): ``checkpoint.dir``.
        min_free_bytes (int): Space one checkpoint needs. Default: ``0``.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint.dir {run_dir} is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(run_dir).free
    if free < min_free_bytes:
        raise CheckpointError(f"checkpoint.dir {run_dir} has {free / 1e6:.0f} MB free but a checkpoint needs "
                              f"about {min_free_bytes / 1e6:.0f} MB")


def save_adapters(directory: Path, weights: dict, adapter_config: dict) -> None:
    """Write ``adapters.safetensors`` + ``adapter_config.json`` (mlx-lm's format), each atomically.

    Raises:
        CheckpointError: The write failed (a full disk says so); nothing partial is left.
    """
    tmp = directory / f".adapters.safetensors.tmp{os.getpid()}.safetensors"
    try:
        _save_arrays(tmp, weights)
        os.replace(tmp, directory / "adapters.safetensors")
        write_json(directory / "adapter_config.json", adapter_config)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write the adapters in {directory}: {describe_os_error(e, directory)}") \
            from None


def save_checkpoint(run_dir: Path, state: TrainingState, weights: dict, optimizer_state: dict,
                    adapter_config: dict, config_yaml: str, on_partial=None) -> Path:
    """Write one resumable checkpoint atomically; return its directory.

    Args:
        run_dir (Path): ``checkpoint.dir``.
        state (TrainingState): Progress and provenance; ``state.step`` names the directory.
        weights (dict): Flat trainable weights.
        optimizer_state (dict): ``optimizer.state`` (a tree).
        adapter_config (dict): mlx-lm adapter config.
        config_yaml (str): The resolved recipe.
        on_partial (callable | None): Called once the weights are written but
            before the rest (a seam for fault injection: a crash mid-save). Default: ``None``.
    """
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(state.step)
    tmp = root / f".tmp-{step_dir_name(state.step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        _save_arrays(tmp / "adapters.safetensors", weights)
        if on_partial is not None:
            on_partial()
        write_json(tmp / "adapter_config.json", adapter_config)
        _save_arrays(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer_state)))
        (tmp / "config.yaml").write_text(config_yaml)
        _fsync_file(tmp / "config.yaml")
        write_json(tmp / "state.json", state.to_dict())
        write_json(tmp / MANIFEST, manifest(tmp))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = [p.name for p in list_checkpoints(run_dir) if p != final]
        kept = f"; the partial checkpoint was removed, {earlier[-1]} is intact" if earlier else \
            "; the partial checkpoint was removed"
        raise CheckpointError(f"could not write checkpoint {final}: {describe_os_error(e, root)}{kept}") from None
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def manifest(directory: Path) -> dict:
    """sha256 and size of every file in a checkpoint directory (the manifest itself excepted)."""
    files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != MANIFEST}
    return {"format": 1, "algorithm": "sha256", "files": files}


def verify(path: Path) -> str | None:
    """Why checkpoint ``path`` is not intact, or ``None``.

    Every file its manifest lists must exist with the recorded size and
    sha256, and the files a checkpoint needs must be listed. A checkpoint
    without a readable manifest is never trusted: nothing would tell damaged
    weights from good ones (they would load, and fail updates later for a
    reason that names the wrong cause).
    """
    path = Path(path)
    listing = path / MANIFEST
    if not listing.is_file():
        return f"it has no {MANIFEST}, so its files cannot be checked"
    try:
        files = json.loads(listing.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} cannot be read"
    unlisted = [name for name in REQUIRED_FILES if name not in files]
    if unlisted:
        return f"its {MANIFEST} does not list {', '.join(unlisted)}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} is truncated or corrupt ({size} bytes, written with {expected['bytes']})"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 checksum (its bytes changed after it was written)"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def prune(run_dir: Path, keep_last: int, keep: set[Path] = frozenset()) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, sparing ``keep``."""
    found = list_checkpoints(run_dir)
    for path in found[:-keep_last]:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def load_arrays(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return mx.load(str(path))
    except Exception as e:  # truncated or corrupt safetensors
        raise CheckpointError(f"checkpoint file {path} ({what}) cannot be read; it is truncated or corrupt "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


@dataclass
class Checkpoint:
    """One checkpoint read back: arrays, the training state and where it came from."""

    weights: dict
    optimizer: dict  # a tree, as optimizer.state
    state: TrainingState
    path: Path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint directory (format 2, or format 1 with its ``rng.safetensors``)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no state.json)")
    try:
        raw = json.loads((path / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'state.json'} is not valid JSON ({e.msg})") from None
    rng_key = None
    if (path / "rng.safetensors").is_file():  # format 1 kept the key in its own file
        rng_key = tuple(int(x) for x in load_arrays(path / "rng.safetensors", "random state")["state.0"].tolist())
    try:
        state = TrainingState.from_dict(raw, rng_key=rng_key)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'state.json'} is not a training state this mlx-dp reads "
                              f"({type(e).__name__}: {e})") from None
    return Checkpoint(weights=load_arrays(path / "adapters.safetensors", "weights"),
                      optimizer=tree_unflatten(list(load_arrays(path / "optimizer.safetensors",
                                                                 "optimizer state").items())),
                      state=state, path=path)


def resume_candidates(run_dir: Path, explicit: str | None) -> list[Path]:
    """Checkpoints to try for a resume, best first.

    ``explicit`` names one checkpoint (only that one is tried) or a run
    directory; without it, ``run_dir``. A run directory yields its
    checkpoints newest first, so a damaged newest one falls back to the one
    before (see :func:`verify`).
    """
    if explicit:
        path = Path(explicit)
        if path.is_dir() and not (path / "state.json").exists() and list_checkpoints(path):
            return list(reversed(list_checkpoints(path)))  # a run directory was given
        if not path.exists():
            raise CheckpointError(f"--resume {explicit}: no such checkpoint")
        return [path]
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS}")
    return list(reversed(found))


def check_weights_match(weights: dict, trainable: dict, source: Path) -> None:
    """Refuse a checkpoint whose tensors do not fit this model's trainable parameters."""
    missing = sorted(set(trainable) - set(weights))
    extra = sorted(set(weights) - set(trainable))
    wrong = sorted(k for k in set(weights) & set(trainable) if weights[k].shape != trainable[k].shape)
    if missing or extra or wrong:
        detail = (f"{len(missing)} missing" if missing else "") + (f", {len(extra)} unexpected" if extra else "") \
            + (f", {len(wrong)} of another shape (e.g. {wrong[0]} {tuple(weights[wrong[0]].shape)} vs "
               f"{tuple(trainable[wrong[0]].shape)})" if wrong else "")
        raise CheckpointError(f"checkpoint {source} does not fit this model and method "
                              f"({detail.strip(', ')}); it comes from a different model or recipe")
