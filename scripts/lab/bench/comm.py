"""``lab bench comm``: how much gradient communication hides behind backward.

Full fine-tuning of a model of realistic shape (random weights built locally,
default: Qwen3-0.6B's layer shape, 8 layers, >100M parameters) on N local
ranks. Four variants of the same step run interleaved, one step each in turn,
so machine noise hits them alike:

* ``compute_only``: forward, backward, update, with the same buckets made and
  taken apart locally but no ``all_sum``;
* ``serial``: our buckets, reduced after the whole backward;
* ``average_gradients``: ``mlx.nn.average_gradients`` inside the step graph;
* ``overlap``: our buckets, each sent as soon as backward produced it.

It also sweeps ``all_sum`` sizes (256 KiB to 256 MiB) for bus bandwidth,
measures raw TCP between two ranks (the engine's ceiling), and records one
overlapped step's timeline: when each bucket was dispatched and reduced,
against when backward finished.

Usage::

    python scripts/lab bench comm -n 2 --json comm.json
    MLX_DP_BLAS=openblas python scripts/lab bench comm -n 2 --link 10gbe   # ranks behind a shaped link
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from lab import pythonpath

from .comm_worker import VARIANTS, MiB, worker
SWEEP_BYTES = [256 * 1024, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]


# ---------------------------------------------------------------------------- parent


def add_model_args(p) -> None:
    """Ranks and the benchmark model's shape: the options ``bench comm`` and ``bench memory`` share."""
    p.add_argument("-n", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--arch", default="qwen3-0.6b", help="architecture in data/archs (default qwen3-0.6b)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers to keep (default 8: >100M params)")
    p.add_argument("--width-divisor", type=int, default=1, help="divide hidden sizes (for quick tests)")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lab bench comm", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--model", default=None, help="use this model directory instead of building one")
    p.add_argument("--batch", type=int, default=1, help="sequences per rank (default 1)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--steps", type=int, default=6, help="measured steps per variant (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per variant (default 2)")
    p.add_argument("--bucket-mb", type=float, default=None, help="bucket size (default: the recipe default)")
    p.add_argument("--first-bucket-mb", type=float, default=None, help="first bucket size")
    p.add_argument("--comm-stream", choices=["auto", "separate", "default"], default="auto",
                   help="stream of the all_sums (see parallel.comm_stream; default auto)")
    p.add_argument("--sweep-reps", type=int, default=5, help="repetitions per all_sum size (default 5)")
    p.add_argument("--sweep-max-mb", type=float, default=256, help="largest all_sum size swept (default 256)")
    p.add_argument("--link", default=None, help="run ranks in network namespaces behind a shaped link "
                   "(1gbe, 10gbe, tb4, none); needs root")
    p.add_argument("--rate", default=None, help="with --link: raw tc rate, e.g. 5gbit")
    p.add_argument("--delay", default=None, help="with --link: raw one-way delay, e.g. 0.2ms")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_bench_model(arch: str, layers: int, width_divisor: int, cache: Path) -> Path:
    """A random-weight model of a real architecture's shape, built once and cached."""
    from lab import synth

    from trainer.library import data_dir

    tokenizer = data_dir() / "tiny-llama"
    out = cache / f"{arch}-{layers}l-w{width_divisor}"
    if (out / "config.json").is_file():
        return out
    print(f"[bench] building a random-weight model of {arch}'s shape with {layers} layers in {out} "
          "(once; later runs reuse it)", flush=True)
    config = synth.reduce_config(synth.load_arch(arch), num_layers=layers,
                                 vocab_size=synth.tokenizer_vocab_size(tokenizer), width_divisor=width_divisor)
    tmp = Path(tempfile.mkdtemp(prefix=out.name, dir=cache))
    synth.make_random_model(config, tmp, tokenizer, seed=0)
    os.replace(tmp, out)
    return out


def run_ranks(args, command: list[str], env: dict) -> int:
    """Start the worker on N ranks through mlx-dp's launcher code; returns the exit status."""
    env = {**env, "PYTHONPATH": pythonpath()}
    if args.link or args.rate or args.delay:
        from lab.netem import EmulatedCluster

        with EmulatedCluster(args.n, preset=args.link, rate=args.rate, delay=args.delay) as cluster:
            print(f"[bench] emulated link: {cluster.link.describe()}", flush=True)
            return cluster.run(command, env=env, timeout=args.timeout, grace_s=10.0)
    from trainer.cluster.launch import launch

    return launch(command, args.n, env=env, timeout=args.timeout, grace_s=10.0)


