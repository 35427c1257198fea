"""Watch the ranks of ``mlx-dp launch``: end them together, pass signals on, exit truthfully.

What the launcher does, and ``mlx.launch`` does not (measured with mlx 0.32.4):

* **A rank fails** (any rank, at any time, even while the others still
  connect): its output is relayed to the end, one line names it and its
  status, every other rank gets SIGTERM (SIGKILL after ``grace_s``), and the
  launcher exits with that rank's status (128+N for a death by signal N).
  ``mlx.launch`` exits 0.
* **Ctrl-C** (SIGINT): passed on once to every rank, so the trainer stops
  after its current update and rank 0 saves a checkpoint. A second Ctrl-C
  passes SIGINT again (the trainer's "stop now") and kills what is left 5 s
  later; a third kills at once.
* **SIGTERM or SIGHUP** (a scheduler, a closed terminal): every rank gets
  SIGTERM, the trainer's clean stop; what has not ended after ``grace_s`` is
  killed, so no rank outlives the launcher. A second one kills at once.
* **--timeout**: every rank is stopped as for SIGTERM; the status is 124.
* **Temporary files**: the pidfiles and hostfiles the ranks' scripts made on
  this machine (in the launch's folder, ``RankSpec.temp_dir``) are removed when
  the attempt ends, whatever ended it.

After a signal the status is 128 + that signal, as a shell reports it.
Nothing here polls: the main thread blocks on one queue that rank exits and
signal handlers feed (``queue.SimpleQueue.put`` is safe in a signal handler).
"""

import queue
import secrets
import signal
import threading
import time

from .mlx_launcher import RankSpec
from .tempfiles import empty_folder
from .relay import Output, Rank, forward_stdin

SECOND_INT_GRACE_S = 5.0  # after a second Ctrl-C
DRAIN_S = 2.0  # how long a failed rank's last output may take to arrive
FINISH_S = 1.0  # how long ssh helpers (signals, pidfile removal) may take before they are left to finish alone
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def exit_status(code: int) -> int:
    """A process exit status as a shell reports it: -N (killed by signal N) becomes 128+N."""
    return 128 - code if code < 0 else code


