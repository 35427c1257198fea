"""Launching the runs of ``mlx-dp bench scaling`` and measuring ours.

:func:`launch_ranks` starts one command on N ranks in one of four ways: the
lean launcher (``trainer.cluster.launch``, which also runs one rank as a plain
process), ``mlx.launch -n N`` on loopback, ``mlx.launch --hostfile`` on a
real cluster, or an emulated cluster of network namespaces behind a shaped
link. Each rank's output goes to a log file, whose tail is shown when a run
fails (:func:`show_failure`). :func:`run_ours` trains the recipe that way and
reads its metrics back through ``scaling_report``.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from . import scaling_report as report
from ..cluster.ports import free_port_block
from .scaling_plan import BenchError, Plan, Run, RunFailed, bench_overrides

TAIL_LINES = 25
NO_DELAY_NOTE = "this kernel has no netem qdisc: the emulated links had their rate but not their delay"


# ---------------------------------------------------------------------------- launchers


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
        from ..cluster.netem import EmulatedCluster, exit_status

        with EmulatedCluster(run.world_size, **plan.link_args) as cluster:
            code = exit_status(cluster.run(_logged(command, log_base), env=env, timeout=plan.timeout))
            if cluster.delay_emulated is False and NO_DELAY_NOTE not in plan.notes:
                plan.notes.append(NO_DELAY_NOTE)
            return code
    if run.launcher == "mlx.launch":
        return _mlx_launch(plan, run.world_size, command, env, log_base)
    from ..cluster.launch import launch

    return launch(_logged(command, log_base), run.world_size, env=env, timeout=plan.timeout)


def _logged(command: list[str], log_base: Path) -> list[str]:
    # The lean launcher and the emulated cluster let ranks write to our terminal; this
    # wrapper sends each rank's output to its own file instead (MLX_RANK is set by then).
    return ["/bin/sh", "-c", 'exec "$@" >"$0.rank$MLX_RANK.log" 2>&1', str(log_base), *command]


def _mlx_launch(plan: Plan, n: int, command: list[str], env: dict, log_base: Path) -> int:
    exe = str(Path(sys.executable).parent / "mlx.launch")
    if plan.hostfile and n > 1:
        where = ["--hostfile", plan.hostfile]
    else:  # a free port block: other jobs on this machine may hold mlx.launch's default 32323
        port = free_port_block(n)
        if port is None:
            raise BenchError(f"found no {n} consecutive free TCP ports on loopback for mlx.launch")
        where = ["-n", str(n), "--starting-port", str(port)]
    env_args = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
    with open(f"{log_base}.log", "w") as out:
        # stdin: mlx.launch makes its stdin non-blocking, which would also change our terminal's.
        # A session of its own, so a timeout or Ctrl-C can stop mlx.launch and every rank it started.
        proc = subprocess.Popen([exe, *where, *env_args, "--", *command], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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


def show_failure(run_label: str, code: int, log_base: Path) -> None:
    """Print the end of every log of a failed run, then raise one clear error."""
    print("", flush=True)
    for log in sorted(log_base.parent.glob(log_base.name + ".*log")):
        lines = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        print(f"--- last {len(lines)} lines of {log.name} ---", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr, flush=True)
    raise RunFailed(f"{run_label} failed (exit status {code}); the end of its output is above")


# ---------------------------------------------------------------------------- our trainer


def run_ours(plan: Plan, run: Run, run_dir: Path) -> dict:
    """Train the recipe at ``run.world_size`` ranks into ``run_dir``; measure the updates after warm-up."""
    from ..tools.fastblas import THREADS_ENV

    switches = ["--no-reduce"] if run.kind == "skip" else []
    command = [sys.executable, "-u", "-m", "trainer.bench_rank", "mlx-dp", *switches, "--", "train", plan.recipe,
               *plan.overrides, *bench_overrides(plan, run_dir)]
    env = {"PYTHONUNBUFFERED": "1"}
    if plan.blas_threads:  # otherwise each rank takes its share of its machine's cores
        env[THREADS_ENV] = str(plan.blas_threads)
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
