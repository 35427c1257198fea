"""The launcher's environment: which launcher started this process, as which rank, on which backend.

Launchers tell each rank where it stands through environment variables:

* ``mlx.launch`` and ``mlx-dp launch`` set ``MLX_RANK`` and, per backend,
  ``MLX_HOSTFILE`` (ring: a JSON list of ``"ip:port"`` lists, one per rank;
  empty for one rank), ``MLX_JACCL_COORDINATOR`` (jaccl) or ``NCCL_HOST_IP``,
  ``NCCL_PORT`` and ``MLX_WORLD_SIZE`` (nccl); ``mlx-dp launch`` also sets
  ``MLX_DP_LAUNCHER``;
* ``mpirun`` sets ``OMPI_COMM_WORLD_RANK``/``_SIZE`` (or ``PMI_RANK``/``_SIZE``).

This module is the only one that reads them; every other module asks
:func:`launch_env`. It is also the one place that writes the process's
environment (:func:`set_library_defaults`, :func:`use_kernel_toolchain`,
:func:`drop_blank_hostfile`, :func:`consume_hostfile`), so what mlx-dp changes
of the process it runs in can be read in one sitting. It imports nothing but
the standard library, so the CLI can use it before MLX is loaded.
"""

import json
import os
from dataclasses import dataclass, field

