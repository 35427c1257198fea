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

Under NCCL two things differ from ``mlx.launch``: each rank gets a GPU of its
own (:func:`assign_gpus`), where ``launch_nccl`` gives ``CUDA_VISIBLE_DEVICES =
rank % repeat_hosts``, GPU 0 for every rank of a hostfile; and a rank 0 that
the other ranks could not reach is refused before anything starts
(:func:`check_nccl_hosts`).

Where MLX's scripts put their temporary files on this machine: ``trainer.cluster.tempfiles``.

These are private names of MLX; :func:`missing_internals` checks that they are
there, and ``mlx-dp launch`` falls back to stock ``mlx.launch`` when they are not.
"""

import argparse
import inspect
import ipaddress
import os
import shlex
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace

from .tempfiles import private_mktemp

LAUNCH_MODULE = "mlx._distributed_utils.launch"
COMMON_MODULE = "mlx._distributed_utils.common"
# RemoteProcess(rank, host, python, cwd, files, env, command): what each rank's entry holds.
RANK_ARGS = ("rank", "host", "python", "cwd", "files", "env", "command")
SCRIPT_ARGS = ("rank", "python", "cwd", "files", "env", "command", "is_local")
LOCAL_HOST = "127.0.0.1"  # MLX runs a rank on this host without ssh
GPU_VAR = "CUDA_VISIBLE_DEVICES"  # under NCCL, the one GPU each rank sees (assign_gpus)
# A remote rank reads the job's secret (trainer.cluster.peers) from its ssh connection, right after MLX's
# script has turned the terminal's echo off and printed its pidfile's path, so the secret is never on a
# command line, echoed or written anywhere.
PIDFILE_PRINT = 'printf "%s\\n" $pidfile; '
READ_SECRET = "IFS= read -r MLX_DP_JOB_SECRET; export MLX_DP_JOB_SECRET; "
BARE_MKTEMP = "$(mktemp)"  # how MLX's script makes its pidfile and each backend file (checked: missing_internals)
# A launch folder's name: the launcher's pid, its start time (tells a later process with the same pid apart),
# and mkdtemp's random part (one launcher process may run several launches).


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
            try:
                local = remote.make_launch_script(0, None, None, {"F": "x"}, [], ["true"], True)
            except Exception:  # noqa: BLE001 - any failure means: not usable
                local = ""
            if local.count(BARE_MKTEMP) != 2 or local.count("mktemp") != 2:
                missing.append("RemoteProcess.make_launch_script making its pidfile and files with a bare mktemp")
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
        temp_dir: The folder on this machine where the script makes its pidfile and
            ``files`` (a rank on this machine under ``mlx-dp launch``: ``trainer.cluster.tempfiles.launch_folder``);
            ``None``: where a bare ``mktemp`` puts them, as MLX does (remote ranks).
    """

    rank: int
    host: str
    python: str | None
    cwd: str | None
    files: dict
    env: tuple
    command: tuple
    temp_dir: str | None = None

    @property
    def is_local(self) -> bool:
        return self.host == LOCAL_HOST

    def script(self, read_secret: bool = False) -> str:
        """MLX's bash script for this rank: prints its pidfile's path as its first line, then execs the command.

        ``read_secret``: right after that line, read the job's secret from stdin (a remote rank).
        With ``temp_dir``, the script's ``mktemp`` makes its files there (``trainer.cluster.tempfiles.private_mktemp``).
        """
        launch, _ = _modules()
        text = launch.RemoteProcess.make_launch_script(self.rank, self.python, self.cwd, dict(self.files),
                                                       list(self.env), list(self.command), self.is_local)
        if self.temp_dir is not None:
            text = private_mktemp(self.temp_dir) + text
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


def rank_specs(parser, hosts, args, command: list[str], launcher_env=None, temp_dir: str | None = None
               ) -> list[RankSpec]:
    """Every rank's command, as ``mlx.launch`` would start it, without starting anything.

    Under NCCL each rank also gets its own GPU (:func:`assign_gpus`): MLX's
    ``launch_nccl`` sets ``CUDA_VISIBLE_DEVICES`` to ``rank % repeat_hosts``,
    which is GPU 0 for every rank of a hostfile.

    Args:
        parser (argparse.ArgumentParser): For argument errors (``parser.error``: one line, status 2).
        hosts (list): ``Hostfile.hosts`` from MLX's hostfile parser.
        args (argparse.Namespace): ``mlx.launch``'s options (backend, env, cwd, python,
            starting_port, connections_per_ip, nccl_port, repeat_hosts, verbose); not changed.
            ``repeat_hosts`` may be ``None`` (``-n`` not given).
        command (list[str]): What every rank runs.
        launcher_env (Mapping | None): The launcher's environment, which local ranks inherit
            (its ``CUDA_VISIBLE_DEVICES`` is honoured for them). Default: ``None`` (``os.environ``).
        temp_dir (str | None): Where the ranks on this machine make their temporary files
            (``trainer.cluster.tempfiles.launch_folder``). Default: ``None`` (where a bare ``mktemp`` puts them, as MLX does).

    Raises:
        RuntimeError: MLX's launcher failed in a way that says its internals changed.
    """
    launch, _ = _modules()
    backend = {"ring": launch.launch_ring, "nccl": launch.launch_nccl, "jaccl": launch.launch_jaccl,
               "jaccl-ring": launch.launch_jaccl}[args.backend]
    if args.backend == "nccl":
        check_nccl_hosts(parser, hosts)
    # MLX appends to args.env in place, and launch_nccl computes `rank % args.repeat_hosts` (stock mlx.launch's
    # -n defaults to 1; ours is None when not given): hand it a copy with both settled.
    given = argparse.Namespace(**vars(args))
    given.env, given.repeat_hosts = list(args.env), args.repeat_hosts or 1
    caught: list = []
    with _caught_launch(caught):
        try:
            backend(parser, hosts, given, command)
        except RuntimeError:
            raise
        except Exception as e:  # noqa: BLE001 - an error inside MLX's code: its launcher changed
            raise RuntimeError(f"MLX's {backend.__name__} failed ({type(e).__name__}: {e})") from e
    specs = [replace(spec, temp_dir=temp_dir) if spec.is_local else spec for spec in _specs_from(caught)]
    if args.backend == "nccl":
        specs = assign_gpus(parser, specs, _env_value(args.env, GPU_VAR),
                            os.environ if launcher_env is None else launcher_env)
    return specs


