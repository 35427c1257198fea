"""Benchmarks: ``mlx-dp bench comm`` (gradient communication),
``mlx-dp bench scaling`` (tokens/s against one machine) and
``mlx-dp bench memory`` (memory per rank, optimizer state sharded or not) and
``mlx-dp bench profile`` (where the time of one update goes, in-process) and
``mlx-dp bench attention`` (the step with attention in query blocks, per row width).

Each prints a table and writes JSON. They launch their own ranks, so they
are run in one process: ``mlx-dp bench comm -n 2``.
"""

import sys

USAGE = "usage: mlx-dp bench {comm,scaling,memory,profile,attention} ..."


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__)
        return 0 if argv else 2
    kind, rest = argv[0], argv[1:]
    if kind == "comm":
        from .comm import main as comm_main

        return comm_main(rest)
    if kind == "scaling":
        from .scaling import main as scaling_main

        return scaling_main(rest)
    if kind == "memory":
        from .memory import main as memory_main

        return memory_main(rest)
    if kind == "profile":
        from .profile import main as profile_main

        return profile_main(rest)
    if kind == "attention":
        from .attention import main as attention_main

        return attention_main(rest)
    print(f"{USAGE}\nmlx-dp bench: unknown benchmark {kind!r}", file=sys.stderr)
    return 2
