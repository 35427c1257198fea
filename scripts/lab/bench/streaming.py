"""``lab bench streaming``: time and peak memory to start and finish a few updates on a big JSONL, streamed or not.

A set of prompt/completion rows (by default 200,000 synthetic ones, about 186
MB, made here with a fixed seed) trains the built-in tiny model for a few
updates through the real trainer (``mlx-dp train``, ranks started by the
product's launcher), in three variants and alternating rounds:

* ``streaming``: ``data.streaming=true``: each rank reads and tokenizes only
  the windows it trains on;
* ``loaded-cold``: ``data.streaming=false`` with an empty ``data.cache_dir``:
  the whole set is converted to Arrow and tokenized before the first update
  (a first run on new data, what streaming replaces);
* ``loaded-warm``: ``data.streaming=false`` again on the cold run's cache:
  the tokenized set is memory-mapped and read into arrays.

An untimed streaming launch first (``--warmup-steps``) fills MLX's on-disk
kernel cache for the usual row widths, which otherwise the first launch alone
would pay. Each rank runs under a small wrapper that reports the peak resident memory
(``ru_maxrss``) of the trainer process; the wall time is the launch's, from
start to exit (imports, model, data, the updates, the final checkpoint), and
"outside updates" is that wall time less the updates' own step times (what the
data costs, beside start-up and the final save; the updates are the same work
in every variant, but their row widths, and so MLX's compiles, differ).
docs/RESULTS.md, "Streaming", has a run.

Usage::

    python scripts/lab bench streaming --json streaming.json
    python scripts/lab bench streaming --data my.jsonl --steps 5 --rounds 2 -n 2
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import yaml

from trainer.bench.stats import median

VARIANTS = ("streaming", "loaded-cold", "loaded-warm")
TINY_MODEL = Path(__file__).resolve().parents[3] / "data" / "tiny-llama"
# Runs the trainer as a child, then writes its peak RSS (KiB on Linux, bytes on macOS) to argv[1].<rank>.
PEAK_RSS = ("import os, resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1] + '.' + os.environ.get('MLX_RANK', '0'), 'w')"
            ".write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lab bench streaming", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a JSONL of prompt/completion rows (default: made here)")
    p.add_argument("--rows", type=int, default=200_000, help="rows of the set made here (default 200000)")
    p.add_argument("-n", type=int, default=1, help="ranks (default 1)")
    p.add_argument("--steps", type=int, default=5, help="updates per launch (default 5)")
    p.add_argument("--batch", type=int, default=4, help="rows per rank (default 4)")
    p.add_argument("--rounds", type=int, default=2, help="launches per variant, alternating (default 2)")
    p.add_argument("--warmup-steps", type=int, default=20,
                   help="updates of an untimed streaming launch first, so that MLX's kernel cache holds the usual "
                        "row widths before any variant is timed (default 20; 0: none)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--timeout", type=float, default=3600, help="give up on one launch after this many seconds")
    return p.parse_args(argv)


def make_rows(path: Path, rows: int, seed: int = 0) -> None:
    """Prompt/completion rows of random words (20-50 and 60-140 of them), as the research set was made."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    with open(path, "w") as f:
        for i in range(rows):
            prompt = " ".join(rng.choices(words, k=rng.randint(20, 50)))
            completion = " ".join(rng.choices(words, k=rng.randint(60, 140)))
            f.write(json.dumps({"id": i, "prompt": f"Q{i}: {prompt}?", "completion": completion}) + "\n")


def write_recipe(args, data: Path, work: Path) -> Path:
    recipe = {
        "model": {"path": str(TINY_MODEL)},
        "data": {"path": str(data), "max_seq_length": 1280, "prefetch": True},
        "method": {"type": "lora", "rank": 4, "scale": 4.0},
        "training": {"batch_size": args.batch, "steps": args.steps, "learning_rate": 1e-4, "seed": 0},
        "eval": {"every": 0, "at_start": False},
        "checkpoint": {"every": 0},
        "logging": {"every": 1, "progress_bar": False},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch_variant(args, recipe: Path, variant: str, work: Path, round_, extra=()) -> dict:
    """One launch of ``variant``: its wall time, every rank's peak RSS, and the updates it reported."""
    from trainer.bench.scaling_report import read_jsonl
    from trainer.cluster.launch import launch

    run_dir, cache = work / f"{variant}-{round_}", work / f"cache-{round_}"
    overrides = [f"checkpoint.dir={run_dir}", f"data.cache_dir={cache}",
                 f"data.streaming={'true' if variant == 'streaming' else 'false'}", *extra]
    rss = work / f"{variant}-{round_}.rss"
    command = [sys.executable, "-c", PEAK_RSS, str(rss), sys.executable, "-u", "-m", "trainer", "train", str(recipe),
               *overrides]
    log = work / f"{variant}.log"
    start = time.monotonic()
    code = launch(["/bin/sh", "-c", 'exec "$@" >>"$0" 2>&1', str(log), *command], args.n,
                  env={"PYTHONUNBUFFERED": "1"}, timeout=args.timeout)
    wall = time.monotonic() - start
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"the {variant} launch failed (status {code}):\n{tail}")
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peaks = [int(Path(f"{rss}.{r}").read_text()) * unit / 1e6 for r in range(args.n)]
    updates = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in r]
    # what is not an update's step time: start-up, the data before the first update, the final checkpoint
    outside = wall - sum(r["step_time_s"] * (r["step"] - prev) for r, prev in
                         zip(updates, [0] + [u["step"] for u in updates[:-1]]))
    return {"wall_s": wall, "outside_updates_s": outside, "peak_rss_mb_per_rank": peaks,
            "updates": max(r["step"] for r in updates)}


