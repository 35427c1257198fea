"""Ranks of a benchmark, started through mlx-dp's own launcher code, with a slower Mac emulated.

    sudo .venv/bin/python scripts/lab launch --slow 1=0.5 -n 2 -- .venv/bin/mlx-dp train recipes/tiny-lora.yaml

``--slow RANK=SHARE,...`` caps local ranks at a share of one core
(``lab.cpulimit``: a cgroup v1 CPU quota; root, Linux); everything else is
``mlx-dp launch``'s command line, run by ``trainer.cluster.launch.main``,
whose ``on_start`` hook puts each capped rank's process into its cgroup.
:func:`launch` is the same from Python.
"""

import sys

from trainer.cluster import launch as product

from .cpulimit import CpuLimitError, CpuLimits, parse_slow

PROG = "lab launch"


def _local_only(argv: list[str]) -> str | None:
    """Why ``--slow`` cannot apply to this launch (it caps ranks on this machine only), or ``None``."""
    if "--hostfile" in argv:
        return "--slow caps ranks on this machine only; drop --hostfile"
    if "--hosts" in argv and argv[argv.index("--hosts") + 1] not in ("127.0.0.1", "localhost"):
        return "--slow caps ranks on this machine only; drop --hosts"
    return None


def run(argv: list[str], slow: dict[int, float], output=None) -> int:
    """``mlx-dp launch ARGV`` with ranks ``slow`` capped at their share of a core; returns the exit status."""
    if slow:
        reason = _local_only(argv)
        if reason:
            raise CpuLimitError(reason)
    with CpuLimits(slow) as limits:
        return product.main(argv, output=output, on_start=lambda spec, pid: limits.add(spec.rank, pid))


def launch(command: list[str], n: int, env: dict | None = None, timeout: float | None = None,
           prefix: bool = False, grace_s: float = product.DEFAULT_GRACE_S, output=None,
           slow: dict[int, float] | None = None) -> int:
    """``n`` local ranks of ``command`` as ``trainer.cluster.launch.launch`` starts them, ``slow`` ones capped."""
    argv = ["-n", str(n), "--grace", str(grace_s)]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    if prefix:
        argv.append("--prefix-output")
    return run([*argv, "--", *command], slow or {}, output=output)


def main(argv: list[str]) -> int:
    slow_text = None
    if argv[:1] == ["--slow"] and len(argv) > 1:
        slow_text, argv = argv[1], argv[2:]
    elif argv[:1] and argv[0].startswith("--slow="):
        slow_text, argv = argv[0].split("=", 1)[1], argv[1:]
    try:
        return run(argv, parse_slow(slow_text))
    except CpuLimitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
