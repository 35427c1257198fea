"""Heartbeats between ranks, so a survivor can name the peer that died or hung; private to the job.

MLX's collectives say only "connection to a peer was lost", and a stopped
peer (SIGSTOP, a sleeping laptop) looks exactly like a slow one: ``all_sum``
just waits. This side channel runs beside the training loop on plain TCP:
rank 0 runs a small hub, every other rank connects to it, and each rank
sends its step and phase about twice a second. The hub re-broadcasts the
table of all ranks, so every rank knows when each peer was last heard from
and what it was doing.

* A killed rank's socket closes at once: the hub marks it lost.
* A stopped or hung rank stops sending (or stays in a compute phase while the
  others wait in a collective): the watchdog names it.

**Private to the job.** The hub listens on rank 0's own address in the job
(the ring's, the JACCL or NCCL coordinator's: loopback for a local launch),
never on every interface. A connection counts only after a challenge and
response keyed by the job's secret (HMAC-SHA256, both ways): ``mlx-dp launch``
makes a fresh one per launch and hands it to each rank in its environment
(``MLX_DP_JOB_SECRET``; to a remote rank through its ssh connection), never
on a command line, on disk or in a log. Under another launcher rank 0 makes
one and passes it to the others over MLX's own connection as the group forms.
Everything read is parsed defensively, with bounded lines and buffers: a
stranger's bytes are dropped and counted (:attr:`PeerMonitor.strangers`),
and no input can end a thread or grow memory.

What someone on the same network can still do: connect to the ports of MLX's
own ring (or JACCL) backend, which has no authentication, and disturb or end
the job there; and, on a shared network, read heartbeats and gradients as
they pass. Keep a desk cluster on a network you trust (a Thunderbolt bridge,
a switch of your own).

When no address is known, the monitor is simply absent and the watchdog still
works, without naming peers.
"""

import hashlib
import hmac
import json
import os
import secrets
import socket
import threading
import time

from .. import log
from ..env import launch_env

INTERVAL_S = 0.5
STALE_S = 3.0  # not heard from for this long: stopped or hung
WAIT_PHASES = ("sync", "barrier", "eval", "agreement", "rank0_first", "all_sum", "save")
SECRET_VAR = "MLX_DP_JOB_SECRET"
GREETING = b"mlx-dp-peers 1"
MAX_LINE = 64 * 1024  # a heartbeat is ~100 bytes, a table ~100 per rank
MAX_HELLO = 1024  # a proof is ~200 bytes: a stranger's stream is cut off after this much
HANDSHAKE_S = 3.0  # a connection that has not proved itself by then is dropped
MAX_PENDING = 16  # connections still proving themselves at a time; more are dropped at once


def job_secret() -> bytes | None:
    """The secret the launcher handed this rank, or ``None`` (another launcher: see :meth:`PeerMonitor.start`)."""
    value = os.environ.get(SECRET_VAR, "").strip()
    return value.encode() if value else None


def proof(secret: bytes, nonce: bytes, who: str) -> str:
    """HMAC-SHA256 of ``nonce`` and who answers: what a peer shows to prove it knows the secret."""
    return hmac.new(secret, nonce + b"|" + who.encode(), hashlib.sha256).hexdigest()


class LineReader:
    """Newline-delimited messages from a socket, at most ``limit`` bytes each (else ``ValueError``)."""

    def __init__(self, conn: socket.socket, limit: int = MAX_LINE):
        self.conn, self.buffer, self.limit = conn, bytearray(), limit

    def lines(self):
        """Yield complete lines until the connection ends; raises ``ValueError`` on an over-long line."""
        while True:
            at = self.buffer.find(b"\n")
            if at >= 0:
                line = bytes(self.buffer[:at])
                del self.buffer[:at + 1]
                yield line
                continue
            if len(self.buffer) > self.limit:
                raise ValueError("line too long")
            data = self.conn.recv(min(4096, self.limit + 1))
            if not data:
                return
            self.buffer += data


