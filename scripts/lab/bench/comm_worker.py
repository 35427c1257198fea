"""One rank of ``lab bench comm`` (see ``lab.bench.comm``).

Run by the benchmark's launcher, never by hand. Every variant times the
trainer's own update (``trainer.step.step.Step``) with a different
reducer from ``trainer.parallel``; only the reducer differs. Rank 0
writes the JSON that the parent process reads.
"""

import json
import socket
import threading
import time

from trainer.env import launch_env
from trainer.bench.stats import median, p90

VARIANTS = ("compute_only", "serial", "average_gradients", "overlap")
MiB = 1024 * 1024


def worker(spec_path: str) -> int:
    from trainer.tools import fastblas

    fastblas.maybe_enable(local_ranks=launch_env().local_ranks())  # before mlx.core loads
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.utils import load

    from trainer.data.batches import Batch
    from trainer.model.load import backward_order, trainable_parameters
    from lab.reducers import AverageGradientsReducer, LocalReducer, PassThroughReducer
    from trainer.parallel import GradientReducer, init_world, plan_buckets
    from trainer.objectives.sft import SFT
    from trainer.step.replicated import ReplicatedUpdate
    from trainer.step.step import Gradient, Step

    spec = json.load(open(spec_path))
    world = init_world()
    model, _ = load(spec["model"])
    model.unfreeze()  # full fine-tuning: every weight gets a gradient
    params = trainable_parameters(model)
    n_params = sum(v.size for v in params.values())
    grad_bytes = sum(v.nbytes for v in params.values())
    optimizer = optim.AdamW(1e-6, weight_decay=0.0)
    objective = SFT(None)
    forward = mx.compile(lambda *a: objective.loss(model, mx.array(1.0), *a)[1], inputs=[model.state],
                         outputs=[model.state])
    vocab = model.args.vocab_size if hasattr(model, "args") else 256
    tokens = np.random.default_rng(world.rank).integers(0, vocab, (spec["batch"], spec["seq"] + 1)).astype(np.int32)
    batch = Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=np.ones((spec["batch"], spec["seq"]), np.float32),
                  tokens=spec["batch"] * spec["seq"], global_tokens=spec["batch"] * spec["seq"] * world.size,
                  indices=np.arange(spec["batch"]), real_tokens=tokens.size)
    arrays = objective.arrays(batch)
    order = backward_order(model, arrays[0])
    buckets = plan_buckets(order, {k: v.shape for k, v in params.items()}, {k: v.dtype for k, v in params.items()},
                           int(spec["bucket_mb"] * MiB), int(spec["first_bucket_mb"] * MiB))
    del params  # holding the first weights would keep a second copy alive once the updates replace them
    groups = [list(b.names) for b in buckets]  # the update is applied bucket by bucket, as in training
    gradient = Gradient(model, objective)
    stream = world.placement.resolve(spec["comm_stream"])
    reducers = {"serial": GradientReducer(world, buckets, overlap=False, stream=stream),
                "overlap": GradientReducer(world, buckets, overlap=True, stream=stream),
                # the same buckets, concatenated and split locally, without any all_sum: the only
                # difference to the others is communication (bucketing also fixes gradient layout)
                "compute_only": LocalReducer(world, buckets),
                "average_gradients": AverageGradientsReducer(world),
                "unbucketed": PassThroughReducer(world)}  # compute only, gradients as backward returns them
    reducers["overlap"].check_plan()
    # One step per reducer, sharing the compiled gradient and the optimizer: only the reducer differs.
    steps = {name: Step(model, objective, ReplicatedUpdate(model, optimizer, r, None, groups=groups), gradient)
             for name, r in reducers.items()}

    def step(variant: str, reducer=None):
        if variant == "forward":
            mx.eval(forward(*arrays))
            return
        if variant == "backward":  # forward + backward, no reduction or update
            mx.eval(gradient(mx.array(1.0), *arrays))
            return
        run = steps[variant] if reducer is None else \
            Step(model, objective, ReplicatedUpdate(model, optimizer, reducer, None, groups=groups), gradient)
        out = run([batch])
        mx.eval(model.state, optimizer.state, out["loss_sum"], out["grad_norm"])  # note: the step's sync point

    measured = list(VARIANTS) + ["forward", "backward", "unbucketed"]
    times = {v: [] for v in measured}
    peaks = {v: 0 for v in measured}
    total = spec["warmup"] + spec["steps"]
    progress = Progress(world.rank == 0, total * len(measured))
    for i in range(total):
        rotation = measured[i % len(measured):] + measured[:i % len(measured)]
        for variant in rotation:
            world.barrier()  # ranks start each step together
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            step(variant)
            dt = time.perf_counter() - t0
            if i >= spec["warmup"]:
                times[variant].append(dt)
                peaks[variant] = max(peaks[variant], mx.get_peak_memory())
            progress.step(f"step {i + 1}/{total}{' (warm-up)' if i < spec['warmup'] else ''}, {variant}", dt)

    progress.say("recording one overlapped step's timeline, then the all_sum sweep and raw TCP")
    timeline = record_timeline(world, step, reducers["overlap"], order) if world.size > 1 else None
    sweep, at_bucket = busbw_sweep(world, spec["sweep_bytes"], int(spec["bucket_mb"] * MiB), spec["sweep_reps"])
    tcp = tcp_bandwidth(world) if world.size > 1 else None
    scatter = reduce_scatter_times(world, int(spec["bucket_mb"] * MiB), spec["sweep_reps"]) if world.size > 1 else None

    per_rank = world.all_gather_bytes(json.dumps({"times": times, "peaks": peaks}).encode())
    if world.rank == 0:
        ranks = [json.loads(r) for r in per_rank]
        result = {
            "world_size": world.size, "params": n_params, "grad_bytes": grad_bytes, "buckets": len(buckets),
            "bucket_mb": spec["bucket_mb"], "first_bucket_mb": spec["first_bucket_mb"],
            "bucket_sizes_mb": [round(b.nbytes / MiB, 2) for b in buckets],
            "blas": fastblas.active(), "comm_stream": stream, "batch": spec["batch"], "seq": spec["seq"], "steps": spec["steps"],
            "step_time_s": {v: median(times[v]) for v in VARIANTS},
            "step_time_p90_s": {v: p90(times[v]) for v in VARIANTS},
            "forward_time_s": median(times["forward"]),
            "backward_time_s": max(0.0, median(times["backward"]) - median(times["forward"])),
            "rank_spread_s": {v: max(median(r["times"][v]) for r in ranks) - min(median(r["times"][v]) for r in ranks)
                              for v in VARIANTS},
            "peak_memory_bytes": {v: max(r["peaks"][v] for r in ranks) for v in VARIANTS},
            "peak_memory_unbucketed_bytes": max(r["peaks"]["unbucketed"] for r in ranks),
            "step_time_unbucketed_s": median(times["unbucketed"]),
            "busbw_sweep": sweep, "busbw_at_bucket": at_bucket, "tcp_gbps": tcp, "timeline": timeline,
            "reduce_scatter_s": scatter,
            "raw_step_times_s": times,
        }
        with open(spec["out"], "w") as f:
            json.dump(result, f)
    world.barrier()
    return 0