def parameter_count(model: Path) -> int | None:
    """Parameters of a model directory, from its safetensors headers alone (nothing is loaded)."""
    total = 0
    for path in sorted(model.glob("*.safetensors")):
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError):
            return None
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total or None


def stock_blas_estimate(args, model: Path) -> str | None:
    """On the stock Linux BLAS: about how long the steps will take, and how to make them faster.

    Each rank computes about 34 x parameters x tokens FLOPs per rotation of the
    seven step kinds timed (four full steps, a forward, a backward, an unbucketed
    step), and MLX's bundled reference BLAS gets about 2.5 GFLOP/s per core
    through such steps (measured: 32.5M parameters x 128 tokens, 2 ranks on 2
    cores, 62 s a rotation; a bare 2048^2 matmul reaches about 6 GFLOP/s,
    docs/PLATFORM.md); ranks share the machine's cores.
    """
    from trainer.tools.fastblas import requested

    if not sys.platform.startswith("linux") or requested():
        return None
    params = parameter_count(model)
    if not params:
        return None
    share = min(1.0, (os.cpu_count() or 1) / args.n)
    seconds = (args.warmup + args.steps) * 34 * params * args.batch * args.seq / (2.5e9 * share)
    took = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{max(1, seconds):.0f} s"
    return (f"the stock Linux BLAS computes fp32 matmul at about 2.5 GFLOP/s per core here, so the "
            f"{args.warmup + args.steps} steps of {params / 1e6:.3g}M parameters x {args.batch * args.seq} tokens "
            f"take roughly {took} before the all_sum sweep; faster: MLX_DP_BLAS=openblas (about 15x), "
            f"or a smaller model or sequence (--layers, --seq)")


def derive(raw: dict) -> dict:
    """The headline ratios from per-variant medians (see the issue's definitions)."""
    step = raw["step_time_s"]
    ours, serial, compute = step["overlap"], step["serial"], step["compute_only"]
    backward = raw["backward_time_s"]
    comm_cost = serial - compute
    hidden_denominator = min(comm_cost, backward)
    best = max(raw["busbw_sweep"].values()) if raw["busbw_sweep"] else None
    at_default = raw.get("busbw_at_bucket")
    return {
        "exposed_comm_fraction": (ours - compute) / ours,
        "hidden_comm_ratio": (serial - ours) / hidden_denominator if hidden_denominator > 0 else None,
        "busbw_ratio": at_default / best if best and at_default else None,
        "busbw_best_gbps": best,
        "busbw_best_vs_tcp": (best / raw["tcp_gbps"]["bidirectional"]) if best and raw.get("tcp_gbps") else None,
        "overlap_vs_average_gradients": step["average_gradients"] / ours,
    }


