"""``lab bench memory``: peak memory and step time per rank, optimizer state sharded or not.

A full fine-tune of a model of realistic shape (by default Qwen3-0.6B's layer
shape with 8 layers, 127M parameters, random weights built locally) trains
with the real trainer (``mlx-dp train``) on N local ranks, once with
``parallel.shard_optimizer=false`` and once with ``true``, in alternating
rounds (one variant, then the other, then again) so that drift on a shared
machine hits both alike. Each launch is a fresh set of processes, so one
variant's memory never counts against the other's.

Per variant it reports the median step time (with its spread over rounds),
the peak memory of the busiest rank, and the optimizer state each rank holds;
then the ratios sharded / unsharded.

Usage::

    MLX_DP_BLAS=openblas python scripts/lab bench memory -n 2 --json memory.json
    python scripts/lab bench memory -n 2 --layers 2 --width-divisor 4 --steps 2 --rounds 1   # a quick look
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .comm import add_model_args, build_bench_model
from trainer.bench.scaling_report import read_jsonl
from trainer.bench.stats import median

VARIANTS = ("unsharded", "sharded")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lab bench memory", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=1, help="sequences per rank (default 1)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--steps", type=int, default=4, help="measured updates per launch (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured first updates (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="launches per variant, alternating (default 2)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"], help="default adamw")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--timeout", type=float, default=1800, help="give up on one launch after this many seconds")
    return p.parse_args(argv)


def write_recipe(args, model: Path, data: Path, work: Path) -> Path:
    """A full fine-tune recipe for the benchmark model (weights barely move: lr 1e-6)."""
    recipe = {
        "model": {"path": str(model)},
        "method": {"type": "full"},
        "data": {"path": str(data), "max_seq_length": args.seq + 16},
        "training": {"batch_size": args.batch, "steps": args.warmup + args.steps, "learning_rate": 1e-6,
                     "optimizer": args.optimizer, "max_grad_norm": 1.0},
        "eval": {"every": 0, "at_start": False, "max_batches": 1},
        "checkpoint": {"dir": str(work / "run"), "every": 0},
        "logging": {"every": 1, "progress_bar": False, "per_rank_timings": True},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch_variant(args, recipe: Path, variant: str, work: Path) -> dict:
    """Train on N ranks with or without sharding; read every rank's step times and memory."""
    from trainer.cluster.launch import launch

    run_dir = work / f"{variant}-{time.monotonic_ns()}"
    command = [sys.executable, "-u", "-m", "trainer", "train", str(recipe), f"checkpoint.dir={run_dir}",
               f"parallel.shard_optimizer={'true' if variant == 'sharded' else 'false'}"]
    with open(work / f"{variant}.log", "a") as log:
        code = launch(["/bin/sh", "-c", 'exec "$@" >>"$0" 2>&1', str(log.name), *command], args.n,
                      env={"PYTHONUNBUFFERED": "1"}, timeout=args.timeout)
    if code != 0:
        tail = "\n".join((work / f"{variant}.log").read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"the {variant} launch failed (status {code}):\n{tail}")
    ranks = [[r for r in read_jsonl(run_dir / f"metrics.rank{rank}.jsonl") if r["step"] > args.warmup]
             for rank in range(args.n)]
    return {"step_time_s": median([r["step_time_s"] for r in ranks[0]]),
            "peak_memory_gb_per_rank": [max(r["peak_memory_gb"] for r in rows) for rows in ranks],
            "optimizer_state_gb_per_rank": [rows[-1]["optimizer_state_gb"] for rows in ranks]}


