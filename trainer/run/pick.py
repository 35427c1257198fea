"""Which checkpoint a resume continues from, the same on every rank, whether or not its disk holds it.

* :func:`pick_checkpoint`: the newest intact checkpoint (of one launch, for a restart);
* :func:`restart_resume`: what an automatic restart continues;
* :func:`shared_resume` and :func:`pick_shared`: rank 0 decides, every rank follows.

Only rank 0 writes checkpoints. On one Mac, or with ``checkpoint.dir`` on a
shared folder, every rank reads the same files; on a desk cluster whose Macs
each have their own disk, only rank 0 has them. Left to itself, each rank
would pick from what its disk holds: rank 1 would start fresh beside a rank 0
that resumed, and the agreement check would stop the job, every time, so
neither ``--resume`` nor ``mlx-dp launch --restarts`` could continue it.

So rank 0 decides, and the others follow:

1. :func:`shared_resume`: rank 0's resume request (from ``--resume`` or a
   restart) becomes every rank's.
2. :func:`pick_shared`: rank 0 picks the checkpoint (skipping damaged ones,
   :func:`pick_checkpoint`) and names it with its manifest's
   hash. A rank whose disk holds the same files (the same manifest, verified)
   loads its own; the others get rank 0's files over the job's own collective
   (``World.broadcast_bytes``), into a private temporary folder, verified against
   the manifest before they are loaded. Nothing is written into a non-zero
   rank's ``checkpoint.dir``.

The copy moves the checkpoint once over the ring: adapters are megabytes; a
full fine-tune's weights and optimizer state are a few times the model, which
10 GbE moves in seconds per GB.
"""

import atexit
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import log
from ..state import checkpoint
from ..errors import CheckpointError


def pick_checkpoint(run_dir: Path, explicit: str | None, job: str = "") -> tuple[checkpoint.Checkpoint, list[str]]:
    """The newest checkpoint that is intact and loads (of launch ``job``, when given), and notes on those skipped.

    Raises:
        CheckpointError: None is intact (each one's reason is given), or the
            one named explicitly is not.
    """
    candidates = checkpoint.resume_candidates(run_dir, explicit)
    if job:
        candidates = [p for p in candidates if _written_by(p) == job]
        if not candidates:
            raise CheckpointError(f"no checkpoint of this launch in {run_dir / checkpoint.CHECKPOINTS}")
    skipped = []
    for path in candidates:
        problem = checkpoint.verify(path)
        if problem is None:
            try:
                return checkpoint.load_checkpoint(path), skipped
            except CheckpointError as e:
                problem = str(e)
        if explicit and len(candidates) == 1:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        skipped.append(f"{path.name}: {problem}")
    raise CheckpointError(f"no intact checkpoint to resume in {candidates[0].parent}: " + "; ".join(skipped))


@dataclass(frozen=True)
class LaunchCheckpoints:
    """Resume from the newest intact checkpoint written by launch ``job`` (an automatic restart)."""

    job: str


