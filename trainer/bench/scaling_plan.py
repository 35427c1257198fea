"""The arguments and the plan of ``mlx-dp bench scaling`` (see ``trainer/bench/scaling.py``).

Everything here happens before the first launch: the command line is parsed,
every argument checked, the recipe resolved with the benchmark's own
overrides, and the launches listed (:func:`schedule`). A mistake ends here,
as one line, before minutes of training are spent.
"""

import argparse
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..cluster.netem import LinkSpec
    from ..core.config import Config

PROG = "mlx-dp bench scaling"
DESCRIPTION = "``mlx-dp bench scaling``: how a recipe's tokens/s grows from one rank to N."
# How ranks are started: our launcher and stock mlx.launch, each a process of its own whose CPU is measured.
LAUNCHERS = ("mlx-dp launch", "mlx.launch")
LAUNCHER_CHOICES = {"mlx-dp": ["mlx-dp launch"], "lean": ["mlx-dp launch"],  # lean: the name before mlx-dp launch
                    "mlx.launch": ["mlx.launch"], "both": list(LAUNCHERS)}
# Keys the benchmark sets on every run; a user override of one would silently lose.
OWN_KEYS = {"training.steps": "use --steps and --warmup", "training.epochs": "use --steps and --warmup",
            "checkpoint.dir": "runs go to a temporary directory; use --keep DIR to keep them"}


class BenchError(UserError):
    """A bad argument or an unusable setup; one line, exit status 2."""


class RunFailed(BenchError):
    """A launched run failed; its output's tail has been shown."""

    exit_code = 1