# Set by ``mlx-dp launch`` on every rank it starts, so a rank can tell its launcher apart.
LAUNCHER_VAR = "MLX_DP_LAUNCHER"
RANK_VARS = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
SIZE_VARS = ("MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process.

    Attributes:
        rank: This process's rank (0 without a launcher).
        world_size: Ranks in the job, where the environment says (ring
            hostfile, MLX_WORLD_SIZE, MPI); ``None`` when only MLX knows.
        launcher: ``"mlx-dp launch"``, ``"mlx.launch"``, ``"mpirun"`` or ``"none"``.
        backend: The backend the environment prepares: ``"ring"``,
            ``"jaccl"``, ``"nccl"``, ``"mpi"`` or ``None`` (a single process).
        hostfile: ``MLX_HOSTFILE``'s path, or ``None``.
        ring_hosts: The ring hostfile's entries, one ``["ip:port", ...]``
            list per rank (empty without a ring or for one rank).
        coordinator: ``"host:port"`` of rank 0 for jaccl/nccl, or ``None``.
        prepared: Every backend whose environment is set (a launcher may set
            more than one), in no particular order.
    """

    rank: int = 0
    world_size: int | None = None
    launcher: str = "none"
    backend: str | None = None
    hostfile: str | None = None
    ring_hosts: list = field(default_factory=list)
    coordinator: str | None = None
    hostfile_blank: bool = False
    prepared: tuple = ()

    @property
    def launched(self) -> bool:
        """A launcher started several ranks, so joining the group must succeed."""
        ring = self.hostfile is not None and not self.hostfile_blank  # even a malformed one: fail loudly
        return ring or self.backend in ("jaccl", "nccl", "mpi")

    def rank0_address(self) -> str | None:
        """Rank 0's IP address or host name, as the launcher gave it; ``None`` if unknown."""
        if self.ring_hosts:
            entry = self.ring_hosts[0][0]
            return entry.rsplit(":", 1)[0] if isinstance(entry, str) and ":" in entry else None
        if self.coordinator:
            return self.coordinator.rsplit(":", 1)[0] if ":" in self.coordinator else self.coordinator
        return None

    def local_ranks(self) -> int:
        """Ranks that share this machine (same address as this rank in the ring), at least 1."""
        if not self.ring_hosts or self.rank >= len(self.ring_hosts):
            return 1
        try:
            mine = self.ring_hosts[self.rank][0].rsplit(":", 1)[0]
            return max(1, sum(1 for h in self.ring_hosts if h and h[0].rsplit(":", 1)[0] == mine))
        except (AttributeError, IndexError, TypeError):
            return 1


def _int_var(names) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


_consumed: dict = {}  # hostfiles read and then removed (consume_hostfile): path -> (entries, blank)


def _read_ring_hosts(path: str) -> tuple[list, bool]:
    """The ring hostfile's entries, and whether the file is blank (``mlx.launch -n 1``).

    A malformed file gives no entries here; ``trainer.cluster.hostfile.check_ring_hostfile``
    reports it before anything connects.
    """
    if path in _consumed:
        return _consumed[path]
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return [], False
    if not text.strip():
        return [], True
    try:
        hosts = json.loads(text)
    except ValueError:
        return [], False
    return (hosts if isinstance(hosts, list) else []), False


def launch_env() -> LaunchEnv:
    """Read the launcher's environment variables (cheap; read afresh at each call)."""
    env = os.environ
    rank = _int_var(RANK_VARS) or 0
    hostfile = env.get("MLX_HOSTFILE") or None
    ring_hosts, blank = _read_ring_hosts(hostfile) if hostfile else ([], False)
    coordinator, backend = None, None
    if ring_hosts:
        backend = "ring"
    elif env.get("MLX_JACCL_COORDINATOR"):
        backend, coordinator = "jaccl", env["MLX_JACCL_COORDINATOR"]
    elif env.get("NCCL_HOST_IP"):
        backend = "nccl"
        coordinator = env["NCCL_HOST_IP"] + (f":{env['NCCL_PORT']}" if env.get("NCCL_PORT") else "")
    elif "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        backend = "mpi"
    prepared = tuple(name for name, ready in (
        ("ring", bool(ring_hosts)), ("jaccl", bool(env.get("MLX_JACCL_COORDINATOR"))),
        ("nccl", bool(env.get("NCCL_HOST_IP"))), ("mpi", "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env)) if ready)
    size = len(ring_hosts) if ring_hosts else _int_var(SIZE_VARS)
    if env.get(LAUNCHER_VAR):
        launcher = env[LAUNCHER_VAR]
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        launcher = "mpirun"
    elif "MLX_RANK" in env:
        launcher = "mlx.launch"
    else:
        launcher = "none"
    return LaunchEnv(rank=rank, world_size=size, launcher=launcher, backend=backend, hostfile=hostfile,
                     ring_hosts=ring_hosts, coordinator=coordinator, hostfile_blank=blank, prepared=prepared)


def consume_hostfile() -> None:
    """Remove the temporary ring hostfile ``mlx-dp launch`` gave this rank, once MLX has read it.

    MLX's launch script writes it with ``mktemp`` and nothing removes it (hundreds
    pile up in /tmp). Only a file ``mlx-dp launch`` made is removed: its launcher
    variable is set and the file is a ``tmp.*`` file in the temporary folder,
    owned by this user. What it said is kept for :func:`launch_env`.
    """
    import tempfile

    path = os.environ.get("MLX_HOSTFILE")
    if not path or not os.environ.get(LAUNCHER_VAR) or path in _consumed:
        return
    here = os.path.dirname(os.path.abspath(path))
    temp_dirs = {os.path.abspath(d) for d in (tempfile.gettempdir(), "/tmp", os.environ.get("TMPDIR") or "/tmp")}
    if not os.path.basename(path).startswith("tmp.") or here not in temp_dirs:
        return
    try:
        if os.stat(path).st_uid != os.geteuid():
            return
        _consumed[path] = _read_ring_hosts(path)
        os.unlink(path)
    except OSError:
        _consumed.pop(path, None)


def drop_blank_hostfile() -> None:
    """Forget a blank MLX_HOSTFILE (``mlx.launch -n 1``): MLX would try to parse it, and one rank needs no ring."""
    if launch_env().hostfile_blank:
        os.environ.pop("MLX_HOSTFILE", None)


def set_library_defaults() -> None:
    """Quieter libraries, where the user set nothing: transformers warns on import that PyTorch is absent
    (MLX needs none), and tokenizers warns, then slows down, when a process forks after using it."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def use_kernel_toolchain(bin_dir, tmp_dir) -> None:
    """``MLX_DP_JIT=avx2`` (opt-in, said at start): MLX finds our ``g++`` wrapper first on ``PATH`` and
    compiles its kernels into our private ``TMPDIR`` (``trainer.tools.fastjit``)."""
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["TMPDIR"] = str(tmp_dir)


# ---------------------------------------------------------------------------- restarts (mlx-dp launch --restarts)

ATTEMPT_VAR = "MLX_DP_ATTEMPT"  # 0 at the first start, k at the k-th restart
RESTARTS_VAR = "MLX_DP_RESTARTS"  # the job's restart budget; set only under --restarts
JOB_VAR = "MLX_DP_JOB_ID"  # one id for every attempt of one launch
CAUSE_VAR = "MLX_DP_RESTART_CAUSE"  # why the launcher restarted, in one line
NOMINAL_VAR = "MLX_DP_NOMINAL_RANKS"  # ranks the global batch is made for, when fewer are running
PRESENT_VAR = "MLX_DP_PRESENT"  # each running rank's place among those nominal ranks, e.g. "0,2"
LEFT_OUT_VAR = "MLX_DP_LEFT_OUT"  # hosts left out of this attempt and why, for the record
# A failing rank's reason and blamed ranks, as one line the launcher takes off the output (trainer.cluster.elastic).
REPORT_MARKER = "[mlx-dp] report for the launcher: "


@dataclass(frozen=True)
class RestartEnv:
    """What ``mlx-dp launch --restarts`` told this attempt (all defaults without it).

    Attributes:
        attempt: 0 at the first start, k at the k-th restart.
        restarts: The launch's restart budget (0: not under ``--restarts``).
        job: An id shared by every attempt of one launch ("" without it).
        cause: Why the launcher restarted the job ("" at the first start).
        nominal: Ranks the global batch is made for, when fewer run (``None``: as many as run).
        present: The nominal rank of each running rank, in rank order (empty: the identity).
        left_out: Hosts left out of this attempt, with the reason, for the record.
    """

    attempt: int = 0
    restarts: int = 0
    job: str = ""
    cause: str = ""
    nominal: int | None = None
    present: tuple = ()
    left_out: str = ""


# What this process set up at start that changes its numbers (``blas``: ``trainer.tools.fastblas`` records
# "openblas" once its route is in place), for the layers below the tools that must know it.
_RUNTIME: dict = {}


def note_runtime(key: str, value: str) -> None:
    """Record a fact of this process's runtime (see :func:`runtime`)."""
    _RUNTIME[key] = value


def runtime(key: str, default: str) -> str:
    """A fact :func:`note_runtime` recorded, else ``default``."""
    return _RUNTIME.get(key, default)


def restart_env() -> RestartEnv:
    """Read what the launcher's restart loop set (cheap; read afresh at each call).

    Raises:
        ValueError: ``MLX_DP_PRESENT`` or ``MLX_DP_NOMINAL_RANKS`` is malformed.
    """
    env = os.environ
    present = env.get(PRESENT_VAR, "").strip()
    return RestartEnv(attempt=_int_var([ATTEMPT_VAR]) or 0, restarts=_int_var([RESTARTS_VAR]) or 0,
                      job=env.get(JOB_VAR, "").strip(), cause=env.get(CAUSE_VAR, "").strip(),
                      nominal=int(env[NOMINAL_VAR]) if env.get(NOMINAL_VAR, "").strip() else None,
                      present=tuple(int(p) for p in present.split(",")) if present else (),
                      left_out=env.get(LEFT_OUT_VAR, "").strip())