class Progress:
    """Rank 0's progress lines: what ran, how long it took, elapsed time, and an estimate of what is left."""

    def __init__(self, active: bool, planned: int):
        self.active, self.planned, self.done, self.start = active, planned, 0, time.perf_counter()

    def say(self, text: str) -> None:
        if self.active:
            print(f"[bench] {text}", flush=True)

    def step(self, label: str, seconds: float) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.planned - self.done)
        self.say(f"{label}: {seconds:.2f} s; elapsed {_clock(elapsed)}, steps left about {_clock(left)}")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class _TimedReducer:
    """A reducer that notes when each bucket is dispatched and starts threads that note when it is reduced."""

    def __init__(self, reducer, order: list[str], t0: float):
        self.reducer, self.world, self.averages = reducer, reducer.world, reducer.averages
        self.buckets = reducer.buckets
        self.order, self.t0 = order, t0
        self.events, self.threads, self.last_grad = {}, [], None

    def _wait_for(self, key, array) -> None:
        import mlx.core as mx

        mx.eval(array)  # MLX releases the GIL while it waits
        self.events[key] = time.perf_counter() - self.t0

    def _start_waiter(self, key, array) -> None:
        thread = threading.Thread(target=self._wait_for, args=(key, array))
        thread.start()
        self.threads.append(thread)

    def reduce(self, grads: dict, extra=None, on_dispatch=None):
        self.last_grad = grads[self.order[-1]]  # the gradient backward produces last
        count = len(self.reducer.buckets)

        def dispatched(index, bucket, total):
            self.events[("dispatched", index)] = time.perf_counter() - self.t0
            self._start_waiter(("reduced", index, bucket.nbytes), total)
            if index == count - 1:  # everything is scheduled now, the last gradient too
                self._start_waiter("backward_end", self.last_grad)
                self.last_grad = None

        return self.reducer.reduce(grads, extra, on_dispatch=dispatched)


def record_timeline(world, step, reducer, order):
    """One overlapped step, instrumented: when each bucket was dispatched and reduced.

    MLX's ``async_eval`` returns once at most ~10 operations are still in
    flight, so a bucket's dispatch time is close to when its gradients exist.
    Right after each dispatch a thread blocks in ``mx.eval`` on the bucket's
    reduced array and notes when it returns. After the last dispatch another
    thread waits for the gradient that backward produces last: that is when
    backward ended.
    """
    world.barrier()
    timed = _TimedReducer(reducer, order, time.perf_counter())
    step("overlap", timed)
    step_end = time.perf_counter() - timed.t0
    for thread in timed.threads:
        thread.join()
    events = timed.events
    reduced = sorted((k[1], k[2], t) for k, t in events.items() if k[0] == "reduced")
    return {
        "buckets": [{"mb": round(nbytes / MiB, 2), "dispatched_s": events[("dispatched", i)], "reduced_s": t}
                    for i, nbytes, t in reduced],
        "backward_end_s": events["backward_end"],
        "step_end_s": step_end,
    }


