"""The envelope around a training run: nothing hangs silently, nothing is lost, every end is recorded.

:class:`RunGuard` is the one context manager that ``trainer.run.loop.train``
wraps the loop in. Entering it arms the watchdog and signal handling
(``trainer.cluster.health``), joins the group, starts the heartbeats between
ranks (``trainer.cluster.peers``), takes ``checkpoint.dir``'s lock
(``trainer.cluster.runlock``), notes a restart by ``mlx-dp launch --restarts``
and chooses the checkpoint it continues from, and sets a Mac's wired memory
limit as mlx-lm's trainer does. While the loop runs, rank 0 keeps
``status.json`` current (``trainer.cluster.status``). Leaving it records how
the run ended (completed, stopped, failed, with the reason), turns a full
disk or a lost peer into one sentence for people, tells the launcher why a
rank failed, and gives back everything it took, in reverse order.
"""

import errno
import signal
import socket
import time
from pathlib import Path

import mlx.core as mx

from .. import log
from ..cluster import connect, health, runlock
from ..cluster import status as status_file
from ..cluster.hostfile import check_ring_hostfile
from ..cluster.peers import PeerMonitor
from ..config.load import Config
from ..data.membership import Membership
from ..env import restart_env
from ..errors import CheckpointError, DistributedError, Stopped, UserError
from ..parallel import refuse_lone_rank
from ..run.report import NullReporter
from ..state import checkpoint, rundir
from .pick import restart_resume, shared_resume

RESTART_SILENCE_S = 15.0  # parallel.peer_silence_s under --restarts: a restart costs seconds, a sleeping Mac hours


