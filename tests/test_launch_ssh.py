"""`mlx-dp launch --hostfile` over real ssh, as on a desk cluster.

Each "machine" is a network namespace of the emulated cluster (scripts/lab/netem.py)
with its own address and a real sshd (Debian's openssh-server) listening on it. The
test makes the keys: sshd trusts a client key, and an ``ssh`` first on the launcher's
PATH adds a config with that key (ssh reads ~/.ssh/config from the passwd home, not
$HOME, so a config cannot be slipped in any other way). The launcher runs in the root
namespace and reaches the namespaces over the bridge, which gets an address for it.

Needs root, iproute2 and sshd (``.ci/run`` installs openssh-server); skips with the
reason otherwise.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import MLX_DP, PYTHON, ROOT, tiny_recipe, wait_for_step
from lab import netem


SSHD = shutil.which("sshd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
SSH, KEYGEN = shutil.which("ssh"), shutil.which("ssh-keygen")
REASON = netem.check_permitted() or (
    None if SSHD and SSH and KEYGEN else "sshd, ssh and ssh-keygen are needed (apt-get install openssh-server)")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

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
# What the remote ranks need from this test's environment (sshd gives them a clean one).
PASSED_ON = ("HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE", "TOKENIZERS_PARALLELISM")


def _wait_for_port(ip: str, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"sshd on {ip}:{port} did not come up")


@pytest.fixture
def cluster(tmp_path):
    """Two namespaces, each with an sshd; yields (hostfile path, env for the launcher)."""
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "client_key.pub").read_text())
    (keys / "ssh_config").write_text(SSH_CONFIG.format(user=os.environ.get("USER", "root"), dir=keys))
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {SSH} -F {keys}/ssh_config "$@"\n')
    wrapper.chmod(0o755)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
    subnet = f"10.214.{os.getpid() % 200 + 1}"  # the root namespace is shared: a subnet of our own
    with netem.EmulatedCluster(n=2, host_ip=True, subnet=subnet) as emulated:
        daemons = []
        for rank, (space, ip) in enumerate(zip(emulated.namespaces, emulated.ips)):
            config = keys / f"sshd-{rank}.conf"
            config.write_text(SSHD_CONFIG.format(ip=ip, dir=keys, rank=rank))
            daemons.append(subprocess.Popen(["ip", "netns", "exec", space, SSHD, "-D", "-e", "-f", str(config)],
                                            stdout=subprocess.DEVNULL, stderr=open(keys / f"sshd-{rank}.log", "w")))
        for ip in emulated.ips:
            _wait_for_port(ip, 22)
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": ip, "ips": [ip]} for ip in emulated.ips]}))
        env = {**os.environ, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
        try:
            yield hostfile, env, emulated
        finally:
            for daemon in daemons:
                daemon.terminate()
                daemon.wait(timeout=10)


def launch_args(hostfile: Path) -> list[str]:
    passed = [arg for key in PASSED_ON if key in os.environ for arg in ("--env", f"{key}={os.environ[key]}")]
    return [MLX_DP, "launch", "--hostfile", str(hostfile), "--cwd", str(ROOT), *passed]


def processes_in(emulated) -> list[str]:
    """Processes still running in the ranks' namespaces, sshd aside."""
    found = []
    for space in emulated.namespaces:
        for pid in subprocess.run(["ip", "netns", "pids", space], capture_output=True, text=True).stdout.split():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "sshd" not in command:
                found.append(command)
    return found


def test_training_over_ssh_writes_rank_0s_checkpoint(cluster, tmp_path):
    hostfile, env, emulated = cluster
    recipe = tiny_recipe(tmp_path, training={"batch_size": 2, "steps": 4}, checkpoint={"every": 2})
    result = subprocess.run([*launch_args(hostfile), "--", MLX_DP, "train", str(recipe)], env=env,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 4 and status["world_size"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step_0000004").is_dir()
    assert (tmp_path / "run" / "adapters.safetensors").is_file()
    # both ranks joined one group across the namespaces, and none is left running there
    assert "[mlx-dp] world: 2 rank(s)" in result.stdout, result.stdout
    assert processes_in(emulated) == []


def test_a_remote_rank_that_fails_ends_the_job_over_ssh(cluster):
    hostfile, env, emulated = cluster
    body = ("import os, sys, time\nprint('on', os.environ['MLX_DP_LAUNCHER'], flush=True)\n"
            "if os.environ['MLX_RANK'] == '1':\n    time.sleep(1)\n    print('rank 1 gives up', file=sys.stderr)\n"
            "    sys.exit(5)\ntime.sleep(120)")
    start = time.monotonic()
    result = subprocess.run([*launch_args(hostfile), "--prefix-output", "--", PYTHON, "-c", body], env=env,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 5, result.stderr
    assert time.monotonic() - start < 40
    ip1 = emulated.ips[1]
    assert f"mlx-dp launch: rank 1 ({ip1}) exited with status 5; stopping the other ranks" in result.stderr
    # remote output comes through ssh's terminal: stdout and stderr together
    assert "[0] on mlx-dp launch" in result.stdout and "[1] rank 1 gives up" in result.stdout
    time.sleep(0.5)
    assert processes_in(emulated) == []


def test_ctrl_c_reaches_remote_ranks_which_checkpoint_and_stop(cluster, tmp_path):
    hostfile, env, emulated = cluster
    recipe = tiny_recipe(tmp_path, training={"batch_size": 2, "steps": 400}, checkpoint={"every": 1000},
                         parallel={"timeout_s": 20.0})
    proc = subprocess.Popen([*launch_args(hostfile), "--", MLX_DP, "train", str(recipe)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_step(tmp_path / "run", 3, [proc], timeout=180)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "stopped", status
    assert (tmp_path / "run" / "checkpoints" / f"step_{status['step']:07d}").is_dir()
    assert processes_in(emulated) == []