def summarise(rounds: dict) -> dict:
    """Per variant: medians over rounds with their spread; then the ratios sharded / unsharded."""
    out = {}
    for variant, runs in rounds.items():
        steps = [r["step_time_s"] for r in runs]
        peaks = [max(r["peak_memory_gb_per_rank"]) for r in runs]
        out[variant] = {"step_time_s": median(steps), "step_time_range_s": [min(steps), max(steps)],
                        "peak_memory_gb": median(peaks), "peak_memory_range_gb": [min(peaks), max(peaks)],
                        "optimizer_state_gb": max(runs[-1]["optimizer_state_gb_per_rank"])}
    a, b = out["unsharded"], out["sharded"]
    out["ratios"] = {"peak_memory": b["peak_memory_gb"] / a["peak_memory_gb"],
                     "optimizer_state": b["optimizer_state_gb"] / a["optimizer_state_gb"],
                     "step_time": b["step_time_s"] / a["step_time_s"]}
    return out


def print_table(doc: dict) -> None:
    s = doc["summary"]
    print(f"\nlab bench memory: {doc['world_size']} ranks, full fine-tune of {doc['params'] / 1e6:.1f}M parameters "
          f"({doc['arch']}, {doc['layers']} layers), {doc['optimizer']}, batch {doc['batch']} x {doc['seq']} tokens "
          f"per rank, {doc['rounds']} alternating round(s), BLAS {doc['blas']}")
    print(f"{'variant':10s} {'median step':>12s} {'(range)':>16s} {'peak mem/rank':>14s} {'(range)':>16s} "
          f"{'optimizer state/rank':>21s}")
    for v in VARIANTS:
        r = s[v]
        print(f"{v:10s} {r['step_time_s']:11.3f}s {r['step_time_range_s'][0]:7.3f}-{r['step_time_range_s'][1]:.3f}s "
              f"{r['peak_memory_gb']:11.3f} GB {r['peak_memory_range_gb'][0]:7.3f}-{r['peak_memory_range_gb'][1]:.3f} "
              f"{r['optimizer_state_gb']:17.3f} GB")
    q = s["ratios"]
    print(f"sharded / unsharded: peak memory {q['peak_memory']:.3f}x, optimizer state {q['optimizer_state']:.3f}x, "
          f"step time {q['step_time']:.3f}x")


def main(argv: list[str]) -> int:
    from lab import synth
    from trainer.tools.fastblas import requested
    from lab.textsets import make_text_set

    args = parse_args(argv)
    cache = Path(os.environ.get("MLX_DP_CACHE") or Path.home() / ".cache" / "mlx-dp") / "bench-models"
    cache.mkdir(parents=True, exist_ok=True)
    model = build_bench_model(args.arch, args.layers, args.width_divisor, cache)
    params = synth.count_params(json.loads((model / "config.json").read_text()))
    with tempfile.TemporaryDirectory(prefix="mlx-dp-memory-") as tmp:
        work = Path(tmp)
        make_text_set(work / "data", rows=max(64, args.n * args.batch * (args.warmup + args.steps) * 2),
                      valid_rows=8, kind="fixed", mean=args.seq, max_tokens=args.seq + 8)
        recipe = write_recipe(args, model, work / "data", work)
        rounds = {v: [] for v in VARIANTS}
        total = args.rounds * len(VARIANTS)
        print(f"[bench] {args.n} ranks, {params / 1e6:.1f}M parameters, {total} launches", flush=True)
        for i in range(args.rounds):
            order = VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS))  # alternate who goes first
            for variant in order:
                start = time.monotonic()
                print(f"[bench] {len(rounds['unsharded']) + len(rounds['sharded']) + 1}/{total}: {variant} ...",
                      end="", flush=True)
                try:
                    result = launch_variant(args, recipe, variant, work)
                except RuntimeError as e:
                    print(f"\nlab bench memory: error: {e}", file=sys.stderr)
                    return 1
                rounds[variant].append(result)
                print(f" step {result['step_time_s']:.3f}s, peak {max(result['peak_memory_gb_per_rank']):.3f} GB "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
    doc = {"benchmark": "memory", "world_size": args.n, "arch": args.arch, "layers": args.layers, "params": params,
           "optimizer": args.optimizer, "batch": args.batch, "seq": args.seq, "steps": args.steps,
           "rounds": args.rounds, "blas": "openblas" if requested() else "mlx", "raw": rounds,
           "summary": summarise(rounds), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print_table(doc)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"[bench] wrote {args.json}")
    return 0
