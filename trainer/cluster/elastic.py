"""``mlx-dp launch --restarts N [--min-ranks M]``: a job that outlives a failure, a sleeping Mac or a dropped link.

torchrun's answer (``--max-restarts``, elastic ``--nnodes MIN:MAX``), built on
what mlx-dp already has: every failure is treated as a change of membership,
and exact resume does the rest.

When a rank fails, or the watchdog ends a hung job (``trainer.cluster.health``),
the supervisor stops every rank as for any failure; then this loop waits a
short backoff (:data:`BACKOFF_S`, doubling, at most :data:`MAX_BACKOFF_S`) and
starts the job again. Each rank learns that it is restart k of this launch
(``trainer.env.RestartEnv``) and continues from this launch's newest intact
checkpoint (``trainer.run.pick.restart_resume``): nobody types ``--resume``,
and an older run's checkpoints in the same directory are never taken. The
restart, its cause and the rank or host blamed go to the console here, and to
``status.json`` and ``metrics.jsonl`` from the restarted rank 0.

Not restarted, since a restart would not help: an error a restart would
repeat (exit 2: the recipe, the data, a full disk), a rank stopped by a signal
of its own, and a Ctrl-C, SIGTERM or ``--timeout`` to the launcher (which
stops everything, during a restart's backoff too).

**Fewer hosts, same training** (``--min-ranks M``, for hostfile launches):
before each start every host is probed (``ssh -o BatchMode=yes``, at most
:data:`PROBE_S`); a host that does not answer, or whose rank never connected
at the previous start, is left out while at least M remain. The global batch
stays the one the full hostfile makes: the ranks that run stand in for the
missing ones (``trainer.data.membership``), so the data order and the updates
are those of the full job, to float rounding, only slower. A host that answers
again at a later start rejoins. Checkpoints live on rank 0's disk: when the
first host is the one left out, the new rank 0 continues from what it can see
(a shared folder), else from the start, which is the same training again.

The trainer reports its cause to this loop in one line of its output that the
relay takes off (``trainer.env.REPORT_MARKER``), as torchelastic's agents read
their workers' error files.
"""

import queue
import secrets
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from ..env import (ATTEMPT_VAR, CAUSE_VAR, JOB_VAR, LEFT_OUT_VAR, NOMINAL_VAR, PRESENT_VAR, RESTARTS_VAR)
from .mlx_launcher import LOCAL_HOST
from .supervisor import FORWARDED, Supervisor, describe_status

BACKOFF_S = 1.0  # before the first restart; doubled for each one after it
MAX_BACKOFF_S = 30.0
PROBE_S = 10.0  # ssh's ConnectTimeout for the reachability probe
USER_ERROR = 2  # trainer.errors.UserError: a restart would fail the same way
STOP_STATUSES = tuple(128 + s for s in FORWARDED)  # a rank stopped by a signal of its own


@dataclass
class Failure:
    """Why an attempt ended, as far as the launcher can tell.

    Attributes:
        cause: One line for people.
        blamed: Indices (in the full host list) of the hosts blamed.
        connecting: The group never formed (a blamed host is left out once).
        final: Why a restart would not help, or "".
    """

    cause: str
    blamed: list
    connecting: bool = False
    final: str = ""


def probe(host, timeout_s: float = PROBE_S) -> str:
    """Why ``host`` cannot take part now ("" when ssh reaches it; this machine always can)."""
    if host.ssh_hostname == LOCAL_HOST:
        return ""
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout_s))}", "--",
            host.ssh_hostname, "true"]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout_s + 5, start_new_session=True)
    except subprocess.TimeoutExpired:
        return f"ssh got no answer within {timeout_s + 5:g} s"
    except OSError as e:
        return f"ssh could not run ({e.strerror or e})"
    if done.returncode == 0:
        return ""
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return f"ssh failed ({lines[-1][:160] if lines else f'status {done.returncode}'})"


