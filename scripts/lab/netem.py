"""An emulated desk cluster: N ranks in network namespaces joined by shaped links.

Each rank gets its own network namespace holding one veth interface (``eth0``)
that is plugged into a Linux bridge in the root namespace, so ranks talk over
real TCP between distinct IPs, like Macs on a switch or a Thunderbolt bridge.
``tc`` shapes both ends of every veth (traffic out of a rank and traffic into
it), so each rank's link has the chosen rate in each direction.

    from lab.netem import EmulatedCluster
    with EmulatedCluster(n=2, preset="10gbe") as cluster:
        status = cluster.run([sys.executable, "bench.py"], timeout=120)

Ranks are started by mlx-dp's own launcher code (``trainer.cluster.supervisor``)
inside the namespaces. CLI: ``sudo .venv/bin/python scripts/emulate_cluster.py
-n 2 --link 10gbe -- python -u bench.py``. Everything here needs root and
iproute2 (``ip``, ``tc``); ``check_permitted()`` says whether this process has them.

Shaping: the rate is a tbf qdisc on the egress of each veth end; tbf counts
Ethernet frames, so TCP payload gets about 95% of it at MTU 1500. The delay is a
netem qdisc above the tbf, half on each end, so ``delay`` is the one-way time
added between two ranks. Kernels built without netem (such as the Firecracker
VMs this was written on) get the rate only: a warning says so and
``cluster.delay_emulated`` is False.

Names: every namespace, link and temp dir of a run starts with ``mxd<pid>-``
(short, because a link name holds at most 15 characters), so the leftovers of
a run killed with SIGKILL can be found and removed by ``cleanup_stale()``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

from trainer.cluster.mlx_launcher import LOCAL_HOST as LOCAL
from trainer.cluster.mlx_launcher import RankSpec

from .cpulimit import CpuLimits
from .netem_links import (DEFAULT_PORT, PRESETS, LinkSpec, NetemError, launch_hostfile,  # noqa: F401
                          link_spec, parse_delay, parse_rate, ring_hostfile)

NAME_ROOT = "mxd"
SUBNET = "10.213.0"  # rank r is SUBNET.(r+1)/24; namespaces are private, so every run reuses it
STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL this long after
NEEDS = "emulate_cluster needs root and iproute2 (ip, tc) to create network namespaces"

def _tool(name: str) -> str | None:
    # sbin is often off a normal user's PATH; search it too.
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        detail = result.stderr.strip() or f"status {result.returncode}"
        raise NetemError(f"`{' '.join(argv)}` failed: {detail}")
    return result


def check_permitted() -> str | None:
    """Returns None when this process can build a cluster, else the reason in one sentence."""
    if not sys.platform.startswith("linux"):
        return f"{NEEDS}; network namespaces exist only on Linux"
    if os.geteuid() != 0:
        return f"{NEEDS}; run it with sudo"
    missing = [tool for tool in ("ip", "tc") if _tool(tool) is None]
    if missing:
        return f"{NEEDS}; {' and '.join(missing)} not found, install the iproute2 package"
    probe = f"{NAME_ROOT}{os.getpid()}-probe"
    made = _sh(_tool("ip"), "netns", "add", probe, check=False)
    _sh(_tool("ip"), "netns", "del", probe, check=False)
    if made.returncode != 0:
        return (f"{NEEDS}; `ip netns add` was refused ({made.stderr.strip()}), "
                "as in containers without CAP_SYS_ADMIN")
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _our_names(prefix: str = NAME_ROOT) -> tuple[list[str], list[str], list[str]]:
    """Namespaces, links and temp dirs (full paths) in the root namespace named like a
    cluster's, ``prefix`` narrowing them to one run."""
    ip, pattern = _tool("ip"), re.compile(rf"{NAME_ROOT}\d+-")
    listed = _sh(ip, "netns", "list", check=False).stdout.splitlines()
    spaces = [line.split()[0] for line in listed if line]
    links = [line.split(": ")[1].split("@")[0]
             for line in _sh(ip, "-o", "link", "show", check=False).stdout.splitlines()]
    tmp = tempfile.gettempdir()
    dirs = [os.path.join(tmp, name) for name in os.listdir(tmp)]
    return tuple([x for x in names if pattern.match(os.path.basename(x))
                  and os.path.basename(x).startswith(prefix)]
                 for names in (spaces, links, dirs))


def _remove(prefix: str) -> list[str]:
    """Removes everything named ``prefix*``; returns what was there. Never raises."""
    ip = _tool("ip")
    spaces, links, dirs = _our_names(prefix)
    for space in spaces:  # a process left in a namespace would keep it alive after `del`
        for pid in _sh(ip, "netns", "pids", space, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    # Host-side veths first: deleting one deletes its peer at once, whereas a namespace's
    # own links vanish asynchronously after `ip netns del`.
    for link in sorted(links, key=lambda name: name.endswith("-br")):
        _sh(ip, "link", "del", link, check=False)
    for space in spaces:
        _sh(ip, "netns", "del", space, check=False)
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)
    return spaces + links + dirs


