"""What the in-process benchmarks that take a recipe share: key=value overrides after it, JSON out."""

import argparse
import json
from pathlib import Path


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``section.key=value`` words anywhere join ``args.overrides``, anything else is an error.

    The parser must declare a positional ``overrides`` with ``nargs="*"``.
    """
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides += extra
    return args


def write_json(path: str, doc: dict) -> None:
    """Write a benchmark's result and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"[bench] wrote {path}")
