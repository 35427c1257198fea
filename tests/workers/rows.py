"""Record the rows each rank trains on, update by update, beside the faults of ``faults.py``.

As one rank of a job::

    python tests/workers/rows.py OUT_DIR SPEC -- train RECIPE [overrides] [--resume]

runs ``mlx-dp`` with :class:`RowHooks` installed: every update appends
``{"step", "rank", "indices", "segments"}`` to ``OUT_DIR/rank<R>.jsonl`` (``indices``:
the sample indices of each of the rank's micro-batches, or with ``data.streaming``
the rows' ids; ``segments``: the samples in each packed row). SPEC is
``faults.py``'s (``-`` for none).
"""

# First, before anything here imports MLX: the command's runtime loads the OpenBLAS shim when MLX_DP_BLAS asks
# (tests/conftest.py asks for e2e tests), and it can only do that before mlx.core is imported.
from trainer.tools import fastblas  # noqa: E402

fastblas.maybe_enable()


import json
import sys
from pathlib import Path

from faults import FaultHooks

from trainer.env import launch_env


class RowHooks(FaultHooks):
    """``FaultHooks`` that also write down the rows of every update."""

    def __init__(self, out_dir: str, spec: str):
        super().__init__("" if spec == "-" else spec)
        self.rank = launch_env().rank
        self.path = Path(out_dir) / f"rank{self.rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def before_update(self, step, micro_batches):
        record = {"step": step, "rank": self.rank, "indices": [b.indices.tolist() for b in micro_batches],
                  "segments": [None if b.segments is None else
                               [len(set(row[row >= 0].tolist())) for row in b.segments] for b in micro_batches]}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return super().before_update(step, micro_batches)


if __name__ == "__main__":
    from trainer.cli import main
    from trainer.run.hooks import RunOptions

    out_dir, spec, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    main(rest[1:] if rest[:1] == ["--"] else rest, options=RunOptions(hooks=RowHooks(out_dir, spec)))
