"""Write a text dataset of chosen token lengths from the tiny world's corpus (see scripts/lab/textsets.py).

    .venv/bin/python scripts/make_text_set.py --out /tmp/text256 --lengths fixed --mean 256
    .venv/bin/python scripts/make_text_set.py --out /tmp/varlen --lengths lognormal --mean 150 --max 1024
"""

import argparse
import json

from lab.textsets import make_text_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and valid.jsonl")
    parser.add_argument("--lengths", choices=["fixed", "lognormal"], default="lognormal")
    parser.add_argument("--mean", type=float, default=150, help="mean tokens per row (default 150)")
    parser.add_argument("--max", type=int, default=1024, help="longest row in tokens (default 1024)")
    parser.add_argument("--rows", type=int, default=2000, help="training rows (default 2000)")
    parser.add_argument("--valid-rows", type=int, default=200, help="validation rows (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stats = make_text_set(args.out, args.rows, args.valid_rows, args.lengths, args.mean, args.max, args.seed)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
