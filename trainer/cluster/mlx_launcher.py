"""The parts of MLX's own launcher that ``mlx-dp launch`` reuses, and the check that they exist.

``mlx.launch`` (``mlx/_distributed_utils/launch.py``) does two jobs:

1. it turns a hostfile and a backend into one shell command per rank: ssh for
   remote hosts, a pidfile, the working directory, each backend's environment
   and files (``launch_ring``, ``launch_jaccl``, ``launch_nccl``, and
   ``RemoteProcess.make_launch_script``);
2. it runs those commands and relays their output (``_launch_with_io``).

mlx-dp keeps the first job as MLX wrote it and replaces the second (why:
``trainer/cluster/relay.py``). Each ``launch_<backend>`` function ends with
``_launch_with_io(RemoteProcess, [(args, kwargs) per rank], verbose)``;
:func:`rank_specs` catches that call instead of letting it run, so MLX still
decides every rank's command, environment and files, exactly as ``mlx.launch``
would. MPI is different: ``launch_mpi`` runs ``mpirun``, which relays for
itself, so :func:`run_mpi` only records mpirun's exit status.

These are private names of MLX; :func:`missing_internals` checks that they are
there, and ``mlx-dp launch`` falls back to stock ``mlx.launch`` when they are not.
"""

import inspect
import shlex
from contextlib import contextmanager
from dataclasses import dataclass

LAUNCH_MODULE = "mlx._distributed_utils.launch"
COMMON_MODULE = "mlx._distributed_utils.common"
# RemoteProcess(rank, host, python, cwd, files, env, command): what each rank's entry holds.
RANK_ARGS = ("rank", "host", "python", "cwd", "files", "env", "command")
SCRIPT_ARGS = ("rank", "python", "cwd", "files", "env", "command", "is_local")
LOCAL_HOST = "127.0.0.1"  # MLX runs a rank on this host without ssh
# A remote rank reads the job's secret (trainer.cluster.peers) from its ssh connection, right after MLX's
# script has turned the terminal's echo off and printed its pidfile's path, so the secret is never on a
# command line, echoed or written anywhere.
PIDFILE_PRINT = 'printf "%s\\n" $pidfile; '
READ_SECRET = "IFS= read -r MLX_DP_JOB_SECRET; export MLX_DP_JOB_SECRET; "


def _modules():
    import importlib

    return importlib.import_module(LAUNCH_MODULE), importlib.import_module(COMMON_MODULE)


def _parameters(function) -> tuple:
    return tuple(p for p in inspect.signature(function).parameters if p != "self")


def missing_internals() -> list[str]:
    """The MLX launcher internals this module needs that this MLX lacks ([] when all are there)."""
    try:
        launch, common = _modules()
    except Exception:  # noqa: BLE001 - any import failure means: not usable
        return [LAUNCH_MODULE]
    missing = [f"launch.{name}" for name in ("_launch_with_io", "launch_ring", "launch_jaccl", "launch_nccl",
                                             "launch_mpi", "RemoteProcess", "run") if not hasattr(launch, name)]
    missing += [f"common.{name}" for name in ("Hostfile", "log") if not hasattr(common, name)]
    remote = getattr(launch, "RemoteProcess", None)
    if remote is not None:
        try:
            if _parameters(remote.__init__) != RANK_ARGS:
                missing.append("RemoteProcess(" + ", ".join(RANK_ARGS) + ")")
            if _parameters(remote.make_launch_script) != SCRIPT_ARGS:
                missing.append("RemoteProcess.make_launch_script(" + ", ".join(SCRIPT_ARGS) + ")")
        except (AttributeError, TypeError, ValueError):
            missing.append("RemoteProcess.make_launch_script")
        else:
            try:
                script = remote.make_launch_script(1, None, None, {}, [], ["true"], False)
            except Exception:  # noqa: BLE001 - any failure means: not usable
                script = ""
            if "stty -echo" not in script or PIDFILE_PRINT not in script:
                missing.append("RemoteProcess.make_launch_script printing its pidfile with echo off")
    return missing


@dataclass(frozen=True)
class RankSpec:
    """One rank as MLX's launcher describes it: where and what to run.

    Attributes:
        rank: The rank.
        host: The ssh host name; ``127.0.0.1`` runs locally without ssh.
        python: ``--python``, prepended to the command, or ``None``.
        cwd: ``--cwd``, or ``None`` (then the launcher's own directory, where it exists).
        files: Environment variables that name a temporary file holding the given text
            (``MLX_HOSTFILE`` for the ring, ``MLX_IBV_DEVICES`` for jaccl).
        env: ``KEY=VALUE`` strings exported before the command.
        command: The program and its arguments.
    """

    rank: int
    host: str
    python: str | None
    cwd: str | None
    files: dict
    env: tuple
    command: tuple

    @property
    def is_local(self) -> bool:
        return self.host == LOCAL_HOST

    def script(self, read_secret: bool = False) -> str:
        """MLX's bash script for this rank: prints its pidfile's path as its first line, then execs the command.

        ``read_secret``: right after that line, read the job's secret from stdin (a remote rank).
        """
        launch, _ = _modules()
        text = launch.RemoteProcess.make_launch_script(self.rank, self.python, self.cwd, dict(self.files),
                                                       list(self.env), list(self.command), self.is_local)
        return text.replace(PIDFILE_PRINT, PIDFILE_PRINT + READ_SECRET, 1) if read_secret else text

    def argv(self) -> list[str]:
        """The local command that starts this rank: bash, or ssh with a terminal as MLX does.

        ``ssh -tt`` gives the remote rank a terminal, so it gets SIGHUP when the
        connection drops (a launcher that dies takes its remote ranks with it).
        The host comes after ``--``, so no host name is ever read as an option.
        """
        if self.is_local:
            return ["/bin/bash", "-c", self.script()]
        return ["ssh", "-tt", "-o", "LogLevel=QUIET", "--", self.host, self.script(read_secret=True)]


