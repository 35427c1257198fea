"""One rank of ``mlx-dp bench comm`` (see ``trainer.bench.comm``).

Run by the benchmark's launcher, never by hand. Rank 0 writes the JSON that
the parent process reads.
"""

import json
import os
import socket
import statistics
import threading
import time

from .comm import VARIANTS, MiB, median, p90


def worker(spec_path: str) -> int:
    from .. import fastblas
    from ..cli import _local_ranks

    fastblas.maybe_enable(local_ranks=_local_ranks())  # before mlx.core loads
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.nn import average_gradients
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import load

    from ..model import backward_order, trainable_parameters
    from ..parallel import GradientReducer, init_world, plan_buckets, resolve_comm_stream
    from ..step import StepFunctions, make_eval_loss

    spec = json.load(open(spec_path))
    world = init_world()
    model, _ = load(spec["model"])
    model.unfreeze()  # full fine-tuning: every weight gets a gradient
    params = trainable_parameters(model)
    n_params = sum(v.size for v in params.values())
    grad_bytes = sum(v.nbytes for v in params.values())
    fns = StepFunctions(model, optim.AdamW(1e-6, weight_decay=0.0), max_grad_norm=None)
    forward = make_eval_loss(model)
    vocab = model.args.vocab_size if hasattr(model, "args") else 256
    tokens = mx.random.randint(0, vocab, (spec["batch"], spec["seq"] + 1), key=mx.random.key(world.rank))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = mx.ones(targets.shape, mx.float32)
    scale = mx.array(1.0 / (targets.size * world.size), mx.float32)
    order = backward_order(model, inputs)
    buckets = plan_buckets(order, {k: v.shape for k, v in params.items()}, {k: v.dtype for k, v in params.items()},
                           int(spec["bucket_mb"] * MiB), int(spec["first_bucket_mb"] * MiB))
    stream = resolve_comm_stream(spec["comm_stream"])
    reducers = {"serial": GradientReducer(world, buckets, overlap=False, stream=stream),
                "overlap": GradientReducer(world, buckets, overlap=True, stream=stream),
                # the same buckets, concatenated and split locally, without any all_sum: the only
                # difference to the others is communication (bucketing also fixes gradient layout)
                "compute_only": GradientReducer(world, buckets, communicate=False)}
    reducers["overlap"].check_plan()

    def step(variant: str, on_dispatch=None, on_grads=None):
        if variant == "forward":
            mx.eval(forward(inputs, targets, mask))
            return
        loss, grads = fns.grads(scale, inputs, targets, mask)
        if variant == "backward":  # forward + backward, no reduction or update
            mx.eval(loss, grads)
            return
        if variant == "unbucketed":  # compute only, gradients used as backward returns them
            summed = grads
        elif variant == "average_gradients":
            summed = average_gradients(grads)
        else:
            flat = dict(tree_flatten(grads))
            del grads  # the reducer frees each gradient once it is in a bucket
            if on_grads is not None:
                on_grads(flat)
            flat, _ = reducers[variant].reduce(flat, on_dispatch=on_dispatch)
            summed = tree_unflatten(list(flat.items()))
        fns.update(summed, loss)
        mx.eval(model.state, fns.optimizer.state)  # note: the step's sync point

    measured = list(VARIANTS) + ["forward", "backward", "unbucketed"]
    times = {v: [] for v in measured}
    peaks = {v: 0 for v in measured}
    for i in range(spec["warmup"] + spec["steps"]):
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

    timeline = record_timeline(world, step, order, len(buckets)) if world.size > 1 else None
    sweep, at_bucket = busbw_sweep(world, spec["sweep_bytes"], int(spec["bucket_mb"] * MiB), spec["sweep_reps"])
    tcp = tcp_bandwidth(world) if world.size > 1 else None

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
            "raw_step_times_s": times,
        }
        with open(spec["out"], "w") as f:
            json.dump(result, f)
    world.barrier()
    return 0


def record_timeline(world, step, order, num_buckets: int):
    """One overlapped step, instrumented: when each bucket was dispatched and reduced.

    MLX's ``async_eval`` returns once at most ~10 operations are still in
    flight, so a bucket's dispatch time is close to when its gradients exist.
    Right after each dispatch a thread blocks in ``mx.eval`` on the bucket's
    reduced array (MLX releases the GIL while waiting) and notes when it
    returns. After the last dispatch another thread waits for the gradient
    that backward produces last: that is when backward ended.
    """
    import mlx.core as mx

    world.barrier()
    t0 = time.perf_counter()
    events, threads, last = {}, [], {}

    def wait_for(key, array):
        mx.eval(array)
        events[key] = time.perf_counter() - t0

    def start_waiter(key, array):
        thread = threading.Thread(target=wait_for, args=(key, array))
        thread.start()
        threads.append(thread)

    def on_grads(flat):
        last["grad"] = flat[order[-1]]

    def on_dispatch(index, bucket, total):
        events[("dispatched", index)] = time.perf_counter() - t0
        start_waiter(("reduced", index, bucket.nbytes), total)
        if index == num_buckets - 1:  # everything is scheduled now, the last gradient too
            start_waiter("backward_end", last.pop("grad"))

    step("overlap", on_dispatch=on_dispatch, on_grads=on_grads)
    step_end = time.perf_counter() - t0
    for thread in threads:
        thread.join()
    reduced = sorted((k[1], k[2], t) for k, t in events.items() if k[0] == "reduced")
    return {
        "buckets": [{"mb": round(nbytes / MiB, 2), "dispatched_s": events[("dispatched", i)], "reduced_s": t}
                    for i, nbytes, t in reduced],
        "backward_end_s": events["backward_end"],
        "step_end_s": step_end,
    }


def busbw_sweep(world, sizes: list[int], bucket_bytes: int, reps: int):
    """all_sum bus bandwidth (GB/s) by message size, and at the bucket size."""
    import mlx.core as mx

    def measure(nbytes: int) -> float:
        x = mx.ones((nbytes // 4,), mx.float32)
        mx.eval(x)
        samples = []
        for r in range(reps + 1):
            world.barrier()
            t0 = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x, group=world.group, stream=mx.cpu))
            if r:  # the first is a warm-up
                samples.append(time.perf_counter() - t0)
        t = statistics.median(samples)
        return nbytes * 2 * (world.size - 1) / world.size / t / 1e9

    if world.size == 1:
        return {}, None
    sweep = {str(n): measure(n) for n in sizes}
    return sweep, measure(bucket_bytes)


def _rank0_ip() -> str:
    path = os.environ.get("MLX_HOSTFILE")
    if path and os.path.isfile(path):
        hosts = json.load(open(path))
        return hosts[0][0].rsplit(":", 1)[0]
    return "127.0.0.1"


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
        sock = socket.create_connection((_rank0_ip(), port), timeout=60)
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
