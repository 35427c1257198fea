"""``python scripts/lab recipe-memory [--write]``: the recipes' ``# Memory`` header lines, from ``mlx-dp recipes memory``.

Prints each recipe's line as ``trainer.tools.stage_plan.recipe_header`` computes it;
``--write`` puts it into the recipe in place of its old ``# Memory`` line (a
maintainer's step after a change to a recipe or to the estimate;
``tests/test_memory_plan.py`` fails until it is done).
"""

import sys

from trainer.tools.memory_plan import HEADER
from trainer.tools.stage_plan import recipe_header as header_line
from trainer.tools.recipes import all_recipes


def main(argv: list[str]) -> int:
    write = "--write" in argv
    for path in all_recipes():
        line = header_line(path)
        print(f"{path.name}: {line}")
        if write:
            lines = path.read_text().splitlines(keepends=True)
            at = next((i for i, text in enumerate(lines) if text.startswith(HEADER)), None)
            if at is None:
                print(f"{path}: no {HEADER} line to replace", file=sys.stderr)
                return 1
            lines[at] = line + "\n"
            path.write_text("".join(lines))
    return 0
