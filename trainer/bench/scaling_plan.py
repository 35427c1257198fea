"""The arguments and the plan of ``mlx-dp bench scaling`` (see ``trainer/bench/scaling.py``).

Everything here happens before the first launch: the command line is parsed,
every argument checked, the recipe resolved with the benchmark's own
overrides, and the launches listed (:func:`schedule`). A mistake ends here,
as one line, before minutes of training are spent.

A plan may carry extensions (``Plan.extensions``): objects that add runs of
their own kinds, launch ranks another way, and add to the results. The
repository's lab uses them for its baselines (``scripts/lab/bench/scaling.py``);
``trainer/bench/scaling.py`` lists what an extension may define.
"""

import argparse
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..config.load import Config

PROG = "mlx-dp bench scaling"
DESCRIPTION = "``mlx-dp bench scaling``: how a recipe's tokens/s grows from one rank to N."
LAUNCHER = "mlx-dp launch"  # how ranks are started: a process of its own, whose CPU is measured
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
        raise BenchError(f"{message} (see {self.prog} --help)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line's options (the lab adds its own to these)."""
    p = _Parser(prog=prog, description=DESCRIPTION)
    p.add_argument("recipe", help="recipe YAML file, or a library recipe's name")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    p.add_argument("-n", type=int, default=None, help="world size to compare with 1 (local ranks)")
    p.add_argument("--sizes", default=None, help="world sizes to run, e.g. 1,2,4 (default: 1 and -n)")
    p.add_argument("--hostfile", default=None, help="launch hostfile of a real cluster: N = its hosts")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer updates per run (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of runs, world sizes alternating within each, so "
                   "drift hits them alike; figures are medians with their spread (default 3)")
    p.add_argument("--max-extra-rounds", type=int, default=2, help="rounds added to re-measure a baseline far "
                   "below its other rounds or an efficiency above 100%% + noise (default 2)")
    # The first updates compile the step once per new sequence-length shape, and at N ranks each
    # update waits for the slowest rank's compile, so an N-rank run settles later than a 1-rank one
    # (measured: docs/RESULTS.md, "Tiny LoRA, N=1 and 2 on loopback").
    p.add_argument("--warmup", type=int, default=10, help="unmeasured first updates, compilation included "
                   "(default 10)")
    p.add_argument("--blas-threads", type=int, default=None, help="with MLX_DP_BLAS=openblas: OpenBLAS threads "
                   "per rank in every run (default: cores // the largest number of ranks on one machine, at "
                   "every world size)")
    p.add_argument("--balance", default=None, metavar="SETTINGS",
                   help="also run N ranks with each parallel.balance setting, e.g. off,auto or off,auto,[2,1], "
                   "and report their throughput side by side (a cluster of unequal Macs)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--png", default=None, help="write the chart here (default: next to --json)")
    p.add_argument("--keep", default=None, help="keep every run's logs, metrics and adapters in this directory")
    p.add_argument("--timeout", type=float, default=1800, help="give up on one run after this many seconds")
    return p


def parse_args(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line; overrides may come before or after the options."""
    return (parser or build_parser()).parse_intermixed_args(argv)


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
    timeout: float
    rounds: int = 1
    max_extra_rounds: int = 0
    hostfile: str | None = None
    blas: str = "mlx"
    jit: str = "mlx"  # what compiles MLX's fused kernels (trainer.tools.fastjit)
    blas_threads: int | None = None  # OpenBLAS threads per rank at every world size; None: each machine decides
    notes: list[str] = field(default_factory=list)
    keep: str | None = None  # keep run directories here instead of a temporary one
    json: str | None = None
    png: str | None = None
    balances: list[str] = field(default_factory=list)  # parallel.balance settings compared at N ranks
    extensions: list = field(default_factory=list)  # see trainer/bench/scaling.py

    @property
    def world_size(self) -> int:
        return max(self.sizes)

    @property
    def primary_launcher(self) -> str:
        """The launcher whose numbers headline: mlx-dp launch where it ran."""
        return LAUNCHER if LAUNCHER in self.launchers else self.launchers[0]

    def hook(self, name: str, *args):
        """The first answer other than ``None`` of the extensions' ``name(plan, *args)``, or ``None``."""
        for extension in self.extensions:
            method = getattr(extension, name, None)
            answer = method(self, *args) if method is not None else None
            if answer is not None:
                return answer
        return None


def bench_overrides(plan: Plan, run_dir: Path, epoch: bool = False) -> list[str]:
    """Overrides for one measured training run (after the user's, so they win)."""
    length = ["training.steps=null", "training.epochs=1"] if epoch else [f"training.steps={plan.warmup + plan.steps}"]
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
    plan.blas_threads = threads_per_rank(plan.world_size)


def check_overrides(overrides: list[str]) -> None:
    """Refuse an override of a key the benchmark sets itself (it would silently lose)."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in OWN_KEYS:
            raise BenchError(f"the benchmark sets {key} itself: {OWN_KEYS[key]}")


def make_plan(args, epoch: bool = False) -> Plan:
    """Check every argument and resolve the recipe before anything is launched.

    Args:
        args (argparse.Namespace): From :func:`parse_args`.
        epoch (bool): Runs train one whole epoch (the lab's epoch comparison); ``--steps`` and
            ``--warmup`` then do not apply. Default: ``False``.
    """
    from ..config.load import load_config
    from ..tools.recipes import find_recipe

    check_overrides(args.overrides)
    args.recipe = str(find_recipe(args.recipe))  # a file, or a library recipe by name
    if epoch:
        args.warmup, args.steps = 0, 0  # the whole epoch is measured, compilation included
    elif args.warmup < 1:
        raise BenchError("--warmup must be at least 1: the first update compiles the step")
    if args.rounds < 1 or args.max_extra_rounds < 0:
        raise BenchError("--rounds must be at least 1 and --max-extra-rounds at least 0")
    if not epoch and args.steps < 1:
        raise BenchError("--steps must be at least 1")
    plan = Plan(recipe=args.recipe, overrides=list(args.overrides), cfg=None, sizes=_sizes(args),
                launchers=[LAUNCHER], warmup=args.warmup, steps=args.steps, timeout=args.timeout,
                hostfile=args.hostfile, keep=args.keep, json=args.json, png=args.png,
                blas_threads=args.blas_threads, rounds=args.rounds, max_extra_rounds=args.max_extra_rounds)
    plan.cfg = load_config(args.recipe, plan.overrides + bench_overrides(plan, Path("runs/bench"), epoch))
    _plan_blas(plan)
    _plan_balance(plan, args)
    _resolve_blas_threads(plan)
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


def _plan_balance(plan: Plan, args) -> None:
    """``--balance``: the parallel.balance settings compared at N ranks, each checked now."""
    from ..config.load import load_config

    text = args.balance or ""
    settings = [s.strip() for s in re.split(r",(?![^\[]*\])", text) if s.strip()]
    if settings and plan.world_size < 2:
        raise BenchError("--balance compares settings at N ranks: give -n 2 or more")
    for setting in settings:
        try:
            load_config(plan.recipe, plan.overrides + [f"parallel.balance={setting}"])
        except UserError as e:
            raise BenchError(f"--balance {setting}: {e}") from None
    plan.balances = settings


def _plan_blas(plan: Plan) -> None:
    from ..tools import fastblas, fastjit

    try:
        plan.blas = "openblas" if fastblas.requested() else "mlx"
        plan.jit = fastjit.active_setting()
        if plan.blas == "openblas" and platform.system() != "Linux":
            raise BenchError(f"{fastblas.ENV_VAR}=openblas is only for Linux CPU; unset it")
        if plan.blas_threads is not None and (plan.blas != "openblas" or plan.blas_threads < 1):
            raise BenchError("--blas-threads needs MLX_DP_BLAS=openblas and a count of at least 1")
    except (fastblas.FastBlasError, fastjit.FastJitError) as e:
        raise BenchError(str(e)) from None


# ---------------------------------------------------------------------------- the launches


KINDS = {"ours": "mlx-dp", "balance": "mlx-dp, parallel.balance={balance}"}  # extensions add theirs


@dataclass(frozen=True)
class Run:
    """One launch: which trainer, how many ranks, started how, in which round."""

    kind: str  # "ours", "balance" (ours with `balance` set), or an extension's kind
    world_size: int
    launcher: str
    round: int = 0
    balance: str | None = None  # parallel.balance of a "balance" run

    def describe(self, plan: Plan) -> str:
        what = KINDS.get(self.kind, self.kind).format(balance=self.balance)
        where = plan.hook("link", self.world_size)
        return f"world size {self.world_size}, {self.launcher}{', ' + where + ' link' if where else ''}, {what}"

    def dirname(self) -> str:
        balance = "" if self.balance is None else "-" + re.sub(r"[^a-z0-9.]+", "_", self.balance)
        return f"{self.launcher.replace(' ', '-')}-n{self.world_size}-{self.kind}{balance}-r{self.round}"

    def same(self, **changes) -> "Run":
        """This run with some fields changed, e.g. ``run.same(world_size=1)``."""
        return Run(**{**self.__dict__, **changes})


def schedule(plan: Plan, round_index: int) -> list[Run]:
    """One round of launches: per launcher, each world size in turn (1, N, ...), then each balance
    setting at N, then what extensions add; every round repeats them, so slow drift of the machine
    hits every figure alike."""
    runs = []
    for launcher in plan.launchers:
        for n in plan.sizes:
            runs.append(Run("ours", n, launcher, round_index))
            for extension in plan.extensions:
                runs += getattr(extension, "after", lambda *a: [])(plan, Run("ours", n, launcher, round_index))
        for setting in plan.balances:  # the N-rank run once per balance setting, in turn
            runs.append(Run("balance", plan.world_size, launcher, round_index, balance=setting))
        for extension in plan.extensions:
            runs += getattr(extension, "runs", lambda *a: [])(plan, launcher, round_index)
    return runs
