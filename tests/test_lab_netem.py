"""Tests of the lab's emulated desk cluster (scripts/lab/netem.py, scripts/emulate_cluster.py).

The cluster tests need root and iproute2 and skip with the reason otherwise:
    sudo .venv/bin/python -m pytest tests/test_lab_netem.py -q
"""

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lab import netem
from lab.netem import EmulatedCluster, NetemError
from trainer.cluster.relay import Output

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "scripts" / "emulate_cluster.py"
NOT_PERMITTED = netem.check_permitted()
needs_root = pytest.mark.skipif(NOT_PERMITTED is not None, reason=NOT_PERMITTED or "")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="network namespaces exist only on Linux")

# Each rank: all_sum a vector of (rank + 1) of SIZE_MIB MiB after a warm-up, time the best
# of 3, and report where it ran: its source IP towards the peer and its netns inode.
RANK_SCRIPT = """
import json, os, socket, sys, time
import mlx.core as mx
size_mib = float(sys.argv[1])
group = mx.distributed.init(strict=True)
rank, n = group.rank(), group.size()
hosts = json.load(open(os.environ["MLX_HOSTFILE"]))
peer_ip = hosts[(rank + 1) % n][0].split(":")[0]
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect((peer_ip, 9))  # no packet sent; the kernel picks this namespace's source IP
x = mx.full((int(size_mib * 2**20) // 4,), rank + 1, dtype=mx.float32)
mx.eval(mx.distributed.all_sum(x[:16]))  # warm-up: connects the ring
times = []
for _ in range(3):
    start = time.perf_counter()
    total = mx.distributed.all_sum(x)
    mx.eval(total)  # blocking collective
    times.append(time.perf_counter() - start)
print(json.dumps({"rank": rank, "ip": probe.getsockname()[0],
                  "netns": os.stat("/proc/self/ns/net").st_ino,
                  "sum_min": total.min().item(), "sum_max": total.max().item(),
                  "seconds": min(times)}), flush=True)
"""


def _ip(*args) -> str:
    ip = shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    return subprocess.run([ip, *args], capture_output=True, text=True, check=True).stdout


def _leftovers(prefix: str) -> list[str]:
    spaces = [line.split()[0] for line in _ip("netns", "list").splitlines() if line]
    links = [line.split(": ")[1].split("@")[0] for line in _ip("-o", "link").splitlines()]
    temps = os.listdir(tempfile.gettempdir())
    return [name for name in spaces + links + temps if name.startswith(prefix)]


