"""``mlx-dp bench scaling``: how a recipe's tokens/s grows from one rank to N.

The recipe trains for a fixed number of optimizer updates at world size 1
and at N with the same per-rank batch (so N ranks do N times the work per
update), and once more at N with ``MLX_DP_SKIP_REDUCE=1`` (gradients not
reduced) to price the communication that nothing hid. The first
``--warmup`` updates (compilation) are not measured. Definitions are in
``trainer/bench/scaling_report.py``.

The launcher matters on small machines: ``mlx.launch`` relays output in a
busy-spinning loop that costs about 1.4 of 2 cores (../shared/PLATFORM.md).
So every world size, 1 included, runs under ``mlx.launch`` and under the
lean launcher (``trainer.launch``: only MLX_RANK and MLX_HOSTFILE per rank),
and every ratio compares runs launched the same way.

Usage::

    mlx-dp bench scaling recipes/tiny-lora.yaml -n 2 --json scaling.json   # also writes scaling.png
    MLX_DP_BLAS=openblas mlx-dp bench scaling recipes/tiny-lora.yaml -n 2 --vs-mlx-lm --steps 30
    mlx-dp bench scaling RECIPE --hostfile hosts.json     # a real cluster: N = its hosts, mlx.launch
    sudo .venv/bin/mlx-dp bench scaling RECIPE -n 2 --link 10gbe   # N ranks behind a shaped link

``--vs-mlx-lm`` also trains the same work with ``mlx_lm.lora`` at N ranks under
the same launcher(s), and scores both adapters with ``mlx-dp eval``. Trailing
``section.key=value`` overrides apply to every run.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from . import scaling_report as report

if TYPE_CHECKING:
    from ..config import Config
    from ..netem import LinkSpec

PROG = "mlx-dp bench scaling"
LAUNCHERS = ("lean", "mlx.launch")
# Keys the benchmark sets on every run; a user override of one would silently lose.
OWN_KEYS = {"training.steps": "use --steps and --warmup", "training.epochs": "use --steps and --warmup",
            "checkpoint.dir": "runs go to a temporary directory; use --keep DIR to keep them"}
TAIL_LINES = 25
NO_DELAY_NOTE = "this kernel has no netem qdisc: the emulated links had their rate but not their delay"


class BenchError(UserError):
    """A bad argument or an unusable setup; one line, exit status 2."""


class RunFailed(BenchError):
    """A launched run failed; its output's tail has been shown."""

    exit_code = 1


