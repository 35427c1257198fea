"""Hostfile checks: catch a mistyped cluster description before any rank connects.

Two formats exist. ``mlx.launch --hostfile`` reads a JSON list of machines
(``{"hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"]}, ...]}``, written by
``mlx.distributed_config``); each rank then gets a ring hostfile in
``MLX_HOSTFILE``: one ``["ip:port", ...]`` list per rank.

A ring hostfile that repeats an ``ip:port`` can never connect (two ranks
would listen on one port), so training refuses it. A launch hostfile that
lists a machine twice starts two ranks there, each with half the memory;
``mlx-dp hostfile check`` refuses it so it is caught before a long job.
"""

import ipaddress
import json
import re
from pathlib import Path

from ..env import launch_env
from ..errors import UserError

LOOPBACK = ("127.", "localhost", "::1")
# What an ssh destination may be: [user@]host, with a host name or an address. Nothing a shell or
# ssh itself would read as anything else (a leading '-' is an option; quotes, spaces, ; $ ` are shell).
SSH_NAME = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?(?:[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])$")


class HostfileError(UserError):
    """A hostfile is malformed or lists a machine twice."""


def _read_json(path: Path):
    if not path.is_file():
        raise HostfileError(f"hostfile {path} does not exist")
    text = path.read_text()
    if not text.strip():
        raise HostfileError(f"hostfile {path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise HostfileError(f"hostfile {path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def check_ring_hostfile(path: str | None = None) -> list[str]:
    """Validate the ring hostfile given to this rank; return notes (warnings).

    Args:
        path (str | None): The file; default ``$MLX_HOSTFILE`` (nothing to
            check when unset).

    Raises:
        HostfileError: Malformed, or an ``ip:port`` listed for two ranks.
    """
    env = launch_env()
    path = path or env.hostfile
    if not path or (Path(path).is_file() and not Path(path).read_text().strip()):
        return []  # no ring: `mlx.launch -n 1` passes an empty file
    if not Path(path).is_file() and path == env.hostfile and env.ring_hosts:
        hosts = env.ring_hosts  # read, then removed once the group formed (trainer.env.consume_hostfile)
    else:
        hosts = _read_json(Path(path))
    if not isinstance(hosts, list) or not all(isinstance(h, list) and h for h in hosts):
        raise HostfileError(f"hostfile {path} must be a list with one list of \"ip:port\" strings per rank")
    seen, notes, ip_ranks = {}, [], {}
    for rank, entries in enumerate(hosts):
        for entry in entries:
            if not isinstance(entry, str) or ":" not in entry:
                raise HostfileError(f"hostfile {path}: rank {rank} entry {entry!r} is not \"ip:port\"")
            if entry in seen:
                raise HostfileError(f"hostfile {path} lists {entry} for both rank {seen[entry]} and rank {rank}; "
                                    "each rank needs its own address and port")
            seen[entry] = rank
        ip = entries[0].rsplit(":", 1)[0]
        ip_ranks.setdefault(ip, []).append(rank)
    for ip, ranks in ip_ranks.items():
        if len(ranks) > 1 and not ip.startswith(LOOPBACK):
            notes.append(f"host {ip} runs ranks {', '.join(map(str, ranks))}; if that machine is listed twice "
                         "by mistake, each rank there gets a share of its memory")
    return notes


def check_launch_hostfile(path: str) -> list[dict]:
    """Validate an ``mlx.launch`` hostfile; return its host entries.

    Raises:
        HostfileError: Malformed, or a machine (ssh name or IP) listed twice.
    """
    data = _read_json(Path(path))
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts:
        raise HostfileError(f"hostfile {path} must list hosts: {{\"hosts\": [{{\"ssh\": ..., \"ips\": [...]}}]}}")
    names, addresses = {}, {}
    for i, host in enumerate(hosts):
        if not isinstance(host, dict) or not isinstance(host.get("ssh"), str):
            raise HostfileError(f"hostfile {path}: entry {i} needs an \"ssh\" host name")
        name = host["ssh"]
        if not SSH_NAME.match(name):
            raise HostfileError(f"hostfile {path}: entry {i}'s ssh name {name[:60]!r} is not a host name or address "
                                "(letters, digits, '.', '-' and an optional user@; no spaces, quotes, shell "
                                "characters or leading '-')")
        ips = host.get("ips", []) or []
        if not isinstance(ips, list):
            raise HostfileError(f"hostfile {path}: entry {i}'s \"ips\" must be a list of addresses")
        for ip in ips:
            try:
                ipaddress.ip_address(ip if isinstance(ip, str) else "")
            except ValueError:
                raise HostfileError(f"hostfile {path}: entry {i} ({name}) lists {str(ip)[:60]!r} in \"ips\", "
                                    "which is not an IP address") from None
        if name in names:
            raise HostfileError(f"hostfile {path} lists host {name} twice (entries {names[name]} and {i}); "
                                "list each machine once")
        names[name] = i
        for ip in host.get("ips", []) or []:
            if ip in addresses:
                raise HostfileError(f"hostfile {path} gives address {ip} to entries {addresses[ip]} and {i}; "
                                    "list each machine once")
            addresses[ip] = i
    return hosts