def _address(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return socket.gethostbyname(text)
    except OSError:
        return None


class PeerMonitor:
    """This rank's view of every rank's liveness, step and phase.

    Use :meth:`start` (a collective: every rank must call it). Call
    :meth:`beat` on each phase change; :meth:`describe_stalled` and
    :meth:`lost_ranks` are read by the watchdog and the failure handler.
    """

    def __init__(self, world, secret: bytes):
        self.world = world
        self.secret = secret
        self.table = {r: {"step": 0, "phase": "setup", "heard": time.monotonic(), "lost": False, "host": "?"}
                      for r in range(world.size)}
        self.mine = {"step": 0, "phase": "setup"}
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.server = None
        self.clients: dict[int, socket.socket] = {}
        self.sock = None
        self.hub_heard = time.monotonic()
        self.strangers = 0  # connections and lines refused: no secret, malformed, too long
        self.pending = threading.BoundedSemaphore(MAX_PENDING)

    # ------------------------------------------------------------ setup

    @classmethod
    def start(cls, world) -> "PeerMonitor | None":
        """Connect all ranks (collective). Returns ``None`` for one rank or no address."""
        if world.size == 1:
            return None
        address = _address(launch_env().rank0_address())
        secret = job_secret()
        server, offer = None, ""
        if world.rank == 0 and address is not None:
            try:
                server = socket.socket()
                server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                server.bind((address, 0))  # the job's own address, never every interface
                server.listen(max(8, world.size))
                offer = str(server.getsockname()[1])
            except OSError:
                server, offer = None, ""
            if offer and secret is None:  # not our launcher: this job's secret travels over MLX's connection
                secret = secrets.token_hex(32).encode()
                offer += ":" + secret.decode()
        # phase "connecting": the group's first exchange, watched as part of forming the group
        port, _, shared = world.all_gather_bytes(offer.encode(), phase="connecting")[0].decode().partition(":")
        if not port:
            return None
        monitor = cls(world, secret or shared.encode())
        if world.rank == 0:
            monitor.server = server
            threading.Thread(target=monitor._accept, daemon=True, name="mlx-dp-peers-accept").start()
        else:
            try:
                monitor.sock = socket.create_connection((address, int(port)), timeout=10)
                monitor._prove_to_hub(monitor.sock)
                monitor.sock.settimeout(None)
            except (OSError, ValueError):
                return None  # peers stay unnamed; the watchdog still works
            threading.Thread(target=monitor._read_hub, args=(monitor.sock,), daemon=True,
                             name="mlx-dp-peers-read").start()
        threading.Thread(target=monitor._send_loop, daemon=True, name="mlx-dp-peers-send").start()
        return monitor

    def _prove_to_hub(self, sock: socket.socket) -> None:
        """Answer the hub's challenge and check the hub's answer to ours (both keyed by the secret)."""
        reader = LineReader(sock)
        lines = reader.lines()
        greeting, _, nonce = next(lines, b"").partition(b" nonce ")
        if greeting != GREETING or len(nonce) != 32:
            raise ValueError("not the job's hub")
        mine = secrets.token_hex(16)
        hello = {"rank": self.world.rank, "proof": proof(self.secret, nonce, f"rank{self.world.rank}"),
                 "nonce": mine}
        sock.sendall((json.dumps(hello) + "\n").encode())
        answer = json.loads(next(lines, b"{}"))
        if not isinstance(answer, dict) or not hmac.compare_digest(
                str(answer.get("proof", "")), proof(self.secret, mine.encode(), "hub")):
            raise ValueError("the hub does not know the job's secret")
        self._leftover = bytes(reader.buffer)

    # ------------------------------------------------------------ the hub (rank 0)

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if not self.pending.acquire(blocking=False):  # a flood of connections: drop, count, go on
                self._refuse(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="mlx-dp-peers-peer").start()

    def _stranger(self) -> None:
        """Count bytes or a connection from outside the job; say so once (the count follows at the end)."""
        with self.lock:
            self.strangers += 1
            first = self.strangers == 1
        if first:
            log.each("the heartbeat channel dropped a connection or line that did not come from this job (it does "
                     "not know the job's secret); later ones are only counted")

    def _refuse(self, conn: socket.socket) -> None:
        self._stranger()
        try:
            conn.close()
        except OSError:
            pass

    def _serve(self, conn: socket.socket) -> None:
        """One peer's connection: prove it within HANDSHAKE_S, then take its heartbeats. Never raises."""
        rank = None
        try:
            try:
                rank = self._challenge(conn)
            finally:
                self.pending.release()
            if rank is None:
                self._refuse(conn)
                return
            self._heartbeats(conn, rank)
        except Exception:  # noqa: BLE001 (a peer's bytes must never end this thread's caller)
            self._refuse(conn)
            return
        if not self.closed.is_set() and rank is not None:
            with self.lock:
                if self.clients.get(rank) is conn:
                    self.table[rank]["lost"] = True

    def _challenge(self, conn: socket.socket) -> int | None:
        """The rank a connection proves it is (it must know the secret), or ``None``."""
        conn.settimeout(HANDSHAKE_S)
        nonce = secrets.token_hex(16).encode()
        conn.sendall(GREETING + b" nonce " + nonce + b"\n")
        try:
            hello = json.loads(next(LineReader(conn, MAX_HELLO).lines(), b""))
        except (ValueError, OSError, StopIteration):
            return None
        if not isinstance(hello, dict):
            return None
        rank = hello.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank < self.world.size:
            return None
        if not hmac.compare_digest(str(hello.get("proof", "")), proof(self.secret, nonce, f"rank{rank}")):
            return None
        theirs = str(hello.get("nonce", ""))[:64].encode()
        conn.sendall((json.dumps({"proof": proof(self.secret, theirs, "hub")}) + "\n").encode())
        conn.settimeout(None)
        with self.lock:
            old = self.clients.get(rank)
            self.clients[rank] = conn
            self.table[rank].update(lost=False, heard=time.monotonic())
        if old is not None:
            try:
                old.close()
            except OSError:
                pass
        return rank

    def _heartbeats(self, conn: socket.socket, rank: int) -> None:
        """Read a proven peer's heartbeats; malformed lines are counted and skipped."""
        for line in LineReader(conn).lines():
            beat = self._parse_beat(line)
            if beat is None:
                self._stranger()
                continue
            with self.lock:
                self.table[rank].update(**beat, heard=time.monotonic())

    @staticmethod
    def _parse_beat(line: bytes) -> dict | None:
        try:
            msg = json.loads(line)
        except ValueError:
            return None
        if not isinstance(msg, dict):
            return None
        step, phase, host = msg.get("step"), msg.get("phase"), msg.get("host", "?")
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(phase, str):
            return None
        return {"step": step, "phase": phase[:64], "host": str(host)[:255]}

    # ------------------------------------------------------------ the other ranks

    def _read_hub(self, conn: socket.socket) -> None:
        """Tables broadcast by the hub (authenticated at connect); EOF marks rank 0 lost. Never raises."""
        reader = LineReader(conn)
        reader.buffer += getattr(self, "_leftover", b"")
        try:
            for line in reader.lines():
                if self.closed.is_set():
                    return
                try:
                    self._merge(json.loads(line))
                except (ValueError, TypeError, KeyError, AttributeError):
                    self._stranger()
        except (OSError, ValueError):
            pass
        if not self.closed.is_set():
            with self.lock:
                self.table[0]["lost"] = True

    def _merge(self, msg: dict) -> None:
        """A table broadcast from the hub: ages are relative, so convert to our clock."""
        now = time.monotonic()
        rows = {}
        for key, row in msg["table"].items():
            r = int(key)
            if 0 <= r < self.world.size:
                rows[r] = {"step": int(row["step"]), "phase": str(row["phase"])[:64],
                           "heard": now - float(row["age"]), "lost": bool(row["lost"]), "host": str(row["host"])[:255]}
        with self.lock:
            self.hub_heard = now
            for r, row in rows.items():
                self.table[r].update(row)

    def _send_loop(self) -> None:
        host = self.world.host
        while not self.closed.wait(INTERVAL_S):
            if self.world.rank == 0:
                now = time.monotonic()
                with self.lock:
                    self.table[0].update(step=self.mine["step"], phase=self.mine["phase"], heard=now, host=host)
                    payload = {"table": {r: {"step": row["step"], "phase": row["phase"], "age": now - row["heard"],
                                             "lost": row["lost"], "host": row["host"]}
                                         for r, row in self.table.items()}}
                    targets = list(self.clients.items())
                line = (json.dumps(payload) + "\n").encode()
                for rank, conn in targets:
                    try:
                        conn.sendall(line)
                    except OSError:
                        with self.lock:
                            self.table[rank]["lost"] = True
            elif self.sock is not None:
                line = json.dumps({"host": host, **self.mine}) + "\n"
                try:
                    self.sock.sendall(line.encode())
                except OSError:
                    with self.lock:
                        self.table[0]["lost"] = True

    # ------------------------------------------------------------ queries

    def beat(self, step: int, phase: str) -> None:
        """Record this rank's progress (sent with the next heartbeat)."""
        self.mine = {"step": step, "phase": phase}

    def lost_ranks(self, wait_s: float = 1.5) -> list[int]:
        """Ranks known to be gone; waits briefly for the news to arrive."""
        end = time.monotonic() + wait_s
        while True:
            with self.lock:
                lost = [r for r, row in self.table.items() if row["lost"] and r != self.world.rank]
                if self.world.rank != 0 and time.monotonic() - self.hub_heard > STALE_S and 0 not in lost:
                    lost.append(0)
            if lost or time.monotonic() > end:
                return sorted(lost)
            time.sleep(0.1)

    def suspects(self) -> list[int]:
        """Ranks lost or not heard from for over :data:`STALE_S` (rank 0 too, when the hub is silent)."""
        now = time.monotonic()
        with self.lock:
            found = {r for r, row in self.table.items()
                     if r != self.world.rank and (row["lost"] or now - row["heard"] > STALE_S)}
            if self.world.rank != 0 and now - self.hub_heard > STALE_S:
                found.add(0)
        return sorted(found)

    def silent_seconds(self) -> float:
        """How long the longest-silent other rank (or, on ranks other than 0, the hub) has not been heard from."""
        now = time.monotonic()
        with self.lock:
            ages = [now - row["heard"] for r, row in self.table.items() if r != self.world.rank]
            if self.world.rank != 0:
                ages.append(now - self.hub_heard)
        return max(ages, default=0.0)

    def describe_stalled(self) -> str:
        """One clause naming the ranks that hold the others up, or ``""``."""
        now = time.monotonic()
        me = self.world.rank
        with self.lock:
            rows = {r: dict(row) for r, row in self.table.items()}
        if me != 0 and now - self.hub_heard > STALE_S:
            return f"rank 0 ({rows[0]['host']}) has not been heard from for {now - self.hub_heard:.0f}s (stopped or hung)"
        rows[me].update(step=self.mine["step"], phase=self.mine["phase"], heard=now)
        lost = [r for r, row in rows.items() if row["lost"]]
        if lost:
            return "lost " + ", ".join(f"rank {r} ({rows[r]['host']})" for r in lost)
        silent = [r for r, row in rows.items() if now - row["heard"] > STALE_S]
        if silent:
            return "; ".join(f"rank {r} ({rows[r]['host']}) has not been heard from for {now - rows[r]['heard']:.0f}s, "
                             f"last at update {rows[r]['step']} in {rows[r]['phase']} (stopped or hung)"
                             for r in silent)
        busy = [r for r, row in rows.items() if row["phase"] not in WAIT_PHASES]
        waiting = [r for r, row in rows.items() if row["phase"] in WAIT_PHASES]
        if busy and waiting:
            return "; ".join(f"rank {r} ({rows[r]['host']}{', this rank' if r == me else ''}) is still in "
                             f"{rows[r]['phase']} at update {rows[r]['step']} while the others wait for it"
                             for r in busy)
        behind = min(row["step"] for row in rows.values())
        laggards = [r for r, row in rows.items() if row["step"] == behind]
        if len(laggards) < len(rows):
            return ", ".join(f"rank {r} ({rows[r]['host']})" for r in laggards) + f" is behind at update {behind}"
        return ""

    def close(self) -> None:
        self.closed.set()
        for s in [self.server, self.sock, *self.clients.values()]:
            if s is None:
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
