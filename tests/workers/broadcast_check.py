"""Rank 0's bytes on every rank through ``World.broadcast_bytes``, in several chunks and in one.

Usage (under mlx-dp launch -n N): python tests/workers/broadcast_check.py. Every
rank checks what arrived against what rank 0 sent (the same seeded bytes) and
exits 1 on a difference; rank 0 prints ``RESULT {json}``.
"""

import json
import sys

import mlx.core as mx
import numpy as np

from trainer.parallel import world as world_module

group = mx.distributed.init(strict=True)
world = world_module.World(group, group.rank(), group.size(), "local")
sizes = [0, 1, 4321, 10_000]
world_module.BROADCAST_CHUNK = 1000  # several chunks, the last one short
ok = []
for size in sizes:
    sent = np.random.default_rng(size).bytes(size)
    got = world.broadcast_bytes(sent if world.rank == 0 else None)
    ok.append(got == sent)
if not all(ok):
    print(f"rank {world.rank}: broadcast_bytes delivered other bytes for sizes "
          f"{[s for s, good in zip(sizes, ok) if not good]}", file=sys.stderr)
    sys.exit(1)
if world.rank == 0:
    print("RESULT " + json.dumps({"sizes": sizes, "ranks": world.size}))