def reduce_scatter_times(world, nbytes: int, reps: int) -> dict:
    """Median seconds of one bucket's reduce-scatter (parallel.shard_optimizer) by method.

    ``sendrecv`` (the ring's own, from send/recv) against ``all_sum`` and a slice,
    which moves twice the bytes; the trainer uses whichever the backend offers
    first (``sum_scatter``, else ``sendrecv``).
    """
    import mlx.core as mx

    from trainer.parallel import Bucket
    from trainer.parallel.scatter import ShardedReducer, ShardPlan

    size = nbytes // 4
    bucket = Bucket(("x",), ((size,),), (size,), (mx.float32,), mx.float32)
    plan = ShardPlan.make([bucket], world.size)
    x = mx.random.normal((size,), key=mx.random.key(world.rank))
    mx.eval(x)
    out = {}
    for method in ("sendrecv", "all_sum"):
        reducer = ShardedReducer(world, plan, method=method)
        reducer.plan_checked = True  # one plan, built the same on every rank
        samples = []
        for r in range(reps + 1):
            world.barrier()
            start = time.perf_counter()
            mx.eval(reducer.reduce_scatter({"x": x}))  # note: sync point
            if r:
                samples.append(time.perf_counter() - start)
        out[method] = median(samples)
    return out


def busbw_sweep(world, sizes: list[int], bucket_bytes: int, reps: int):
    """all_sum bus bandwidth (GB/s) by message size, and at the bucket size."""

    def measure(nbytes: int) -> float:
        t = median(all_sum_seconds(world, nbytes, reps))
        return nbytes * 2 * (world.size - 1) / world.size / t / 1e9

    if world.size == 1:
        return {}, None
    sweep = {str(n): measure(n) for n in sizes}
    return sweep, measure(bucket_bytes)


def tcp_bandwidth(world, seconds: float = 1.5, chunk: int = MiB) -> dict:
    """Raw TCP between ranks 0 and 1 over the ranks' own network: GB/s one way,
    and GB/s each way with both directions at once (what a ring needs)."""
    listener = None
    port = 0
    if world.rank == 0:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 0))
        listener.listen(1)
        listener.settimeout(60)
        port = listener.getsockname()[1]
    port = int(world.all_gather_bytes(str(port).encode())[0])
    sock = None
    if world.rank == 1:
        sock = socket.create_connection((launch_env().rank0_address() or "127.0.0.1", port), timeout=60)
    elif world.rank == 0:
        sock, _ = listener.accept()
        listener.close()
    result = {}
    for mode in ("one_way", "bidirectional"):
        world.barrier()
        if sock is not None:
            result[mode] = _transfer(sock, world.rank, mode, seconds, chunk)
    if sock is not None:
        sock.close()
    shared = world.all_gather_bytes(json.dumps(result).encode())[0]  # rank 0 measured the receiving side
    return json.loads(shared)


def _transfer(sock, rank: int, mode: str, seconds: float, chunk: int) -> float:
    """Stream for ``seconds``; return the GB/s this rank received."""
    payload = bytes(chunk)
    view = memoryview(bytearray(chunk))
    received = 0

    def send(until):
        while time.perf_counter() < until:
            sock.sendall(payload)

    start = time.perf_counter()
    until = start + seconds
    if mode == "one_way" and rank == 1:
        send(until)
        sock.sendall(b"")
        return 0.0
    sender = None
    if mode == "bidirectional":
        sender = threading.Thread(target=send, args=(until,))
        sender.start()
    sock.settimeout(0.5)
    elapsed = None
    # Keep reading while this rank's sender still runs, even past ``until``: the
    # peer's sender can only finish its last chunk if we read it, and ours only if
    # the peer reads. On a slow (shaped) link, readers that both stop at ``until``
    # can leave both senders stuck in sendall until its timeout raises in the thread.
    while time.perf_counter() < until or (sender is not None and sender.is_alive()):
        try:
            n = sock.recv_into(view)
        except socket.timeout:
            continue
        if elapsed is None:
            received += n
            if time.perf_counter() >= until:
                elapsed = time.perf_counter() - start
    if elapsed is None:
        elapsed = time.perf_counter() - start
    if sender is not None:
        sender.join()
    # drain what the peer still sends so the next measurement starts clean
    sock.settimeout(0.2)
    try:
        while sock.recv_into(view):
            pass
    except (socket.timeout, OSError):
        pass
    return received / elapsed / 1e9


def all_sum_seconds(world, nbytes: int, reps: int) -> list[float]:
    """Wall times of ``reps`` blocking ``all_sum``s of ``nbytes`` of float32 (after one warm-up).

    For bandwidth sweeps; every rank must call it.
    """
    import mlx.core as mx

    x = mx.ones((nbytes // 4,), mx.float32)
    mx.eval(x)
    samples = []
    for r in range(reps + 1):
        world.barrier()
        start = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=world.group))  # note: sync point
        if r:  # the first is a warm-up
            samples.append(time.perf_counter() - start)
    return samples
