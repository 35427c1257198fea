"""The lab's ``bench scaling``: the product's benchmark plus the baselines only the lab needs.

It is ``mlx-dp bench scaling`` (``trainer/bench/scaling.py``: the same plan,
rounds, figures and table) with one extension (:class:`LabRuns`) that adds:

* **communication skipped**: at N ranks, the same run with a reducer that
  skips every ``all_sum`` (``lab.reducers.LocalReducer``, passed to the trainer
  by ``lab.rank``); the gap prices the communication nothing hid
  (``exposed comm = (t_N - t_N_skip) / t_N`` on median steps);
* ``--launcher mlx.launch|both``: the same runs under stock ``mlx.launch``,
  started from the product's own fallback command line
  (``trainer.cluster.launch.stock_argv``), its relay's CPU measured;
* ``--vs-mlx-lm``: mlx_lm.lora on the same work (``scaling_mlx_lm``);
* ``--link``/``--rate``/``--delay``: N ranks in network namespaces behind
  shaped links (``lab.netem``, root), started by the product's launcher code;
* ``--slow RANK=SHARE``: slower Macs emulated with cgroup CPU caps
  (``lab.cpulimit``, root), with ``--balance off,auto`` by default;
* ``--epoch`` (``scaling_epoch``): one epoch at N side by side, with ``--variant``.

Usage::

    .venv/bin/python scripts/lab bench scaling recipes/tiny-lora.yaml -n 2 --vs-mlx-lm --json out.json
    sudo .venv/bin/python scripts/lab bench scaling RECIPE -n 2 --link 10gbe
    sudo .venv/bin/python scripts/lab bench scaling RECIPE -n 2 --slow 1=0.5
"""

import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from trainer.bench import scaling as product
from trainer.bench import scaling_plan
from trainer.bench.scaling_plan import BenchError, Plan, Run, build_parser, make_plan
from trainer.bench.scaling_report import pct
from trainer.bench.scaling_runs import launch_process, run_ours
from trainer.errors import UserError

from lab import pythonpath

PROG = "lab bench scaling"
LAUNCHERS = ("mlx-dp launch", "mlx.launch")
LAUNCHER_CHOICES = {"mlx-dp": ["mlx-dp launch"], "mlx.launch": ["mlx.launch"], "both": list(LAUNCHERS)}
NO_DELAY_NOTE = "this kernel has no netem qdisc: the emulated links had their rate but not their delay"
scaling_plan.KINDS.update({"skip": "mlx-dp, communication skipped", "mlx_lm": "mlx_lm.lora"})


@dataclass
class LabPlan(Plan):
    """The product's plan with the lab's settings."""

    skip: bool = True  # the communication-skipped run at every N > 1
    vs_mlx_lm: bool = False
    mlx_lm_sort: str = "fields"  # mlx_lm.lora's length sort: "fields" (as shipped) or "tokens" (repaired)
    shim: str | None = None  # the OpenBLAS shim mlx_lm.lora gets with LD_PRELOAD
    link: object = None  # lab.netem_links.LinkSpec when N-rank runs go behind an emulated link
    link_args: dict = field(default_factory=dict)
    slow: dict = field(default_factory=dict)  # rank -> share of one core, in every run
    epoch: bool = False
    variants: list = field(default_factory=list)  # extra mlx-dp runs with these overrides (--epoch)


def parse_args(argv: list[str]):
    p = build_parser(PROG)
    p.add_argument("--launcher", choices=list(LAUNCHER_CHOICES), default=None,
                   help="how to start ranks: mlx-dp (mlx-dp launch), mlx.launch or both (default both locally, "
                   "mlx-dp with --hostfile, --link or --slow)")
    p.add_argument("--no-skip", action="store_true", help="leave out the N-rank runs with communication skipped")
    p.add_argument("--link", default=None, help="run N-rank jobs in network namespaces behind a shaped link "
                   "(1gbe, 10gbe, tb4, none); needs root")
    p.add_argument("--rate", default=None, help="with --link: raw tc rate per direction, e.g. 5gbit")
    p.add_argument("--delay", default=None, help="with --link: raw one-way delay, e.g. 0.2ms")
    p.add_argument("--vs-mlx-lm", action="store_true", help="also train the same work with mlx_lm.lora at N")
    p.add_argument("--mlx-lm-sort", choices=["fields", "tokens"], default="fields", help="mlx_lm.lora's length "
                   "sort: fields (as shipped: CacheDataset.itemlen counts a row's fields) or tokens (repaired "
                   "as in mlx-lm PR #1029)")
    p.add_argument("--epoch", action="store_true", help="train one epoch at N ranks only and compare loss tokens/s "
                   "(lab/bench/scaling_epoch.py); --steps and --warmup do not apply")
    p.add_argument("--variant", action="append", default=[], help="with --epoch: also run mlx-dp with these "
                   "overrides (space-separated), e.g. --variant data.packing=true; repeatable")
    p.add_argument("--slow", default=None, metavar="RANK=SHARE[,...]",
                   help="emulate a slower Mac: cap ranks at a share of one core in every run, e.g. 1=0.5 "
                   "(cgroup v1 CPU quota; root, Linux); --balance defaults to off,auto")
    return p.parse_intermixed_args(argv)