def print_table(result: dict) -> None:
    step, mem = result["step_time_s"], result["peak_memory_bytes"]
    print(f"\nlab bench comm: {result['world_size']} ranks, {result['params'] / 1e6:.1f}M params "
          f"({result['grad_bytes'] / MiB:.0f} MiB of fp32 gradients), {result['buckets']} buckets of "
          f"{result['bucket_mb']:g} MiB (first {result['first_bucket_mb']:g}), all_sum on the "
          f"{result['comm_stream']} stream, BLAS {result['blas']}, "
          f"launcher {result['launcher']}, link {result['link']}")
    print(f"{'variant':20s} {'median step':>12s} {'p90':>9s} {'peak mem/rank':>14s}")
    for v in VARIANTS:
        print(f"{v:20s} {step[v]:11.3f}s {result['step_time_p90_s'][v]:8.3f}s {mem[v] / 1e9:12.2f} GB")
    print(f"backward alone: {result['backward_time_s']:.3f}s; memory cost of bucketing: "
          f"{(mem['overlap'] - result['peak_memory_unbucketed_bytes']) / 1e6:+.0f} MB over compute only without "
          f"buckets ({result['step_time_unbucketed_s']:.3f}s a step: backward's transposed gradients slow the update)")

    def fmt(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    print(f"exposed communication fraction {fmt(result['exposed_comm_fraction'])}  "
          f"hidden communication ratio {fmt(result['hidden_comm_ratio'])}  "
          f"ours vs average_gradients {fmt(result['overlap_vs_average_gradients'], '.2f')}x")
    sweep = "  ".join(f"{int(k) // 1024}K:{v:.2f}" for k, v in result["busbw_sweep"].items())
    print(f"all_sum busbw GB/s by size: {sweep}")
    scatter = result.get("reduce_scatter_s")
    if scatter:
        print(f"reduce-scatter of one {result['bucket_mb']:g} MiB bucket (parallel.shard_optimizer): send/recv "
              f"{scatter['sendrecv'] * 1e3:.1f} ms, all_sum + slice {scatter['all_sum'] * 1e3:.1f} ms "
              f"({scatter['all_sum'] / scatter['sendrecv']:.2f}x)")
    tcp = result.get("tcp_gbps") or {}
    print(f"busbw at bucket size {fmt(result['busbw_at_bucket'], '.2f')} GB/s = {fmt(result['busbw_ratio'])} of best "
          f"{fmt(result['busbw_best_gbps'], '.2f')}; raw TCP {fmt(tcp.get('one_way'), '.2f')} GB/s one way, "
          f"{fmt(tcp.get('bidirectional'), '.2f')} GB/s each way both at once "
          f"(best busbw / that = {fmt(result['busbw_best_vs_tcp'], '.2f')})")
    timeline = result.get("timeline")
    if timeline:
        end = timeline["backward_end_s"]
        early = sum(1 for b in timeline["buckets"] if b["reduced_s"] < end)
        print(f"timeline of one overlapped step: backward ended at {end:.3f}s; {early} of "
              f"{len(timeline['buckets'])} buckets were already reduced by then:")
        for i, b in enumerate(timeline["buckets"]):
            print(f"  bucket {i:2d} {b['mb']:7.1f} MiB  dispatched {b['dispatched_s']:7.3f}s  "
                  f"reduced {b['reduced_s']:7.3f}s")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    from trainer.config.load import ParallelConfig
    from trainer.tools.fastblas import requested

    defaults = ParallelConfig()
    cache = Path(os.environ.get("MLX_DP_CACHE") or Path.home() / ".cache" / "mlx-dp") / "bench-models"
    cache.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_bench_model(args.arch, args.layers, args.width_divisor, cache)
    with tempfile.TemporaryDirectory(prefix="mlx-dp-bench-") as tmp:
        spec = {"model": str(model), "batch": args.batch, "seq": args.seq, "steps": args.steps,
                "warmup": args.warmup, "sweep_reps": args.sweep_reps, "out": str(Path(tmp) / "result.json"),
                "bucket_mb": args.bucket_mb or defaults.bucket_mb,
                "first_bucket_mb": args.first_bucket_mb or defaults.first_bucket_mb,
                "sweep_bytes": [b for b in SWEEP_BYTES if b <= args.sweep_max_mb * MiB],
                "comm_stream": args.comm_stream}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        print(f"[bench] {args.n} ranks on {model}, {args.steps} measured steps per variant "
              f"(+{args.warmup} warm-up), interleaved", flush=True)
        estimate = stock_blas_estimate(args, model)
        if estimate:
            print(f"[bench] {estimate}", flush=True)
        command = [sys.executable, "-u", "-m", "lab.bench.comm", "--worker", str(spec_path)]
        code = run_ranks(args, command, env={"PYTHONUNBUFFERED": "1"})
        if code != 0:
            print(f"lab bench comm: ranks failed with status {code}", file=sys.stderr)
            return code
        raw = json.loads(Path(spec["out"]).read_text())
    raw.update(derive(raw))
    raw["blas"] = raw.get("blas") or ("openblas" if requested() else "mlx")
    raw["launcher"] = "mlx-dp launch" + (" in emulated-cluster namespaces" if (args.link or args.rate) else "")
    raw["link"] = args.link or (f"{args.rate or 'unshaped'}/{args.delay or '0ms'}" if args.rate or args.delay
                                else "loopback")
    print_table(raw)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
        print(f"[bench] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