# ---------------------------------------------------------------------------- arguments and plan


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        if "arguments are required" in message:  # argparse also names the optional overrides
            message = "give a recipe: mlx-dp bench scaling RECIPE -n N [section.key=value ...]"
        raise BenchError(f"{message} (see {PROG} --help)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; overrides may come before or after the options."""
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    p.add_argument("-n", type=int, default=None, help="world size to compare with 1 (local ranks)")
    p.add_argument("--sizes", default=None, help="world sizes to run, e.g. 1,2,4 (default: 1 and -n)")
    p.add_argument("--hostfile", default=None, help="mlx.launch hostfile of a real cluster: N = its hosts")
    p.add_argument("--launcher", choices=["both", *LAUNCHERS], default=None,
                   help="how to start ranks (default both locally, mlx.launch with --hostfile, lean with --link)")
    p.add_argument("--link", default=None, help="run N-rank jobs in network namespaces behind a shaped link "
                   "(1gbe, 10gbe, tb4, none); needs root")
    p.add_argument("--rate", default=None, help="with --link: raw tc rate per direction, e.g. 5gbit")
    p.add_argument("--delay", default=None, help="with --link: raw one-way delay, e.g. 0.2ms")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer updates per run (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured first updates, compilation included "
                   "(default 3)")
    p.add_argument("--blas-threads", type=int, default=None, help="with MLX_DP_BLAS=openblas: OpenBLAS threads "
                   "per rank in every run (default: the trainer's cores // ranks on a machine)")
    p.add_argument("--vs-mlx-lm", action="store_true", help="also train the same work with mlx_lm.lora at N")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--png", default=None, help="write the chart here (default: next to --json)")
    p.add_argument("--keep", default=None, help="keep every run's logs, metrics and adapters in this directory")
    p.add_argument("--timeout", type=float, default=1800, help="give up on one run after this many seconds")
    return p.parse_intermixed_args(argv)


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
    hostfile: str | None = None
    link: "LinkSpec | None" = None  # set when N-rank runs go behind an emulated link
    link_args: dict = field(default_factory=dict)
    blas: str = "mlx"
    blas_threads: int | None = None  # OpenBLAS threads per rank; None: the trainer's own choice
    shim: str | None = None  # the OpenBLAS shim mlx_lm.lora gets with LD_PRELOAD
    notes: list[str] = field(default_factory=list)
    keep: str | None = None  # keep run directories here instead of a temporary one
    json: str | None = None
    png: str | None = None

    @property
    def world_size(self) -> int:
        return max(self.sizes)

    @property
    def primary_launcher(self) -> str:
        """The launcher whose numbers headline: lean where it ran (fair on small machines)."""
        return "lean" if "lean" in self.launchers else self.launchers[0]


def bench_overrides(plan: Plan, run_dir: Path) -> list[str]:
    """Overrides for one measured training run (after the user's, so they win)."""
    return [f"training.steps={plan.warmup + plan.steps}", "logging.every=1", "logging.per_rank_timings=true",
            "logging.progress_bar=false", "logging.wandb=false", "eval.every=0", "eval.at_start=false",
            "eval.max_batches=1",  # the trainer still validates once at the end; keep that short
            "checkpoint.every=0", f"checkpoint.dir={run_dir}"]


def _sizes(args) -> list[int]:
    if args.hostfile:
        from ..hostfile import check_launch_hostfile

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
    if args.hostfile or args.link or args.rate or args.delay:
        fixed = "mlx.launch" if args.hostfile else "lean"
        why = "a real cluster runs through mlx.launch" if args.hostfile else \
            "emulated links start ranks in namespaces (a lean launch)"
        if args.launcher not in (None, fixed):
            raise BenchError(f"--launcher {args.launcher} does not apply here: {why}")
        if args.hostfile and (args.link or args.rate or args.delay):
            raise BenchError("use either --hostfile (a real cluster) or --link (an emulated one)")
        return [fixed]
    return list(LAUNCHERS) if args.launcher in (None, "both") else [args.launcher]


def make_plan(args) -> Plan:
    """Check every argument and resolve the recipe before anything is launched."""
    from ..config import load_config

    for text in args.overrides:
        key = text.split("=", 1)[0].strip()
        if key in OWN_KEYS:
            raise BenchError(f"the benchmark sets {key} itself: {OWN_KEYS[key]}")
    if args.warmup < 1:
        raise BenchError("--warmup must be at least 1: the first update compiles the step")
    if args.steps < (2 if args.vs_mlx_lm else 1):
        raise BenchError("--steps must be at least 1 (2 with --vs-mlx-lm, whose last update also validates)")
    sizes, launchers = _sizes(args), _launchers(args)
    plan = Plan(recipe=args.recipe, overrides=list(args.overrides), cfg=None, sizes=sizes, launchers=launchers,
                warmup=args.warmup, steps=args.steps, vs_mlx_lm=args.vs_mlx_lm, timeout=args.timeout,
                hostfile=args.hostfile, keep=args.keep, json=args.json, png=args.png,
                blas_threads=args.blas_threads)
    plan.cfg = load_config(args.recipe, plan.overrides + bench_overrides(plan, Path("runs/bench")))
    _plan_blas(plan)
    if args.link or args.rate or args.delay:
        _plan_link(plan, args)
    if "mlx.launch" in launchers and not (Path(sys.executable).parent / "mlx.launch").is_file():
        raise BenchError(f"mlx.launch is not next to {sys.executable}; install mlx in this environment")
    if plan.vs_mlx_lm:
        plan.notes += check_mlx_lm_comparable(plan.cfg)
    if plan.hostfile:
        plan.notes.append("world size 1 ran on this machine under mlx.launch -n 1; the cluster's ranks write "
                          "per-rank timings on their own machines, so the rank spread covers what is visible here")
    return plan


def _plan_link(plan: Plan, args) -> None:
    from .. import netem

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
    if plan.blas == "openblas" and not plan.blas_threads:
        plan.notes.append("behind an emulated link each rank believes it has a machine of its own, so each "
                          "uses every core for OpenBLAS; the ranks share this machine's cores")


def _plan_blas(plan: Plan) -> None:
    import platform

    from .. import fastblas

    try:
        plan.blas = "openblas" if fastblas.requested() else "mlx"
        if plan.blas == "openblas" and platform.system() != "Linux":
            raise BenchError(f"{fastblas.ENV_VAR}=openblas is only for Linux CPU; unset it")
        if plan.blas_threads is not None and (plan.blas != "openblas" or plan.blas_threads < 1):
            raise BenchError("--blas-threads needs MLX_DP_BLAS=openblas and a count of at least 1")
        if plan.blas == "openblas" and plan.vs_mlx_lm:
            plan.shim = str(fastblas.build_shim())
    except fastblas.FastBlasError as e:
        raise BenchError(str(e)) from None


# ---------------------------------------------------------------------------- runs and launchers


@dataclass(frozen=True)
class Run:
    """One launch: which trainer, how many ranks, started how."""

    kind: str  # "ours", "skip" (ours with MLX_DP_SKIP_REDUCE=1) or "mlx_lm"
    world_size: int
    launcher: str

    def describe(self, plan: Plan) -> str:
        what = {"ours": "mlx-dp", "skip": "mlx-dp, communication skipped", "mlx_lm": "mlx_lm.lora"}[self.kind]
        where = f", {plan.link.describe()} link" if plan.link is not None and self.world_size > 1 else ""
        return f"world size {self.world_size}, {self.launcher}{where}, {what}"

    def dirname(self) -> str:
        return f"{self.launcher}-n{self.world_size}-{self.kind}"


def schedule(plan: Plan) -> list[Run]:
    """Every launch, in order: per launcher, each world size, its skip baseline, then mlx-lm."""
    runs = []
    for launcher in plan.launchers:
        for n in plan.sizes:
            runs.append(Run("ours", n, launcher))
            if n > 1:  # one rank never communicates: nothing to skip
                runs.append(Run("skip", n, launcher))
        if plan.vs_mlx_lm:
            runs.append(Run("mlx_lm", plan.world_size, launcher))
    return runs


def _logged(command: list[str], log_base: Path) -> list[str]:
    # The lean launcher and the emulated cluster let ranks write to our terminal; this
    # wrapper sends each rank's output to its own file instead (MLX_RANK is set by then).
    return ["/bin/sh", "-c", 'exec "$@" >"$0.rank$MLX_RANK.log" 2>&1', str(log_base), *command]


def free_port_block(n: int, tries: int = 50) -> int:
    """A port p with p..p+n-1 all free on loopback now (mlx.launch -n gives rank r port p+r).

    Args:
        n (int): Consecutive ports needed.
        tries (int): Random starting points to try. Default: ``50``.
    """
    from ..launch import free_ports

    for _ in range(tries):
        base = free_ports(1)[0]
        if base + n > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise BenchError(f"found no {n} consecutive free TCP ports on loopback for mlx.launch")


def _mlx_launch(plan: Plan, n: int, command: list[str], env: dict, log_base: Path) -> int:
    exe = str(Path(sys.executable).parent / "mlx.launch")
    if plan.hostfile and n > 1:
        where = ["--hostfile", plan.hostfile]
    else:  # a free port block: other jobs on this machine may hold mlx.launch's default 32323
        where = ["-n", str(n), "--starting-port", str(free_port_block(n))]
    if n == 1:
        # mlx.launch -n 1 hands the rank an empty MLX_HOSTFILE, meaning "no ring" to MLX,
        # but the trainer's hostfile check rejects the empty file; unset it, as MLX reads it.
        command = ["env", "-u", "MLX_HOSTFILE", *command]
    env_args = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
    with open(f"{log_base}.log", "w") as out:
        # stdin: mlx.launch makes its stdin non-blocking, which would also change our terminal's.
        # A session of its own, so a timeout or Ctrl-C can stop mlx.launch and every rank it started.
        proc = subprocess.Popen([exe, *where, *env_args, "--", *command], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return _wait_group(proc, plan.timeout)


def _run_one(plan: Plan, command: list[str], env: dict, log_base: Path) -> int:
    # trainer.launch writes a one-entry ring hostfile for n=1, which never connects
    # (PLATFORM.md); the lean way to start one rank is one process without a hostfile.
    full_env = {**{k: v for k, v in os.environ.items() if k != "MLX_HOSTFILE"}, **env, "MLX_RANK": "0"}
    proc = subprocess.Popen(_logged(command, log_base), env=full_env, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    return _wait_group(proc, plan.timeout)


def _wait_group(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for a process started in a session of its own; on timeout (status 124) or
    Ctrl-C stop it and everything it started."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        return 124
    except KeyboardInterrupt:
        _stop_group(proc)
        raise


def _stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group we started, SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def launch_ranks(plan: Plan, run: Run, command: list[str], env: dict, log_base: Path) -> int:
    """Start ``command`` on ``run.world_size`` ranks as ``run`` says and wait for them.

    Args:
        plan (Plan): Timeout, hostfile and link.
        run (Run): World size and launcher.
        command (list[str]): What every rank runs.
        env (dict): Extra environment for every rank.
        log_base (Path): Output goes to ``<log_base>.rank<r>.log`` (``<log_base>.log`` under mlx.launch).

    Returns:
        int: The launcher's exit status (mlx.launch can return 0 when a rank failed: the
        caller checks what the run wrote as well).
    """
    if plan.link is not None and run.world_size > 1:
        from ..netem import EmulatedCluster, exit_status

        with EmulatedCluster(run.world_size, **plan.link_args) as cluster:
            code = exit_status(cluster.run(_logged(command, log_base), env=env, timeout=plan.timeout))
            if cluster.delay_emulated is False and NO_DELAY_NOTE not in plan.notes:
                plan.notes.append(NO_DELAY_NOTE)
            return code
    if run.launcher == "mlx.launch":
        return _mlx_launch(plan, run.world_size, command, env, log_base)
    if run.world_size == 1:
        return _run_one(plan, command, env, log_base)
    from ..launch import launch

    return launch(_logged(command, log_base), run.world_size, env=env, timeout=plan.timeout)


def show_failure(run_label: str, code: int, log_base: Path) -> None:
    """Print the end of every log of a failed run, then raise one clear error."""
    print("", flush=True)
    for log in sorted(log_base.parent.glob(log_base.name + ".*log")):
        lines = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        print(f"--- last {len(lines)} lines of {log.name} ---", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr, flush=True)
    raise RunFailed(f"{run_label} failed (exit status {code}); the end of its output is above")


# ---------------------------------------------------------------------------- our trainer


def blas_threads(plan: Plan, world_size: int) -> int | None:
    """OpenBLAS threads per rank, as the trainer picks them (cores // ranks on the machine)."""
    if plan.blas != "openblas":
        return 1  # MLX's bundled reference BLAS is single-threaded
    if plan.blas_threads:
        return plan.blas_threads
    if plan.hostfile and world_size > 1:
        return None  # decided on each remote machine
    local = 1 if plan.link is not None else world_size
    return max(1, (os.cpu_count() or 1) // local)


def run_ours(plan: Plan, run: Run, run_dir: Path) -> dict:
    """Train the recipe at ``run.world_size`` ranks into ``run_dir``; measure the updates after warm-up."""
    train = ["train", plan.recipe, *plan.overrides, *bench_overrides(plan, run_dir)]
    command = [sys.executable, "-u", "-m", "trainer", *train]
    if plan.blas_threads:
        command = [sys.executable, "-u", "-m", "trainer.bench.scaling", "--trainer-worker",
                   str(plan.blas_threads), "--", *train]
    env = {"PYTHONUNBUFFERED": "1", "MLX_DP_SKIP_REDUCE": "1" if run.kind == "skip" else "0"}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_base = run_dir.parent / "log"  # log.rank<r>.log (or log.log from mlx.launch)
    code = launch_ranks(plan, run, command, env, log_base)
    if code != 0 or _run_state(run_dir) != "completed":
        show_failure(run.describe(plan), code or 1, log_base)
    return _measured(run_dir, run.world_size, plan)


def _run_state(run_dir: Path) -> str | None:
    """``state`` from the run's status.json: mlx.launch may exit 0 although a rank failed."""
    try:
        return json.loads((run_dir / "status.json").read_text()).get("state")
    except (OSError, ValueError, AttributeError):
        return None


def _measured(run_dir: Path, world_size: int, plan: Plan) -> dict:
    try:
        return report.measure_ours(run_dir, world_size, plan.warmup, plan.steps)
    except ValueError as e:
        hint = "; rank 0 must run on this machine: list it first in the hostfile" if plan.hostfile else ""
        raise RunFailed(f"{e}{hint}") from None


def evaluate_adapters(plan: Plan, adapters: dict[str, Path], work: Path) -> dict[str, float]:
    """Valid loss of each adapter directory with one evaluator, ``mlx-dp eval`` (run side by side)."""
    procs = {}
    for name, directory in adapters.items():
        out = work / f"eval-{name}.json"
        command = [sys.executable, "-u", "-m", "trainer", "eval", plan.recipe, "eval.exact_match=false",
                   *plan.overrides, "--checkpoint", str(directory), "--split", "valid", "--json", str(out)]
        log = open(work / f"eval-{name}.log", "w")
        procs[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL), out, log)
    losses = {}
    for name, (proc, out, log) in procs.items():
        try:
            code = proc.wait(timeout=plan.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = 124
        log.close()
        if code != 0 or not out.is_file():
            show_failure(f"mlx-dp eval of the {name} adapters", code or 1, work / f"eval-{name}")
        losses[name] = json.loads(out.read_text())["loss"]
    return losses


# ---------------------------------------------------------------------------- mlx_lm.lora


def check_mlx_lm_comparable(cfg) -> list[str]:
    """Refuse what mlx_lm.lora cannot train alike; return notes on the differences left."""
    d, t = cfg.data, cfg.training
    path = Path(d.path) if d.path else None
    if d.hf_dataset or path is None or not all((path / f"{s}.jsonl").is_file() for s in ("train", "valid")):
        raise BenchError(f"--vs-mlx-lm needs data.path to be a directory with train.jsonl and valid.jsonl "
                         f"(the local format mlx_lm.lora reads); {d.path or d.hf_dataset} is not")
    if d.packing:
        raise BenchError("--vs-mlx-lm compares unpacked batches (mlx_lm.lora does not pack); "
                         "set data.packing=false")
    notes = []
    if t.max_grad_norm is not None:
        notes.append(f"mlx_lm.lora has no gradient clipping; mlx-dp clips the norm at {t.max_grad_norm:g} "
                     "(one more pass over the gradients)")
    if cfg.model.dtype:
        notes.append(f"mlx_lm.lora trains the stored dtype; mlx-dp casts the base to {cfg.model.dtype}")
    if t.warmup_steps == 1 and t.lr_schedule != "constant":
        notes.append("with warmup_steps=1 mlx-lm's decay runs one update ahead of mlx-dp's")
    return notes


def mlx_lm_schedule(t, total_updates: int) -> dict | None:
    """Our learning-rate schedule as mlx-lm's ``lr_schedule`` entry (None: a constant rate).

    Our warmup gives update s (from 0) ``init + (s+1)(peak-init)/W``; mlx-lm's warmup
    of w updates from init' gives ``init' + s(peak-init')/w`` and joins the decay at
    w+1. So w = W-1 and init' = init + (peak-init)/W match ours exactly, decay from update W.

    Args:
        t (TrainingConfig): learning_rate, lr_schedule, warmup_steps, warmup_init, min_learning_rate.
        total_updates (int): Updates of the run (where decay ends).
    """
    peak, floor = t.learning_rate, t.min_learning_rate
    decay = max(1, total_updates - t.warmup_steps)
    if t.lr_schedule == "constant" and t.warmup_steps == 0:
        return None
    name, arguments = {"cosine": ("cosine_decay", [peak, decay, floor]),
                       "linear": ("linear_schedule", [peak, floor, decay]),
                       "constant": ("linear_schedule", [peak, peak, 1])}[t.lr_schedule]
    schedule = {"name": name, "arguments": arguments}
    if t.warmup_steps > 1:
        schedule.update(warmup=t.warmup_steps - 1,
                        warmup_init=t.warmup_init + (peak - t.warmup_init) / t.warmup_steps)
    return schedule


def mlx_lm_config(cfg, total_updates: int) -> dict:
    """mlx_lm.lora's ``-c`` file: adapter shape, optimizer with our hyper-parameters, schedule."""
    t, m, d = cfg.training, cfg.method, cfg.data
    optimizer = {"adamw": {"weight_decay": t.weight_decay, "betas": list(t.betas), "eps": t.eps},
                 "adam": {"betas": list(t.betas), "eps": t.eps},
                 "sgd": {"momentum": t.momentum, "weight_decay": t.weight_decay},
                 "adafactor": {"relative_step": False, "scale_parameter": False}}[t.optimizer]
    config = {"lora_parameters": {"rank": m.rank, "scale": m.scale, "dropout": m.dropout},
              "optimizer": t.optimizer, "optimizer_config": {t.optimizer: optimizer},
              "prompt_feature": d.prompt_feature, "completion_feature": d.completion_feature,
              "text_feature": d.text_feature, "chat_feature": d.chat_feature}
    if m.keys:
        config["lora_parameters"]["keys"] = list(m.keys)
    schedule = mlx_lm_schedule(t, total_updates)
    if schedule:
        config["lr_schedule"] = schedule
    return config


def _is_text_data(cfg) -> bool:
    """mlx-lm refuses --mask-prompt on plain-text rows; ours ignores it there."""
    first = (Path(cfg.data.path) / "train.jsonl").read_text().split("\n", 1)[0]
    row = json.loads(first) if first.strip() else {}
    d = cfg.data
    return d.text_feature in row and d.chat_feature not in row and d.prompt_feature not in row


def mlx_lm_args(cfg, world_size: int, updates: int, config_path: Path, adapter_dir: Path) -> list[str]:
    """mlx_lm.lora's command line for the same work as our run at ``world_size`` ranks.

    Its ``--batch-size`` is the global batch (split over ranks) and an iteration is a
    micro-batch, so it gets batch_size x ranks, and ``updates`` x accumulation iterations.
    """
    t, m, d = cfg.training, cfg.method, cfg.data
    iters = updates * t.grad_accumulation
    args = ["--model", cfg.model.path, "--train", "--data", d.path, "-c", str(config_path),
            "--fine-tune-type", m.type, "--num-layers", str(m.num_layers),
            "--batch-size", str(t.batch_size * world_size), "--grad-accumulation-steps", str(t.grad_accumulation),
            "--iters", str(iters), "--learning-rate", str(t.learning_rate), "--seed", str(t.seed),
            "--max-seq-length", str(d.max_seq_length), "--adapter-path", str(adapter_dir),
            "--steps-per-report", str(t.grad_accumulation),  # one report per optimizer update
            "--steps-per-eval", str(iters + 1), "--val-batches", "1",  # it still validates at 1 and at the end
            "--save-every", str(iters + 1)]
    if d.mask_prompt and not _is_text_data(cfg):
        args.append("--mask-prompt")
    if t.grad_checkpoint:
        args.append("--grad-checkpoint")
    if cfg.model.trust_remote_code:
        args.append("--trust-remote-code")
    return args


def run_mlx_lm(plan: Plan, run: Run, work: Path) -> tuple[dict, Path]:
    """Train the same work with mlx_lm.lora; returns its measurement and adapter directory."""
    import yaml

    base = work / run.dirname()
    base.mkdir(parents=True, exist_ok=True)
    updates = plan.warmup + plan.steps
    config_path = base / "mlx_lm_config.yaml"
    config_path.write_text(yaml.safe_dump(mlx_lm_config(plan.cfg, updates)))
    reports, adapters = base / "reports.jsonl", base / "adapters"
    command = [sys.executable, "-u", "-m", "trainer.bench.scaling", "--mlx-lm-worker", str(reports), "--",
               *mlx_lm_args(plan.cfg, run.world_size, updates, config_path, adapters)]
    env = {"PYTHONUNBUFFERED": "1"}
    if plan.shim:  # the same BLAS as our ranks: the shim, and our thread split
        env.update(LD_PRELOAD=plan.shim,
                   OPENBLAS_NUM_THREADS=str(blas_threads(plan, run.world_size) or os.cpu_count() or 1))
    log_base = base / "log"
    code = launch_ranks(plan, run, command, env, log_base)
    rows = report.read_jsonl(reports)
    if code != 0 or len(rows) != updates or not (adapters / "adapters.safetensors").is_file():
        show_failure(run.describe(plan), code or 1, log_base)
    return report.mlx_lm_window(rows, plan.warmup, plan.steps), adapters


def trainer_worker(threads: int, argv: list[str]) -> int:
    """Rank body for ``--blas-threads``: the trainer's own CLI, with OpenBLAS set to ``threads``
    first (the trainer divides the cores by the ranks on a machine and has no override)."""
    from .. import fastblas
    from ..cli import main as cli_main

    fastblas.enable(threads=threads)  # the CLI then finds the shim active and keeps it
    cli_main(argv)  # exits with the trainer's status
    return 0


def mlx_lm_worker(reports_path: str, lora_argv: list[str]) -> int:
    """Rank body: mlx_lm.lora's own ``main()``, with a reporting callback that appends each
    report and the wall time it arrived to ``reports_path`` (rank 0).

    The callback is mlx-lm's own hook (``get_reporting_callbacks``, which also serves
    wandb); its console only prints rounded numbers and no step times.
    """
    import mlx_lm.lora as lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    if not hasattr(lora, "get_reporting_callbacks"):
        print(f"{PROG}: this mlx-lm has no mlx_lm.lora.get_reporting_callbacks to time its updates",
              file=sys.stderr)
        return 2

    class Recorder(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            if os.environ.get("MLX_RANK", "0") != "0":
                return
            record = {"time": time.perf_counter(),
                      **{k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}}
            with open(reports_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    lora.get_reporting_callbacks = lambda *args, **kwargs: Recorder()
    sys.argv = ["mlx_lm.lora", *lora_argv]
    lora.main()
    return 0


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
           "launcher_notes": {"lean": "trainer.launch: only MLX_RANK and MLX_HOSTFILE per rank",
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


def add_mlx_lm(plan: Plan, doc: dict, measured: dict, adapters: dict, work: Path) -> None:
    """The comparisons, the headline ratio and both valid losses, into ``doc``."""
    n, primary = plan.world_size, plan.primary_launcher
    doc["vs_mlx_lm"] = [report.comparison(n, plan.warmup + plan.steps, launcher, measured[Run("ours", n, launcher)],
                                          measured[Run("mlx_lm", n, launcher)]) for launcher in plan.launchers]
    losses = evaluate_adapters(plan, {"mlx-dp": adapters[("ours", primary, n)],
                                      "mlx_lm": adapters[("mlx_lm", primary)]}, work)
    for c in doc["vs_mlx_lm"]:
        if c["launcher"] == primary:
            c["ours"]["valid_loss"], c["mlx_lm"]["valid_loss"] = losses["mlx-dp"], losses["mlx_lm"]
    headline = next(c for c in doc["vs_mlx_lm"] if c["launcher"] == primary)
    doc["vs_mlx_lm_tokens_per_s_ratio"] = headline["tokens_per_s_ratio"]
    doc["vs_mlx_lm_launcher"] = primary
    doc["final_losses"] = {"evaluator": "mlx-dp eval --split valid", "launcher": primary,
                           "mlx_dp_valid_loss": losses["mlx-dp"], "mlx_lm_valid_loss": losses["mlx_lm"],
                           "mlx_dp_final_train_loss": headline["ours"]["final_train_loss"],
                           "mlx_lm_final_train_loss": headline["mlx_lm"]["final_train_loss"]}
    doc["notes"].append("vs_mlx_lm_tokens_per_s_ratio is mlx-dp's optimizer updates per second over mlx_lm.lora's "
                        "(same sequences per update), i.e. the tokens/s ratio under one token definition; "
                        "mlx_lm.lora ran through its own main() with a reporting callback that timestamps "
                        "each update")


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
    """``mlx-dp bench scaling ...``; returns the exit status (also the entry of its rank workers)."""
    rest = argv[3:] if argv[2:3] == ["--"] else argv[2:]
    if argv[:1] == ["--mlx-lm-worker"]:  # a rank of the mlx_lm.lora comparison
        return mlx_lm_worker(argv[1], rest)
    if argv[:1] == ["--trainer-worker"]:  # a rank of ours with --blas-threads
        return trainer_worker(int(argv[1]), rest)
    from ..fastblas import FastBlasError
    from ..netem import NetemError

    try:
        plan = make_plan(parse_args(argv))
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
