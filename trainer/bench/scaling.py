"""``mlx-dp bench scaling``: how a recipe's tokens/s grows from one rank to N.

The recipe trains for a fixed number of optimizer updates at world size 1
and at N with the same per-rank batch (so N ranks do N times the work per
update) and the same OpenBLAS threads per rank, and once more at N with the
reduction skipped (gradients not reduced) to price the communication that
nothing hid. The first ``--warmup`` updates (compilation) are not measured.
All of that runs in ``--rounds`` rounds (1, N, 1, N, ...), and each figure is
the median over rounds with its spread; a baseline far below its other rounds
or an efficiency above 100% plus the noise is re-measured or marked invalid
(``trainer/bench/scaling_rounds.py``). Definitions are in
``trainer/bench/scaling_report.py``.

The launcher matters on small machines: ``mlx.launch`` relays output in a
busy-spinning loop that costs about 1.4 of 2 cores (../shared/PLATFORM.md;
``trainer/cluster/relay.py``). So every world size, 1 included, runs under
``mlx-dp launch`` and under ``mlx.launch``, every ratio compares runs
launched the same way, and each launcher's own CPU use is measured from the
system while its ranks run and reported next to the throughput it allowed.

Usage::

    mlx-dp bench scaling recipes/tiny-lora.yaml -n 2 --json scaling.json   # also writes scaling.png
    MLX_DP_BLAS=openblas mlx-dp bench scaling recipes/tiny-lora.yaml -n 2 --vs-mlx-lm --steps 30
    mlx-dp bench scaling RECIPE --hostfile hosts.json     # a real cluster: N = its hosts
    mlx-dp bench scaling RECIPE -n 2 --epoch --vs-mlx-lm --mlx-lm-sort tokens --variant data.packing=true
    sudo .venv/bin/mlx-dp bench scaling RECIPE -n 2 --link 10gbe   # N ranks behind a shaped link

``--vs-mlx-lm`` also trains the same work with ``mlx_lm.lora`` at N ranks under
the same launcher(s), in every round, and scores both adapters with ``mlx-dp
eval``. Trailing ``section.key=value`` overrides apply to every run.

This module runs the benchmark from start to end; the pieces are
``scaling_plan`` (arguments, checks, the launches of a round), ``scaling_runs``
(launchers, their CPU, our trainer's runs), ``scaling_mlx_lm`` (the
mlx_lm.lora side), ``scaling_rounds`` (figures over rounds, and which to
trust), ``scaling_report`` (the numbers and the table) and ``scaling_chart``
(the PNG).
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
from .scaling_chart import write_png
from .scaling_mlx_lm import add_mlx_lm, check_mlx_lm_comparable, run_mlx_lm
from .scaling_plan import PROG, Plan, blas_threads, make_plan, parse_args, schedule
from .scaling_rounds import notes as round_notes
from .scaling_rounds import summarize
from .scaling_runs import run_ours

# ---------------------------------------------------------------------------- the benchmark


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
        cpu, others = measured[run].get("launcher_cpu"), measured[run].get("other_cpu")
        if cpu is not None:
            summary += f", launcher CPU {cpu:.1%} of a core"
        if others is not None:
            summary += f", other processes {others:.2f} cores"
        progress.end(summary, time.monotonic() - start)


def run_all(plan: Plan, work: Path) -> dict:
    """Run the rounds (and the extra ones the figures need); return the JSON document."""
    per_round = len(schedule(plan, 0))
    progress = Progress(per_round * plan.rounds + (1 if plan.vs_mlx_lm else 0))
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
           "launcher_notes": {"mlx-dp launch": "mlx-dp launch: MLX's own rank commands, a relay that blocks in "
                              "read() (trainer/cluster/relay.py)",
                              "mlx.launch": "stock mlx.launch: its output relay busy-polls (about 1.4 cores on 2)"},
           "link": plan.link.describe() if plan.link is not None else ("cluster" if plan.hostfile else "loopback"),
           "hostfile": plan.hostfile, "blas": plan.blas, "jit": plan.jit, "blas_threads_per_rank": blas_threads(plan),
           "machine": report.machine_info(),
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
        doc["slow"] = {str(rank): share for rank, share in plan.slow.items()}
        doc["balance"] = summarize_balance(plan, measured)
    if plan.vs_mlx_lm:
        progress.begin(f"valid loss of both {plan.primary_launcher} adapters with mlx-dp eval")
        start = time.monotonic()
        add_mlx_lm(plan, doc, measured, adapters, work)
        progress.end("done", time.monotonic() - start)
    return doc


def _link(plan: Plan, world_size: int) -> str:
    if plan.link is not None and world_size > 1:
        return plan.link.describe()
    return "cluster" if plan.hostfile and world_size > 1 else "loopback"


def write_outputs(doc: dict, json_path: str | None, png_path: str | None) -> None:
    """Write the JSON (if asked) and the chart (if asked, or next to the JSON)."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"[bench] wrote {json_path}")
    png = png_path or (str(Path(json_path).with_suffix(".png")) if json_path else None)
    if png:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        write_png(doc, Path(png))
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


def main(argv: list[str]) -> int:
    """``mlx-dp bench scaling ...``; returns the exit status.

    Args:
        argv (list[str]): The arguments after ``mlx-dp bench scaling``.
    """
    from ..cluster.netem import NetemError
    from ..tools.fastblas import FastBlasError

    _stop_on_termination()
    try:
        plan = make_plan(parse_args(argv))
        if plan.vs_mlx_lm:
            plan.notes += check_mlx_lm_comparable(plan.cfg)
        threads = blas_threads(plan)
        print(f"[bench] {plan.recipe}: world sizes {', '.join(map(str, plan.sizes))} under "
              f"{' and '.join(plan.launchers)}, {plan.rounds} round(s) of "
              + ("one epoch" if plan.epoch else f"{plan.steps} measured updates (+{plan.warmup} warm-up)")
              + f" per run, BLAS {plan.blas}, fused kernels {plan.jit}"
              + (f" with {threads} thread(s) per rank at every world size" if threads else ""), flush=True)
        if plan.keep:
            Path(plan.keep).mkdir(parents=True, exist_ok=True)
        if plan.epoch:
            from . import scaling_epoch

            scaling_epoch.check_epoch_plan(plan)
            with tempfile.TemporaryDirectory(prefix="mlx-dp-scaling-") as tmp:
                doc = scaling_epoch.run_epochs(plan, Path(plan.keep or tmp).resolve(),
                                               Progress(len(scaling_epoch.epoch_schedule(plan, 0)) * plan.rounds))
            print(scaling_epoch.format_epochs(doc))
            scaling_epoch.write(doc, plan.json)
            return 0
        with tempfile.TemporaryDirectory(prefix="mlx-dp-scaling-") as tmp:
            doc = run_all(plan, Path(plan.keep or tmp).resolve())
        print(report.format_table(doc))
        if doc.get("balance"):
            print(format_balance(doc["balance"]))
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