def make_lab_plan(args) -> LabPlan:
    """The product's checks and plan, then the lab's."""
    from trainer.config.load import load_config

    if args.variant and not args.epoch:
        raise BenchError("--variant applies to --epoch only")
    if args.slow and args.balance is None and not args.epoch:
        args.balance = "off,auto"
    if args.vs_mlx_lm and not args.epoch and args.steps < 2:
        raise BenchError("--steps must be at least 2 with --vs-mlx-lm, whose last update also validates")
    base = make_plan(args, epoch=args.epoch)
    plan = LabPlan(**{f.name: getattr(base, f.name) for f in fields(Plan)}, skip=not args.no_skip,
                   vs_mlx_lm=args.vs_mlx_lm, mlx_lm_sort=args.mlx_lm_sort, epoch=args.epoch,
                   variants=list(args.variant))
    plan.extensions.append(LabRuns())
    plan.launchers = _launchers(args)
    if args.epoch:
        plan.sizes = [plan.world_size]  # one epoch at N; the scaling from 1 is the other mode's question
        if plan.balances:
            raise BenchError("--balance compares settings in step runs; with --epoch use --variant "
                             "parallel.balance=auto")
    if plan.vs_mlx_lm:
        from .scaling_mlx_lm import check_mlx_lm_comparable

        if plan.cfg.training.max_grad_norm is not None:
            # mlx_lm.lora cannot clip gradients: identical work means no clipping on our side either
            plan.overrides.append("training.max_grad_norm=null")
            plan.cfg = load_config(args.recipe, plan.overrides
                                   + scaling_plan.bench_overrides(plan, Path("runs/bench"), args.epoch))
            plan.notes.append("gradient clipping is off in every mlx-dp run here: mlx_lm.lora has none, and "
                              "identical work is compared")
        plan.notes += check_mlx_lm_comparable(plan.cfg)
        if plan.blas == "openblas":
            from trainer.tools import fastblas

            plan.shim = str(fastblas.build_shim())
    _plan_slow(plan, args)
    if args.link or args.rate or args.delay:
        _plan_link(plan, args)
    if "mlx.launch" in plan.launchers and not (Path(sys.executable).parent / "mlx.launch").is_file():
        raise BenchError(f"mlx.launch is not next to {sys.executable}; install mlx in this environment")
    return plan


def _launchers(args) -> list[str]:
    if args.link or args.rate or args.delay or args.slow:
        if args.launcher not in (None, "mlx-dp"):
            raise BenchError(f"--launcher {args.launcher} does not apply here: emulated links and CPU caps start "
                             "ranks through mlx-dp's launcher code, which mlx.launch gives no handle on")
        if args.hostfile:
            raise BenchError("use either --hostfile (a real cluster) or --link/--slow (an emulated one)")
        return [LAUNCHERS[0]]
    if args.launcher is None:
        return [LAUNCHERS[0]] if args.hostfile else list(LAUNCHERS)
    return LAUNCHER_CHOICES[args.launcher]


def _plan_slow(plan: LabPlan, args) -> None:
    from lab.cpulimit import CpuLimitError, check_permitted, parse_slow

    try:
        plan.slow = parse_slow(args.slow)
    except CpuLimitError as e:
        raise BenchError(str(e)) from None
    if not plan.slow:
        return
    if max(plan.slow) >= plan.world_size:
        raise BenchError(f"--slow names rank {max(plan.slow)}, but the largest world size is {plan.world_size}")
    reason = check_permitted()
    if reason:
        raise BenchError(reason)
    plan.notes.append("slower Macs emulated: " + ", ".join(f"rank {r} capped at {s:g} of a core"
                                                          for r, s in sorted(plan.slow.items()))
                      + " (cgroup CPU quota) in every run")


def _plan_link(plan: LabPlan, args) -> None:
    from lab import netem

    try:
        plan.link = netem.link_spec(args.link, args.rate, args.delay)
    except netem.NetemError as e:
        raise BenchError(str(e)) from None
    reason = netem.check_permitted()
    if reason:
        raise BenchError(f"--link: {reason}")
    if plan.world_size < 2:
        raise BenchError("--link needs a world size of at least 2")
    plan.link_args = {"preset": args.link, "rate": args.rate, "delay": args.delay}
    plan.notes.append("behind an emulated link, N ranks are started by mlx-dp's launcher code inside the "
                      "namespaces, in this process, so its CPU is not measured; one rank runs under mlx-dp launch")