def _output() -> tuple[Output, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Output(prefix=True, streams=(out, err)), out, err


def _run_ranks(cluster, tmp_path, size_mib) -> list[dict]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    output, out, err = _output()
    status = cluster.run([sys.executable, "-u", str(script), str(size_mib)], output=output, timeout=60)
    assert status == 0, out.getvalue() + err.getvalue()
    lines = [line.split("] ", 1) for line in out.getvalue().splitlines()]
    reports = [json.loads(text) for _, text in lines]
    assert [label for label, _ in lines] == [f"[{r['rank']}" for r in reports]  # prefixes
    return sorted(reports, key=lambda report: report["rank"])


def _load_cli():
    spec = importlib.util.spec_from_file_location("emulate_cluster", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_rates_delays_and_presets():
    assert netem.parse_rate("200mbit") == 200e6
    assert netem.parse_rate("10Gbit") == 10e9
    assert netem.parse_rate("125mbps") == 1e9  # tc's bps are bytes per second
    assert netem.parse_delay("0.05ms") == pytest.approx(50e-6)
    assert netem.parse_delay("30us") == pytest.approx(30e-6)
    for bad in ("10g", "fast", "5", "-1gbit"):
        with pytest.raises(NetemError, match="not a rate"):
            netem.parse_rate(bad)
    with pytest.raises(NetemError, match="not a delay"):
        netem.parse_delay("0.1")
    assert netem.link_spec("10gbe") == netem.LinkSpec("10gbe", 10e9, 50e-6)
    custom = netem.link_spec("10gbe", rate="5gbit")
    assert (custom.rate_bps, custom.delay_s) == (5e9, 50e-6)
    assert netem.link_spec("none").rate_bps is None
    with pytest.raises(NetemError, match="unknown"):
        netem.link_spec("100gbe")


def test_hostfiles_match_mlx_formats(tmp_path):
    ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert netem.ring_hostfile(ips, 5000) == [
        ["10.0.0.1:5000"], ["10.0.0.2:5001"], ["10.0.0.3:5002"]]
    # mlx.launch's own parser reads the launch-style file back to the same IPs.
    from mlx._distributed_utils.common import Hostfile
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(netem.launch_hostfile(ips, ["a", "b", "c"])))
    parsed = Hostfile.from_file(path)
    assert parsed.backend == "ring"
    assert [(h.ssh_hostname, h.ips) for h in parsed.hosts] == [
        ("a", ["10.0.0.1"]), ("b", ["10.0.0.2"]), ("c", ["10.0.0.3"])]


@pytest.mark.e2e
@linux_only
def test_cli_refuses_without_root_in_one_sentence(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = netem.check_permitted()
    assert reason and "root" in reason and "sudo" in reason
    assert _load_cli().main(["-n", "2", "--", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run it with sudo" in err and "Traceback" not in err
    with pytest.raises(NetemError, match="sudo"):
        EmulatedCluster(2).__enter__()


@linux_only
def test_missing_iproute2_is_reported(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    reason = netem.check_permitted()
    assert "ip and tc not found" in reason and "iproute2" in reason


@pytest.mark.e2e
@needs_root
def test_all_sum_across_namespaces_and_cleanup(tmp_path):
    with EmulatedCluster(n=2) as cluster:
        prefix = cluster.prefix
        assert json.loads(Path(cluster.hostfile_path).read_text()) == netem.ring_hostfile(
            cluster.ips, cluster.port)
        assert json.loads(Path(cluster.launch_hostfile_path).read_text())["backend"] == "ring"
        assert len(_leftovers(prefix)) == 2 + 3 + 1  # namespaces, host veths + bridge, tmp
        reports = _run_ranks(cluster, tmp_path, size_mib=0.01)
    assert [r["sum_min"] for r in reports] == [3.0, 3.0]  # 1 + 2 on every element
    assert [r["sum_max"] for r in reports] == [3.0, 3.0]
    assert [r["ip"] for r in reports] == cluster.ips  # really different source IPs
    assert len({r["netns"] for r in reports} | {os.stat("/proc/self/ns/net").st_ino}) == 3
    assert _leftovers(prefix) == []


@pytest.mark.e2e
@needs_root
def test_failing_rank_stops_the_others_and_cleans_up():
    command = [sys.executable, "-c", "import os, sys, time\n"
               "if os.environ['MLX_RANK'] == '1': sys.exit(3)\ntime.sleep(60)"]
    start = time.monotonic()
    output, _, err = _output()
    with EmulatedCluster(n=2, preset="1gbe") as cluster:
        status = cluster.run(command, output=output, timeout=30)
    assert status == 3, err.getvalue()
    assert "rank 1 (this machine) exited with status 3; stopping the other ranks" in err.getvalue()
    assert time.monotonic() - start < 15
    assert _leftovers(cluster.prefix) == []


@pytest.mark.e2e
@needs_root
def test_timeout_stops_every_rank():
    output, _, err = _output()
    with EmulatedCluster(n=2) as cluster:
        status = cluster.run([sys.executable, "-c", "import time; time.sleep(60)"], output=output, timeout=1)
    assert status == 124 and "--timeout" in err.getvalue()


@pytest.mark.e2e
@needs_root
def test_rate_shaping_slows_all_sum(tmp_path):
    size_mib, rate_bps = 4, 100e6
    # Each rank sends 2(N-1)/N of the array over its link in a ring all_sum.
    wire_seconds = size_mib * 2**20 * 2 * (2 - 1) / 2 / (rate_bps / 8)
    with EmulatedCluster(n=2, rate="100mbit") as cluster:
        shaped = max(r["seconds"] for r in _run_ranks(cluster, tmp_path, size_mib))
    with EmulatedCluster(n=2) as cluster:
        unshaped = max(r["seconds"] for r in _run_ranks(cluster, tmp_path, size_mib))
    assert shaped >= 0.5 * wire_seconds, (shaped, wire_seconds)
    assert shaped <= 3 * wire_seconds, (shaped, wire_seconds)
    assert unshaped < 0.5 * wire_seconds, (unshaped, wire_seconds)


@pytest.mark.e2e
@needs_root
def test_cli_runs_ranks_writes_hostfiles_and_returns_first_failure(tmp_path):
    ring, launch = tmp_path / "ring.json", tmp_path / "launch.json"
    ok = subprocess.run(
        [sys.executable, str(CLI), "-n", "3", "--link", "tb4", "--write-hostfile", str(ring),
         "--write-launch-hostfile", str(launch), "--", "sh", "-c", "echo rank $MLX_RANK"],
        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert sorted(ok.stdout.splitlines()) == ["[0] rank 0", "[1] rank 1", "[2] rank 2"]
    assert len(json.loads(ring.read_text())) == 3
    assert [h["ips"] for h in json.loads(launch.read_text())["hosts"]] == [
        [f"{netem.SUBNET}.{rank}"] for rank in (1, 2, 3)]
    failed = subprocess.run([sys.executable, str(CLI), "-n", "2", "--", "sh", "-c",
                             "exit $((MLX_RANK * 5))"], capture_output=True, text=True)
    assert failed.returncode == 5 and "rank 1 (this machine) exited with status 5" in failed.stderr


@pytest.mark.e2e
@needs_root
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130),
                                         (signal.SIGKILL, -signal.SIGKILL)])
def test_cli_cleans_up_on_signal(sig, status):
    # A shell without job control starts background jobs with SIGINT ignored, and the
    # CLI would inherit that; give it the terminal's default, as for a real Ctrl-C.
    cli = subprocess.Popen([sys.executable, str(CLI), "-n", "2", "--", "sleep", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    prefix = f"{netem.NAME_ROOT}{cli.pid}-"
    deadline = time.monotonic() + 15
    while len(_leftovers(prefix)) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the ranks start
    assert all(_ip("netns", "pids", f"{prefix}r{rank}").split() for rank in (0, 1))
    cli.send_signal(sig)
    _, err = cli.communicate(timeout=15)
    assert cli.returncode == status, err
    assert "Traceback" not in err
    if sig == signal.SIGKILL:  # nothing could clean up, but the ranks died with the CLI
        time.sleep(0.2)
        assert not any(_ip("netns", "pids", f"{prefix}r{rank}").split() for rank in (0, 1))
        assert len(netem.cleanup_stale()) >= 6
    assert _leftovers(prefix) == []


@pytest.mark.e2e
@needs_root
def test_cleanup_stale_removes_only_dead_runs():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"{netem.NAME_ROOT}{dead.pid}-", f"{netem.NAME_ROOT}{os.getpid()}-"
    _ip("netns", "add", stale + "r0")
    _ip("link", "add", stale + "br", "type", "bridge")
    tempfile.mkdtemp(prefix=stale)
    _ip("netns", "add", live + "r9")
    try:
        removed = netem.cleanup_stale()
        names = {os.path.basename(name) for name in removed if stale in name}
        assert {stale + "br", stale + "r0"} < names and len(names) == 3
        assert _leftovers(stale) == []
        assert _leftovers(live) == [live + "r9"]
    finally:
        _ip("netns", "del", live + "r9")
