"""One rank of the bucket tests: bucketed reduction vs a plain per-array all_sum.

Usage: python tests/workers/reduce_check.py MODE. MODE "compare" checks many
random trees and bucket settings; "mismatch" gives rank 1 a different bucket
plan and calls reduce(), which must refuse before any all_sum; "scatter"
compares the reduce-scatter of sharded optimizer state (ring send/recv and
all_sum + slice) with a per-array all_sum, and the all-gather with the
original; "scatter-mismatch" gives rank 1 a different shard plan; "settle" has
rank 1 send its gradients 1.5 s late and times how long rank 0's reducers take
to return (they must wait on the host, so no GPU kernel waits on a peer).
Prints one JSON line on rank 0.
"""

import json
import sys

import mlx.core as mx
import numpy as np

from trainer.errors import DistributedError
from trainer.parallel import GradientReducer, init_world, plan_buckets
from trainer.parallel.scatter import ShardedReducer, ShardPlan

DTYPES = [mx.float32, mx.bfloat16, mx.float16]


def random_tree(seed: int, rank: int):
    rng = np.random.default_rng(seed)
    names = [f"layer{i}.w{j}" for i in range(rng.integers(3, 9)) for j in range(rng.integers(1, 4))]
    shapes = {n: tuple(int(d) for d in rng.integers(1, 40, rng.integers(1, 4))) for n in names}
    dtypes = {n: DTYPES[int(rng.integers(0, 3))] for n in names}
    values = {n: mx.array(np.random.default_rng([seed, rank, i]).standard_normal(shapes[n]).astype(np.float32)
                          ).astype(dtypes[n]) for i, n in enumerate(names)}
    return names, shapes, dtypes, values


def compare(world) -> dict:
    worst = {}
    for seed in range(6):  # six random trees of 3 to 24 arrays in three dtypes, four bucket plans each
        names, shapes, dtypes, values = random_tree(seed, world.rank)
        order = list(reversed(names))
        reference = {n: mx.distributed.all_sum(values[n], group=world.group, stream=mx.cpu) for n in names}
        mx.eval(reference)
        for bucket_bytes, first, comm in [(64, 16, None), (4096, 512, None), (1 << 20, 1 << 20, None),
                                          (2048, 256, mx.float32)]:
            for overlap in (True, False):
                buckets = plan_buckets(order, shapes, dtypes, bucket_bytes, first, comm)
                reducer = GradientReducer(world, buckets, overlap=overlap)
                extra = mx.array([float(world.rank + 1), 2.0])
                out, extra_sum = reducer.reduce(dict(values), extra=extra)
                mx.eval(out, extra_sum)
                assert set(out) == set(names)
                assert extra_sum.tolist() == [sum(range(1, world.size + 1)), 2.0 * world.size]
                for n in names:
                    assert out[n].dtype == dtypes[n] and out[n].shape == shapes[n], n
                    got = np.array(out[n].astype(mx.float32))
                    want = np.array(reference[n].astype(mx.float32))
                    err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-6))
                    key = str(dtypes[n]).replace("mlx.core.", "")  # the output keeps the gradient dtype
                    worst[key] = max(worst.get(key, 0.0), err)
    return {"worst_relative_error": worst}