class LabRuns:
    """The lab's extension of the product's plan (the hooks are listed in ``trainer/bench/scaling.py``)."""

    round_kinds = ("skip",)

    # ------------------------------------------------------------------ which runs

    def after(self, plan: LabPlan, run: Run) -> list[Run]:
        return [run.same(kind="skip")] if plan.skip and run.world_size > 1 else []

    def runs(self, plan: LabPlan, launcher: str, round_index: int) -> list[Run]:
        return [Run("mlx_lm", plan.world_size, launcher, round_index)] if plan.vs_mlx_lm else []

    def measure(self, plan: LabPlan, run: Run, work: Path):
        if run.kind == "skip":
            run_dir = work / run.dirname() / "run"
            entry = [sys.executable, "-u", "-m", "lab.rank", "mlx-dp", "--no-reduce", "--"]
            return run_ours(plan, run, run_dir, entry=entry, env={"PYTHONPATH": pythonpath()}), run_dir
        if run.kind == "mlx_lm":
            from .scaling_mlx_lm import run_mlx_lm

            return run_mlx_lm(plan, run, work)
        return None

    # ------------------------------------------------------------------ how ranks start

    def launch(self, plan: LabPlan, run: Run, command: list[str], env: dict, log_base: Path):
        if plan.link is not None and run.world_size > 1:
            from lab.netem import EmulatedCluster

            with EmulatedCluster(run.world_size, **plan.link_args) as cluster:
                from trainer.cluster.relay import Output

                with open(f"{log_base}.log", "w") as log:
                    code = cluster.run(command, env=env, timeout=plan.timeout, slow=plan.slow,
                                       output=Output(prefix=True, streams=(log, log)))
                if cluster.delay_emulated is False and NO_DELAY_NOTE not in plan.notes:
                    plan.notes.append(NO_DELAY_NOTE)
                return code, {"launcher_cpu": None, "other_cpu": None}
        if run.launcher == "mlx.launch":
            return launch_process(_stock_argv(plan, run.world_size, env, command), log_base, plan.timeout)
        slow = {rank: share for rank, share in plan.slow.items() if rank < run.world_size}
        if slow:
            caps = ",".join(f"{rank}={share}" for rank, share in slow.items())
            lab = [sys.executable, str(Path(__file__).resolve().parents[1]), "launch", "--slow", caps]
            argv = lab + ["--prefix-output", "-n", str(run.world_size)]
            argv += [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
            return launch_process(argv + ["--", *command], log_base, plan.timeout)
        return None

    def link(self, plan: LabPlan, world_size: int):
        return plan.link.describe() if plan.link is not None and world_size > 1 else None

    def slow(self, plan: LabPlan):
        return plan.slow or None

    # ------------------------------------------------------------------ figures

    def per_round(self, plan: LabPlan, launcher: str, n: int, round_index: int, measured: dict) -> dict:
        ours, base = measured[Run("ours", n, launcher, round_index)], measured[Run("ours", 1, launcher, round_index)]
        skipped = measured.get(Run("skip", n, launcher, round_index)) if n > 1 else None
        if not skipped:
            return {}
        step, skip_step = ours["step_time_median_s"], skipped["step_time_median_s"]
        return {"exposed_comm_share": exposed_comm_share(step, skip_step),
                "scaling_efficiency_comm_skipped": skipped["tokens_per_s"] / base["tokens_per_s"] / n,
                "skipped_tokens_per_s": skipped["tokens_per_s"], "skipped_step_time_median_s": skip_step,
                "other_cpu": max(x for x in (ours.get("other_cpu"), base.get("other_cpu"), skipped.get("other_cpu"),
                                             0.0) if x is not None)}

    def row(self, plan: LabPlan, n: int, rounds: list, mid) -> dict:
        if n == 1 or not any("exposed_comm_share" in r for r in rounds):
            return {"comm_skipped": None}
        return {"exposed_comm_share": mid("exposed_comm_share"),
                "scaling_efficiency_comm_skipped": mid("scaling_efficiency_comm_skipped"),
                "comm_skipped": {"tokens_per_s": mid("skipped_tokens_per_s"),
                                 "step_time_median_s": mid("skipped_step_time_median_s")}}

    def finish(self, plan: LabPlan, doc: dict, measured: dict, adapters: dict, work: Path) -> None:
        lines = [f"{r['launcher']}, {r['world_size']} ranks: exposed communication "
                 f"{pct(r.get('exposed_comm_share'))} of a step ((t_N - t_N with no all_sum) / t_N), efficiency "
                 f"with communication skipped {pct(r.get('scaling_efficiency_comm_skipped'))}"
                 for r in doc["results"] if r.get("comm_skipped")]
        doc["extra_tables"] = doc.get("extra_tables", []) + lines
        if plan.slow:
            doc["slow"] = {str(rank): share for rank, share in plan.slow.items()}
        doc["launcher_notes"] = {"mlx-dp launch": "mlx-dp launch: MLX's own rank commands, a relay that blocks in "
                                 "read() (trainer/cluster/relay.py)",
                                 "mlx.launch": "stock mlx.launch: its output relay busy-polls (about 1.4 cores on 2)"}
        if plan.vs_mlx_lm:
            from .scaling_mlx_lm import add_mlx_lm, format_vs_mlx_lm

            print(f"[bench] valid loss of both {plan.primary_launcher} adapters with mlx-dp eval ...", flush=True)
            add_mlx_lm(plan, doc, measured, adapters, work)
            doc["extra_tables"].append(format_vs_mlx_lm(doc["vs_mlx_lm"]))

    def chart(self, doc: dict, panels: dict) -> None:
        """Dashed: the same runs with communication skipped; x: mlx_lm.lora on the same work."""
        tps, eff, colors = panels["tokens_per_s"], panels["efficiency"], panels["colors"]
        for launcher, color in colors.items():
            rows = sorted((r for r in doc["results"] if r["launcher"] == launcher), key=lambda r: r["world_size"])
            skipped = [r for r in rows if r.get("comm_skipped")]
            if skipped and rows[0]["world_size"] == 1:
                tps.plot([1] + [r["world_size"] for r in skipped],
                         [rows[0]["tokens_per_s"]] + [r["comm_skipped"]["tokens_per_s"] for r in skipped],
                         color=color, linestyle="--", label=f"{launcher}, communication skipped")
                eff.plot([1] + [r["world_size"] for r in skipped],
                         [1.0] + [r["scaling_efficiency_comm_skipped"] for r in skipped],
                         color=color, linestyle="--", label=f"{launcher}, communication skipped")
        for c in doc.get("vs_mlx_lm") or []:
            value = c["mlx_lm"].get("tokens_per_s_our_definition")
            if value:
                tps.plot([c["world_size"]], [value], marker="x", markersize=9, linestyle="none",
                         color=colors.get(c["launcher"], "black"), label=f"mlx_lm.lora under {c['launcher']}")


def exposed_comm_share(step_median_s: float | None, skip_step_median_s: float | None) -> float | None:
    """(t_N - t_N_skip) / t_N: the share of a step spent on communication nothing hid.

    Noise can make it slightly negative when communication is almost free; it is
    reported as measured, not clamped.
    """
    if not step_median_s or skip_step_median_s is None:
        return None
    return (step_median_s - skip_step_median_s) / step_median_s


def _stock_argv(plan: LabPlan, n: int, env: dict, command: list[str]) -> list[str]:
    """Stock ``mlx.launch``'s command line, as the product's launcher builds it for its own fallback."""
    import argparse

    from trainer.cluster.launch import stock_argv
    from trainer.cluster.ports import free_port_block

    local = not (plan.hostfile and n > 1)
    port = free_port_block(n) if local else None  # other jobs on this machine may hold its default 32323
    if local and port is None:
        raise BenchError(f"found no {n} consecutive free TCP ports on loopback for mlx.launch")
    args = argparse.Namespace(hostfile=None if local else plan.hostfile, hosts="127.0.0.1",
                              repeat_hosts=n, backend=None, env=[f"{k}={v}" for k, v in env.items()],
                              python=None, cwd=None, starting_port=port, connections_per_ip=1, nccl_port=12345,
                              mpi_arg=[], verbose=False)
    return [str(Path(sys.executable).parent / "mlx.launch"), *stock_argv(args, command)]


def main(argv: list[str]) -> int:
    """``python scripts/lab bench scaling ...``; returns the exit status."""
    product._stop_on_termination()
    try:
        plan = make_lab_plan(parse_args(argv))
        if plan.epoch:
            from . import scaling_epoch

            scaling_epoch.check_epoch_plan(plan)
            product.announce(plan, "one epoch")
            with tempfile.TemporaryDirectory(prefix="mlx-dp-scaling-") as tmp:
                doc = scaling_epoch.run_epochs(plan, Path(plan.keep or tmp).resolve(), product.Progress(
                    len(scaling_epoch.epoch_schedule(plan, 0)) * plan.rounds))
            print(scaling_epoch.format_epochs(doc))
            scaling_epoch.write(doc, plan.json)
            return 0
        product.run_benchmark(plan)
        return 0
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