# ---------------------------------------------------------------------------- the command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        if "arguments are required" in message:  # argparse also names the optional overrides
            message = "give a recipe: mlx-dp bench scaling RECIPE -n N [section.key=value ...]"
        raise BenchError(f"{message} (see {PROG} --help)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; overrides may come before or after the options."""
    p = _Parser(prog=PROG, description=DESCRIPTION)
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    p.add_argument("-n", type=int, default=None, help="world size to compare with 1 (local ranks)")
    p.add_argument("--sizes", default=None, help="world sizes to run, e.g. 1,2,4 (default: 1 and -n)")
    p.add_argument("--hostfile", default=None, help="launch hostfile of a real cluster: N = its hosts")
    p.add_argument("--launcher", choices=list(LAUNCHER_CHOICES), default=None,
                   help="how to start ranks: mlx-dp (mlx-dp launch), mlx.launch or both (default both locally, "
                   "mlx-dp with --hostfile or --link)")
    p.add_argument("--link", default=None, help="run N-rank jobs in network namespaces behind a shaped link "
                   "(1gbe, 10gbe, tb4, none); needs root")
    p.add_argument("--rate", default=None, help="with --link: raw tc rate per direction, e.g. 5gbit")
    p.add_argument("--delay", default=None, help="with --link: raw one-way delay, e.g. 0.2ms")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer updates per run (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of runs, world sizes alternating within each, so "
                   "drift hits them alike; figures are medians with their spread (default 3)")
    p.add_argument("--max-extra-rounds", type=int, default=2, help="rounds added to re-measure a baseline far "
                   "below its other rounds or an efficiency above 100%% + noise (default 2)")
    # The first updates compile the step once per new sequence-length shape, and at N ranks each
    # update waits for the slowest rank's compile: on tiny-lora the first ~10 updates of a 2-rank
    # run were 20-40% slower than later ones, at one rank only the first (measured, 2 cores).
    p.add_argument("--warmup", type=int, default=10, help="unmeasured first updates, compilation included "
                   "(default 10)")
    p.add_argument("--blas-threads", type=int, default=None, help="with MLX_DP_BLAS=openblas: OpenBLAS threads "
                   "per rank in every run (default: cores // the largest number of ranks on one machine, at "
                   "every world size)")
    p.add_argument("--vs-mlx-lm", action="store_true", help="also train the same work with mlx_lm.lora at N")
    p.add_argument("--epoch", action="store_true", help="train one epoch at N ranks only and compare loss tokens/s "
                   "(trainer/bench/scaling_epoch.py); --steps and --warmup do not apply")
    p.add_argument("--variant", action="append", default=[], help="with --epoch: also run mlx-dp with these "
                   "overrides (space-separated), e.g. --variant data.packing=true; repeatable")
    p.add_argument("--mlx-lm-sort", choices=["fields", "tokens"], default="fields", help="mlx_lm.lora's length "
                   "sort: fields (as shipped: CacheDataset.itemlen counts a row's fields) or tokens (repaired "
                   "as in mlx-lm PR #1029)")
    p.add_argument("--slow", default=None, metavar="RANK=SHARE[,...]",
                   help="emulate a slower Mac: cap ranks at a share of one core in every run, e.g. 1=0.5 "
                   "(cgroup v1 CPU quota; root, Linux; ranks on this machine)")
    p.add_argument("--balance", default=None, metavar="SETTINGS",
                   help="also run N ranks with each parallel.balance setting, e.g. off,auto or off,auto,[2,1], "
                   "and report their throughput side by side (default with --slow: off,auto)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--png", default=None, help="write the chart here (default: next to --json)")
    p.add_argument("--keep", default=None, help="keep every run's logs, metrics and adapters in this directory")
    p.add_argument("--timeout", type=float, default=1800, help="give up on one run after this many seconds")
    return p.parse_intermixed_args(argv)


# ---------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Everything decided before the first launch."""

    recipe: str
    overrides: list[str]
    cfg: "Config | None"  # the recipe resolved with the user's and the benchmark's overrides
    sizes: list[int]
    launchers: list[str]
    warmup: int
    steps: int
    vs_mlx_lm: bool
    timeout: float
    rounds: int = 1
    max_extra_rounds: int = 0
    hostfile: str | None = None
    link: "LinkSpec | None" = None  # set when N-rank runs go behind an emulated link
    link_args: dict = field(default_factory=dict)
    blas: str = "mlx"
    jit: str = "mlx"  # what compiles MLX's fused kernels (trainer.tools.fastjit), for both tools
    blas_threads: int | None = None  # OpenBLAS threads per rank at every world size; None: each machine decides
    shim: str | None = None  # the OpenBLAS shim mlx_lm.lora gets with LD_PRELOAD
    notes: list[str] = field(default_factory=list)
    keep: str | None = None  # keep run directories here instead of a temporary one
    epoch: bool = False  # one epoch at N ranks, loss tokens/s (scaling_epoch)
    variants: list[str] = field(default_factory=list)  # extra mlx-dp runs with these overrides (--epoch)
    mlx_lm_sort: str = "fields"  # mlx_lm.lora's length sort: "fields" (as shipped) or "tokens" (repaired)
    json: str | None = None
    png: str | None = None
    slow: dict = field(default_factory=dict)  # rank -> share of one core (cluster.cpulimit), in every run
    balances: list[str] = field(default_factory=list)  # parallel.balance settings compared at N ranks

    @property
    def world_size(self) -> int:
        return max(self.sizes)

    @property
    def primary_launcher(self) -> str:
        """The launcher whose numbers headline: mlx-dp launch where it ran (fair on small machines)."""
        return LAUNCHERS[0] if LAUNCHERS[0] in self.launchers else self.launchers[0]


def bench_overrides(plan: Plan, run_dir: Path) -> list[str]:
    """Overrides for one measured training run (after the user's, so they win)."""
    length = [f"training.steps={plan.warmup + plan.steps}"]
    if plan.epoch:
        length = ["training.steps=null", "training.epochs=1"]
    return [*length, "logging.every=1", "logging.per_rank_timings=true",
            "logging.progress_bar=false", "logging.wandb=false", "eval.every=0", "eval.at_start=false",
            "eval.max_batches=1",  # the trainer still validates once at the end; keep that short
            "checkpoint.every=0", f"checkpoint.dir={run_dir}"]


def blas_threads(plan: Plan, world_size: int | None = None) -> int | None:
    """OpenBLAS threads per rank: the same at every world size, so only the world size changes.

    ``world_size`` is accepted for callers that ask per run; the answer does not depend on it.
    """
    return 1 if plan.blas != "openblas" else plan.blas_threads


def _resolve_blas_threads(plan: Plan) -> None:
    """Fix the threads per rank once: cores // the most ranks one machine runs (the trainer's own
    default would give one rank all the cores and N ranks a share each, comparing unlike runs)."""
    from ..tools.fastblas import threads_per_rank

    if plan.blas != "openblas" or plan.blas_threads:
        return
    if plan.hostfile:
        plan.notes.append("with --hostfile each machine runs one rank at every world size, so each picks the "
                          "same OpenBLAS threads for its rank at 1 and at N")
        return
    # Behind an emulated link every rank still shares this machine's cores.
    plan.blas_threads = threads_per_rank(plan.world_size)


def make_plan(args) -> Plan:
    """Check every argument and resolve the recipe before anything is launched.

    Args:
        args (argparse.Namespace): From :func:`parse_args`.
    """
    from ..core.config import load_config

    for text in args.overrides:
        key = text.split("=", 1)[0].strip()
        if key in OWN_KEYS:
            raise BenchError(f"the benchmark sets {key} itself: {OWN_KEYS[key]}")
    if args.variant and not args.epoch:
        raise BenchError("--variant applies to --epoch only")
    if args.epoch:
        args.warmup, args.steps = 0, 0  # the whole epoch is measured, compilation included
    elif args.warmup < 1:
        raise BenchError("--warmup must be at least 1: the first update compiles the step")
    if args.rounds < 1 or args.max_extra_rounds < 0:
        raise BenchError("--rounds must be at least 1 and --max-extra-rounds at least 0")
    if not args.epoch and args.steps < (2 if args.vs_mlx_lm else 1):
        raise BenchError("--steps must be at least 1 (2 with --vs-mlx-lm, whose last update also validates)")
    sizes, launchers = _sizes(args), _launchers(args)
    plan = Plan(recipe=args.recipe, overrides=list(args.overrides), cfg=None, sizes=sizes, launchers=launchers,
                warmup=args.warmup, steps=args.steps, vs_mlx_lm=args.vs_mlx_lm, timeout=args.timeout,
                hostfile=args.hostfile, keep=args.keep, json=args.json, png=args.png,
                blas_threads=args.blas_threads, rounds=args.rounds, max_extra_rounds=args.max_extra_rounds,
                epoch=args.epoch, variants=list(args.variant), mlx_lm_sort=args.mlx_lm_sort)
    if args.epoch:
        plan.sizes = [plan.world_size]  # one epoch at N; the scaling from 1 is the other mode's question
    plan.cfg = load_config(args.recipe, plan.overrides + bench_overrides(plan, Path("runs/bench")))
    if plan.vs_mlx_lm and plan.cfg.training.max_grad_norm is not None:
        # mlx_lm.lora cannot clip gradients: identical work means no clipping on our side either
        plan.overrides.append("training.max_grad_norm=null")
        plan.cfg = load_config(args.recipe, plan.overrides + bench_overrides(plan, Path("runs/bench")))
        plan.notes.append("gradient clipping is off in every mlx-dp run here: mlx_lm.lora has none, and "
                          "identical work is compared")
    _plan_blas(plan)
    _plan_slow(plan, args)
    if args.link or args.rate or args.delay:
        _plan_link(plan, args)
    _resolve_blas_threads(plan)
    if "mlx.launch" in launchers and not (Path(sys.executable).parent / "mlx.launch").is_file():
        raise BenchError(f"mlx.launch is not next to {sys.executable}; install mlx in this environment")
    if plan.hostfile:
        plan.notes.append("world size 1 ran on this machine under its launcher with -n 1; the cluster's ranks "
                          "write per-rank timings on their own machines, so the rank spread covers what is "
                          "visible here")
    return plan


def _sizes(args) -> list[int]:
    if args.hostfile:
        from ..cluster.hostfile import check_launch_hostfile

        hosts = len(check_launch_hostfile(args.hostfile))
        if args.sizes or (args.n is not None and args.n != hosts):
            raise BenchError(f"--hostfile {args.hostfile} fixes the world size at its {hosts} hosts; "
                             "drop -n/--sizes")
        if hosts < 2:
            raise BenchError(f"--hostfile {args.hostfile} lists one host; a scaling run needs at least 2")
        return [1, hosts]
    if args.sizes:
        try:
            sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
        except ValueError:
            raise BenchError(f"--sizes {args.sizes!r} must be world sizes separated by commas, e.g. 1,2,4") from None
    elif args.n is not None:
        sizes = [1, args.n]
    else:
        raise BenchError("give the world size with -n N (or --sizes, or --hostfile)")
    if not sizes or min(sizes) < 1:
        raise BenchError("world sizes must be at least 1")
    return sorted(set(sizes) | {1})  # one rank is every ratio's baseline


def _launchers(args) -> list[str]:
    if args.link or args.rate or args.delay:
        if args.launcher not in (None, "mlx-dp", "lean"):
            raise BenchError(f"--launcher {args.launcher} does not apply here: emulated links start ranks in "
                             "namespaces with the emulated cluster's own relay")
        if args.hostfile:
            raise BenchError("use either --hostfile (a real cluster) or --link (an emulated one)")
        return [LAUNCHERS[0]]
    if args.launcher is None:
        return [LAUNCHERS[0]] if args.hostfile else list(LAUNCHERS)
    return LAUNCHER_CHOICES[args.launcher]


def _plan_slow(plan: Plan, args) -> None:
    """``--slow`` and ``--balance``: a mixed cluster emulated on one machine, and the balance settings compared."""
    from ..cluster.cpulimit import CpuLimitError, check_permitted, parse_slow
    from ..core.config import load_config

    try:
        plan.slow = parse_slow(args.slow)
    except CpuLimitError as e:
        raise BenchError(str(e)) from None
    if plan.slow:
        if plan.hostfile:
            raise BenchError("--slow emulates a slower Mac on this machine; on a real cluster the Macs differ "
                             "already: drop --slow")
        if "mlx.launch" in plan.launchers:
            if args.launcher in ("mlx.launch", "both"):
                raise BenchError("--slow needs --launcher mlx-dp: mlx.launch gives no handle on its ranks' "
                                 "processes to cap")
            plan.launchers = [LAUNCHERS[0]]
        if max(plan.slow) >= plan.world_size:
            raise BenchError(f"--slow names rank {max(plan.slow)}, but the largest world size is {plan.world_size}")
        reason = check_permitted()
        if reason:
            raise BenchError(reason)
        plan.notes.append("slower Macs emulated: " + ", ".join(f"rank {r} capped at {s:g} of a core"
                                                              for r, s in sorted(plan.slow.items()))
                          + " (cgroup CPU quota) in every run")
    text = args.balance if args.balance is not None else ("off,auto" if plan.slow else "")
    settings = [s.strip() for s in re.split(r",(?![^\[]*\])", text) if s.strip()]
    if settings and plan.epoch:
        raise BenchError("--balance compares settings in step runs; with --epoch use --variant parallel.balance=auto")
    if settings and plan.world_size < 2:
        raise BenchError("--balance compares settings at N ranks: give -n 2 or more")
    for setting in settings:
        try:
            load_config(plan.recipe, plan.overrides + [f"parallel.balance={setting}"])
        except UserError as e:
            raise BenchError(f"--balance {setting}: {e}") from None
    plan.balances = settings


def _plan_link(plan: Plan, args) -> None:
    from ..cluster import netem

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
    plan.notes.append("behind an emulated link, N ranks are started by the emulated cluster's own relay "
                      "(blocking reads, as mlx-dp launch) inside this process, so its CPU is not measured; "
                      "one rank runs under mlx-dp launch")


def _plan_blas(plan: Plan) -> None:
    from ..tools import fastblas, fastjit

    try:
        plan.blas = "openblas" if fastblas.requested() else "mlx"
        plan.jit = "avx2" if fastjit.requested() and fastjit.why_not() is None else "mlx"
        if plan.blas == "openblas" and platform.system() != "Linux":
            raise BenchError(f"{fastblas.ENV_VAR}=openblas is only for Linux CPU; unset it")
        if plan.blas_threads is not None and (plan.blas != "openblas" or plan.blas_threads < 1):
            raise BenchError("--blas-threads needs MLX_DP_BLAS=openblas and a count of at least 1")
        if plan.blas == "openblas" and plan.vs_mlx_lm:
            plan.shim = str(fastblas.build_shim())
    except fastblas.FastBlasError as e:
        raise BenchError(str(e)) from None


# ---------------------------------------------------------------------------- the launches


@dataclass(frozen=True)
class Run:
    """One launch: which trainer, how many ranks, started how, in which round."""

    kind: str  # "ours", "skip" (ours with gradients not reduced), "balance" (ours with `balance` set) or "mlx_lm"
    world_size: int
    launcher: str
    round: int = 0
    balance: str | None = None  # parallel.balance of a "balance" run

    def describe(self, plan: Plan) -> str:
        what = {"ours": "mlx-dp", "skip": "mlx-dp, communication skipped", "mlx_lm": "mlx_lm.lora",
                "balance": f"mlx-dp, parallel.balance={self.balance}"}[self.kind]
        where = f", {plan.link.describe()} link" if plan.link is not None and self.world_size > 1 else ""
        return f"world size {self.world_size}, {self.launcher}{where}, {what}"

    def dirname(self) -> str:
        balance = "" if self.balance is None else "-" + re.sub(r"[^a-z0-9.]+", "_", self.balance)
        return f"{self.launcher.replace(' ', '-')}-n{self.world_size}-{self.kind}{balance}-r{self.round}"

    def same(self, **changes) -> "Run":
        """This run with some fields changed, e.g. ``run.same(world_size=1)``."""
        return Run(**{**self.__dict__, **changes})


def schedule(plan: Plan, round_index: int) -> list[Run]:
    """One round of launches: per launcher, each world size in turn (1, N, ...), N's skip baseline,
    then mlx-lm; every round repeats them, so slow drift of the machine hits every figure alike."""
    runs = []
    for launcher in plan.launchers:
        for n in plan.sizes:
            runs.append(Run("ours", n, launcher, round_index))
            if n > 1:  # one rank never communicates: nothing to skip
                runs.append(Run("skip", n, launcher, round_index))
        for setting in plan.balances:  # the N-rank run once per balance setting, in turn
            runs.append(Run("balance", plan.world_size, launcher, round_index, balance=setting))
        if plan.vs_mlx_lm:
            runs.append(Run("mlx_lm", plan.world_size, launcher, round_index))
    return runs
