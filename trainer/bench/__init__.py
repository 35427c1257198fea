"""``mlx-dp bench scaling``: how much faster N ranks train a recipe than one (tokens/s, side by side).

The lab's other benchmarks (gradient communication, memory, profiles, attention)
live in the repository's ``scripts/lab`` and are not part of the package.
"""

import sys

USAGE = "usage: mlx-dp bench scaling RECIPE -n N [options] [section.key=value ...]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__ + "\nmlx-dp bench scaling --help lists the options.")
        return 0 if argv else 2
    kind, rest = argv[0], argv[1:]
    if kind == "scaling":
        from .scaling import main as scaling_main

        return scaling_main(rest)
    print(f"{USAGE}\nmlx-dp bench: unknown benchmark {kind!r} (the others are the repository's lab: "
          "python scripts/lab bench --help)", file=sys.stderr)
    return 2
