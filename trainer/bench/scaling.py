"""``mlx-dp bench scaling``: how a recipe's tokens/s grows from one rank to N.

The recipe trains for a fixed number of optimizer updates at world size 1
and at N with the same per-rank batch (so N ranks do N times the work per
update), and once more at N with the reduction skipped (gradients not
reduced) to price the communication that nothing hid. The first
``--warmup`` updates (compilation) are not measured. Definitions are in
``trainer/bench/scaling_report.py``.

The launcher matters on small machines: ``mlx.launch`` relays output in a
busy-spinning loop that costs about 1.4 of 2 cores (../shared/PLATFORM.md).
So every world size, 1 included, runs under ``mlx.launch`` and under the
lean launcher (``trainer.cluster.launch``: only MLX_RANK and MLX_HOSTFILE per rank),
and every ratio compares runs launched the same way.

Usage::

    mlx-dp bench scaling recipes/tiny-lora.yaml -n 2 --json scaling.json   # also writes scaling.png
    MLX_DP_BLAS=openblas mlx-dp bench scaling recipes/tiny-lora.yaml -n 2 --vs-mlx-lm --steps 30
    mlx-dp bench scaling RECIPE --hostfile hosts.json     # a real cluster: N = its hosts, mlx.launch
    sudo .venv/bin/mlx-dp bench scaling RECIPE -n 2 --link 10gbe   # N ranks behind a shaped link

``--vs-mlx-lm`` also trains the same work with ``mlx_lm.lora`` at N ranks under
the same launcher(s), and scores both adapters with ``mlx-dp eval``. Trailing
``section.key=value`` overrides apply to every run.

This module runs the benchmark from start to end; the pieces are
``scaling_plan`` (arguments, checks, the list of launches), ``scaling_runs``
(launchers, our trainer's runs), ``scaling_mlx_lm`` (the mlx_lm.lora side)
and ``scaling_report`` (the numbers, the table and the chart).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UserError
from . import scaling_report as report
from .scaling_mlx_lm import add_mlx_lm, check_mlx_lm_comparable, run_mlx_lm
from .scaling_plan import PROG, Plan, Run, blas_threads, make_plan, parse_args, schedule
from .scaling_runs import run_ours

# ---------------------------------------------------------------------------- the benchmark


def result_row(plan: Plan, run: Run, ours: dict, skipped: dict | None, wall_s: float) -> dict:
    """One entry of ``results``: a world size under one launcher (ratios are added later).

    Args:
        plan (Plan): The benchmark.
        run (Run): Our run at this world size.
        ours (dict): Its measurement.
        skipped (dict | None): The same with communication skipped (None at one rank).
        wall_s (float): Seconds the launch took, start-up and final save included.
    """
    t = plan.cfg.training
    link = plan.link.describe() if plan.link is not None and run.world_size > 1 else (
        "cluster" if plan.hostfile and run.world_size > 1 else "loopback")
    return {"world_size": run.world_size, "launcher": run.launcher, "link": link, "blas": plan.blas,
            "blas_threads_per_rank": blas_threads(plan, run.world_size), **ours,
            "per_rank_batch": t.batch_size, "grad_accumulation": t.grad_accumulation,
            "comm_skipped": None if skipped is None else {
                k: skipped[k] for k in ("tokens_per_s", "step_time_median_s", "step_time_p90_s",
                                        "rank_spread_s", "peak_memory_gb_per_rank")},
            "wall_s": wall_s}


def run_all(plan: Plan, work: Path) -> dict:
    """Launch every run in turn with a progress line each; return the JSON document."""
    runs = schedule(plan)
    total = len(runs) + (1 if plan.vs_mlx_lm else 0)
    measured, walls, adapters = {}, {}, {}
    for i, run in enumerate(runs, 1):
        print(f"[bench] {i}/{total}: {run.describe(plan)} ...", end="", flush=True)
        start = time.monotonic()
        if run.kind == "mlx_lm":
            measured[run], adapters[("mlx_lm", run.launcher)] = run_mlx_lm(plan, run, work)
            rate = measured[run]["updates_per_s"]
            summary = f"{rate:.2f} updates/s" if rate else "no measured update"
        else:
            run_dir = work / run.dirname() / "run"
            measured[run] = run_ours(plan, run, run_dir)
            adapters[(run.kind, run.launcher, run.world_size)] = run_dir
            summary = (f"{measured[run]['tokens_per_s']:.0f} tok/s, median step "
                       f"{measured[run]['step_time_median_s']:.3f} s")
        walls[run] = time.monotonic() - start
        print(f" {summary} ({walls[run]:.0f} s)", flush=True)

    results = [result_row(plan, run, measured[run], measured.get(Run("skip", run.world_size, run.launcher)),
                          walls[run]) for run in runs if run.kind == "ours"]
    report.add_ratios(results)
    if any((r["scaling_efficiency"] or 0) > 1.05 for r in results):
        plan.notes.append("an efficiency above 100% means one rank ran slower than its share: usually other "
                          "load on the machine changed between the runs, which run one after another; rerun on "
                          "a quiet machine")
    threads = {r["world_size"]: r["blas_threads_per_rank"] for r in results}
    if len(set(threads.values())) > 1:
        plan.notes.append("OpenBLAS threads per rank differ between world sizes (" + ", ".join(
            f"{n} rank(s): {t}" for n, t in threads.items()) + "), as the trainer divides the cores among the "
            "ranks on a machine; multi-threaded OpenBLAS on small matrices can be far slower on a busy "
            "machine, so compare with --blas-threads 1")
    doc = {"benchmark": "scaling", "recipe": plan.recipe, "overrides": plan.overrides, "warmup": plan.warmup,
           "steps": plan.steps, "sizes": plan.sizes, "launchers": plan.launchers,
           "launcher_notes": {"lean": "trainer.cluster.launch: only MLX_RANK and MLX_HOSTFILE per rank",
                              "mlx.launch": "mlx.launch: its output relay busy-polls (about 1.4 cores here)"},
           "link": plan.link.describe() if plan.link is not None else ("cluster" if plan.hostfile else "loopback"),
           "hostfile": plan.hostfile, "blas": plan.blas, "machine": report.machine_info(),
           "setup": {"per_rank_batch": plan.cfg.training.batch_size,
                     "grad_accumulation": plan.cfg.training.grad_accumulation,
                     "max_seq_length": plan.cfg.data.max_seq_length, "model": plan.cfg.model.path,
                     "data": plan.cfg.data.path, "method": plan.cfg.method.type},
           "results": results, "notes": list(plan.notes),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if plan.vs_mlx_lm:
        print(f"[bench] {total}/{total}: valid loss of both {plan.primary_launcher} adapters with mlx-dp eval ...",
              end="", flush=True)
        add_mlx_lm(plan, doc, measured, adapters, work)
        print(" done", flush=True)
    return doc


def write_outputs(doc: dict, json_path: str | None, png_path: str | None) -> None:
    """Write the JSON (if asked) and the chart (if asked, or next to the JSON)."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"[bench] wrote {json_path}")
    png = png_path or (str(Path(json_path).with_suffix(".png")) if json_path else None)
    if png:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        report.write_png(doc, Path(png))
        print(f"[bench] wrote {png}")


def main(argv: list[str]) -> int:
    """``mlx-dp bench scaling ...``; returns the exit status.

    Args:
        argv (list[str]): The arguments after ``mlx-dp bench scaling``.
    """
    from ..cluster.netem import NetemError
    from ..tools.fastblas import FastBlasError

    try:
        plan = make_plan(parse_args(argv))
        if plan.vs_mlx_lm:
            plan.notes += check_mlx_lm_comparable(plan.cfg)
        print(f"[bench] {plan.recipe}: world sizes {', '.join(map(str, plan.sizes))} under "
              f"{' and '.join(plan.launchers)}, {plan.steps} measured updates (+{plan.warmup} warm-up), "
              f"BLAS {plan.blas}", flush=True)
        if plan.keep:
            Path(plan.keep).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mlx-dp-scaling-") as tmp:
            doc = run_all(plan, Path(plan.keep or tmp).resolve())
        print(report.format_table(doc))
        write_outputs(doc, plan.json, plan.png)
        return 0
    except (UserError, NetemError, FastBlasError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
