"""``mlx-dp bench scaling``: how a recipe's tokens/s grows from one rank to N.

The recipe trains for a fixed number of optimizer updates at world size 1
and at N with the same per-rank batch (so N ranks do N times the work per
update) and the same OpenBLAS threads per rank. The first ``--warmup``
updates (compilation) are not measured. All of that runs in ``--rounds``
rounds, world sizes alternating: ``scaling_rounds`` decides which figures to
trust and combines them, ``scaling_report`` defines them. Every rank is
started by ``mlx-dp launch``, whose own CPU use is measured and reported next
to the throughput.

Usage::

    mlx-dp bench scaling recipes/tiny-lora.yaml -n 2 --json scaling.json   # also writes scaling.png
    mlx-dp bench scaling RECIPE --hostfile hosts.json     # a real cluster: N = its hosts
    mlx-dp bench scaling RECIPE --hostfile hosts.json --balance off,auto   # unequal Macs

Trailing ``section.key=value`` overrides apply to every run. The chart needs
matplotlib (``pip install 'mlx-dp[plot]'``); the table and the JSON are
always written.

The pieces: ``scaling_plan`` (arguments, checks, the launches of a round),
``scaling_runs`` (launching, the launcher's CPU, our trainer's runs),
``scaling_rounds`` (figures over rounds, and which to trust),
``scaling_report`` (the numbers and the table), ``scaling_balance`` (the
``--balance`` comparison) and ``scaling_chart`` (the chart).

**Extensions.** A plan's ``extensions`` (the repository's lab adds its
baselines this way: runs with communication skipped, mlx_lm.lora on the same
work, stock ``mlx.launch``, emulated links) may define any of:

* ``after(plan, run)`` and ``runs(plan, launcher, round)``: more :class:`Run` s to
  schedule after one of ours, or at the end of a launcher's round;
* ``measure(plan, run, work)``: run a launch of its own kind and return
  ``(measurement, adapter directory)``;
* ``launch(plan, run, command, env, log_base)``: start ranks another way,
  returning ``(status, cpu)``;
* ``link(plan, world_size)``: what links N ranks, for the report;
* ``round_kinds``: kinds whose runs count when judging a round;
* ``per_round(plan, launcher, n, round, measured)`` and ``row(plan, n, rounds, mid)``:
  more figures per round and their medians;
* ``finish(plan, doc, measured, adapters, work)``: more results in the document;
* ``chart(doc, panels)``: more on the chart.
"""

import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..errors import UserError
from . import scaling_report as report
from .scaling_balance import format_balance, summarize_balance
from .scaling_chart import chart_backend, write_chart
from .scaling_plan import PROG, Plan, blas_threads, make_plan, parse_args, schedule
from .scaling_rounds import notes as round_notes
from .scaling_rounds import summarize
from .scaling_runs import run_ours


