"""Link descriptions for the emulated cluster: presets, tc rates and delays, hostfiles.

Pure data and parsing, split from ``lab.netem`` (which builds the
namespaces); only the standard library is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PORT = 32323  # mlx.launch's --starting-port default; rank r listens on port + r


_RATE_UNITS = {  # tc's units: *bit are bits/s, *bps are BYTES/s
    "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
    "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12,
}
_DELAY_UNITS = {"s": 1, "sec": 1, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}


class NetemError(RuntimeError):
    """A cluster could not be made or used; the message is one sentence for people."""


@dataclass(frozen=True)
class LinkSpec:
    """How each rank's link to the switch is shaped, per direction."""

    name: str
    rate_bps: float | None  # bits per second each way; None leaves the link unshaped
    delay_s: float = 0.0  # one-way latency added between two ranks; half on each veth end

    def describe(self) -> str:
        rate = "unshaped" if self.rate_bps is None else f"{self.rate_bps / 1e9:g} Gbit/s"
        delay = f", +{self.delay_s * 1e3:g} ms one-way" if self.delay_s else ""
        return f"{self.name} ({rate}{delay})"


PRESETS = {
    "1gbe": LinkSpec("1gbe", 1e9, 0.1e-3),
    "10gbe": LinkSpec("10gbe", 10e9, 0.05e-3),
    "tb4": LinkSpec("tb4", 25e9, 0.03e-3),  # Thunderbolt 4 IP networking: 20-40 Gbit/s in practice
    "loopback": LinkSpec("loopback", None),
    "none": LinkSpec("none", None),
}


def parse_rate(text: str) -> float:
    """Parses a tc-style rate such as ``200mbit`` or ``10gbit`` into bits per second."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _RATE_UNITS or float(match.group(1)) <= 0:
        raise NetemError(f"rate {text!r} is not a rate; write a number and a unit such as "
                         "200mbit or 10gbit (bits/s) or 125mbps (bytes/s)")
    return float(match.group(1)) * _RATE_UNITS[unit]


def parse_delay(text: str) -> float:
    """Parses a tc-style delay such as ``0.05ms`` or ``30us`` into seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _DELAY_UNITS:
        raise NetemError(f"delay {text!r} is not a delay; write a number and a unit "
                         "such as 0.1ms or 30us")
    return float(match.group(1)) * _DELAY_UNITS[unit]


def link_spec(preset: str | None = None, rate: str | None = None,
              delay: str | None = None) -> LinkSpec:
    """Resolves a preset and raw overrides into one LinkSpec.

    Args:
        preset: one of ``PRESETS`` (default ``None``: unshaped unless rate/delay given).
        rate: tc-style rate overriding the preset's, e.g. ``"5gbit"`` (default ``None``).
        delay: tc-style one-way delay overriding the preset's, e.g. ``"0.2ms"``.
    """
    if preset is not None and preset not in PRESETS:
        raise NetemError(f"link preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset or "none"]
    if rate is None and delay is None:
        return base
    name = "custom" if preset is None else f"{preset}+custom"
    return LinkSpec(name, parse_rate(rate) if rate is not None else base.rate_bps,
                    parse_delay(delay) if delay is not None else base.delay_s)


def ring_hostfile(ips: list[str], port: int = DEFAULT_PORT) -> list[list[str]]:
    """MLX_HOSTFILE contents for the ring backend: rank r listens on ips[r]:port+r."""
    return [[f"{ip}:{port + rank}"] for rank, ip in enumerate(ips)]


def launch_hostfile(ips: list[str], hosts: list[str]) -> dict:
    """The same cluster in ``mlx.launch --hostfile`` form (documentation only: mlx.launch
    would ssh into ``hosts``; here each is a namespace name)."""
    return {"backend": "ring", "envs": [],
            "hosts": [{"ssh": host, "ips": [ip]} for host, ip in zip(hosts, ips)]}