def _probe_all(hosts: list, timeout_s: float, signals: "queue.SimpleQueue") -> dict | int:
    """host index -> why it cannot take part ("" when it can), probed at once; or a signal that arrived."""
    found: dict = {}
    done = threading.Event()

    def one(index: int) -> None:
        found[index] = probe(hosts[index], timeout_s)
        if len(found) == len(hosts):
            done.set()

    for index in range(len(hosts)):
        threading.Thread(target=one, args=(index,), daemon=True, name=f"probe-{index}").start()
    while not done.wait(0.1):
        try:
            return signals.get_nowait()
        except queue.Empty:
            pass
    return found


class _Signals:
    """Catch the launcher's stop signals between attempts (the supervisor catches them during one)."""

    def __init__(self):
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {sig: signal.signal(sig, lambda signum, _frame: self.events.put(signum)) for sig in FORWARDED}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def wait(self, seconds: float) -> int:
        """A signal that arrives within ``seconds`` (0: none)."""
        try:
            return self.events.get(timeout=seconds)
        except queue.Empty:
            return 0


def _failure(sup: Supervisor, present: list, hosts: list) -> Failure:
    """What ended an attempt: the failing rank, its own report, the hosts it blames."""
    rank, code = sup.failure if sup.failure is not None else (0, 1)
    host = present[rank] if rank < len(present) else rank
    name = hosts[host].ssh_hostname if host < len(hosts) else "?"
    name = "this machine" if name == LOCAL_HOST else name
    # The failing rank's own words; a rank killed outright has none, and the others' only echo its end.
    report = sup.reports.get(rank) or (None if code < 0 else next(iter(sup.reports.values()), None))
    cause = f"rank {rank} ({name}) {describe_status(code)}"
    blamed, connecting = [host], False
    if report is not None:
        cause += f": {' '.join(str(report.get('cause', '')).split())}"
        named = [present[r] for r in report.get("blamed", []) if isinstance(r, int) and 0 <= r < len(present)]
        blamed = named or blamed
        connecting = bool(report.get("connecting"))
    final = ""
    if report is not None and report.get("final"):
        final = f"rank {rank}'s error is one a restart would repeat"
    elif code == USER_ERROR:
        final = f"rank {rank}'s error is one a restart would repeat (exit status {USER_ERROR})"
    elif code in STOP_STATUSES or -code in FORWARDED:
        final = f"rank {rank} was asked to stop by a signal of its own"
    return Failure(cause=cause[:400], blamed=blamed, connecting=connecting, final=final)


def _choose(hosts: list, min_ranks: int | None, avoid: set, reach: dict) -> tuple[list, dict]:
    """Host indices that take part, and those left out with the reason."""
    if min_ranks is None:
        return list(range(len(hosts))), {}
    left = {i: reach[i] for i in range(len(hosts)) if reach.get(i)}
    left.update({i: "its rank never connected at the last start" for i in avoid if i not in left})
    return [i for i in range(len(hosts)) if i not in left], left


def _attempt_env(attempt: int, restarts: int, job: str, cause: str, present: list, total: int, left: dict,
                 hosts: list) -> list[str]:
    env = [f"{ATTEMPT_VAR}={attempt}", f"{RESTARTS_VAR}={restarts}", f"{JOB_VAR}={job}"]
    if cause:
        env.append(f"{CAUSE_VAR}={' '.join(cause.split())}")
    if len(present) < total:
        left_out = "; ".join(f"{hosts[i].ssh_hostname}: {why}" for i, why in sorted(left.items()))
        env += [f"{NOMINAL_VAR}={total}", f"{PRESENT_VAR}={','.join(map(str, present))}",
                f"{LEFT_OUT_VAR}={' '.join(left_out.split())[:400]}"]
    return env


