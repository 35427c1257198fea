"""Fault injection for tests: hooks that stall, poison, stop or crash a rank at a chosen update.

As one rank of a job::

    python tests/workers/faults.py SPEC -- train RECIPE [overrides] [--resume]

runs ``mlx-dp`` with :class:`FaultHooks` installed. SPEC lists faults
separated by ``;``, each ``kind:rank=R:step=S[:seconds=T]`` (rank defaults to 0):

* ``stall``: rank R sleeps T seconds inside update S (a hung peer);
* ``nan``: rank R's loss is NaN at update S;
* ``stop``: rank R asks for a clean stop during update S, as SIGTERM would;
* ``crash_in_save``: the process dies halfway through writing checkpoint S;
* ``kill``: rank R is killed outright (SIGKILL, as the OOM killer does) at update S,
  on every attempt of a restarted job that reaches it;
* ``raise``: rank R raises an unexpected exception (a bug: exit 1, a traceback) at update S,
  on every attempt;
* ``compute``: rank R reports T seconds of compute for every measured update
  (``parallel.balance: auto``), from update S on (a fake, deterministic speed).
"""

# First, before anything here imports MLX: the command's runtime loads the OpenBLAS shim when MLX_DP_BLAS asks
# (tests/conftest.py asks for e2e tests), and it can only do that before mlx.core is imported.
from trainer.tools import fastblas  # noqa: E402

fastblas.maybe_enable()


import dataclasses
import os
import signal
import sys
import time

import numpy as np

from trainer.cluster import health
from trainer.env import launch_env
from trainer.run.hooks import Hooks


def parse(spec: str) -> list[dict]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        kind, *fields = item.split(":")
        args = dict(field.split("=", 1) for field in fields)
        faults.append({"kind": kind, "rank": int(args.get("rank", 0)), "step": int(args.get("step", 1)),
                       "seconds": float(args.get("seconds", 1))})
    return faults


class FaultHooks(Hooks):
    """The faults of ``spec`` that concern this rank."""

    def __init__(self, spec: str, rank: int | None = None):
        rank = launch_env().rank if rank is None else rank
        self.faults = [f for f in parse(spec) if f["rank"] == rank]

    def _due(self, kind: str, step: int):
        return next((f for f in self.faults if f["kind"] == kind and f["step"] == step), None)

    def before_update(self, step, micro_batches):
        stall = self._due("stall", step)
        if stall:
            time.sleep(stall["seconds"])
        if self._due("stop", step):
            health.request_stop()
        if self._due("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._due("raise", step):
            raise RuntimeError(f"injected crash at update {step}")
        if self._due("nan", step):  # a NaN in the loss mask makes this rank's loss (and gradient) NaN
            micro_batches = [dataclasses.replace(b, mask=b.mask * np.float32("nan")) for b in micro_batches]
        return micro_batches

    def compute_seconds(self, step, seconds):
        fake = [f for f in self.faults if f["kind"] == "compute" and f["step"] <= step]
        return fake[-1]["seconds"] if fake else seconds

    def mid_save(self, step):
        if self._due("crash_in_save", step):
            os._exit(1)


if __name__ == "__main__":
    from trainer.cli import main
    from trainer.run.hooks import RunOptions

    spec, rest = sys.argv[1], sys.argv[2:]
    main(rest[1:] if rest[:1] == ["--"] else rest, options=RunOptions(hooks=FaultHooks(spec)))
