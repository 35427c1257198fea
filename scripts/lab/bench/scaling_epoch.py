"""The lab's ``bench scaling --epoch``: one epoch at N ranks, loss tokens per second, side by side.

On variable-length data a fixed window of updates says little: how many
shapes compile, how full the batches are and how long the epoch's longest
batches take all depend on the whole epoch. So each side trains exactly one
epoch at N ranks, under the same launcher, and its speed is the loss tokens of
that epoch over the wall time of its updates (compilation included,
validation and saving left out):

* mlx-dp, the recipe as given (``training.epochs=1``);
* mlx-dp with each ``--variant`` (e.g. ``data.packing=true``);
* with ``--vs-mlx-lm``, mlx_lm.lora for ``floor(samples / global batch)``
  iterations, its one epoch. ``--mlx-lm-sort tokens`` repairs its length sort
  first (``lab.rank.repair_length_sort``, mlx-lm PR #1029); the
  result says which sort ran. Its time runs from the end of its first
  validation (before its first update) to its last report, less its last
  validation (inside its last iteration).

Loss tokens are counted by one definition (ours: targets that count in the
loss, no padding), so a run's tokens/s compares across both trainers; the
unpacked recipe and mlx-lm train the same samples (``data.long_samples:
truncate`` is required for that: mlx-lm truncates). The runs alternate in
every round and each ratio is taken within a round; the figure is the median
over rounds with its range.
"""

import json
import sys
from pathlib import Path

from trainer.bench import scaling_report as report
from trainer.bench.scaling_plan import BenchError, Plan, Run, bench_overrides, blas_threads
from trainer.bench.scaling_rounds import spread
from trainer.bench.scaling_runs import launch_ranks, show_failure

from lab import pythonpath


def check_epoch_plan(plan: Plan) -> None:
    """Refuse what one epoch side by side cannot compare; note what differs."""
    if plan.vs_mlx_lm and plan.cfg.data.long_samples != "truncate":
        raise BenchError("--epoch --vs-mlx-lm needs data.long_samples=truncate: mlx_lm.lora truncates long samples, "
                         "and both sides must train the same samples")
    if plan.cfg.training.grad_accumulation != 1:
        raise BenchError("--epoch compares updates of one micro-batch: set training.grad_accumulation=1")


def train_rows(plan: Plan) -> int:
    """Rows of the training file (mlx_lm.lora's sample count: it truncates and drops nothing)."""
    from trainer.library import resolve

    path = Path(resolve(plan.cfg.data.path)) / "train.jsonl"
    return sum(1 for line in path.open() if line.strip())


def epoch_schedule(plan: Plan, round_index: int) -> list[Run]:
    """One round: mlx-dp, each variant, then mlx_lm.lora, all at N ranks under each launcher."""
    runs = []
    for launcher in plan.launchers:
        runs += [Run("ours", plan.world_size, launcher, round_index)]
        runs += [Run(f"variant{i}", plan.world_size, launcher, round_index) for i in range(len(plan.variants))]
        if plan.vs_mlx_lm:
            runs.append(Run("mlx_lm", plan.world_size, launcher, round_index))
    return runs


def run_ours_epoch(plan: Plan, run: Run, run_dir: Path) -> dict:
    """One epoch of mlx-dp (or a variant); its loss tokens and the wall time of its updates."""
    from trainer.tools.fastblas import THREADS_ENV

    extra = plan.variants[int(run.kind[len("variant"):])].split() if run.kind.startswith("variant") else []
    command = [sys.executable, "-u", "-m", "trainer", "train", plan.recipe,
               *plan.overrides, *extra, *bench_overrides(plan, run_dir, epoch=True)]
    env = {"PYTHONUNBUFFERED": "1"}
    if plan.blas_threads:
        env[THREADS_ENV] = str(plan.blas_threads)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_base = run_dir.parent / "log"
    code, cpu = launch_ranks(plan, run, command, env, log_base)
    records = [r for r in report.read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in r]
    times = [r["step_time_s"] for r in report.read_jsonl(run_dir / "metrics.rank0.jsonl")]
    if code != 0 or not records or len(times) != records[-1]["step"]:
        show_failure(run.describe(plan), code or 1, log_base)
    tokens = sum(r["tokens"] for r in records)
    return {"updates": len(times), "seconds": sum(times), "loss_tokens": tokens,
            "tokens_per_s": tokens / sum(times), "final_train_loss": records[-1]["train_loss"],
            "compiles": None, **cpu}


def run_mlx_lm_epoch(plan: Plan, run: Run, work: Path) -> dict:
    """One epoch of mlx_lm.lora; the wall time of its updates (its loss tokens are counted by ours)."""
    import yaml

    from .scaling_mlx_lm import mlx_lm_args, mlx_lm_config

    base = work / run.dirname()
    base.mkdir(parents=True, exist_ok=True)
    updates = train_rows(plan) // (plan.cfg.training.batch_size * run.world_size)
    config_path = base / "mlx_lm_config.yaml"
    config_path.write_text(yaml.safe_dump(mlx_lm_config(plan.cfg, updates)))
    reports, adapters = base / "reports.jsonl", base / "adapters"
    sort = ["--sort-by-tokens"] if plan.mlx_lm_sort == "tokens" else []
    command = [sys.executable, "-u", "-m", "lab.rank", "mlx-lm", str(reports), *sort, "--",
               *mlx_lm_args(plan.cfg, run.world_size, updates, config_path, adapters)]
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath()}
    if plan.shim:
        env.update(LD_PRELOAD=plan.shim, OPENBLAS_NUM_THREADS=str(blas_threads(plan, run.world_size) or 1))
    log_base = base / "log"
    code, cpu = launch_ranks(plan, run, command, env, log_base)
    rows, vals = report.read_jsonl(reports), report.read_jsonl(Path(str(reports) + ".val"))
    if code != 0 or len(rows) != updates or len(vals) < 2:
        show_failure(run.describe(plan), code or 1, log_base)
    seconds = rows[-1]["time"] - vals[0]["time"] - vals[-1]["val_time"]
    return {"updates": updates, "seconds": seconds, "final_train_loss": rows[-1]["train_loss"],
            "own_trained_tokens": rows[-1]["trained_tokens"], "sort": plan.mlx_lm_sort, **cpu}


