"""``lab bench profile``: where the time of one update goes, phase by phase.

It builds a recipe's run exactly as ``mlx-dp train`` does (data, batches,
model, reducer, compiled step) and then drives the same pieces one phase at a
time, forcing evaluation between phases, so each one can be timed:

* ``batch``: waiting for this rank's micro-batches (Python: gather, pad, mask;
  with prefetch, only what the prefetch thread had not finished) and turning
  them into MLX arrays;
* ``compile``: tracing and compiling the step for a shape it had not seen
  (the first update at a shape, less what an update of that size costs once
  compiled);
* ``forward+backward``: the compiled gradient function;
* ``mask``: the block-diagonal attention mask of packed rows, timed on its own
  (it is part of forward+backward; shown so its share is visible);
* ``reduce+update``: the gradient reduction over ranks, clipping and the
  optimizer update.

Training runs these as one graph with one sync point, so the phases overlap a
little there; the profile's sum is an upper bound of a training update.
It trains (weights change) but writes nothing but its JSON.

    MLX_DP_BLAS=openblas python scripts/lab bench profile RECIPE [--steps 60 | --epoch] [--json out.json] [key=value ...]
    python scripts/lab launch -n 2 -- .venv/bin/python scripts/lab bench profile RECIPE ...   # on each of 2 ranks (rank 0 prints)
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from trainer.errors import UserError
from .recipe_args import parse_with_overrides, write_json

PROG = "lab bench profile"
PHASES = ("batch", "compile", "forward_backward", "mask", "reduce_update")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Per-phase time of a recipe's updates.")
    p.add_argument("recipe")
    p.add_argument("--steps", type=int, default=60, help="updates to profile (default 60)")
    p.add_argument("--epoch", action="store_true", help="profile one whole epoch instead of --steps updates")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parse_with_overrides(p, argv)
    return args


def estimate_compile(times: list[float], slots: list[int], first: list[bool]) -> list[float]:
    """Compile seconds of each update: its time less a compiled update of the same size.

    A compiled update's cost is taken as proportional to its token slots
    (rows x width), at the median rate of the updates that compiled nothing.

    Args:
        times (list[float]): Forward+backward seconds of each update, compile included.
        slots (list[int]): Token slots (rows x width) each update computed.
        first (list[bool]): Whether the update met a shape for the first time.
    """
    rates = sorted(t / s for t, s, f in zip(times, slots, first) if not f and s)
    rate = rates[len(rates) // 2] if rates else 0.0
    return [max(0.0, t - rate * s) if f else 0.0 for t, s, f in zip(times, slots, first)]


def _mask_seconds(batch) -> float:
    """Build and evaluate a packed batch's attention mask alone (0 for unpacked batches)."""
    if batch.segments is None:
        return 0.0
    import mlx.core as mx

    from trainer.data.packing import SegmentMask

    segments = mx.array(batch.segments)
    mx.eval(segments)
    start = time.perf_counter()
    mx.eval(SegmentMask(segments).make_mask(segments.shape[1]))
    return time.perf_counter() - start