def cleanup_stale() -> list[str]:
    """Removes namespaces, links and temp dirs of clusters whose owning process is dead.

    Returns the names removed. A leftover whose pid has been reused by a live process
    is kept; it goes once that process ends.
    """
    owners = {int(re.match(rf"{NAME_ROOT}(\d+)-", os.path.basename(name)).group(1))
              for names in _our_names() for name in names}
    removed = []
    for pid in sorted(owners):
        if not _pid_alive(pid):
            removed += _remove(f"{NAME_ROOT}{pid}-")
    return removed


@dataclass(frozen=True)
class NamespaceRank(RankSpec):
    """A rank of mlx-dp's launcher (``trainer.cluster.mlx_launcher.RankSpec``) run inside a network namespace."""

    namespace: str = ""
    ip: str = "ip"

    def argv(self) -> list[str]:
        return [self.ip, "netns", "exec", self.namespace, "/bin/bash", "-c", self.script()]


class EmulatedCluster:
    """N network namespaces joined by a bridge, each link shaped with tc.

    Args:
        n: number of ranks, at least 2 (a one-entry ring hostfile does not connect).
        preset: a key of ``PRESETS`` (default ``None``: unshaped).
        rate: tc-style rate per direction overriding the preset, e.g. ``"5gbit"``.
        delay: tc-style one-way rank-to-rank delay overriding the preset, e.g. ``"0.2ms"``.
        port: rank r's ring backend listens on ``port + r`` (default 32323, as mlx.launch).
        mtu: MTU of every veth (default 1500, plain Ethernet; 9000 for jumbo frames).
        host_ip: also give the bridge an address, ``SUBNET.254``, so this (root) namespace
            reaches the ranks, e.g. to ssh into them (default ``False``).
        subnet: the first three octets of every address (default ``SUBNET``). Give a cluster
            with ``host_ip`` a subnet of its own: the root namespace is shared, and two bridges
            with one subnet there would make routing ambiguous.

    Use as a context manager: entering builds the cluster (root only) and exiting removes
    every namespace, link, qdisc and temp file, also on exceptions, Ctrl-C and SIGTERM
    (while inside, SIGTERM and SIGHUP raise SystemExit when they had no handler).
    Attributes once entered: ``prefix``, ``namespaces``, ``ips``, ``hostfile_path`` (ring
    MLX_HOSTFILE), ``launch_hostfile_path`` (mlx.launch form), ``link`` and
    ``delay_emulated`` (False where the kernel lacks netem: rate is then shaped, delay not).
    """

    _active = False  # one per process: names carry only the pid

    def __init__(self, n: int, preset: str | None = None, rate: str | None = None,
                 delay: str | None = None, port: int = DEFAULT_PORT, mtu: int = 1500,
                 host_ip: bool = False, subnet: str = SUBNET):
        if not 2 <= n <= 200:
            raise NetemError(f"an emulated cluster needs 2 to 200 ranks, not {n}")
        self.n, self.port, self.mtu = n, port, mtu
        self.link = link_spec(preset, rate, delay)
        self.prefix = f"{NAME_ROOT}{os.getpid()}-"
        self.namespaces = [f"{self.prefix}r{rank}" for rank in range(n)]
        self.ips = [f"{subnet}.{rank + 1}" for rank in range(n)]
        self.host_ip = f"{subnet}.254" if host_ip else None
        self.bridge = f"{self.prefix}br"
        self.host_veths = [f"{self.prefix}h{rank}" for rank in range(n)]
        self.delay_emulated = None if self.link.delay_s > 0 else True  # None: not tried yet
        self.entered = False
        self.workdir = self.hostfile_path = self.launch_hostfile_path = None
        self._old_handlers: dict = {}

    def __enter__(self) -> EmulatedCluster:
        reason = check_permitted()
        if reason:
            raise NetemError(reason)
        if EmulatedCluster._active:
            raise NetemError("only one EmulatedCluster can exist per process at a time")
        EmulatedCluster._active = self.entered = True
        self._catch_termination()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _catch_termination(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def terminate(signum, _frame):
            raise SystemExit(128 + signum)

        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) == signal.SIG_DFL:
                self._old_handlers[signum] = signal.signal(signum, terminate)

    def _build(self) -> None:
        ip = _tool("ip")
        self.workdir = tempfile.mkdtemp(prefix=self.prefix)
        os.chmod(self.workdir, 0o755)  # ranks may drop root later and still read the hostfile
        self.hostfile_path = os.path.join(self.workdir, "ring_hostfile.json")
        self.launch_hostfile_path = os.path.join(self.workdir, "launch_hostfile.json")
        with open(self.hostfile_path, "w") as f:
            json.dump(ring_hostfile(self.ips, self.port), f)
        with open(self.launch_hostfile_path, "w") as f:
            json.dump(launch_hostfile(self.ips, self.namespaces), f, indent=2)

        _sh(ip, "link", "add", self.bridge, "type", "bridge")
        _sh(ip, "link", "set", self.bridge, "up")
        if self.host_ip:
            _sh(ip, "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        for space, veth, addr in zip(self.namespaces, self.host_veths, self.ips):
            _sh(ip, "netns", "add", space)
            _sh(ip, "link", "add", veth, "mtu", str(self.mtu), "type", "veth",
                "peer", "name", "eth0", "netns", space, "mtu", str(self.mtu))
            _sh(ip, "link", "set", veth, "master", self.bridge, "up")
            _sh(ip, "-n", space, "addr", "add", f"{addr}/24", "dev", "eth0")
            _sh(ip, "-n", space, "link", "set", "eth0", "up")
            _sh(ip, "-n", space, "link", "set", "lo", "up")
            self._shape(["dev", veth])  # into the rank
            self._shape(["dev", "eth0"], space)  # out of the rank

    def _shape(self, device: list[str], space: str | None = None) -> None:
        """Egress qdiscs on one veth end: netem (half the delay) over tbf (the rate)."""
        tc = [_tool("tc")] + (["-n", space] if space else [])
        parent = ["root"]
        if self.link.delay_s > 0 and self.delay_emulated is not False:
            half_us = f"{self.link.delay_s / 2 * 1e6:.1f}us"
            added = _sh(*tc, "qdisc", "add", *device, "root", "handle", "1:",
                        "netem", "delay", half_us, "limit", "100000", check=False)
            if added.returncode == 0:
                self.delay_emulated, parent = True, ["parent", "1:1"]
            elif "unknown" in added.stderr and self.delay_emulated is None:
                self.delay_emulated = False
                print(f"emulate_cluster: this kernel has no netem qdisc, so links get the "
                      f"rate but not the {self.link.delay_s * 1e3:g} ms delay", file=sys.stderr)
            else:
                raise NetemError(f"tc could not add a netem delay: {added.stderr.strip()}")
        if self.link.rate_bps is not None:
            rate_bytes = self.link.rate_bps / 8
            # Burst above a 64 KiB GSO packet (else tbf splits each one) and about 1 ms of
            # traffic, so timer wake-ups do not starve fast links; queue 5 ms beyond it.
            burst = int(max(256 * 1024, rate_bytes * 1e-3))
            limit = int(burst + rate_bytes * 5e-3)
            _sh(*tc, "qdisc", "add", *device, *parent, "handle", "10:", "tbf",
                "rate", f"{int(self.link.rate_bps)}bit", "burst", str(burst),
                "limit", str(limit))

    def run(self, command: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
            output=None, slow: dict[int, float] | None = None, grace_s: float = STOP_GRACE_S) -> int:
        """Runs ``command`` once per rank, each in its namespace; returns the job's exit status.

        The ranks are started, watched and stopped by mlx-dp's own launcher code
        (``trainer.cluster.supervisor``), as ``mlx-dp launch`` starts them: each
        gets MLX's launch script with ``MLX_RANK``, ``MLX_HOSTFILE`` (the
        namespaces' addresses) and ``env``, inside ``ip netns exec``. When one
        rank fails the others are stopped and its status is the job's.

        Args:
            command: argv to run; the same on every rank.
            env: extra environment variables (default ``None``).
            timeout: seconds before every rank is stopped, status 124 (default ``None``: no limit).
            output: a ``trainer.cluster.relay.Output`` (default: this process's stdout and
                stderr, each line prefixed with its rank).
            slow: rank -> share of one core, to emulate slower Macs (``lab.cpulimit``;
                default ``None``: every rank unlimited).
            grace_s: from SIGTERM to SIGKILL when ranks are stopped (default 3 s).

        Returns:
            int: 0, the first failing rank's status (128 + N for a death by signal N), or 124.
        """
        from trainer.cluster.relay import Output
        from trainer.cluster.supervisor import Supervisor

        if self.hostfile_path is None:
            raise NetemError("EmulatedCluster.run() needs the cluster entered with `with` first")
        ring = json.dumps(ring_hostfile(self.ips, self.port))
        extra = tuple(f"{key}={value}" for key, value in (env or {}).items())
        specs = [NamespaceRank(rank=rank, host=LOCAL, python=None, cwd=None, files={"MLX_HOSTFILE": ring},
                               env=extra, command=tuple(command), namespace=space, ip=_tool("ip"))
                 for rank, space in enumerate(self.namespaces)]
        with CpuLimits(slow or {}) as limits:  # CpuLimitError before anything starts
            return Supervisor(specs, output or Output(prefix=True), timeout=timeout, grace_s=grace_s,
                              on_start=lambda spec, pid: limits.add(spec.rank, pid)).run()

    def close(self) -> None:
        """Removes everything this cluster made; safe to call twice. Blocks Ctrl-C and
        SIGTERM while it runs, so an impatient second Ctrl-C cannot leave leftovers."""
        if not self.entered:
            return
        main = threading.current_thread() is threading.main_thread()
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        if main:
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            _remove(self.prefix)
            left = [name for names in _our_names(self.prefix) for name in names]
            if left:
                print(f"emulate_cluster: could not remove {left}; run --cleanup-stale "
                      "after this process ends", file=sys.stderr)
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
        finally:
            self._old_handlers, self.entered, EmulatedCluster._active = {}, False, False
            self.workdir = self.hostfile_path = self.launch_hostfile_path = None
            if main:  # a signal that came meanwhile is delivered now
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