def summarise(rounds: dict) -> dict:
    """Per variant: medians over rounds with their spread; then streaming over each loaded variant."""
    out = {}
    for variant, runs in rounds.items():
        walls, peaks = [r["wall_s"] for r in runs], [max(r["peak_rss_mb_per_rank"]) for r in runs]
        outside = [r["outside_updates_s"] for r in runs]
        out[variant] = {"wall_s": median(walls), "wall_range_s": [min(walls), max(walls)],
                        "outside_updates_s": median(outside), "outside_updates_range_s": [min(outside), max(outside)],
                        "peak_rss_mb": median(peaks), "peak_rss_range_mb": [min(peaks), max(peaks)]}
    s = out["streaming"]
    out["ratios"] = {f"streaming/{v}": {"wall": s["wall_s"] / out[v]["wall_s"],
                                        "outside_updates": s["outside_updates_s"] / out[v]["outside_updates_s"],
                                        "peak_rss": s["peak_rss_mb"] / out[v]["peak_rss_mb"]}
                     for v in VARIANTS[1:]}
    return out


def print_table(doc: dict) -> None:
    s = doc["summary"]
    print(f"\nlab bench streaming: {doc['rows']} rows ({doc['bytes'] / 1e6:.0f} MB), {doc['world_size']} rank(s), "
          f"{doc['steps']} updates of {doc['batch']} rows per rank, tiny model, {doc['rounds']} alternating round(s)")
    print(f"{'variant':12s} {'median wall':>12s} {'(range)':>18s} {'outside updates':>16s} {'peak RSS/rank':>14s} "
          f"{'(range)':>18s}")
    for v in VARIANTS:
        r = s[v]
        print(f"{v:12s} {r['wall_s']:11.1f}s {r['wall_range_s'][0]:8.1f}-{r['wall_range_s'][1]:.1f}s "
              f"{r['outside_updates_s']:15.1f}s {r['peak_rss_mb']:11.0f} MB "
              f"{r['peak_rss_range_mb'][0]:8.0f}-{r['peak_rss_range_mb'][1]:.0f} MB")
    for name, q in s["ratios"].items():
        print(f"{name}: wall {q['wall']:.3f}x, outside updates {q['outside_updates']:.3f}x, peak RSS "
              f"{q['peak_rss']:.3f}x")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlx-dp-streaming-") as tmp:
        work = Path(tmp)
        data = Path(args.data) if args.data else work / "rows.jsonl"
        if not args.data:
            print(f"[bench] writing {args.rows} rows to {data} ...", flush=True)
            make_rows(data, args.rows)
        recipe = write_recipe(args, data, work)
        if args.warmup_steps:  # MLX compiles a kernel per row width once and caches it on disk: not data's cost
            print(f"[bench] warm-up: {args.warmup_steps} streamed updates, untimed ...", flush=True)
            launch_variant(args, recipe, "streaming", work, "warmup", [f"training.steps={args.warmup_steps}",
                                                                       "training.seed=1"])
        rounds = {v: [] for v in VARIANTS}
        for i in range(args.rounds):
            # cold before warm (warm reads cold's cache); streaming first in even rounds, last in odd ones
            order = VARIANTS if i % 2 == 0 else VARIANTS[1:] + VARIANTS[:1]
            for variant in order:
                print(f"[bench] round {i + 1}/{args.rounds}: {variant} ...", end="", flush=True)
                try:
                    result = launch_variant(args, recipe, variant, work, i)
                except RuntimeError as e:
                    print(f"\nlab bench streaming: error: {e}", file=sys.stderr)
                    return 1
                rounds[variant].append(result)
                print(f" {result['wall_s']:.1f} s, peak RSS {max(result['peak_rss_mb_per_rank']):.0f} MB, "
                      f"{result['updates']} updates", flush=True)
        rows = args.rows if not args.data else sum(1 for _ in open(data, "rb"))
        doc = {"benchmark": "streaming", "rows": rows, "data": str(data), "bytes": data.stat().st_size,
               "world_size": args.n, "steps": args.steps, "batch": args.batch, "rounds": args.rounds,
               "warmup_steps": args.warmup_steps, "raw": rounds,
               "summary": summarise(rounds), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print_table(doc)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"[bench] wrote {args.json}")
    return 0
