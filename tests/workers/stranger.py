"""A stranger on the network, for the heartbeat-channel test; real processes, no mocks.

``sink``: a listener that greets, reads at most a line of 1 KB, and hangs up, the way
the hub treats a stranger: it stands in for the hub so the attack's own cost is the same
in both rounds. Prints its port.

``attack TARGET_FILE``: junk streams with no newline and forged heartbeats (no secret,
and the line that once killed the hub's threads), sent to the port named in
TARGET_FILE, read afresh on every connection; runs until killed.
"""

import socket
import sys
import threading
import time
from pathlib import Path


def sink() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    print(server.getsockname()[1], flush=True)

    def serve(conn):
        with conn:
            try:
                conn.settimeout(3)
                conn.sendall(b"mlx-dp-peers 1 nonce " + b"0" * 32 + b"\n")
                data = b""
                while b"\n" not in data and len(data) <= 1024:
                    chunk = conn.recv(1025)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def attack(target_file: str) -> None:
    def port():
        return int(Path(target_file).read_text())

    def junk():
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port()), timeout=2) as s:
                    while True:
                        s.sendall(b"x" * 65536)
            except OSError:
                time.sleep(0.001)

    def forged():
        payloads = (b'{"rank": 99}\n', b'{"rank": 1, "proof": "00", "nonce": "aa"}\n'
                    b'{"step": 999999, "phase": "compute", "host": "evil"}\n')
        while True:
            for payload in payloads:
                try:
                    with socket.create_connection(("127.0.0.1", port()), timeout=2) as s:
                        s.recv(100)
                        s.sendall(payload)
                        time.sleep(0.05)
                except OSError:
                    time.sleep(0.001)

    for target in (junk, junk, forged):
        threading.Thread(target=target, daemon=True).start()
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sink() if sys.argv[1] == "sink" else attack(sys.argv[2])