def _label(plan: Plan, kind: str) -> str:
    if kind == "ours":
        return "mlx-dp"
    if kind == "mlx_lm":
        return f"mlx_lm.lora (sort by {'tokens, repaired' if plan.mlx_lm_sort == 'tokens' else 'fields, as shipped'})"
    return f"mlx-dp {plan.variants[int(kind[len('variant'):])]}"


def summarize_epochs(plan: Plan, measured: dict) -> dict:
    """Per-run medians over rounds and, within each round, every ratio to mlx-dp and to mlx_lm.lora."""
    rounds = sorted({run.round for run in measured})
    kinds = [k for k in ["ours", *[f"variant{i}" for i in range(len(plan.variants))], "mlx_lm"]
             if any(run.kind == k for run in measured)]
    out = {"runs": [], "ratios": []}
    for launcher in plan.launchers:
        def get(kind, r):
            return measured.get(Run(kind, plan.world_size, launcher, r))

        for kind in kinds:
            rates = []
            for r in rounds:
                m = get(kind, r)
                if m is None:
                    continue
                if kind == "mlx_lm":  # the same samples as our unpacked run: its loss tokens
                    m["loss_tokens"] = get("ours", r)["loss_tokens"]
                    m["tokens_per_s"] = m["loss_tokens"] / m["seconds"]
                rates.append(m["tokens_per_s"])
            out["runs"].append({"launcher": launcher, "run": _label(plan, kind), "kind": kind,
                                "tokens_per_s": spread(rates), "per_round": rates,
                                "updates": get(kind, rounds[0])["updates"]})
        pairs = [(k, "ours") for k in kinds if k.startswith("variant")]
        pairs += [(k, "mlx_lm") for k in kinds if k != "mlx_lm" and "mlx_lm" in kinds]
        for a, b in pairs:
            ratios = [get(a, r)["tokens_per_s"] / get(b, r)["tokens_per_s"] for r in rounds
                      if get(a, r) and get(b, r)]
            out["ratios"].append({"launcher": launcher, "run": _label(plan, a), "against": _label(plan, b),
                                  "ratio": spread(ratios), "per_round": ratios})
    return out


def run_epochs(plan: Plan, work: Path, progress) -> dict:
    """Every round of the epoch comparison; returns the JSON document."""
    from trainer.bench.scaling_report import machine_info

    measured = {}
    for round_index in range(plan.rounds):
        for run in epoch_schedule(plan, round_index):
            progress.begin(f"round {round_index + 1}, {_label(plan, run.kind)}, one epoch at N={run.world_size}")
            if run.kind == "mlx_lm":
                measured[run] = run_mlx_lm_epoch(plan, run, work)
            else:
                measured[run] = run_ours_epoch(plan, run, work / run.dirname() / "run")
            m = measured[run]
            progress.end(f"{m['updates']} updates in {m['seconds']:.1f} s", m["seconds"])
    summary = summarize_epochs(plan, measured)
    return {"benchmark": "scaling --epoch", "recipe": plan.recipe, "overrides": plan.overrides,
            "variants": plan.variants, "world_size": plan.world_size, "launchers": plan.launchers,
            "rounds": plan.rounds, "mlx_lm_sort": plan.mlx_lm_sort if plan.vs_mlx_lm else None,
            "blas": plan.blas, "jit": plan.jit, "blas_threads_per_rank": blas_threads(plan), "machine": machine_info(),
            **summary, "measured": [{**run.__dict__, **m} for run, m in measured.items()],
            "notes": list(plan.notes) + ["tokens/s: loss tokens of one epoch over the wall time of its updates "
                                         "(compilation included, validation left out); ratios within each round, "
                                         "median and range over rounds"]}


def format_epochs(doc: dict) -> str:
    """The table of runs and of ratios."""
    lines = [f"one epoch at N={doc['world_size']}, {doc['rounds']} round(s), BLAS {doc['blas']}", "",
             f"{'launcher':<14} {'run':<52} {'updates':>7} {'tok/s (median, range)':>26}"]
    for r in doc["runs"]:
        t = r["tokens_per_s"]
        lines.append(f"{r['launcher']:<14} {r['run']:<52} {r['updates']:>7} "
                     f"{t['median']:>9.0f} ({t['min']:.0f}-{t['max']:.0f})")
    lines.append("")
    for r in doc["ratios"]:
        x = r["ratio"]
        lines.append(f"{r['launcher']:<14} {r['run']} / {r['against']}: {x['median']:.3f}x "
                     f"(range {x['min']:.3f}-{x['max']:.3f})")
    return "\n".join(lines)


def write(doc: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"[bench] wrote {path}")
