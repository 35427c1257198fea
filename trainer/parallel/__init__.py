"""Every collective of the trainer lives in this package.

* ``world``: the process group (:class:`World`), rank helpers (``print0``),
  blocking scalar reductions, barrier and gathers, and the agreement check
  ranks run before training. Every rank must reach every collective in the
  same order.
* ``buckets``: gradient buckets and their ``all_sum``s, filled in the order
  backward produces gradients and each dispatched as soon as its gradients
  exist (:class:`GradientReducer`).
* ``placement``: where each collective runs on a CPU, Metal or CUDA, and the
  host waits that keep a Mac's GPU from waiting on a peer (the one place that
  names a device for a collective).
* ``scatter``: reduce-scatter and all-gather of bucket shards for optimizer
  state sharded across ranks (``parallel.shard_optimizer``), built from
  ``send``/``recv`` where the backend (ring) has no ``sum_scatter``.

It depends only on MLX, the standard library and ``trainer.env`` (what the
launcher set).
"""

from .buckets import MiB, Bucket, GradientReducer, Reducer, plan_buckets, plan_digest  # noqa: F401
from .placement import Placement, settle  # noqa: F401
from .world import World, check_agreement, digest, init_world, refuse_lone_rank, resolve_backend, set_monitor
