"""Build the random-weight model the benchmarks use, and print its path.

The default is Qwen3-0.6B's real layer shape (hidden 1024, 16 heads of 128,
8 kv heads, MLP 3072, qk-norm) with 8 layers and the tiny tokenizer's
vocabulary: 126.9M parameters, 484 MiB of fp32 gradients. The same model
`python scripts/lab bench comm` builds and caches.

    .venv/bin/python scripts/make_bench_model.py                # prints the path
    M=$(.venv/bin/python scripts/make_bench_model.py)
    mlx-dp bench scaling recipes/tiny-full.yaml -n 2 model.path=$M
"""

import argparse
import os
from pathlib import Path

from lab.bench.comm import build_bench_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen3-0.6b", help="architecture in data/archs (default qwen3-0.6b)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--width-divisor", type=int, default=1, help="divide hidden sizes (default 1: real width)")
    args = parser.parse_args()
    cache = Path(os.environ.get("MLX_DP_CACHE") or Path.home() / ".cache" / "mlx-dp") / "bench-models"
    cache.mkdir(parents=True, exist_ok=True)
    print(build_bench_model(args.arch, args.layers, args.width_divisor, cache))


if __name__ == "__main__":
    main()