def profile_updates(run, updates: int) -> dict:
    """Drive ``updates`` updates of a built run phase by phase; return per-update timings."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    step, stream, accum = run.step, run.stream, run.cfg.training.grad_accumulation
    to_arrays, reducer = run.objective.arrays, step.update.reducer
    seen, rows = set(), []
    for _ in range(updates):
        t0 = time.perf_counter()
        micro = [next(stream) for _ in range(accum)]
        arrays = [to_arrays(b) for b in micro]
        mx.eval(arrays)
        t1 = time.perf_counter()
        shapes = {b.inputs.shape for b in micro}
        new = bool(shapes - seen)
        seen |= shapes
        total = sum(b.global_tokens for b in micro)
        scale = mx.array(1.0 / total, mx.float32)
        acc, loss = None, mx.array(0.0, mx.float32)
        for a in arrays:
            loss_sum, grads = step.grads(scale, *a)
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            loss = loss + loss_sum
            mx.eval(acc, loss)  # note: sync point, to time forward+backward alone
        t2 = time.perf_counter()
        summed, extra = reducer.reduce(dict(tree_flatten(acc)), extra=loss.reshape(1))
        step.update._apply(summed, extra[0])  # the replicated update's clip and apply, timed with the reduction
        mx.eval(run.model.state, run.optimizer.state)  # note: sync point, the end of the update
        t3 = time.perf_counter()
        rows.append({"batch": t1 - t0, "fwd_bwd_raw": t2 - t1, "reduce_update": t3 - t2, "new_shape": new,
                     "slots": int(sum(b.inputs.size for b in micro)), "width": max(b.inputs.shape[1] for b in micro),
                     "loss_tokens": total, "local_loss_tokens": int(sum(b.tokens for b in micro)),
                     "real_tokens": int(sum(b.real_tokens for b in micro)),
                     "mask": sum(_mask_seconds(b) for b in micro)})
    compile_s = estimate_compile([r["fwd_bwd_raw"] for r in rows], [r["slots"] for r in rows],
                                 [r["new_shape"] for r in rows])
    for r, c in zip(rows, compile_s):
        r["compile"], r["forward_backward"] = c, r["fwd_bwd_raw"] - c
    return {"updates": rows, "distinct_shapes": sorted(seen)}


def summarize(rows: list[dict], world_size: int) -> dict:
    """Per-phase totals, shares and per-update means; loss tokens/s over the profiled updates."""
    totals = {p: sum(r[p] for r in rows) for p in PHASES}
    wall = sum(totals[p] for p in PHASES if p != "mask")  # the mask is inside forward+backward
    slots = sum(r["slots"] for r in rows)
    real = sum(r["real_tokens"] - 1 for r in rows)  # a sample of n tokens fills n-1 input slots
    return {"updates": len(rows), "seconds": wall,
            "per_update_ms": {p: 1000 * totals[p] / len(rows) for p in PHASES},
            "share": {p: totals[p] / wall for p in PHASES},
            "compiles": sum(r["new_shape"] for r in rows),
            "padded_share": max(0.0, 1 - real / slots) if slots else 0.0,
            "loss_tokens_per_s": sum(r["loss_tokens"] for r in rows) / wall,
            "world_size": world_size}


def format_split(summary: dict, shapes: list) -> str:
    lines = [f"{'phase':<18} {'ms/update':>10} {'share':>7}"]
    names = {"batch": "batch (Python)", "compile": "trace+compile", "forward_backward": "forward+backward",
             "mask": "  of which mask", "reduce_update": "reduce+update"}
    for p in PHASES:
        lines.append(f"{names[p]:<18} {summary['per_update_ms'][p]:>10.1f} {summary['share'][p]:>7.1%}")
    lines.append(f"{summary['updates']} updates in {summary['seconds']:.1f} s: "
                 f"{summary['loss_tokens_per_s']:.0f} loss tokens/s (all ranks), {summary['compiles']} compiles "
                 f"for {len(shapes)} distinct shapes, {summary['padded_share']:.1%} of token slots padding")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``lab bench profile ...``; returns the exit status."""
    from trainer.tools.runtime import prepare_runtime, print_error
    from trainer.config.load import load_config

    args = parse_args(argv)
    try:
        # One directory name on every rank: ranks check before training that their recipes agree.
        run_dir = Path(tempfile.gettempdir()) / f"mlx-dp-profile-{os.getuid()}"
        cfg = load_config(args.recipe, [*args.overrides, f"checkpoint.dir={run_dir}"])
        prepare_runtime()
        from trainer.cluster import connect
        from trainer.model import fused
        from trainer.model.attention import resolve_block
        from trainer.data.batches import batches_per_epoch
        from trainer.run.setup import build_run
        from trainer.tools import fastjit
        from trainer.tools.fastblas import active

        world = connect.join(cfg.parallel.backend, cfg.parallel.timeout_s)
        run = build_run(cfg, world, None)
        stream = run.stream
        updates = args.steps
        if args.epoch:
            updates = -(-batches_per_epoch(len(stream.split), stream.micro_batch) // cfg.training.grad_accumulation)
        result = profile_updates(run, updates)
        stream.close()  # the prefetch thread
        summary = summarize(result["updates"], world.size)
        shapes = [list(s) for s in result["distinct_shapes"]]
        if world.is_main:
            print(format_split(summary, shapes), flush=True)
            if args.json:
                doc = {"benchmark": "profile", "recipe": args.recipe, "overrides": args.overrides,
                       "epoch": args.epoch, "blas": active(), "jit": fastjit.active(),
                       "attention_block": resolve_block(cfg.training.attention_block),
                       "fused_exp": fused.resolve(cfg.training.fused_exp), "summary": summary,
                       "distinct_shapes": shapes,
                       "per_update": result["updates"], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                write_json(args.json, doc)
        return 0
    except UserError as e:
        print_error(e)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
