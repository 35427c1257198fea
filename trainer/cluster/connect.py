"""Joining the group, with a deadline and words for a peer that never connects.

``mx.distributed.init`` connects the ring inside C++ while holding Python's
GIL: rank ``r`` accepts a connection from its left neighbour ``r-1`` on its
own address and connects to its right neighbour ``r+1``; a refused connect
is retried for about half a minute, an accept waits forever, and no Python
thread (a watchdog, a signal handler) runs meanwhile. A rank that died at
start, a wrong port or a machine that is off would leave the others waiting
in silence.

So before MLX connects, :func:`rendezvous` does the same thing in Python,
with a deadline (``parallel.timeout_s``): every rank listens on its own ring
address, connects to its right neighbour, and the two exchange a greeting
naming the rank and the job (a digest of the ring hostfile). A token then
travels twice around the ring (everyone is here; go), so every rank calls
``mx.distributed.init`` within milliseconds of the others, and MLX finds each
neighbour listening. A rank that misses the deadline says which neighbour
never came and at which address; the others, further along the ring, say
that the ranks before them did not all arrive.

Only the ring backend (the one a hostfile describes) is checked this way;
JACCL, NCCL and MPI connect as before.
"""

import errno
import hashlib
import json
import signal
import socket
import threading
import time

from ..parallel import World, init_world
from ..env import launch_env
from ..errors import DistributedError, Stopped

POLL_S = 0.2
_joined: set = set()  # backends this process already joined
GREETING = "mlx-dp-rendezvous"

_ERRNO_WORDS = {
    errno.ECONNREFUSED: "connection refused: nothing listens there (that rank's process is not running, or its "
                        "port is wrong)",
    errno.ETIMEDOUT: "no answer: the machine is off or unreachable",
    errno.EHOSTUNREACH: "no route to the host: the machine is off or on another network",
    errno.ENETUNREACH: "the network is unreachable",
    errno.EADDRINUSE: "the address is in use by another process",
    errno.EADDRNOTAVAIL: "that address does not belong to this machine (the hostfile gives this rank another "
                         "machine's address)",
}


class _Stop(Exception):
    """Raised inside the rendezvous when a stop was requested (a signal)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _words(code) -> str:
    return _ERRNO_WORDS.get(code, errno.errorcode.get(code, str(code)) if isinstance(code, int) else str(code))


def _job_digest(hosts: list) -> str:
    return hashlib.sha1(json.dumps(hosts).encode()).hexdigest()[:12]


class _Rendezvous:
    """One rank's side of the rendezvous; see the module docstring."""

    def __init__(self, hosts: list, rank: int, timeout_s: float, should_stop):
        self.hosts, self.rank, self.n = hosts, rank, len(hosts)
        self.timeout_s, deadline = timeout_s, time.monotonic() + timeout_s
        self.left, self.right = (rank - 1) % self.n, (rank + 1) % self.n
        self.deadline, self.should_stop = deadline, should_stop
        self.job = _job_digest(hosts)
        self.listeners, self.left_conns, self.right_conns = [], [], []
        self.last_error = None

    def _check(self) -> None:
        signum = self.should_stop()
        if signum:
            raise _Stop(signum)

    def _address(self, rank: int, i: int = 0) -> str:
        return str(self.hosts[rank][i])

    def listen(self) -> None:
        for i, address in enumerate(self.hosts[self.rank]):
            host, port = _split(address)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as e:
                sock.close()
                raise DistributedError(f"rank {self.rank} cannot listen on its address {address}: "
                                       f"{_words(e.errno)}") from None
            sock.listen(8)
            sock.settimeout(POLL_S)
            self.listeners.append(sock)

    def _hello(self, rank: int) -> bytes:
        return f"{GREETING} {self.job} rank {rank} of {self.n}\n".encode()

    def accept_left(self) -> None:
        """Accept the left neighbour on every own address (greeting checked); runs in a thread."""
        expected = self._hello(self.left)
        for sock in self.listeners:
            while time.monotonic() < self.deadline:
                try:
                    conn, _ = sock.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return  # closed: the rendezvous ended
                conn.settimeout(max(0.1, min(5.0, self.deadline - time.monotonic())))  # a rank greets at once
                try:
                    greeting = _read_line(conn)
                except OSError:
                    greeting = b""
                if greeting == expected:
                    conn.sendall(b"ok\n")
                    self.left_conns.append(conn)
                    break
                conn.close()  # a stray client, or another job's rank: keep waiting for ours

    def connect_right(self) -> None:
        """Connect to each of the right neighbour's addresses and greet it; retries until the deadline."""
        for i in range(len(self.hosts[self.right])):
            address = self._address(self.right, i)
            while True:
                self._check()
                if time.monotonic() > self.deadline:
                    raise self._missing_right(address)
                try:
                    conn = socket.create_connection(_split(address), timeout=max(0.1, min(
                        2.0, self.deadline - time.monotonic())))
                except OSError as e:
                    self.last_error = e.errno if e.errno is not None else errno.ETIMEDOUT
                    time.sleep(POLL_S)
                    continue
                conn.settimeout(max(0.1, self.deadline - time.monotonic()))
                try:
                    conn.sendall(self._hello(self.rank))
                    answer = _read_line(conn)
                except socket.timeout:
                    answer = None
                except OSError:
                    answer = b""
                if answer == b"ok\n":
                    self.right_conns.append(conn)
                    break
                conn.close()
                self.last_error = ("it accepted the connection but never answered (the process is stopped or hung)"
                                   if answer is None else "another program, or another job's rank, answered there")
                time.sleep(POLL_S)

    def _missing_right(self, address: str) -> DistributedError:
        why = _words(self.last_error) if self.last_error is not None else "no answer"
        return DistributedError(f"rank {self.rank} could not reach rank {self.right} at {address} within "
                                f"parallel.timeout_s={self.timeout_s:g}: {why}", blamed=(self.right,))

    def _missing_left(self) -> DistributedError:
        return DistributedError(
            f"rank {self.left} ({self._address(self.left)}) never connected to rank {self.rank} within "
            f"parallel.timeout_s={self.timeout_s:g}: its process died at start, its port is wrong, or its machine is "
            "off or unreachable", blamed=(self.left,))

    def pass_token(self, token: bytes, what: str) -> None:
        """Send ``token`` right and wait for it from the left (rank 0 starts, the others forward)."""
        if self.rank == 0:
            self.right_conns[0].sendall(token)
        conn = self.left_conns[0]
        while True:
            self._check()
            if time.monotonic() > self.deadline:
                raise DistributedError(
                    f"rank {self.rank}: the group did not form within parallel.timeout_s={self.timeout_s:g}: {what} "
                    "(see the other ranks' messages for the one that is missing)")
            conn.settimeout(POLL_S)
            try:
                got = _read_line(conn)
            except socket.timeout:
                continue
            except OSError:
                got = b""
            if got != token:
                raise DistributedError(f"rank {self.rank}: rank {self.left} ({self._address(self.left)}) left the "
                                       "group while it formed", blamed=(self.left,))
            break
        if self.rank != 0:
            self.right_conns[0].sendall(token)

    def close(self) -> None:
        for sock in self.listeners + self.left_conns + self.right_conns:
            try:
                sock.close()
            except OSError:
                pass


