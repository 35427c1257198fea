"""An emulated desk cluster reached over real ssh: namespaces of ``lab.netem``, each with its own sshd.

    from lab.sshcluster import SshCluster
    with SshCluster(n=2, workdir=tmp) as cluster:
        subprocess.run([*cluster.launch_args(), "--", "mlx-dp", "train", recipe], env=cluster.env)
        cluster.link(1, up=False)  # host 1's cable is pulled

Each "machine" is a network namespace with its own address and a real sshd
(Debian's openssh-server) listening on it. The keys are made here: sshd trusts a
client key, and an ``ssh`` first on the launcher's PATH (``cluster.env``) adds a
config with that key (ssh reads ~/.ssh/config from the passwd home, not $HOME, so
a config cannot be slipped in any other way). The launcher runs in the root
namespace and reaches the namespaces over the bridge, which gets an address for it.

Needs root, iproute2 and sshd; :func:`check_permitted` says why not.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from . import netem

SSHD = shutil.which("sshd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
SSH, KEYGEN = shutil.which("ssh"), shutil.which("ssh-keygen")
SSHD_CONFIG = """ListenAddress {ip}
Port 22
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd-{rank}.pid
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
"""
SSH_CONFIG = """Host *
  User {user}
  IdentityFile {dir}/client_key
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  BatchMode yes
  ConnectTimeout 10
"""
# What the remote ranks need from this environment (sshd gives them a clean one).
PASSED_ON = ("HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE", "TOKENIZERS_PARALLELISM",
             "MLX_DP_CACHE", "MLX_DP_BLAS", "MLX_DP_BLAS_THREADS")


def check_permitted() -> str | None:
    """Why an ssh cluster cannot be built here, or ``None``."""
    return netem.check_permitted() or (
        None if SSHD and SSH and KEYGEN else "sshd, ssh and ssh-keygen are needed (apt-get install openssh-server)")


def _wait_for_port(ip: str, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise netem.NetemError(f"sshd on {ip}:{port} did not come up")


class SshCluster:
    """N namespaces, each with an sshd, and a hostfile naming them.

    Args:
        n: Hosts (ranks), at least 2.
        workdir: A directory for keys, configs, logs and the hostfile.
        subnet: The first three octets of every address (default: one of this
            process's own, since the root namespace is shared).

    Attributes once entered: ``hostfile`` (path), ``env`` (for the launcher:
    PATH finds the ssh wrapper), ``emulated`` (the ``EmulatedCluster``), ``ips``.
    """

    def __init__(self, n: int, workdir: Path, subnet: str | None = None):
        self.n, self.workdir = n, Path(workdir)
        self.subnet = subnet or f"10.214.{os.getpid() % 200 + 1}"
        self.daemons: list[subprocess.Popen] = []
        self.emulated = None

    def __enter__(self) -> SshCluster:
        keys = self.workdir / "ssh"
        keys.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "client_key"):
            if not (keys / name).exists():
                subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
        (keys / "authorized_keys").write_text((keys / "client_key.pub").read_text())
        (keys / "ssh_config").write_text(SSH_CONFIG.format(user=os.environ.get("USER", "root"), dir=keys))
        wrapper = self.workdir / "bin" / "ssh"
        wrapper.parent.mkdir(exist_ok=True)
        wrapper.write_text(f'#!/bin/sh\nexec {SSH} -F {keys}/ssh_config "$@"\n')
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
        self.emulated = netem.EmulatedCluster(n=self.n, host_ip=True, subnet=self.subnet).__enter__()
        try:
            for rank, (space, ip) in enumerate(zip(self.emulated.namespaces, self.emulated.ips)):
                config = keys / f"sshd-{rank}.conf"
                config.write_text(SSHD_CONFIG.format(ip=ip, dir=keys, rank=rank))
                self.daemons.append(subprocess.Popen(["ip", "netns", "exec", space, SSHD, "-D", "-e", "-f", str(config)],
                                                     stdout=subprocess.DEVNULL,
                                                     stderr=open(keys / f"sshd-{rank}.log", "w")))
            for ip in self.emulated.ips:
                _wait_for_port(ip, 22)
        except BaseException:
            self.close()
            raise
        self.ips = self.emulated.ips
        self.hostfile = self.workdir / "hosts.json"
        self.hostfile.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": ip, "ips": [ip]} for ip in self.ips]}))
        self.env = {**os.environ, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def launch_args(self, launcher: str, cwd: str) -> list[str]:
        """``mlx-dp launch --hostfile ...`` with what remote ranks need from this environment."""
        passed = [arg for key in PASSED_ON if key in os.environ for arg in ("--env", f"{key}={os.environ[key]}")]
        return [launcher, "launch", "--hostfile", str(self.hostfile), "--cwd", cwd, *passed]

    def link(self, rank: int, up: bool) -> None:
        """Plug host ``rank``'s cable in or pull it (its veth on the bridge goes up or down)."""
        subprocess.run(["ip", "link", "set", self.emulated.host_veths[rank], "up" if up else "down"], check=True)

    def processes(self) -> list[str]:
        """Processes still running in the hosts' namespaces, sshd aside."""
        found = []
        for space in self.emulated.namespaces:
            for pid in subprocess.run(["ip", "netns", "pids", space], capture_output=True, text=True).stdout.split():
                try:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if "sshd" not in command:
                    found.append(command)
        return found

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.terminate()
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
        self.daemons = []
        if self.emulated is not None:
            self.emulated.close()
