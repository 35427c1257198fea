"""``python scripts/lab bench rollouts``: what uneven generation between ranks costs GRPO, and whether balancing pays.

Each rank of a GRPO update completes its own prompts, and completions end at
their first stop token, so one rank's rollouts can take longer than another's;
the others then wait at the rollout's collective. This bench trains a GRPO
recipe (default ``recipes/tiny-grpo.yaml``) on 2 ranks under three settings,
in alternating rounds:

* ``off``: ``parallel.balance: off``, the even split;
* ``auto``: ``parallel.balance: auto`` as shipped: it measures each rank's
  forward and backward only (``trainer/run/loop.py`` ``_next_update``: the
  measured span starts after the rollouts);
* ``auto+generation``: the same, with each rank's generation seconds of the
  measured update added to what it reports (``lab.rank --balance-rollouts``,
  through the product's ``Hooks.compute_seconds`` seam): the balancer as it
  would be if it counted rollouts.

Every run's ranks time their generation per update (``lab.rank
--time-rollouts``). Reported per run: prompts/s over all updates (as ``bench
grpo``), each rank's generation seconds, ``uneven_generation_share`` (per
update, the slowest rank's generation minus the ranks' mean, summed, over the
updates' time: the most that perfectly even generation could save), and the
splits the balancer chose. ``--slow 1=0.5`` caps rank 1 at half a core
(``lab.cpulimit``, root), a slower Mac beside a faster one; all runs, capped or
not, start through ``python scripts/lab launch`` (the product's launcher).

    flock /tmp/cpu.lock .venv/bin/python scripts/lab bench rollouts --rounds 3 \\
        --out results/grpo-rollouts-balance.json
    flock /tmp/cpu.lock .venv/bin/python scripts/lab bench rollouts --rounds 3 --slow 1=0.5 \\
        --out results/grpo-rollouts-balance-slow.json
"""

import argparse
import sys
import tempfile
from pathlib import Path

from lab import SCRIPTS, pythonpath

from . import grpo_eval as check
from .preference import blas_env
from trainer.bench.scaling_rounds import spread

ROOT = Path(__file__).resolve().parents[3]
SETTINGS = ("off", "auto", "auto+generation")


def parse_args(argv):
    from .recipe_args import parse_with_overrides

    p = argparse.ArgumentParser(prog="lab bench rollouts", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every setting once (default 3)")
    p.add_argument("--steps", type=int, default=60, help="updates per run (default 60)")
    p.add_argument("--slow", default="", help="cap ranks at a share of one core, e.g. 1=0.5 (root; default none)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"which of {', '.join(SETTINGS)} (default all)")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-grpo.yaml"), help="a GRPO recipe")
    p.add_argument("--timeout", type=float, default=900, help="give up on one run after this many seconds")
    p.add_argument("--keep", default=None, help="keep every run's files in this directory")
    p.add_argument("--out", default="grpo-rollouts-balance.json", help="JSON result")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. training.batch_size=8")
    return parse_with_overrides(p, argv)


def overrides(args, setting: str, run_dir: Path) -> list[str]:
    balance = "off" if setting == "off" else "auto"
    return [*args.overrides, f"training.steps={args.steps}", f"parallel.balance={balance}",
            "logging.compute_timings=true", "logging.every=1", "logging.per_rank_timings=true",
            "logging.progress_bar=false", "logging.wandb=false", "eval.every=0", "eval.at_start=false",
            "eval.max_batches=1", "checkpoint.every=0", f"checkpoint.dir={run_dir}",
            f"data.cache_dir={run_dir.parent.parent / 'cache'}"]  # shared: tokenized once, then read


def run_one(args, setting: str, base: Path) -> dict:
    """One 2-rank run of ``setting``; its figures."""
    from trainer.bench.scaling_report import read_jsonl
    from trainer.bench.scaling_runs import launch_process, show_failure

    run_dir, timer = base / "run", base / "rollouts"
    lab_rank = ["--time-rollouts", str(timer)] + (["--balance-rollouts"] if setting == "auto+generation" else [])
    command = [sys.executable, "-u", "-m", "lab.rank", "mlx-dp", *lab_rank, "--", "train", args.recipe,
               *overrides(args, setting, run_dir)]
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath(), "MLX_DP_JIT": "mlx", **blas_env("mlx-dp", 1)}
    env_args = [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
    slow = ["--slow", args.slow] if args.slow else []
    argv = [sys.executable, str(SCRIPTS / "lab"), "launch", *slow, "-n", "2", "--prefix-output", *env_args, "--",
            *command]
    code, cpu = launch_process(argv, base / "log", args.timeout)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in r]
    if code != 0 or len(rows) != args.steps:
        show_failure(f"{setting} at 2 ranks", code or 1, base / "log")
    f = check.our_figures(rows)
    ranks = [read_jsonl(Path(f"{timer}.rank{k}.jsonl")) for k in range(2)]
    splits = [tuple(r["rows_per_rank"]) for r in rows if "rows_per_rank" in r]
    return {**check.rates(f["times"], f["prompts"], f["completion_tokens"], warmup=5),
            **check.generation(ranks, f["times"]),
            "rollout_s_per_rank": [round(sum(r["rollout_s"] for r in rank), 3) for rank in ranks],
            "splits_used": {",".join(map(str, s)): splits.count(s) for s in sorted(set(splits))},
            "compute_s_per_rank_last": rows[-1].get("compute_s_per_rank"),
            "update_times_s": [round(t, 4) for t in f["times"]], **cpu}


