"""``python scripts/lab COMMAND ...``: the lab's benchmarks and tools.

    bench comm|memory|profile|attention|scaling|faults|preference|grpo|rollouts|streaming|pipeline|loss ...
                                                       benchmarks (each has --help)
    launch [--slow RANK=SHARE,...] LAUNCH_ARGS -- CMD   mlx-dp launch with slower local ranks
    recipe-memory [--write]                            the recipes' # Memory lines, from mlx-dp recipes memory
"""

import sys

BENCHES = ("comm", "memory", "profile", "attention", "scaling", "faults", "preference", "grpo", "rollouts",
           "streaming", "pipeline", "loss")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "launch":
        from .launch import main as launch_main

        return launch_main(rest)
    if command == "recipe-memory":
        from .recipe_memory import main as memory_main

        return memory_main(rest)
    if command == "bench":
        if not rest or rest[0] in ("-h", "--help") or rest[0] not in BENCHES:
            print(f"usage: python scripts/lab bench {{{','.join(BENCHES)}}} ...", file=sys.stderr if rest else sys.stdout)
            return 0 if rest[:1] in (["-h"], ["--help"]) else 2
        import importlib

        return importlib.import_module(f"lab.bench.{rest[0]}").main(rest[1:])
    print(__doc__, file=sys.stderr)
    print(f"lab: unknown command {command!r}", file=sys.stderr)
    return 2