def _specs_from(caught: list) -> list[RankSpec]:
    """``RankSpec`` per ``(args, kwargs)`` that MLX handed to ``_launch_with_io``, checked to be in rank order."""
    specs = []
    for position, (rank_args, kwargs) in enumerate(caught):
        values = dict(zip(RANK_ARGS, rank_args), **kwargs)
        if values.get("rank") != position:
            raise RuntimeError(f"MLX's launcher listed rank {values.get('rank')} in place {position}")
        specs.append(RankSpec(rank=values["rank"], host=values["host"], python=values["python"],
                              cwd=values["cwd"], files=dict(values["files"]), env=tuple(values["env"]),
                              command=tuple(values["command"])))
    return specs


def _is_loopback(name: str) -> bool:
    """Whether an ssh name or IP is this machine's loopback (then a rank there shares rank 0's machine)."""
    host = name.rpartition("@")[2].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_nccl_hosts(parser, hosts) -> None:
    """Refuse, in one sentence, a rank 0 address that the other ranks could not reach.

    Every NCCL rank connects to rank 0's first IP (``NCCL_HOST_IP``) to fetch
    the communicator's id. With no IP, MLX's own message does not say how to
    give one; with a loopback IP and ranks on other machines, those ranks
    would retry until ``MLX_NCCL_TIMEOUT`` and then fail.
    """
    first = hosts[0]
    if not first.ips:
        parser.error(f"--backend nccl: every rank connects to rank 0 by IP address, and rank 0's host "
                     f"{first.ssh_hostname!r} has none; give --hosts as IP addresses, or \"ips\" for the "
                     "first host of the hostfile")
    remote = sorted({h.ssh_hostname for h in hosts if not _is_loopback(h.ssh_hostname)})
    if _is_loopback(first.ips[0]) and remote:
        parser.error(f"--backend nccl: rank 0's address {first.ips[0]} is loopback, which the ranks on "
                     f"{', '.join(remote)} cannot reach; give rank 0's host an address on their network")


def _env_value(env, key: str) -> str | None:
    """The value the last ``key=...`` entry of ``env`` exports (MLX exports them in order), or ``None``."""
    value = None
    for entry in env:
        name, _, rest = entry.partition("=")
        if name == key:
            value = rest
    return value


def assign_gpus(parser, specs: list[RankSpec], given: str | None, launcher_env) -> list[RankSpec]:
    """Give each NCCL rank its own GPU: ranks sharing a host take local indices 0, 1, ... in rank order.

    A rank sees one GPU, ``CUDA_VISIBLE_DEVICES=<local index>``, as torchrun's
    ``LOCAL_RANK`` would pick it. Where the user lists GPUs
    (``CUDA_VISIBLE_DEVICES`` in ``--env`` or the hostfile's ``envs``, else, for
    ranks on this machine, in the launcher's own environment), the local index
    picks from that list instead, so a job keeps to the GPUs it was given.
    NCCL refuses two ranks on one GPU, so a list shorter than a host's ranks is
    an error here. The GPU count of a host without a list is unknown: a rank
    whose index is past it sees no GPU and fails when it first uses CUDA.
    Hosts are told apart by their ssh name, as MLX starts them.

    Args:
        parser (argparse.ArgumentParser): For the error (``parser.error``).
        specs (list[RankSpec]): MLX's ranks; the ``CUDA_VISIBLE_DEVICES`` it set is replaced.
        given (str | None): ``CUDA_VISIBLE_DEVICES`` as the launch's ``--env`` / ``envs`` set it, or ``None``.
        launcher_env (Mapping): The launcher's environment, which local ranks inherit.
    """
    per_host = Counter(spec.host for spec in specs)
    seen: Counter = Counter()
    assigned = []
    for spec in specs:
        local = seen[spec.host]
        seen[spec.host] += 1
        listed = given
        if listed is None and spec.is_local:
            listed = launcher_env.get(GPU_VAR)
        gpu = str(local)
        if listed is not None:
            gpus = [g.strip() for g in listed.split(",") if g.strip()]
            if per_host[spec.host] > len(gpus):
                parser.error(f"--backend nccl: host {spec.host} runs {per_host[spec.host]} ranks but "
                             f"{GPU_VAR}={listed!r} lists {len(gpus)} GPU(s), and NCCL cannot put two ranks on "
                             "one GPU; list more GPUs, start fewer ranks there, or use --backend ring")
            gpu = gpus[local]
        env = [e for e in spec.env if e.partition("=")[0] != GPU_VAR]
        assigned.append(replace(spec, env=tuple(env + [f"{GPU_VAR}={gpu}"])))
    return assigned


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
