"""Launching the runs of ``mlx-dp bench scaling``, measuring the launcher, and measuring ours.

:func:`launch_ranks` starts one command on N ranks under ``mlx-dp launch``
(``-n N`` on loopback, ``--hostfile`` on a real cluster) as a process of its
own, whose CPU time is sampled from the system while the ranks run, so the
launcher's own cost is reported next to the throughput it allowed; so is the
CPU other processes took meanwhile (a round next to other load is left out).
An extension of the plan may launch another way (``Plan.hook("launch")``).
Output goes to a log file, whose tail is shown when a run fails
(:func:`show_failure`). :func:`run_ours` trains the recipe that way and reads
its metrics back through ``scaling_report``.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import scaling_report as report
from .scaling_plan import Plan, Run, RunFailed, bench_overrides

TAIL_LINES = 25
CPU_SKIP_S = 2.0  # the launcher's own start-up (imports) is not what is measured
CPU_EVERY_S = 0.5


# ---------------------------------------------------------------------------- launchers


def launch_ranks(plan: Plan, run: Run, command: list[str], env: dict, log_base: Path) -> tuple[int, dict]:
    """Start ``command`` on ``run.world_size`` ranks as ``run`` says and wait for them.

    Args:
        plan (Plan): Timeout and hostfile (and extensions that may launch instead).
        run (Run): World size and launcher.
        command (list[str]): What every rank runs.
        env (dict): Extra environment for every rank.
        log_base (Path): Output goes to ``<log_base>.log``.

    Returns:
        tuple: The launcher's exit status, and the CPU measurements of :func:`wait_measuring_cpu`
        (``None`` values where they could not be measured).
    """
    taken = plan.hook("launch", run, command, env, log_base)
    if taken is not None:
        return taken
    return launch_process(launcher_argv(plan, run.world_size, env) + ["--", *command], log_base, plan.timeout)


def launch_process(argv: list[str], log_base: Path, timeout: float) -> tuple[int, dict]:
    """Run a launcher's command line with output to ``<log_base>.log``, measuring its CPU (see above)."""
    with open(f"{log_base}.log", "w") as out:
        # A session of its own, so a timeout or Ctrl-C can stop the launcher and what it started.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        return wait_measuring_cpu(proc, timeout)


def launcher_argv(plan: Plan, n: int, env: dict) -> list[str]:
    """``mlx-dp launch``'s command line up to ``--``: where the ranks go and their environment.

    A local launch picks free ports itself (other jobs may hold the default one).
    """
    env_args = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
    where = ["--hostfile", plan.hostfile] if plan.hostfile and n > 1 else ["-n", str(n)]
    return [sys.executable, "-m", "trainer", "launch", "--prefix-output", *where, *env_args]


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (its threads, not its children); None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    try:  # macOS and other systems without /proc: ps's cumulative CPU time, [[dd-]hh:]mm:ss.ss
        text = subprocess.run(["ps", "-o", "time=", "-p", str(pid)], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = re.split(r"[-:]", text)
    if not text or not all(re.fullmatch(r"\d+(\.\d+)?", p) for p in parts):
        return None
    seconds = 0.0
    for value, unit in zip(reversed(parts), (1, 60, 3600, 86400)):
        seconds += float(value) * unit
    return seconds


def system_busy_seconds() -> float | None:
    """CPU seconds every core of this machine has spent busy since boot (Linux; ``None`` elsewhere).

    Busy is user, nice, system, irq, softirq and steal (time a hypervisor gave to other
    machines): all of it is CPU the benchmark's ranks did not get.
    """
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_measuring_cpu(proc: subprocess.Popen, timeout: float) -> tuple[int, dict]:
    """Wait for the launcher; measure its own CPU, and the CPU that other processes took meanwhile.

    The launcher's CPU time is sampled every half second after its start-up (its
    threads only). The job's whole CPU time (launcher and ranks, which it waits for)
    comes from ``wait4``; what the machine was busy with beyond that is other
    processes' load, which slows N ranks on N cores most.

    Returns:
        tuple: Exit status (124 after ``timeout``), and ``launcher_cpu`` (CPU seconds per
        wall second between the first and last sample; ``None`` for a run too short to
        sample) and ``other_cpu`` (cores used by other processes over the run; ``None``
        where it cannot be measured).
    """
    start, first, last, job_cpu = time.monotonic(), None, None, None
    busy_start = system_busy_seconds()
    try:
        while True:
            time.sleep(CPU_EVERY_S)
            try:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            except ChildProcessError:
                code = proc.wait()
                break
            if pid:
                proc.returncode = code = os.waitstatus_to_exitcode(status)
                job_cpu = usage.ru_utime + usage.ru_stime
                break
            now = time.monotonic()
            if now - start > timeout:
                _stop_group(proc)
                code = 124
                break
            cpu = process_cpu_seconds(proc.pid)
            if cpu is not None and now - start >= CPU_SKIP_S:
                first = first or (now, cpu)
                last = (now, cpu)
    except KeyboardInterrupt:
        _stop_group(proc)
        raise
    wall, busy_end = time.monotonic() - start, system_busy_seconds()
    share = None
    if first and last and last[0] - first[0] >= 1.0:
        share = (last[1] - first[1]) / (last[0] - first[0])
    other = None
    if None not in (busy_start, busy_end, job_cpu) and wall > 0:
        other = max(0.0, (busy_end - busy_start - job_cpu) / wall)
    return code, {"launcher_cpu": share, "other_cpu": other}


def _stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group we started, SIGKILL what is left after ``grace_s``.

    mlx-dp launch passes SIGTERM on to its ranks (their own sessions), and they die with it.
    """
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


def run_ours(plan: Plan, run: Run, run_dir: Path, entry: list[str] | None = None,
             env: dict | None = None) -> dict:
    """Train the recipe at ``run.world_size`` ranks into ``run_dir``; measure the updates after warm-up.

    Args:
        plan (Plan): The benchmark.
        run (Run): Which run.
        run_dir (Path): Its ``checkpoint.dir``.
        entry (list[str] | None): The program each rank runs before ``train RECIPE ...``.
            Default: ``None`` (``python -m trainer``: the trainer as users run it).
        env (dict | None): More environment for every rank. Default: ``None``.
    """
    from ..tools.fastblas import THREADS_ENV

    # balance runs also time each rank's compute under every setting, to report it side by side
    balance = [] if run.balance is None else [f"parallel.balance={run.balance}", "logging.compute_timings=true"]
    entry = entry or [sys.executable, "-u", "-m", "trainer"]
    command = [*entry, "train", plan.recipe, *plan.overrides, *balance, *bench_overrides(plan, run_dir)]
    env = {"PYTHONUNBUFFERED": "1", **(env or {})}
    if plan.blas_threads:  # the same at every world size (scaling_plan.blas_threads)
        env[THREADS_ENV] = str(plan.blas_threads)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_base = run_dir.parent / "log"
    code, cpu = launch_ranks(plan, run, command, env, log_base)
    if code != 0 or _run_state(run_dir) != "completed":
        show_failure(run.describe(plan), code or 1, log_base)
    return {**_measured(run_dir, run.world_size, plan), **cpu}


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