class Progress:
    """``[bench]`` lines: which run, which round, how long it took, and about how long is left."""

    def __init__(self, runs_planned: int):
        self.planned, self.done, self.start = runs_planned, 0, time.monotonic()

    def begin(self, label: str) -> None:
        print(f"[bench] {self.done + 1}/{self.planned}: {label} ...", end="", flush=True)

    def end(self, summary: str, seconds: float) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * max(0, self.planned - self.done)
        eta = f", about {_duration(left)} left" if self.planned > self.done else ""
        print(f" {summary} ({seconds:.0f} s{eta})", flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def run_round(plan: Plan, round_index: int, work: Path, measured: dict, adapters: dict, progress: Progress) -> None:
    """Every launch of one round, in order; measurements go into ``measured``."""
    for run in schedule(plan, round_index):
        progress.begin(f"round {round_index + 1}, {run.describe(plan)}")
        start = time.monotonic()
        taken = plan.hook("measure", run, work)
        if taken is not None:
            measured[run], adapters[(run.kind, run.launcher, run.world_size)] = taken
        else:
            run_dir = work / run.dirname() / "run"
            measured[run] = run_ours(plan, run, run_dir)
            adapters[(run.kind, run.launcher, run.world_size)] = run_dir
        m = measured[run]
        if m.get("tokens_per_s") is not None:
            summary = f"{m['tokens_per_s']:.0f} tok/s, median step {m['step_time_median_s']:.3f} s"
        else:
            summary = f"{m['updates_per_s']:.2f} updates/s" if m.get("updates_per_s") else "no measured update"
        if m.get("launcher_cpu") is not None:
            summary += f", launcher CPU {m['launcher_cpu']:.1%} of a core"
        if m.get("other_cpu") is not None:
            summary += f", other processes {m['other_cpu']:.2f} cores"
        progress.end(summary, time.monotonic() - start)


def run_all(plan: Plan, work: Path, progress: Progress | None = None) -> dict:
    """Run the rounds (and the extra ones the figures need); return the JSON document."""
    per_round = len(schedule(plan, 0))
    progress = progress or Progress(per_round * plan.rounds)
    measured, adapters = {}, {}
    for round_index in range(plan.rounds):
        run_round(plan, round_index, work, measured, adapters, progress)
    results, problems = summarize(plan, measured)
    extra = 0
    while problems and extra < plan.max_extra_rounds:
        print(f"[bench] re-measuring with one more round: {problems[0]}", flush=True)
        progress.planned += per_round
        run_round(plan, plan.rounds + extra, work, measured, adapters, progress)
        extra += 1
        results, problems = summarize(plan, measured)
    plan.notes += round_notes(results)
    doc = {"benchmark": "scaling", "recipe": plan.recipe, "overrides": plan.overrides, "warmup": plan.warmup,
           "steps": plan.steps, "sizes": plan.sizes, "launchers": plan.launchers,
           "rounds": plan.rounds + extra, "extra_rounds": extra,
           "link": _link(plan, plan.world_size), "hostfile": plan.hostfile, "blas": plan.blas, "jit": plan.jit,
           "blas_threads_per_rank": blas_threads(plan), "machine": report.machine_info(),
           "setup": {"per_rank_batch": plan.cfg.training.batch_size,
                     "grad_accumulation": plan.cfg.training.grad_accumulation,
                     "max_seq_length": plan.cfg.data.max_seq_length, "model": plan.cfg.model.path,
                     "data": plan.cfg.data.path, "method": plan.cfg.method.type},
           "results": [{**row, "link": _link(plan, row["world_size"]), "blas": plan.blas,
                        "blas_threads_per_rank": blas_threads(plan),
                        "per_rank_batch": plan.cfg.training.batch_size,
                        "grad_accumulation": plan.cfg.training.grad_accumulation} for row in results],
           "launcher_cpu": report.launcher_cpu_summary(results),
           "notes": list(plan.notes), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if plan.balances:
        doc["balance"] = summarize_balance(plan, measured)
    for extension in plan.extensions:
        if hasattr(extension, "finish"):
            extension.finish(plan, doc, measured, adapters, work)
    return doc


def _link(plan: Plan, world_size: int) -> str:
    where = plan.hook("link", world_size) if world_size > 1 else None
    return where or ("cluster" if plan.hostfile and world_size > 1 else "loopback")


def write_outputs(doc: dict, json_path: str | None, png_path: str | None, extensions=()) -> None:
    """Write the JSON (if asked) and the chart (if asked, or next to the JSON, when matplotlib is there)."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"[bench] wrote {json_path}")
    png = png_path or (str(Path(json_path).with_suffix(".png")) if json_path else None)
    if png and chart_backend() is not None:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        write_chart(doc, Path(png), extensions)
        print(f"[bench] wrote {png}")


def _stop_on_termination() -> None:
    """SIGTERM and SIGHUP end the benchmark as Ctrl-C does, so the launch in progress (a session of
    its own) is stopped with it rather than left running."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, _frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, interrupt)


def announce(plan: Plan, what: str | None = None) -> None:
    """The benchmark's first line, and whether a chart will be drawn (said before anything is measured)."""
    threads = blas_threads(plan)
    print(f"[bench] {plan.recipe}: world sizes {', '.join(map(str, plan.sizes))} under "
          f"{' and '.join(plan.launchers)}, {plan.rounds} round(s) of "
          + (what or f"{plan.steps} measured updates (+{plan.warmup} warm-up)")
          + f" per run, BLAS {plan.blas}, fused kernels {plan.jit}"
          + (f" with {threads} thread(s) per rank at every world size" if threads else ""), flush=True)
    if (plan.png or plan.json) and chart_backend() is None:
        print("[bench] no chart: matplotlib is not installed (pip install 'mlx-dp[plot]'); the table and the "
              "JSON are written as usual", flush=True)


def run_benchmark(plan: Plan) -> dict:
    """Announce, run every round in a temporary (or ``--keep``) directory, print and write the results."""
    announce(plan)
    if plan.keep:
        Path(plan.keep).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlx-dp-scaling-") as tmp:
        doc = run_all(plan, Path(plan.keep or tmp).resolve())
    print(report.format_table(doc))
    if doc.get("balance"):
        print(format_balance(doc["balance"]))
    write_outputs(doc, plan.json, plan.png, plan.extensions)
    return doc


def main(argv: list[str]) -> int:
    """``mlx-dp bench scaling ...``; returns the exit status.

    Args:
        argv (list[str]): The arguments after ``mlx-dp bench scaling``.
    """
    _stop_on_termination()
    try:
        run_benchmark(make_plan(parse_args(argv)))
        return 0
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