def run(hosts: list, make_specs, output, restarts: int, min_ranks: int | None = None, timeout: float | None = None,
        grace_s: float = 30.0, verbose: bool = False, on_start=None, probe_s: float = PROBE_S) -> int:
    """Run a job, restarting it after failures; returns the job's exit status.

    Args:
        hosts (list): The hostfile's hosts (MLX's ``Host``), one rank each.
        make_specs (callable): ``(hosts, extra_env) -> list[RankSpec]`` for one attempt.
        output (trainer.cluster.relay.Output): Where output and the launcher's lines go.
        restarts (int): Restarts allowed after the first start.
        min_ranks (int | None): Go on with the hosts that answer while at least this many
            do; ``None``: every host, always. Default: ``None``.
        timeout (float | None): For the whole job, restarts included. Default: ``None``.
        grace_s (float): From SIGTERM to SIGKILL. Default: ``30``.
        verbose (bool): Say when each rank ends. Default: ``False``.
        on_start (callable | None): As ``Supervisor``'s. Default: ``None``.
        probe_s (float): ssh's connect timeout for the probe. Default: :data:`PROBE_S`.
    """
    job, cause, avoid, status = secrets.token_hex(8), "", set(), 0
    deadline = None if timeout is None else time.monotonic() + timeout
    # Between attempts (probe, backoff, the few lines between) a stop signal is caught here, so Ctrl-C or
    # SIGTERM ends the launch cleanly at any moment; during an attempt the supervisor catches its own.
    with _Signals() as signals:
        for attempt in range(restarts + 1):
            stopped = _stopped(signals, output, deadline)
            if stopped:
                return stopped
            reach = {}
            if min_ranks is not None:
                reach = _probe_all(hosts, probe_s, signals.events)
                if isinstance(reach, int):
                    output.say(f"{signal.Signals(reach).name}: stopping before the next start")
                    return 128 + reach
            present, left = _choose(hosts, min_ranks, avoid, reach)
            for index, why in sorted(left.items()):
                output.say(f"leaving out {hosts[index].ssh_hostname}: {why}")
            if min_ranks is not None and len(present) < min_ranks:
                output.say(f"only {len(present)} of {len(hosts)} hosts can take part, and --min-ranks {min_ranks} "
                           f"needs {min_ranks}: stopping" + (f"; the last failure: {cause}" if cause else ""))
                return status or 3
            if left:
                output.say(f"starting {len(present)} of {len(hosts)} ranks; they compute the missing ranks' rows "
                           "too, so the global batch and the updates stay the same")
            specs = make_specs([hosts[i] for i in present], _attempt_env(attempt, restarts, job, cause, present,
                                                                         len(hosts), left, hosts))
            remaining = None if deadline is None else max(1.0, deadline - time.monotonic())
            sup = Supervisor(specs, output, timeout=remaining, grace_s=grace_s, verbose=verbose, on_start=on_start)
            status = sup.run()
            if status == 0 or sup.asked_to_stop():
                return status
            failure = _failure(sup, present, hosts)
            if failure.final:
                output.say(f"not restarting: {failure.final}")
                return status
            if attempt == restarts:
                output.say(f"giving up after {restarts} restart(s); the last failure: {failure.cause}")
                return status
            cause, avoid = failure.cause, set(failure.blamed) if failure.connecting else set()
            wait = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** attempt)
            output.say(f"restart {attempt + 1} of {restarts} in {wait:g} s, from this launch's newest checkpoint, "
                       f"after: {failure.cause}")
            signum = signals.wait(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
            if signum:
                output.say(f"{signal.Signals(signum).name}: not restarting")
                return 128 + signum
    return status


def _stopped(signals: "_Signals", output, deadline: float | None) -> int:
    """Before an attempt: the status to end with, when a stop signal came or ``--timeout`` has passed (else 0)."""
    try:
        signum = signals.events.get_nowait()
    except queue.Empty:
        signum = 0
    if signum:
        output.say(f"{signal.Signals(signum).name}: not restarting")
        return 128 + signum
    if deadline is not None and time.monotonic() >= deadline:
        output.say("--timeout reached: not restarting")
        return 124
    return 0