def _read_line(conn: socket.socket, limit: int = 256) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def rendezvous(timeout_s: float, should_stop=lambda: 0) -> None:
    """Meet every ring neighbour before MLX connects, or say which one never came (no-op off the ring).

    Args:
        timeout_s (float): ``parallel.timeout_s``: the deadline for the whole group to gather.
        should_stop (callable): Returns the number of a signal that asked to
            stop, or 0; the rendezvous then ends with :class:`trainer.errors.Stopped`.
            Default: never.

    Raises:
        DistributedError: A neighbour never connected, could not be reached,
            or the group did not gather in time.
        Stopped: A signal asked to stop meanwhile.
    """
    env = launch_env()
    hosts = env.ring_hosts
    if env.backend != "ring" or len(hosts) < 2 or env.rank >= len(hosts):
        return
    r = _Rendezvous(hosts, env.rank, timeout_s, should_stop)
    try:
        r.listen()
        acceptor = threading.Thread(target=r.accept_left, daemon=True, name="mlx-dp-rendezvous")
        acceptor.start()
        r.connect_right()
        while acceptor.is_alive():
            r._check()
            acceptor.join(POLL_S)
        if len(r.left_conns) < len(r.listeners):
            raise r._missing_left()
        for sock in r.listeners:  # MLX binds these addresses next
            sock.close()
        r.pass_token(b"here\n", "ranks before this one in the ring have not all arrived")
        r.pass_token(b"go\n", "the start signal did not come round")
    except _Stop as e:
        raise Stopped(f"{signal.Signals(e.signum).name} while the ranks connected; nothing was trained",
                      e.signum) from None
    finally:
        r.close()


def join(backend: str, timeout_s: float, should_stop=lambda: 0) -> World:
    """Meet the other ranks (:func:`rendezvous`), then join MLX's group.

    Args:
        backend (str): ``parallel.backend``.
        timeout_s (float): ``parallel.timeout_s``.
        should_stop (callable): See :func:`rendezvous`.

    Raises:
        DistributedError: The group cannot form, naming the rank and its address.
    """
    if backend in ("any", "ring") and not _joined:  # MLX keeps its group: a second run in this process reuses it
        rendezvous(timeout_s, should_stop)
    world = init_world(backend)
    _joined.add(backend)
    return world