class RunGuard:
    """Arm, join and lock on entry; record the end and give everything back on exit.

    Attributes (once entered):
        world: The group.
        membership: The nominal ranks this process computes (fewer ranks than planned after a restart).
        resume: The checkpoint to continue from (every rank's choice is rank 0's), or ``None``.

    Args:
        cfg (Config): The resolved recipe.
        resume (str | bool | None): What the user asked to resume (``--resume``).
        overwrite (bool): ``--overwrite``: write into a folder that holds other files, or start an
            earlier run there over (``trainer.state.rundir``). Default: ``False``.
    """

    def __init__(self, cfg: Config, resume=None, overwrite: bool = False):
        self.cfg, self.run_dir, self.resume, self.overwrite = cfg, cfg.checkpoint.run_dir, resume, overwrite
        self.world, self.membership, self.restarted = None, None, None
        self._lock, self._reporter, self._wired, self._heartbeat = None, NullReporter(), None, None

    def __enter__(self) -> "RunGuard":
        cfg = self.cfg
        notes = check_ring_hostfile()  # a repeated ip:port would never connect
        refuse_lone_rank()  # before anything is written: such a process has no run of its own
        status_file.reset()
        # Armed before the ranks connect: a signal or a missing rank then ends with words and a status too.
        health.install(None, self.run_dir, cfg.parallel.timeout_s, describe_connect=_first_exchange_stuck,
                       silence_s=_peer_silence_s(cfg))
        try:
            self._join(notes)
        except BaseException as e:
            if not self.__exit__(type(e), e, e.__traceback__):
                raise
        return self

    def _join(self, notes: list) -> None:
        cfg = self.cfg
        self.world = world = connect.join(cfg.parallel.backend, cfg.parallel.timeout_s,
                                          should_stop=health.stop_signal)
        log.set_rank(world.rank)
        health.attach(world)
        health.attach(world, PeerMonitor.start(world))
        for note in notes:
            log.note(note)
        restart = restart_env()

        def earlier(run_dir):  # once the lock is held: an earlier run is continued, or replaced only when asked
            removed = rundir.check_earlier_run(run_dir, self.resume is not None, self.overwrite, restart.attempt > 0)
            if removed:
                log.info(f"--overwrite: removed the earlier run's {', '.join(removed)} from {run_dir}")

        try:
            self._lock, run_id = runlock.acquire_for_group(
                world, self.run_dir, before=lambda run_dir: rundir.check_place_and_contents(run_dir, self.overwrite),
                after=earlier)
        except UserError:
            status_file.disown()  # another run owns checkpoint.dir: write nothing there
            raise
        status_file.set_run(run_id)
        if world.is_main:  # the launcher records its restarts where this run writes
            health.report_progress("run", run_dir=str(self.run_dir.resolve()), host=socket.gethostname())
        earlier = status_file.read(self.run_dir)
        if earlier is not None and earlier.get("state") == "lost":
            log.note(f"the earlier run in {self.run_dir} was lost: {earlier['lost_reason']}")
        self.membership = Membership.of(world.rank, world.size, restart.nominal, restart.present)
        self.restarted = _note_restart(self.run_dir, restart, earlier, self.membership, world.size)
        if self.restarted is not None:
            self.resume = restart_resume(self.run_dir, restart.job, self.resume)  # this launch's newest checkpoint
        self.resume = shared_resume(world, self.resume)  # rank 0's disk holds the checkpoints: its choice is all's
        # As mlx-lm's trainer: on a Mac, let MLX keep the recommended working set wired (a no-op elsewhere).
        from mlx_lm.utils import maybe_set_recommended_wired_limit

        self._wired = maybe_set_recommended_wired_limit()

    @property
    def reporter(self):
        """Where the run reports (rank 0's bar, metrics.jsonl and wandb; nothing on the other ranks)."""
        return self._reporter

    def started(self, run, reporter) -> None:
        """Set up, checked and agreed: from here this run's records replace an earlier run's end."""
        self._reporter = reporter
        if run.resumed is not None:
            reporter.log(run.resumed.record())
        if self.restarted is not None:
            reporter.log({"step": run.state.step, **self.restarted})
        health.status(self.world, self.run_dir, "running", step=run.state.step)
        self._heartbeat = status_file.Heartbeat(self.world, self.run_dir, health.current_step)

    def finished(self, result: dict) -> dict:
        """Record how the loop ended: completed, or stopped (resumable) by a signal or a stop request."""
        result["signal"] = health.stop_signal()
        reason = result.get("reason")
        if result["stopped"]:
            asked = signal.Signals(result["signal"]).name if result["signal"] else "a stop request"
            reason = f"{asked}: stopped after saving update {result['step']}; continue with --resume"
        health.status(self.world, self.run_dir, "stopped" if result["stopped"] else "completed", step=result["step"],
                      reason=reason)
        return result

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if error is not None:
                self._record_failure(error)  # raises the error for people where there is one
        finally:
            self._release()
        return False

    def _record_failure(self, error: BaseException) -> None:
        world, step = self.world, health.current_step()
        if isinstance(error, KeyboardInterrupt):
            health.failing()
            health.status(world, self.run_dir, "failed", step=step,
                          reason=f"interrupted: a second Ctrl-C at update {step} aborted before a checkpoint was "
                                 "saved; --resume continues from the last one")
            return
        if isinstance(error, Stopped):
            health.status(world, self.run_dir, "stopped", step=step, reason=str(error))
            return
        if not isinstance(error, Exception):
            return
        health.failing()
        translated = as_user_error(error, self.run_dir)
        # what this rank only saw of another's end (a lost peer, rank 0's failure): the other's cause wins
        lost_peer = isinstance(translated, DistributedError) and (translated.consequence
                                                                  or str(translated) != str(error))
        health.status(world, self.run_dir, "failed", step=step, reason=str(translated), consequence=lost_peer)
        blamed, final = (translated.blamed, translated.final) if isinstance(translated, DistributedError) else ((),
                                                                                                              False)
        health.report_failure(str(translated), blamed, final=final)
        if translated is not error:
            raise translated from None

    def _release(self) -> None:
        """Give back what was taken, newest first; a failing flush never hides the error being raised."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
        try:
            self._reporter.close()
        except OSError:  # a full disk fails the last flush too; the error above is the one to report
            pass
        if self._lock is not None:
            self._lock.release()
        if self._wired is not None:
            mx.set_wired_limit(self._wired)  # the process's own limit again (mlx-lm leaves it set)
        log.set_rank(None)
        health.uninstall()


def _peer_silence_s(cfg: Config) -> float:
    """``parallel.peer_silence_s``, or its default: short when a restart follows, else the whole timeout (a peer
    whose Wi-Fi roams may come back, and without a restart the job would be over)."""
    if cfg.parallel.peer_silence_s is not None:
        return cfg.parallel.peer_silence_s
    return min(RESTART_SILENCE_S, cfg.parallel.timeout_s) if restart_env().restarts > 0 else cfg.parallel.timeout_s


def _note_restart(run_dir: Path, restart, earlier: dict | None, membership: Membership, size: int) -> dict | None:
    """At a restart by ``mlx-dp launch --restarts``: say why, and list it in every status record.

    Returns:
        dict | None: The restart's ``metrics.jsonl`` record (without its step), or
        ``None`` at a launch's first start.
    """
    if restart.attempt <= 0:
        return None
    record = {"event": "restarted", "attempt": restart.attempt, "of": restart.restarts, "cause": restart.cause[:300],
              "ranks": size, "nominal_ranks": membership.nominal, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if restart.left_out:
        record["left_out"] = restart.left_out[:300]
    same_launch = earlier is not None and earlier.get("job") == restart.job
    status_file.note_restarts(((earlier or {}).get("restarts", []) if same_launch else [])[-9:] +
                              [{k: v for k, v in record.items() if k != "event"}])
    log.info(f"restart {restart.attempt} of {restart.restarts} after: {restart.cause or 'a failure'}"
             + (f"; left out: {restart.left_out}" if restart.left_out else ""))
    return record


def _first_exchange_stuck() -> str:
    return ("the ranks connected, but their first exchange did not complete: a rank stopped or died just after "
            "connecting (see the other ranks' messages)")


def as_user_error(error: Exception, run_dir: Path) -> Exception:
    """A full disk or a lost peer as one line for people; other exceptions unchanged (a bug: traceback)."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = Path(error.filename) if error.filename else Path(run_dir)
        directory = where.parent if error.filename else where
        return CheckpointError(f"could not write {where}: {checkpoint.describe_os_error(error, directory)}")
    reason = health.describe_failure(error)
    return DistributedError(reason) if reason != str(error) else error
