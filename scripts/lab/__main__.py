"""``python scripts/lab ...``: the lab's benchmarks and tools (see ``lab/__init__.py``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
