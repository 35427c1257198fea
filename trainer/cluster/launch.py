"""A lean local launcher: N processes on this machine, ring backend over loopback.

``mlx.launch`` relays every rank's output through a busy-polling loop that
costs about 1.4 cores on a 2-core machine (../shared/PLATFORM.md), which
distorts throughput on small machines. This launcher only sets ``MLX_RANK``
and ``MLX_HOSTFILE`` for each rank and lets the ranks write straight to the
terminal. It is for local measurement and tests; real clusters use
``mlx.launch --hostfile``.

Usage::

    mlx-dp launch -n 2 -- mlx-dp train recipes/tiny-lora.yaml
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on loopback right now."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def write_ring_hostfile(path: Path, n: int, host: str = "127.0.0.1") -> Path:
    """Write the JSON hostfile the ring backend reads from ``MLX_HOSTFILE``."""
    path.write_text(json.dumps([[f"{host}:{p}"] for p in free_ports(n)]))
    return path


def launch(command: list[str], n: int, env: dict | None = None, timeout: float | None = None,
           grace_s: float = 10.0) -> int:
    """Run ``command`` as ranks 0..n-1 and wait for all of them.

    If a rank fails, the others are sent SIGTERM, then SIGKILL after
    ``grace_s``. Returns the first non-zero exit status (a signal ``-k``
    becomes ``128+k``), or 0.

    Args:
        command (list[str]): The program and its arguments.
        n (int): Number of ranks.
        env (dict | None): Extra environment for every rank. Default: ``None``.
        timeout (float | None): Kill everything after this many seconds. Default: ``None``.
        grace_s (float): Time between SIGTERM and SIGKILL. Default: ``10``.
    """
    with tempfile.TemporaryDirectory(prefix="mlx-dp-launch-") as tmp:
        base = {**os.environ, **(env or {})}
        if n > 1:  # a one-entry ring never connects: one rank runs as a plain process
            base["MLX_HOSTFILE"] = str(write_ring_hostfile(Path(tmp) / "hosts.json", n))
        else:
            base.pop("MLX_HOSTFILE", None)
        procs = [subprocess.Popen(command, env={**base, "MLX_RANK": str(r)}) for r in range(n)]
        deadline = None if timeout is None else time.monotonic() + timeout
        first_failure = 0
        try:
            while any(p.poll() is None for p in procs):
                failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
                timed_out = deadline is not None and time.monotonic() > deadline
                if (failed or timed_out) and not first_failure:
                    first_failure = _status(failed[0]) if failed else 124
                    _terminate(procs, grace_s)
                    break
                time.sleep(0.05)
        except KeyboardInterrupt:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                p.wait()
        codes = [p.wait() for p in procs]
        if first_failure:
            return first_failure
        bad = [c for c in codes if c != 0]
        return _status(bad[0]) if bad else 0


def _status(code: int) -> int:
    return 128 - code if code < 0 else code


def _terminate(procs, grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="mlx-dp launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, required=True, help="number of local ranks")
    parser.add_argument("--timeout", type=float, default=None, help="kill all ranks after this many seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- program [args...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. mlx-dp launch -n 2 -- mlx-dp train recipe.yaml")
    if args.n < 1:
        parser.error("-n must be at least 1")
    return launch(command, args.n, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