def _written_by(path: Path) -> str:
    try:
        return str(json.loads((path / "state.json").read_text()).get("job") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def restart_resume(run_dir: Path, job: str, resume):
    """What an automatic restart resumes from: this launch's newest intact checkpoint, else as first asked.

    A restart (``mlx-dp launch --restarts``) must continue the training the
    launch started, never an older run's: so the checkpoints it may take are
    those this launch wrote (``state.json``'s ``job``). Before the first of
    them exists, the restart does what the first start did (start fresh, or
    resume what ``--resume`` named).

    Returns:
        LaunchCheckpoints | str | bool | None: This launch's checkpoints, or ``resume`` unchanged.
    """
    if job and any(_written_by(p) == job for p in checkpoint.list_checkpoints(run_dir)):
        return LaunchCheckpoints(job)
    return resume


def _encode(resume) -> dict:
    if isinstance(resume, LaunchCheckpoints):
        return {"job": resume.job}
    return {"resume": resume if resume is None or isinstance(resume, (bool, str)) else str(resume)}


def shared_resume(world, resume):
    """Rank 0's resume request on every rank (``None``, ``True``, a path or :class:`LaunchCheckpoints`)."""
    if world.size == 1:
        return resume
    sent = json.loads(world.all_gather_bytes(json.dumps(_encode(resume)).encode(), phase="resume")[0])
    return LaunchCheckpoints(sent["job"]) if "job" in sent else sent["resume"]


def _manifest_hash(path: Path) -> str:
    return hashlib.sha256((path / checkpoint.MANIFEST).read_bytes()).hexdigest()


def _holds(path: Path, manifest: str) -> bool:
    """Whether this disk holds the checkpoint rank 0 named: the same manifest, and files that match it."""
    try:
        return path.is_dir() and _manifest_hash(path) == manifest and checkpoint.verify(path) is None
    except OSError:
        return False


def _private_copy() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="mlx-dp-resume-"))  # mode 700: this user's alone
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def pick_shared(world, run_dir: Path, explicit: str | None, job: str = "") -> tuple[checkpoint.Checkpoint, list]:
    """The checkpoint rank 0 resumes from, loaded on every rank, and rank 0's notes on those it skipped.

    Every rank must call this. Raises ``CheckpointError`` on every rank when
    rank 0 finds no intact checkpoint (rank 0 with the reason, the others
    pointing at it), or when a copy arrives damaged.
    """
    if world.size == 1:
        return pick_checkpoint(run_dir, explicit, job=job)
    picked, skipped, error = None, [], None
    if world.rank == 0:
        try:
            picked, skipped = pick_checkpoint(run_dir, explicit, job=job)
        except CheckpointError as e:
            error = e
    named = {}
    if world.rank == 0:
        named = {"error": str(error)} if error else {"path": _as_sent(picked.path, run_dir),
                                                      "manifest": _manifest_hash(picked.path)}
    named = json.loads(world.all_gather_bytes(json.dumps(named).encode(), phase="resume")[0])
    if "error" in named:
        raise error or CheckpointError(f"rank 0 found no checkpoint to resume: {named['error']}")
    path = run_dir / named["path"][1] if named["path"][0] == "run" else Path(named["path"][1])
    have = world.rank == 0 or _holds(path, named["manifest"])
    missing = [r for r, ok in enumerate(world.all_gather_bytes(b"1" if have else b"0", phase="resume")) if ok == b"0"]
    if missing:
        log.info(f"rank(s) {', '.join(map(str, missing))} do not hold checkpoint {path.name}: "
                     "sending them rank 0's copy")
        path = _receive(world, picked.path if world.rank == 0 else None, keep=world.rank in missing)
    if world.rank == 0:
        return picked, skipped
    if _manifest_hash(path) != named["manifest"] or checkpoint.verify(path) is not None:
        raise CheckpointError(f"the copy of checkpoint {named['path'][1]} from rank 0 arrived damaged "
                              f"({checkpoint.verify(path) or 'another manifest'}); resume again")
    return checkpoint.load_checkpoint(path), []


def _as_sent(path: Path, run_dir: Path) -> tuple:
    """A checkpoint's place as the other ranks look for it: inside the run directory relative to it (each
    rank's ``checkpoint.dir``, whose ``~`` may differ), else the path given to ``--resume``."""
    try:
        return ("run", str(path.resolve().relative_to(run_dir.resolve())))
    except ValueError:
        return ("path", str(path))


def _receive(world, source: Path | None, keep: bool) -> Path | None:
    """Rank 0's checkpoint files in a private folder on the ranks that ``keep`` them; ``source`` on rank 0."""
    names = sorted(p.name for p in source.iterdir() if p.is_file()) if source is not None else None
    names = json.loads(world.broadcast_bytes(json.dumps(names).encode() if names is not None else None,
                                             phase="resume copy"))
    folder = _private_copy() if keep else None
    for name in names:
        data = world.broadcast_bytes((source / name).read_bytes() if source is not None else None,
                                     phase="resume copy")
        if folder is not None:
            (folder / Path(name).name).write_bytes(data)
    return source if source is not None else folder