def signal_argv(host: str, pidfile: str, signal_name: str) -> list[str]:
    """ssh command that sends ``signal_name`` (``INT``, ``TERM``, ``KILL``) to a remote rank by its pidfile.

    MLX's own ``make_kill_script`` only sends SIGTERM and then deletes the pidfile,
    so nothing would be left to aim a later SIGKILL at; this keeps the pidfile.
    """
    script = f"pid=$(cat {shlex.quote(pidfile)} 2>/dev/null) && kill -s {signal_name} \"$pid\" 2>/dev/null"
    return ["ssh", "-o", "LogLevel=QUIET", "-o", "BatchMode=yes", "--", host, script]


def kill_if_stopped_argv(host: str, pidfile: str) -> list[str]:
    """ssh command that SIGKILLs a remote rank by its pidfile if it is stopped (it cannot act on SIGTERM)."""
    script = (f"pid=$(cat {shlex.quote(pidfile)} 2>/dev/null) && case $(ps -o stat= -p \"$pid\") in "
              "T*|t*) kill -s KILL \"$pid\";; esac")
    return ["ssh", "-o", "LogLevel=QUIET", "-o", "BatchMode=yes", "--", host, script]


def remove_argv(host: str, pidfile: str) -> list[str]:
    """ssh command that removes a remote rank's pidfile once the rank has ended."""
    return ["ssh", "-o", "LogLevel=QUIET", "-o", "BatchMode=yes", "--", host, f"rm -f {shlex.quote(pidfile)}"]


@contextmanager
def _caught_launch(caught: list):
    """Replace MLX's ``_launch_with_io`` by a recorder for the duration of the block."""
    launch, _ = _modules()
    original = launch._launch_with_io

    def record(command_class, arguments, verbose):
        if command_class is not launch.RemoteProcess:
            raise RuntimeError(f"MLX's launcher asked for {command_class!r}, which mlx-dp does not know")
        caught.extend(arguments)

    launch._launch_with_io = record
    try:
        yield
    finally:
        launch._launch_with_io = original


def rank_specs(parser, hosts, args, command: list[str]) -> list[RankSpec]:
    """Every rank's command, as ``mlx.launch`` would start it, without starting anything.

    Args:
        parser (argparse.ArgumentParser): For MLX's own argument errors (``parser.error``).
        hosts (list): ``Hostfile.hosts`` from MLX's hostfile parser.
        args (argparse.Namespace): ``mlx.launch``'s options (backend, env, cwd, python,
            starting_port, connections_per_ip, nccl_port, repeat_hosts, verbose).
        command (list[str]): What every rank runs.
    """
    launch, _ = _modules()
    backend = {"ring": launch.launch_ring, "nccl": launch.launch_nccl, "jaccl": launch.launch_jaccl,
               "jaccl-ring": launch.launch_jaccl}[args.backend]
    caught: list = []
    with _caught_launch(caught):
        backend(parser, hosts, args, command)
    specs = []
    for position, (rank_args, kwargs) in enumerate(caught):
        values = dict(zip(RANK_ARGS, rank_args), **kwargs)
        if values.get("rank") != position:
            raise RuntimeError(f"MLX's launcher listed rank {values.get('rank')} in place {position}")
        specs.append(RankSpec(rank=values["rank"], host=values["host"], python=values["python"],
                              cwd=values["cwd"], files=dict(values["files"]), env=tuple(values["env"]),
                              command=tuple(values["command"])))
    return specs


def run_mpi(parser, hosts, args, command: list[str]) -> int:
    """Run the job with ``mpirun`` through MLX's ``launch_mpi``; return mpirun's exit status."""
    launch, _ = _modules()
    original = launch.run
    statuses = []

    def recording_run(cmd, *rest, **kwargs):
        result = original(cmd, *rest, **kwargs)
        if isinstance(cmd, list) and "--" in cmd and not kwargs:  # the job itself, not a `which` probe
            statuses.append(result.returncode)
        return result

    launch.run = recording_run
    try:
        launch.launch_mpi(parser, hosts, args, command)
    finally:
        launch.run = original
    return statuses[-1] if statuses else 1
