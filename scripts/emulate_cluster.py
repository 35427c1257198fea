"""Run a command as N ranks of an emulated desk cluster (network namespaces + tc).

    sudo .venv/bin/python scripts/emulate_cluster.py -n 2 --link 10gbe -- \
        .venv/bin/python -u bench.py
    sudo .venv/bin/python scripts/emulate_cluster.py -n 4 --rate 5gbit --delay 0.2ms \
        --write-hostfile hosts.json -- .venv/bin/python -u train.py
    sudo .venv/bin/python scripts/emulate_cluster.py --cleanup-stale

Each rank runs inside its own namespace with MLX_RANK and MLX_HOSTFILE added to this
process's environment, started by mlx-dp's launcher code; its output is relayed with a
``[rank]`` prefix. If any rank fails the others are stopped, and the exit status is the
failing rank's. Everything the run made is removed when it ends, also on Ctrl-C and SIGTERM.
See ``scripts/lab/netem.py``.
"""

import argparse
import shutil
import sys

from lab.cpulimit import CpuLimitError, parse_slow  # noqa: E402
from lab.netem import PRESETS, EmulatedCluster, NetemError, check_permitted, cleanup_stale  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Python ranks should run with -u so their output streams.")
    parser.add_argument("-n", "--num-ranks", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--link", choices=sorted(PRESETS), default="none",
                        help="link preset (default none: unshaped veths)")
    parser.add_argument("--rate", help="rate per direction overriding the preset, e.g. 5gbit")
    parser.add_argument("--delay", help="one-way rank-to-rank delay overriding the preset, "
                        "e.g. 0.2ms (needs the netem qdisc in the kernel)")
    parser.add_argument("--mtu", type=int, default=1500, help="veth MTU (default 1500)")
    parser.add_argument("--port", type=int, default=32323,
                        help="rank r listens on port + r (default 32323, as mlx.launch)")
    parser.add_argument("--timeout", type=float, help="stop all ranks after this many seconds")
    parser.add_argument("--slow", metavar="RANK=SHARE[,...]",
                        help="emulate slower Macs: cap ranks at a share of one core, e.g. 1=0.5 "
                        "(needs the cgroup v1 cpu controller)")
    parser.add_argument("--write-hostfile", metavar="PATH",
                        help="also copy the ring MLX_HOSTFILE (list of ip:port lists) here")
    parser.add_argument("--write-launch-hostfile", metavar="PATH",
                        help="also write the cluster as an mlx.launch --hostfile JSON here")
    parser.add_argument("--cleanup-stale", action="store_true",
                        help="remove namespaces, links and temp dirs of dead runs, then exit")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the command every rank runs")
    args = parser.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.cleanup_stale and not args.command:
        parser.error("give the command to run after --, or --cleanup-stale")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        slow = parse_slow(args.slow)
    except CpuLimitError as e:
        print(f"emulate_cluster: {e}", file=sys.stderr)
        return 2
    reason = check_permitted()
    if reason:
        print(reason + ".", file=sys.stderr)
        return 2
    if args.cleanup_stale:
        removed = cleanup_stale()
        print(f"emulate_cluster: removed {len(removed)} leftovers" +
              (f": {' '.join(removed)}" if removed else ""), file=sys.stderr)
        return 0
    cluster = EmulatedCluster(args.num_ranks, preset=args.link, rate=args.rate,
                              delay=args.delay, port=args.port, mtu=args.mtu)
    with cluster:
        for path, made in ((args.write_hostfile, cluster.hostfile_path),
                           (args.write_launch_hostfile, cluster.launch_hostfile_path)):
            if path:
                shutil.copyfile(made, path)
        delay_note = "" if cluster.delay_emulated else " (delay not emulated: no netem)"
        print(f"emulate_cluster: {cluster.n} ranks at {', '.join(cluster.ips)} in namespaces "
              f"{cluster.prefix}r*, link {cluster.link.describe()}{delay_note}",
              file=sys.stderr, flush=True)
        try:
            return cluster.run(args.command, timeout=args.timeout, slow=slow)
        except CpuLimitError as e:
            print(f"emulate_cluster: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NetemError as error:
        print(f"emulate_cluster: {error}.", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("emulate_cluster: interrupted; everything it made is removed", file=sys.stderr)
        sys.exit(130)
