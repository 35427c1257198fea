"""Heartbeats between ranks, so a survivor can name the peer that died or hung.

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

Rank 0's address comes from the launcher (``MLX_HOSTFILE``'s first entry for
the ring backend, ``MLX_JACCL_COORDINATOR`` or ``NCCL_HOST_IP``); the port is
chosen by rank 0 and shared with one ``all_gather`` at start. When no address
is known, the monitor is simply absent and the watchdog still works, without
naming peers.
"""

import json
import socket
import threading
import time

from ..env import launch_env

INTERVAL_S = 0.5
STALE_S = 3.0  # not heard from for this long: stopped or hung
WAIT_PHASES = ("sync", "barrier", "eval", "agreement", "rank0_first", "all_sum", "save")


class PeerMonitor:
    """This rank's view of every rank's liveness, step and phase.

    Use :meth:`start` (a collective: every rank must call it). Call
    :meth:`beat` on each phase change; :meth:`describe_stalled` and
    :meth:`lost_ranks` are read by the watchdog and the failure handler.
    """

    def __init__(self, world):
        self.world = world
        self.table = {r: {"step": 0, "phase": "setup", "heard": time.monotonic(), "lost": False, "host": "?"}
                      for r in range(world.size)}
        self.mine = {"step": 0, "phase": "setup"}
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.server = None
        self.clients: dict[int, socket.socket] = {}
        self.sock = None
        self.hub_heard = time.monotonic()

    # ------------------------------------------------------------ setup

    @classmethod
    def start(cls, world) -> "PeerMonitor | None":
        """Connect all ranks (collective). Returns ``None`` for one rank or no address."""
        if world.size == 1:
            return None
        monitor = cls(world)
        address = launch_env().rank0_address()
        port = 0
        if world.rank == 0 and address is not None:
            monitor.server = socket.socket()
            monitor.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            monitor.server.bind(("0.0.0.0", 0))
            monitor.server.listen(world.size)
            port = monitor.server.getsockname()[1]
        # phase "connecting": the group's first exchange, watched as part of forming the group
        port = int(world.all_gather_bytes(str(port).encode(), phase="connecting")[0])
        if not port:
            return None
        if world.rank == 0:
            threading.Thread(target=monitor._accept, daemon=True, name="mlx-dp-peers-accept").start()
        else:
            try:
                monitor.sock = socket.create_connection((address, port), timeout=10)
                monitor.sock.settimeout(None)
            except OSError:
                return None  # peers stay unnamed; the watchdog still works
            threading.Thread(target=monitor._read, args=(monitor.sock, 0), daemon=True,
                             name="mlx-dp-peers-read").start()
        threading.Thread(target=monitor._send_loop, daemon=True, name="mlx-dp-peers-send").start()
        return monitor

    # ------------------------------------------------------------ I/O threads

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn, None), daemon=True, name="mlx-dp-peers-read").start()

    def _read(self, conn: socket.socket, fixed_rank: int | None) -> None:
        """Read newline-delimited JSON; EOF marks the sender lost."""
        rank = fixed_rank
        buf = b""
        while not self.closed.is_set():
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if self.world.rank == 0:
                    rank = msg["rank"]
                    with self.lock:
                        self.clients[rank] = conn
                        self.table[rank].update(step=msg["step"], phase=msg["phase"], heard=time.monotonic(),
                                                host=msg.get("host", "?"))
                else:
                    self._merge(msg)
        if self.closed.is_set():
            return
        with self.lock:
            lost = rank if rank is not None else None
            if lost is not None:
                self.table[lost]["lost"] = True

    def _merge(self, msg: dict) -> None:
        """A table broadcast from the hub: ages are relative, so convert to our clock."""
        now = time.monotonic()
        with self.lock:
            self.hub_heard = now
            for key, row in msg["table"].items():
                r = int(key)
                self.table[r].update(step=row["step"], phase=row["phase"], heard=now - row["age"],
                                     lost=row["lost"], host=row["host"])

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
                line = json.dumps({"rank": self.world.rank, "host": host, **self.mine}) + "\n"
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