def mismatch(world) -> dict:
    names, shapes, dtypes, values = random_tree(0, 0)
    bucket_bytes = 256 if world.rank == 1 else 4096
    buckets = plan_buckets(list(reversed(names)), shapes, dtypes, bucket_bytes, 128)
    calls = {"all_sum": 0, "all_gather": 0}
    real = {name: getattr(mx.distributed, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)
        return call

    for name in calls:
        setattr(mx.distributed, name, counting(name))
    try:
        out, _ = GradientReducer(world, buckets).reduce(dict(values))  # no check_plan() first
        mx.eval(out)
        refused = None
    except DistributedError as e:
        refused = str(e)
    finally:
        for name, fn in real.items():
            setattr(mx.distributed, name, fn)
    return {"refused": refused, **{f"{name}_calls": n for name, n in calls.items()}}


def scatter(world) -> dict:
    worst, methods = {}, {}
    for seed in range(4):  # four random trees, three bucket plans, two methods each
        names, shapes, dtypes, values = random_tree(seed, world.rank)
        order = list(reversed(names))
        reference = {n: mx.distributed.all_sum(values[n], group=world.group, stream=mx.cpu) for n in names}
        mx.eval(reference)
        for bucket_bytes, first in [(64, 16), (4096, 512), (1 << 20, 1 << 20)]:
            plan = ShardPlan.make(plan_buckets(order, shapes, dtypes, bucket_bytes, first), world.size)
            for method in ("sendrecv", "all_sum"):
                reducer = ShardedReducer(world, plan, method=method)
                methods[method] = reducer.method
                shards = reducer.reduce_scatter(dict(values))
                mx.eval(shards)
                for index, (bucket, bounds, shard) in enumerate(zip(plan.buckets, plan.bounds, shards)):
                    whole = np.concatenate([np.array(reference[n].astype(mx.float32)).ravel() for n in bucket.names]
                                           + [np.zeros(plan.padding(index), np.float32)])
                    start, stop = bounds[world.rank]
                    got = np.array(shard.astype(mx.float32))
                    assert got.shape == (stop - start,), (got.shape, bounds)
                    err = float(np.abs(got - whole[start:stop]).max(initial=0) / (np.abs(whole).max() + 1e-6))
                    key = f"{method}-{str(bucket.comm_dtype).replace('mlx.core.', '')}"
                    worst[key] = max(worst.get(key, 0.0), err)
                    # all-gather of every rank's summed shard rebuilds the whole summed bucket
                    gathered = np.array(reducer.gather(index, shard).astype(mx.float32))
                    assert gathered.shape == whole.shape and np.array_equal(gathered[start:stop], got)
                    err = float(np.abs(gathered - whole).max(initial=0) / (np.abs(whole).max() + 1e-6))
                    worst[f"gather-{key}"] = max(worst.get(f"gather-{key}", 0.0), err)
                    # equal shards covering the bucket, padded by fewer than one element per rank
                    sizes = {b - a for a, b in bounds}
                    assert len(sizes) == 1 and 0 <= plan.padding(index) < world.size
                    assert bounds[-1][1] == sum(bucket.sizes) + plan.padding(index)
    return {"worst_relative_error": worst, "methods": methods}


def scatter_mismatch(world) -> dict:
    names, shapes, dtypes, values = random_tree(0, 0)
    bucket_bytes = 256 if world.rank == 1 else 4096
    plan = ShardPlan.make(plan_buckets(list(reversed(names)), shapes, dtypes, bucket_bytes, 128), world.size)
    calls = {name: 0 for name in ("all_sum", "send", "recv_like", "all_gather")}
    real = {name: getattr(mx.distributed, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)
        return call

    for name in calls:
        setattr(mx.distributed, name, counting(name))
    try:
        mx.eval(ShardedReducer(world, plan, method="sendrecv").reduce_scatter(dict(values)))
        refused = None
    except DistributedError as e:
        refused = str(e)
    finally:
        for name, fn in real.items():
            setattr(mx.distributed, name, fn)
    return {"refused": refused, **{f"{name}_calls": n for name, n in calls.items()}}


def settle(world) -> dict:
    import time

    names, shapes, dtypes, values = random_tree(3, world.rank)
    buckets = plan_buckets(list(reversed(names)), shapes, dtypes, 256, 64)
    late = 1.5
    seconds = {}
    for name, make in (("reduce", lambda: GradientReducer(world, buckets)),
                       ("reduce_scatter", lambda: ShardedReducer(world, ShardPlan.make(buckets, world.size),
                                                                 method="sendrecv"))):
        reducer = make()
        reducer.check_plan()
        world.barrier()
        if world.rank == 1:
            time.sleep(late)  # a slow peer: its buckets arrive late
        start = time.perf_counter()
        if name == "reduce":
            out, _ = reducer.reduce(dict(values), extra=mx.array([1.0]))
        else:
            out = reducer.reduce_scatter(dict(values))
        seconds[name] = time.perf_counter() - start  # before anything evaluates what came back
        mx.eval(out)
    return {"late_s": late, "seconds": seconds}


world = init_world()
result = {"compare": compare, "mismatch": mismatch, "scatter": scatter,
          "scatter-mismatch": scatter_mismatch, "settle": settle}[sys.argv[1]](world)
if world.rank == 0:
    print("RESULT " + json.dumps(result), flush=True)
