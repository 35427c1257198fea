"""Free TCP ports on loopback, for ring hostfiles that local ranks listen on.

Other jobs on the same machine (a second test run, another user's ``mlx.launch``
on its default port 32323) may hold any fixed port, so local launches ask the
kernel for free ones.
"""

import json
import socket
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


def free_port_block(n: int, tries: int = 50) -> int | None:
    """A port p with p..p+n-1 all free on loopback now (rank r of a local ring listens on p+r).

    Args:
        n (int): Consecutive ports needed.
        tries (int): Random starting points to try. Default: ``50``.

    Returns:
        int | None: The first port, or ``None`` when no block was found.
    """
    for _ in range(tries):
        base = free_ports(1)[0]
        if base + n > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    return None


def write_ring_hostfile(path: Path, n: int, host: str = "127.0.0.1") -> Path:
    """Write the JSON hostfile the ring backend reads from ``MLX_HOSTFILE`` (one free port per rank)."""
    path.write_text(json.dumps([[f"{host}:{p}"] for p in free_ports(n)]))
    return path