def summarize(runs: list[dict], settings: list[str]) -> dict:
    """Per setting: prompts/s and uneven share (median, range), and its per-round ratio to ``off``."""
    out = {}
    for s in settings:
        mine = [r for r in runs if r["setting"] == s]
        per_round = []
        for r in mine:
            off = [x for x in runs if x["setting"] == "off" and x["round"] == r["round"]]
            if off:
                per_round.append(r["prompts_per_s"] / off[0]["prompts_per_s"])
        out[s] = {"prompts_per_s": spread([r["prompts_per_s"] for r in mine]),
                  "uneven_generation_share": spread([r.get("uneven_generation_share") for r in mine
                                                     if r.get("uneven_generation_share") is not None]),
                  "generation_share": spread([r.get("generation_share") for r in mine
                                              if r.get("generation_share") is not None]),
                  "ratio_to_off": {**spread(per_round), "per_round": per_round}}
    return out


def table(doc: dict) -> str:
    lines = ["| round | setting | prompts/s | generation share | uneven generation share | generation s per rank | "
             "splits used (updates) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["runs"]:
        splits = "; ".join(f"[{k}] {v}" for k, v in r["splits_used"].items())
        lines.append(f"| {r['round'] + 1} | {r['setting']} | {r['prompts_per_s']:.2f} | "
                     f"{r.get('generation_share', 0):.0%} | {r.get('uneven_generation_share', 0):.1%} | "
                     f"{r.get('generate_s_per_rank')} | {splits} |")
    lines.append("")
    for s, x in doc["summary"].items():
        ratio = x["ratio_to_off"]
        if ratio["median"] is not None and s != "off":
            lines.append(f"{s} / off prompts/s: {ratio['median']:.3f}x (range {ratio['min']:.3f}-{ratio['max']:.3f})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from trainer.bench.scaling import Progress, _stop_on_termination
    from trainer.bench.scaling_report import machine_info
    from trainer.errors import UserError
    from trainer.tools import fastblas

    from .preference import _source_state
    from .recipe_args import write_json

    args = parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not settings or set(settings) - set(SETTINGS) or args.rounds < 1:
        print(f"lab bench rollouts: --settings from {', '.join(SETTINGS)}, --rounds at least 1", file=sys.stderr)
        return 2
    _stop_on_termination()
    runs, source = [], {"at_start": _source_state()}
    with tempfile.TemporaryDirectory(prefix="mlx-dp-rollouts-") as tmp:
        work = Path(args.keep or tmp).resolve()
        progress = Progress(args.rounds * len(settings))
        try:
            for r in range(args.rounds):
                for s in settings:
                    base = work / f"r{r}-{s.replace('+', '-')}"
                    base.mkdir(parents=True, exist_ok=True)
                    progress.begin(f"round {r + 1}, balance {s}")
                    m = run_one(args, s, base)
                    runs.append({"round": r, "setting": s, **m})
                    progress.end(f"{m['prompts_per_s']:.2f} prompts/s, uneven generation "
                                 f"{m.get('uneven_generation_share', 0):.1%} of update time", m["train_s"])
        except UserError as e:
            print(f"lab bench rollouts: {e}", file=sys.stderr, flush=True)
            return getattr(e, "exit_code", 2)
    source["at_end"] = _source_state()
    doc = {"benchmark": "rollouts", "recipe": args.recipe, "settings": vars(args), "world_size": 2,
           "blas": "openblas" if fastblas.requested() else "mlx", "machine": machine_info(), "mlx_dp_source": source,
           "runs": runs, "summary": summarize(runs, settings)}
    print(table(doc))
    write_json(args.out, doc)
    return 0
