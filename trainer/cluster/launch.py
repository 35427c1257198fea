"""``mlx-dp launch``: ``mlx.launch``'s command line, without its spinning relay, with a truthful exit status.

    mlx-dp launch -n 2 -- .venv/bin/mlx-dp train recipes/tiny-lora.yaml
    mlx-dp launch --hostfile hosts.json -- ~/mlx-dp/.venv/bin/mlx-dp train recipes/qwen3-0.6b-lora.yaml
    mlx-dp launch -n 2 --prefix-output --timeout 600 -- python -u script.py

It takes ``mlx.launch``'s options (``-n``, ``--hosts``, ``--hostfile``,
``--backend``, ``--env``, ``--python``, ``--cwd``, ``--starting-port``,
``--connections-per-ip``, ``--nccl-port``, ``--mpi-arg``, ``--verbose``) and
starts the ranks exactly as ``mlx.launch`` does, with MLX's own code: hostfile
parsing, ssh to remote hosts, each backend's environment and files
(``trainer/cluster/mlx_launcher.py``). Only the part that runs the ranks and
relays their output is mlx-dp's own (``trainer/cluster/relay.py`` says why;
``trainer/cluster/supervisor.py`` what happens on failures and signals).

Differences a user sees: a failing rank is named and its status becomes the
launcher's (``mlx.launch`` exits 0); ``--restarts N`` starts a failed or hung
job again from its newest checkpoint, and ``--min-ranks M`` goes on without
hosts that cannot be reached, at the same global batch
(``trainer/cluster/elastic.py``); Ctrl-C lets ranks checkpoint and stop;
``--prefix-output`` tags lines with their rank; ``--timeout`` bounds the job;
a local launch picks free ports unless ``--starting-port`` is given (other jobs
may hold ``mlx.launch``'s default 32323); every rank gets
``MLX_DP_LAUNCHER=mlx-dp launch``; the temporary files MLX's scripts make
for ranks on this machine (pidfiles, ring hostfiles) live in a private folder
of the launch that goes when it ends, and a killed launcher's folder is swept
by the next launch (``tempfiles.launch_folder``). If this MLX lacks the
internals reused here, one line says so and stock ``mlx.launch`` runs the job instead.

Under ``--backend nccl`` (the default where CUDA is) every rank sees one GPU:
ranks that share a host get ``CUDA_VISIBLE_DEVICES`` 0, 1, ... in rank order,
or the first, second, ... entry of a ``CUDA_VISIBLE_DEVICES`` list the user
gave (``--env``, the hostfile's ``envs``, or this shell's for local ranks), as
torchrun's ``LOCAL_RANK`` does (``mlx_launcher.assign_gpus``; docs/DEVICES.md).
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from ..env import LAUNCHER_VAR
from . import mlx_launcher, tempfiles
from .ports import free_port_block

PROG = "mlx-dp launch"
LAUNCHER_NAME = "mlx-dp launch"
DEFAULT_PORT = 32323  # mlx.launch's --starting-port
DEFAULT_GRACE_S = 30.0
BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi", "nccl")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Start the ranks of a distributed MLX job as mlx.launch "
                                "does, without its spinning relay, with a truthful exit status.",
                                epilog="Everything after the options (or after --) is the command each rank runs.")
    mlx = p.add_argument_group("as mlx.launch")
    mlx.add_argument("-n", "--repeat-hosts", dest="repeat_hosts", type=_positive, default=None, metavar="N",
                     help="ranks per host of --hosts (default 1); under nccl each gets its own GPU")
    mlx.add_argument("--hosts", default="127.0.0.1", help="comma-separated hosts (default 127.0.0.1: this machine)")
    mlx.add_argument("--hostfile", default=None, help="JSON hostfile, as written by mlx.distributed_config")
    mlx.add_argument("--backend", choices=BACKENDS, default=None,
                     help="distributed backend (default: the hostfile's, else ring; nccl where CUDA is)")
    mlx.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set for every rank")
    mlx.add_argument("--python", default=None, help="run the command with this interpreter on every host")
    mlx.add_argument("--cwd", default=None, help="working directory on every host (default: this one, where it exists)")
    mlx.add_argument("--starting-port", "-p", type=int, default=None,
                     help=f"ring/jaccl: first port, one more per rank and IP (default: free ports for a "
                     f"local launch, else {DEFAULT_PORT})")
    mlx.add_argument("--connections-per-ip", type=int, default=1, help="ring: connections per IP (default 1)")
    mlx.add_argument("--nccl-port", type=int, default=12345, help="nccl: rank 0's port (default 12345)")
    mlx.add_argument("--mpi-arg", action="append", default=[], help="mpi: passed to mpirun")
    mlx.add_argument("--verbose", action="store_true", help="say what is run and when each rank ends")
    own = p.add_argument_group("mlx-dp's own")
    own.add_argument("--prefix-output", action="store_true", help="start every output line with [rank]")
    own.add_argument("--timeout", type=float, default=None, help="stop every rank after this many seconds (status 124)")
    own.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                     help=f"seconds from SIGTERM to SIGKILL when ranks are stopped (default {DEFAULT_GRACE_S:g})")
    own.add_argument("--restarts", type=int, default=0, metavar="N",
                     help="after a failure or a hang, stop every rank and start the job again from this launch's "
                     "newest checkpoint, up to N times (default 0)")
    own.add_argument("--min-ranks", type=_positive, default=None, metavar="M",
                     help="with --hostfile: at each start, leave out hosts that ssh cannot reach (or whose rank "
                     "never connected) while M remain; the others compute their rows too, so the global batch "
                     "and the updates stay the same (default: every host, always)")
    own.add_argument("--probe-timeout", type=float, default=10.0, metavar="S",
                     help="with --min-ranks: seconds ssh may take to reach a host before it is left out (default 10)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- program [args...]")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace, list[str]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. mlx-dp launch -n 2 -- mlx-dp train recipe.yaml")
    if args.hostfile and args.repeat_hosts is not None:
        parser.error("give either --hostfile (its hosts are the ranks) or -n, not both")
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.grace < 0:
        parser.error("--grace must be 0 or more seconds")
    if args.restarts < 0:
        parser.error("--restarts must be 0 or more")
    if not args.probe_timeout > 0:
        parser.error("--probe-timeout must be positive")
    return parser, args, command


def main(argv: list[str], output=None, on_start=None) -> int:
    """``mlx-dp launch ...``; returns the exit status.

    Args:
        argv (list[str]): The arguments after ``mlx-dp launch``.
        output (trainer.cluster.relay.Output | None): Where ranks' output goes.
            Default: ``None`` (this process's stdout and stderr).
        on_start (Callable[[RankSpec, int], None] | None): Called with each rank's spec and
            the pid of its process as it starts (the lab caps a rank's CPU there).
            Default: ``None``.
    """
    parser, args, command = parse_args(argv)
    missing = mlx_launcher.missing_internals()
    if missing:
        if on_start is not None:
            parser.error(f"this needs the MLX launcher internals mlx-dp reuses ({', '.join(missing)})")
        return run_stock(args, command, missing)
    from mlx._distributed_utils.common import Hostfile

    from .hostfile import HostfileError, check_launch_hostfile

    try:
        if args.hostfile:
            check_launch_hostfile(args.hostfile)  # no host name that ssh or a shell would misread
        else:
            check_host_names(args.hosts)
        hostfile = (Hostfile.from_file(args.hostfile) if args.hostfile
                    else Hostfile.from_list(args.hosts, args.repeat_hosts or 1))
    except (ValueError, HostfileError) as e:
        parser.error(str(e))
    as_given = argparse.Namespace(**vars(args))  # for a fallback to mlx.launch, before ours is added
    _complete_args(args, hostfile)
    elastic = args.restarts > 0 or args.min_ranks is not None
    if elastic and args.backend == "mpi":
        parser.error("--restarts and --min-ranks need ranks that mlx-dp launch starts itself, not mpirun")
    if args.min_ranks is not None and args.min_ranks > len(hostfile.hosts):
        parser.error(f"--min-ranks {args.min_ranks} is more than the {len(hostfile.hosts)} rank(s) of the job")
    if args.backend == "mpi":
        return mlx_launcher.run_mpi(parser, hostfile.hosts, args, command)
    # The local ranks' pidfiles and hostfiles go into a folder of this launch, gone when it ends
    # (tempfiles.launch_folder: what is and is not cleaned up on remote hosts).
    with tempfiles.launch_folder(warn=_say) as temp_dir:
        if elastic:
            return _run_elastic(parser, args, as_given, hostfile.hosts, command, output, on_start, temp_dir)
        return _run_once(parser, args, as_given, hostfile.hosts, command, output, on_start, temp_dir)


def _say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _run_once(parser, args, as_given, hosts: list, command: list[str], output, on_start, temp_dir) -> int:
    """The job, started once (no ``--restarts`` or ``--min-ranks``)."""
    try:
        specs = mlx_launcher.rank_specs(parser, hosts, args, command, temp_dir=temp_dir)
    except RuntimeError as e:  # MLX's launcher changed in a way the checks did not catch
        return run_stock(as_given, command, [str(e)])
    from .relay import Output
    from .supervisor import Supervisor

    output = output or Output(prefix=args.prefix_output)
    try:
        return Supervisor(specs, output, timeout=args.timeout, grace_s=args.grace, verbose=args.verbose,
                          on_start=on_start).run()
    except OSError as e:  # e.g. no ssh on this machine; every rank started so far has been killed
        print(f"{PROG}: error: could not start the ranks: {e}", file=sys.stderr, flush=True)
        return 127


def _run_elastic(parser, args, as_given, hosts: list, command: list[str], output, on_start, temp_dir) -> int:
    """``--restarts`` / ``--min-ranks``: attempts of the job, each with the hosts that take part."""
    from . import elastic
    from .relay import Output

    def make_specs(chosen: list, extra_env: list[str]):
        attempt = argparse.Namespace(**vars(args))
        attempt.env = list(args.env) + extra_env
        if as_given.starting_port is None and all(h.ssh_hostname == mlx_launcher.LOCAL_HOST for h in chosen):
            per_host = max(1, args.connections_per_ip) * max(1, max(len(h.ips) for h in chosen))
            attempt.starting_port = free_port_block(len(chosen) * per_host) or DEFAULT_PORT  # fresh ports each time
        return mlx_launcher.rank_specs(parser, chosen, attempt, command, temp_dir=temp_dir)

    try:
        return elastic.run(hosts, make_specs, output or Output(prefix=args.prefix_output), args.restarts,
                           min_ranks=args.min_ranks, timeout=args.timeout, grace_s=args.grace, verbose=args.verbose,
                           on_start=on_start, probe_s=args.probe_timeout)
    except OSError as e:
        print(f"{PROG}: error: could not start the ranks: {e}", file=sys.stderr, flush=True)
        return 127
    except RuntimeError as e:  # MLX's launcher changed in a way the checks did not catch
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2


def check_host_names(hosts: str) -> None:
    """``--hosts``: every name one ssh reads as a host (see ``trainer.cluster.hostfile.SSH_NAME``)."""
    from .hostfile import SSH_NAME, HostfileError

    for name in (h.strip() for h in hosts.split(",")):
        if not SSH_NAME.match(name):
            raise HostfileError(f"--hosts: {name[:60]!r} is not a host name or address")


def _complete_args(args: argparse.Namespace, hostfile) -> None:
    """What ``mlx.launch``'s main() decides before launching, plus the launcher's name for the ranks."""
    if hostfile.backend and args.backend is None:
        args.backend = hostfile.backend
    if args.backend is None:
        import mlx.core as mx

        cuda = getattr(mx, "cuda", None)
        args.backend = "nccl" if cuda is not None and cuda.is_available() else "ring"
    args.env = list(hostfile.envs) + list(args.env) + [f"{LAUNCHER_VAR}={LAUNCHER_NAME}"]
    cols, lines = shutil.get_terminal_size((0, 0))
    if cols > 0 and not any(e.startswith("COLUMNS=") for e in args.env):
        args.env += [f"COLUMNS={cols}", f"LINES={lines}"]
    if args.starting_port is None:
        local = all(h.ssh_hostname == mlx_launcher.LOCAL_HOST for h in hostfile.hosts)
        per_host = max(1, args.connections_per_ip) * max(1, max(len(h.ips) for h in hostfile.hosts))
        ports = len(hostfile.hosts) * per_host
        args.starting_port = (free_port_block(ports) if local else None) or DEFAULT_PORT


def stock_argv(args: argparse.Namespace, command: list[str]) -> list[str]:
    """The same job as ``mlx.launch``'s arguments (without mlx-dp's own options)."""
    if args.hostfile:
        argv = ["--hostfile", args.hostfile]
    else:
        argv = ["--hosts", args.hosts, "-n", str(args.repeat_hosts or 1)]
    if args.backend:
        argv += ["--backend", args.backend]
    for env in args.env:
        argv += ["--env", env]
    for name in ("python", "cwd", "starting_port"):
        if getattr(args, name) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.connections_per_ip != 1:
        argv += ["--connections-per-ip", str(args.connections_per_ip)]
    if args.nccl_port != 12345:
        argv += ["--nccl-port", str(args.nccl_port)]
    for arg in args.mpi_arg:
        argv += ["--mpi-arg", arg]
    if args.verbose:
        argv.append("--verbose")
    return argv + ["--", *command]


def run_stock(args: argparse.Namespace, command: list[str], missing: list[str]) -> int:
    """Run the job with stock ``mlx.launch`` (this MLX lacks what mlx-dp reuses); one line says so."""
    exe = Path(sys.executable).parent / "mlx.launch"
    exe = str(exe) if exe.is_file() else shutil.which("mlx.launch")
    try:
        from importlib.metadata import version

        mlx_version = version("mlx")
    except Exception:  # noqa: BLE001 - only for the message
        mlx_version = "unknown"
    if exe is None:
        print(f"{PROG}: error: this MLX ({mlx_version}) lacks the launcher internals mlx-dp reuses "
              f"({', '.join(missing)}), and no mlx.launch was found to fall back on", file=sys.stderr, flush=True)
        return 2
    print(f"{PROG}: this MLX ({mlx_version}) lacks the launcher internals mlx-dp reuses ({', '.join(missing)}); "
          "running stock mlx.launch instead (its relay busy-polls a core, it exits 0 when a rank fails, "
          "and --timeout/--prefix-output do not apply)", file=sys.stderr, flush=True)
    proc = subprocess.Popen([exe, *stock_argv(args, command)])
    try:
        return proc.wait()
    except KeyboardInterrupt:  # mlx.launch got the Ctrl-C too (same process group)
        return proc.wait()


def launch(command: list[str], n: int, env: dict | None = None, timeout: float | None = None,
           prefix: bool = False, grace_s: float = DEFAULT_GRACE_S, output=None, on_start=None) -> int:
    """Run ``command`` as ``n`` local ranks through ``mlx-dp launch``; returns the exit status.

    Args:
        command (list[str]): The program and its arguments.
        n (int): Number of ranks.
        env (dict | None): Extra environment for every rank. Default: ``None``.
        timeout (float | None): Stop every rank after this many seconds. Default: ``None``.
        prefix (bool): Prefix output lines with the rank. Default: ``False``.
        grace_s (float): From SIGTERM to SIGKILL. Default: ``30``.
        output (trainer.cluster.relay.Output | None): Where output goes. Default: this process's.
        on_start (callable | None): See :func:`main`. Default: ``None``.
    """
    argv = ["-n", str(n), "--grace", str(grace_s)]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    if prefix:
        argv.append("--prefix-output")
    return main([*argv, "--", *command], output=output, on_start=on_start)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
