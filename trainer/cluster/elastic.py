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
import re
import secrets
import signal
import socket
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
    launch = _Launch(hosts, output, restarts, min_ranks, timeout, probe_s)
    # Between attempts (probe, backoff, the few lines between) a stop signal is caught here, so Ctrl-C or
    # SIGTERM ends the launch cleanly at any moment; during an attempt the supervisor catches its own.
    with _Signals() as signals:
        for attempt in range(restarts + 1):
            present = launch.choose(signals)
            if isinstance(present, int):
                return present
            specs = make_specs([hosts[i] for i in present], launch.attempt_env(attempt, present))
            sup = Supervisor(specs, output, timeout=launch.remaining(), grace_s=grace_s, verbose=verbose,
                             on_start=on_start, timeout_given=timeout)
            launch.status = sup.run()
            launch.learn(sup)
            if launch.status == 0 or sup.asked_to_stop():
                return launch.status
            ended = launch.after_failure(_failure(sup, present, hosts), attempt, signals)
            if ended is not None:
                return ended
    return launch.status


def signature(cause: str) -> str:
    """A failure's cause without what changes from one attempt to the next (numbers: pids, times, ports)."""
    return re.sub(r"\d+(\.\d+)?", "#", cause)


class _Launch:
    """One launch's state between attempts: who takes part, why the last attempt ended, and what the run
    directory's ``status.json`` says meanwhile (when rank 0 writes on this machine)."""

    def __init__(self, hosts: list, output, restarts: int, min_ranks, timeout, probe_s: float):
        self.hosts, self.output, self.restarts, self.min_ranks, self.probe_s = hosts, output, restarts, min_ranks, probe_s
        self.job, self.cause, self.avoid, self.status = secrets.token_hex(8), "", set(), 0
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.previous, self.saved, self.run_dir, self.left = None, False, None, {}

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(1.0, self.deadline - time.monotonic())

    def choose(self, signals) -> list | int:
        """The host indices taking part in the next attempt, or the status to end with (a signal, the
        timeout, too few hosts)."""
        stopped = _stopped(signals, self.output, self.deadline)
        if stopped:
            return self._record_stop(stopped)
        reach = {}
        if self.min_ranks is not None:
            reach = _probe_all(self.hosts, self.probe_s, signals.events)
            if isinstance(reach, int):
                self.output.say(f"{signal.Signals(reach).name}: stopping before the next start")
                return self._record_stop(128 + reach)
        present, self.left = _choose(self.hosts, self.min_ranks, self.avoid, reach)
        for index, why in sorted(self.left.items()):
            self.output.say(f"leaving out {self.hosts[index].ssh_hostname}: {why}")
        if self.min_ranks is not None and len(present) < self.min_ranks:
            self.output.say(f"only {len(present)} of {len(self.hosts)} hosts can take part, and --min-ranks "
                            f"{self.min_ranks} needs {self.min_ranks}: stopping"
                            + (f"; the last failure: {self.cause}" if self.cause else ""))
            self._record("failed", f"mlx-dp launch stopped: only {len(present)} of {len(self.hosts)} hosts could "
                                   f"take part (--min-ranks {self.min_ranks}); the last failure: {self.cause}")
            return self.status or 3
        if self.left:
            self.output.say(f"starting {len(present)} of {len(self.hosts)} ranks; they compute the missing ranks' "
                            "rows too, so the global batch and the updates stay the same")
        return present

    def attempt_env(self, attempt: int, present: list) -> list[str]:
        return _attempt_env(attempt, self.restarts, self.job, self.cause, present, len(self.hosts), self.left,
                            self.hosts)

    def learn(self, sup) -> None:
        """What the attempt's rank 0 said: where the run writes (on this machine), and whether it saved."""
        progress = sup.progress
        if progress.get("run_dir") and progress.get("host") == socket.gethostname():
            self.run_dir = progress["run_dir"]
        self.saved = "saved" in progress

    def after_failure(self, failure: "Failure", attempt: int, signals) -> int | None:
        """Restart after a backoff (``None``), or the status to end with, said in one line."""
        repeated = self.previous == signature(failure.cause) and not self.saved
        self.previous = signature(failure.cause)
        if failure.final:  # the failing rank recorded its own cause in status.json
            self.output.say(f"not restarting: {failure.final}")
            return self.status
        if attempt == self.restarts:  # none left: that is the reason, whether or not the failure repeats
            self.output.say(f"giving up after {self.restarts} restart(s); the last failure: {failure.cause}")
            return self.status
        if repeated:
            why = "the same failure twice with no checkpoint saved in between, so a restart would fail again"
            self._record("failed", f"mlx-dp launch stopped restarting: {why}; the last failure: {failure.cause}")
            self.output.say(f"not restarting: {why}; the last failure: {failure.cause}")
            return self.status
        self.cause, self.avoid = failure.cause, set(failure.blamed) if failure.connecting else set()
        wait = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** attempt)
        # status.json first: whoever reads the line below finds the record already true
        self._record("restarting", f"restart {attempt + 1} of {self.restarts} in {wait:g} s after: {failure.cause}")
        self.output.say(f"restart {attempt + 1} of {self.restarts} in {wait:g} s, from this launch's newest "
                        f"checkpoint, after: {failure.cause}")
        signum = signals.wait(wait if self.deadline is None else max(0.0, min(wait, self.deadline - time.monotonic())))
        if signum:
            self.output.say(f"{signal.Signals(signum).name}: not restarting")
            return self._record_stop(128 + signum)
        return None

    def _record(self, state: str, reason: str) -> None:
        """``status.json`` between attempts, where rank 0 writes on this machine (``status.write_for_launcher``)."""
        if self.run_dir is None:
            return
        from . import status

        status.write_for_launcher(self.run_dir, state, reason, self.job)

    def _record_stop(self, code: int) -> int:
        what = "--timeout" if code == 124 else signal.Signals(code - 128).name
        self._record("stopped", f"{what} while mlx-dp launch was between attempts; --resume continues from the "
                                "newest checkpoint")
        return code


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