def describe_status(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """Start ranks, watch them to the end and return the job's exit status (:meth:`run`).

    Args:
        specs (list[RankSpec]): Every rank, from ``trainer.cluster.mlx_launcher.rank_specs``.
        output (Output): Where output and the launcher's own lines go.
        timeout (float | None): Stop every rank after this many seconds. Default: ``None``.
        timeout_given (float | None): The ``--timeout`` the user gave, for the message when
            ``timeout`` runs out (under ``--restarts``, ``timeout`` is what is left of it).
            Default: ``None`` (``timeout``).
        grace_s (float): From SIGTERM to SIGKILL. Default: ``30``.
        verbose (bool): Also say when each rank completes. Default: ``False``.
        on_start (Callable[[RankSpec, int], None] | None): Called with each rank's spec and
            the pid of its process as it starts. Default: ``None``.
    """

    def __init__(self, specs: list[RankSpec], output: Output, timeout: float | None = None,
                 grace_s: float = 30.0, verbose: bool = False, on_start=None, timeout_given: float | None = None):
        self.specs, self.output, self.timeout, self.grace_s, self.verbose = specs, output, timeout, grace_s, verbose
        self.timeout_given = timeout if timeout_given is None else timeout_given
        self.on_start = on_start
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.ranks: list[Rank] = []
        self.codes: dict[int, int] = {}
        self.failure: tuple[int, int] | None = None  # (rank, raw status) of the rank that ended the job
        self.signals: list[int] = []
        self.timed_out = False
        self.kill_at: float | None = None
        self.reports: dict[int, dict] = {}  # rank -> its failure report to the launcher (trainer.cluster.health)
        # What rank 0 said of the run (health.report_progress, under --restarts): "run_dir" and "host" where it
        # writes, "saved" the update of its newest checkpoint.
        self.progress: dict = {}

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Run the job; returns its exit status."""
        old_handlers = self._catch_signals()
        try:
            secret = secrets.token_hex(32)  # this job's heartbeat channel (trainer.cluster.peers); never printed
            for spec in self.specs:  # every fork before any thread starts (see relay._die_with_parent)
                self.ranks.append(Rank(spec, self.output, self.events, secret=secret, on_report=self._on_report))
                if self.on_start is not None:
                    self.on_start(spec, self.ranks[-1].proc.pid)
            for rank in self.ranks:
                rank.start_threads()
            threading.Thread(target=forward_stdin, args=(self.ranks,), daemon=True, name="stdin").start()
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while len(self.codes) < len(self.ranks):
                self._step(deadline)
                if deadline is not None and self.timed_out:
                    deadline = None
        finally:
            for rank in self.ranks:  # only after a bug in this loop can one still run here
                rank.send(signal.SIGKILL)
            self._restore(old_handlers)
            self._finish()
        return self._status()

    def _step(self, deadline: float | None) -> None:
        """Handle one event, or a deadline that passed."""
        now = time.monotonic()
        due = [t for t in (deadline, self.kill_at) if t is not None]
        try:
            kind, who, value = self.events.get(timeout=max(0.0, min(due) - now) if due else None)
        except queue.Empty:
            self._on_deadline(deadline)
            return
        if kind == "exit":
            self._on_exit(who, value)
        else:
            self._on_signal(value)

    def _on_exit(self, index: int, code: int) -> None:
        self.codes[index] = code
        rank = self.ranks[index]
        stopping = self.failure is not None or self.signals or self.timed_out
        if code == 0 or stopping:
            if self.verbose:
                self.output.say(f"{rank.describe()} {describe_status(code)}")
            return
        rank.drain(DRAIN_S)  # its last words come before ours
        others = [r for r in self.ranks if r.alive()]
        self.failure = (index, code)
        hint = ""
        if not rank.spec.is_local and code == 255:
            hint = f" (ssh's status for a failed connection: try `ssh {rank.spec.host} true`)"
        self.output.say(f"{rank.describe()} {describe_status(code)}{hint}" +
                        ("; stopping the other ranks" if others else ""))
        self._kill_blamed(index)
        self._stop(signal.SIGTERM, self.grace_s)

    def _on_signal(self, signum: int) -> None:
        self.signals.append(signum)
        name = signal.Signals(signum).name
        same = sum(1 for s in self.signals if (s == signal.SIGINT) == (signum == signal.SIGINT))
        if signum == signal.SIGINT and same == 1:
            self.output.say("Ctrl-C: every rank stops after its current update and saves a checkpoint "
                            "(Ctrl-C again to stop at once)")
            self._send(signal.SIGINT)
        elif signum == signal.SIGINT and same == 2:
            self.output.say(f"second Ctrl-C: stopping every rank now (killed in {SECOND_INT_GRACE_S:g} s)")
            self._stop(signal.SIGINT, SECOND_INT_GRACE_S)
        elif same == 1:
            self.output.say(f"{name}: every rank stops after its current update and saves a checkpoint; "
                            f"what is still running in {self.grace_s:g} s is killed")
            self._stop(signal.SIGTERM, self.grace_s)
        else:
            self.output.say(f"{name} again: killing every rank")
            self._send(signal.SIGKILL)

    def _on_deadline(self, deadline: float | None) -> None:
        now = time.monotonic()
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            for rank in self.ranks:
                if rank.alive():
                    self.output.say(f"{rank.describe()} has not stopped; killing it")
                    rank.send(signal.SIGKILL)
        if deadline is not None and now >= deadline and not self.timed_out:
            self.timed_out = True
            self.output.say(f"ranks still running after --timeout {self.timeout_given:g} s; stopping them")
            self._stop(signal.SIGTERM, self.grace_s)

    # ------------------------------------------------------------------ helpers

    def _on_report(self, rank: int, report: dict) -> None:
        """A relay thread: a line the trainer addressed to the launcher, a failure or news of progress."""
        event = report.get("event")
        if event is None:
            self.reports.setdefault(rank, report)  # the first failure report of a rank is its own cause
        elif event == "run":
            self.progress.update(run_dir=report.get("run_dir"), host=report.get("host"))
        elif event == "saved":
            self.progress["saved"] = report.get("step")

    def _kill_blamed(self, index: int) -> None:
        """Kill at once the ranks the failed rank's report blames (lost, or silent: asleep, unplugged).

        They cannot act on SIGTERM in time, if at all, and an unreachable host would
        hold the job for the whole grace. Reports exist under ``--restarts`` only.
        """
        report = self.reports.get(self.ranks[index].rank) or {}
        for blamed in report.get("blamed", []):
            if isinstance(blamed, int) and 0 <= blamed < len(self.ranks) and blamed != index and \
                    self.ranks[blamed].alive():
                self.output.say(f"{self.ranks[blamed].describe()} is the one rank {index} lost or waited for; "
                                "killing it")
                self.ranks[blamed].send(signal.SIGKILL)

    def asked_to_stop(self) -> bool:
        """A signal to the launcher or ``--timeout`` ended the job (not a failure of its own)."""
        return bool(self.signals) or self.timed_out

    def _send(self, sig: int) -> None:
        for rank in self.ranks:
            rank.send(sig)

    def _stop(self, sig: int, grace_s: float) -> None:
        """Send ``sig`` to every live rank and kill what is left after ``grace_s``.

        A stopped rank (a SIGSTOP the watchdog has named, a sleeping machine's
        process) cannot act on ``sig``: it is killed at once instead of after the grace.
        """
        self._send(sig)
        for rank in self.ranks:
            if rank.kill_if_stopped():
                self.output.say(f"{rank.describe()} is stopped and cannot stop cleanly; killed it")
        kill_at = time.monotonic() + grace_s
        self.kill_at = kill_at if self.kill_at is None else min(self.kill_at, kill_at)

    def _status(self) -> int:
        if self.failure is not None:
            return exit_status(self.failure[1])
        if self.timed_out:
            return 124
        if self.signals:
            return 128 + self.signals[0]
        bad = [code for code in self.codes.values() if code != 0]
        return exit_status(bad[0]) if bad else 0

    def _catch_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, lambda signum, _frame: self.events.put(("signal", None, signum)))
                for sig in FORWARDED}

    @staticmethod
    def _restore(old_handlers: dict) -> None:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    def _finish(self) -> None:
        """Relay what is left of the output, reap ssh helpers, remove pidfiles and this machine's hostfiles."""
        end = time.monotonic() + DRAIN_S
        for rank in self.ranks:
            rank.drain(max(0.0, end - time.monotonic()))
        for rank in self.ranks:
            rank.finish(timeout=FINISH_S)
        for rank in self.ranks:
            rank.finish(timeout=FINISH_S)  # the remote pidfile removal started by the first pass
        # Every local rank has ended: what their scripts made (a hostfile no Python read, when a rank died
        # before its Python started) goes now, before a restart's attempt makes its own.
        for folder in {spec.temp_dir for spec in self.specs if spec.is_local and spec.temp_dir is not None}:
            empty_folder(folder)
