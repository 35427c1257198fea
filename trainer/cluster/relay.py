"""The ranks of ``mlx-dp launch`` as processes: start them, relay their output, signal them.

Why mlx-dp relays output itself instead of using ``mlx.launch``'s relay
(``_launch_with_io`` in ``mlx/_distributed_utils/launch.py``): each of its
per-rank threads calls ``select()`` with the child's stdin pipe in the write
set, and a pipe is always writable, so ``select`` returns at once and the loop
never sleeps. On the 2-core machine this was written on, that cost about 1.4
cores while ranks trained (docs/PLATFORM.md): two ranks ran at 43% of their
speed. On a desk cluster the same cost falls on the Mac you launch from, which
also runs rank 0. ``mlx.launch`` also exits 0 when a rank fails, and makes the
terminal's stdin non-blocking.

Here every output pipe has a thread blocked in ``read()``, stdin is read only
when it has data (a terminal only while this process is in the foreground), and
nothing polls: an idle job costs this process nothing. Each rank runs in a
session of its own, so a Ctrl-C in the terminal reaches only the launcher, which
passes exactly one SIGINT on (``trainer/cluster/supervisor.py`` decides when).
On Linux the kernel kills local ranks (and the ssh clients of remote ones,
whose terminals then hang up) if the launcher itself is killed with SIGKILL.
"""

import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading

from ..env import REPORT_MARKER
from .mlx_launcher import RankSpec, kill_if_stopped_argv, remove_argv, signal_argv
from .peers import SECRET_VAR

_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1
_LINE_END = re.compile(rb"(\r\n|\r|\n)")
PARTIAL_S = 0.05  # an unfinished output line is shown after this long without more


def _die_with_parent() -> None:
    """Runs in each rank's child before exec: SIGKILL it if the launcher's thread dies.

    prctl is looked up at import, since a forked child of a threaded process
    should not load libraries.
    """
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def process_stopped(pid: int) -> bool:
    """Whether process ``pid`` on this machine is stopped (state T or t), by ``ps`` (Linux and macOS)."""
    try:
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return state[:1] in ("T", "t")


class Output:
    """Where ranks' output goes: this process's stdout and stderr, as it comes or by line with a rank prefix.

    Writes that fail (the terminal closed, a reader went away) are dropped, and
    the pipes are still drained, so a rank never blocks on a full pipe.

    Args:
        prefix (bool): Prefix every line with ``[rank] ``.
        streams (tuple | None): Text streams for stdout and stderr. Default: ``None``
            (``sys.stdout`` and ``sys.stderr``).
    """

    def __init__(self, prefix: bool = False, streams: tuple | None = None):
        self.prefix = prefix
        self.streams = streams or (sys.stdout, sys.stderr)
        self.lock = threading.Lock()
        self.broken = [False, False]

    def write(self, index: int, data: bytes) -> None:
        """Write bytes to stdout (``index`` 0) or stderr (1)."""
        with self.lock:
            if self.broken[index] or not data:
                return
            stream = self.streams[index]
            try:
                buffer = getattr(stream, "buffer", None)
                if buffer is not None:
                    stream.flush()
                    buffer.write(data)
                    buffer.flush()
                else:
                    stream.write(data.decode("utf-8", errors="replace"))
                    stream.flush()
            except (OSError, ValueError):
                self.broken[index] = True

    def say(self, text: str) -> None:
        """One line of the launcher's own on stderr."""
        self.write(1, f"mlx-dp launch: {text}\n".encode())


class _Lines:
    """Cuts a byte stream into lines (ending in ``\n``, ``\r\n`` or a lone ``\r``, as progress bars
    write), each started with ``prefix``, so lines of different ranks never mix."""

    def __init__(self, prefix: bytes):
        self.prefix, self.partial, self.fresh = prefix, b"", True  # fresh: at the start of a line

    def feed(self, data: bytes) -> bytes:
        """The complete lines so far; the unfinished rest is kept."""
        text, hold = self.partial + data, b""
        if text.endswith(b"\r"):  # \r\n may be split across reads: decide with the next one
            text, hold = text[:-1], b"\r"
        parts = _LINE_END.split(text)  # text, line end, text, ...; the last text has no end yet
        self.partial = parts[-1] + hold
        out = []
        for i in range(0, len(parts) - 1, 2):
            text, end = parts[i], parts[i + 1].replace(b"\r\n", b"\n")
            if not text and end == b"\r" and self.fresh:  # a bar's leading \r: no line of its own
                out.append(end)
                continue
            out.append((self.prefix if self.fresh else b"") + text + end)
            self.fresh = True
        return b"".join(out)

    def flush(self, end: bytes = b"") -> bytes:
        """The unfinished line as it stands, then ``end`` (``b"\\n"`` at the end of the stream)."""
        rest, self.partial = self.partial, b""
        if not rest and (self.fresh or not end):
            return b""
        out = (self.prefix if self.fresh else b"") + rest + end
        self.fresh = bool(end) or rest.endswith(b"\r")
        return out


class Rank:
    """One rank: a local bash or an ssh client running MLX's launch script, with its relay threads.

    The script's first line on stdout is the path of a file holding the rank's
    pid (MLX's pidfile); it is taken off the output and used to signal a remote
    rank over ssh. Remote output comes through a terminal (``ssh -tt``), so its
    stdout and stderr arrive together, with ``\\r\\n`` line ends.

    The job's secret (``trainer.cluster.peers``) reaches a local rank in its
    environment and a remote one as the first line of its input, once its
    script has printed the pidfile's path with the terminal's echo off; input
    for a remote rank waits until then.

    Args:
        spec (RankSpec): What and where to run.
        output (Output): Where the output goes.
        events: A queue that gets ``("exit", rank, status)`` when the process ends.
        secret (str | None): The job's secret. Default: ``None``.
        on_report (callable | None): Called with the rank and the dict of each line
            the trainer addresses to the launcher (``trainer.cluster.health.report_failure``);
            such lines are taken off the output. Default: ``None`` (relayed as they are).
    """

    def __init__(self, spec: RankSpec, output: Output, events, secret: str | None = None, on_report=None):
        self.spec, self.output, self.events, self.on_report = spec, output, events, on_report
        self.pidfile = None
        self.helpers: list[subprocess.Popen] = []  # ssh commands that signal a remote rank
        self.threads: list[threading.Thread] = []
        self.secret, self.held = secret, ([] if secret and not spec.is_local else None)
        self.stdin_lock = threading.Lock()
        env = {**os.environ, SECRET_VAR: secret} if secret and spec.is_local else None
        self.proc = subprocess.Popen(spec.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, env=env,
                                     preexec_fn=_die_with_parent if _PRCTL else None)

    @property
    def rank(self) -> int:
        return self.spec.rank

    def describe(self) -> str:
        return f"rank {self.rank} ({'this machine' if self.spec.is_local else self.spec.host})"

    def start_threads(self) -> None:
        """Start relaying output and waiting for the exit (after every rank is started: see _die_with_parent)."""
        for index, pipe in enumerate((self.proc.stdout, self.proc.stderr)):
            self.threads.append(threading.Thread(target=self._pump, args=(index, pipe), daemon=True,
                                                 name=f"relay-{self.rank}-{index}"))
        self.threads.append(threading.Thread(target=self._wait, daemon=True, name=f"wait-{self.rank}"))
        for thread in self.threads:
            thread.start()

    def _wait(self) -> None:
        self.events.put(("exit", self.rank, self.proc.wait()))

    def _pump(self, index: int, pipe) -> None:
        fd = pipe.fileno()
        head = b"" if index == 0 else None  # stdout starts with the pidfile's path
        lines = _Lines(f"[{self.rank}] ".encode() if self.output.prefix else b"")
        while True:
            # Block in read(); only while a line is unfinished, wait at most PARTIAL_S for the
            # rest of it, then show it as it stands (a prompt, "loading...").
            if lines.partial and not select.select([fd], [], [], PARTIAL_S)[0]:
                self.output.write(index, lines.flush())
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                break
            if head is not None:
                head += data
                if b"\n" not in head:
                    continue
                line, data = head.split(b"\n", 1)
                head = None
                self.pidfile = line.decode("utf-8", errors="replace").strip()
                self._send_secret()
            self.output.write(index, self._take_reports(lines.feed(data)))
        self.output.write(index, self._take_reports(lines.feed(head or b"") + lines.flush(b"\n")))

    def _take_reports(self, chunk: bytes) -> bytes:
        """Complete lines, less those addressed to the launcher (handed to ``on_report``)."""
        marker = REPORT_MARKER.encode()
        if self.on_report is None or marker not in chunk:
            return chunk
        kept = []
        for line in chunk.splitlines(keepends=True):
            if marker not in line:
                kept.append(line)
                continue
            try:
                report = json.loads(line.split(marker, 1)[1].decode("utf-8", errors="replace"))
            except ValueError:
                continue
            if isinstance(report, dict):
                self.on_report(self.rank, report)
        return b"".join(kept)

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for this rank's output to be relayed to the end."""
        for thread in self.threads[:2]:
            thread.join(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        """Send ``sig`` to the rank: to its process group here, or by pidfile over ssh.

        A remote SIGKILL also ends the local ssh client, whose connection then
        drops, so the remote terminal hangs up even if the ssh command failed.
        """
        if not self.alive():
            return
        if self.spec.is_local:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            return
        if self.pidfile:
            name = signal.Signals(sig).name.removeprefix("SIG")
            self.helpers.append(subprocess.Popen(signal_argv(self.spec.host, self.pidfile, name),
                                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL, start_new_session=True))
        if sig == signal.SIGKILL:
            self.proc.kill()
        elif not self.pidfile:  # not started yet: dropping the connection ends it
            self.proc.terminate()

    def _send_secret(self) -> None:
        """A remote rank's first line of input: the job's secret; then the input held back meanwhile."""
        with self.stdin_lock:
            held, self.held = self.held, None
            if held is None:
                return
            try:
                self.proc.stdin.write(self.secret.encode() + b"\n")
                self.proc.stdin.flush()
            except (OSError, ValueError):
                return
        for data in held:
            self.write_stdin(data)

    def kill_if_stopped(self) -> bool:
        """SIGKILL the rank at once if it is stopped (SIGSTOP, a debugger): it cannot act on SIGTERM.

        Checked with ``ps`` here, over ssh by its pidfile on another host (the
        kill then happens there, without waiting). Returns whether a local rank was killed.
        """
        if not self.alive():
            return False
        if self.spec.is_local:
            if process_stopped(self.proc.pid):
                self.send(signal.SIGKILL)
                return True
            return False
        if self.pidfile:
            self.helpers.append(subprocess.Popen(kill_if_stopped_argv(self.spec.host, self.pidfile),
                                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL, start_new_session=True))
        return False

    def write_stdin(self, data: bytes | None) -> None:
        """Pass input on (``None``: end of input, which closes a local rank's stdin).

        A remote rank's stdin stays open: its ssh client would pass the end of
        input to the remote terminal.
        """
        with self.stdin_lock:
            if self.held is not None:  # the secret goes first
                self.held.append(data)
                return
        try:
            if data is None:
                if self.spec.is_local:
                    self.proc.stdin.close()
                return
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def finish(self, timeout: float) -> None:
        """After the rank ended: reap the ssh helpers and remove the pidfile (MLX leaves it behind).

        A helper still running after ``timeout`` (its host is unreachable: ssh waits
        for its connect timeout) is left to a background thread, so an unreachable
        host does not hold up the job's end or its restart.
        """
        for helper in self.helpers:
            try:
                helper.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                threading.Thread(target=_reap, args=(helper,), daemon=True, name="reap-ssh").start()
        if not self.pidfile:
            return
        if self.spec.is_local:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass
        else:
            self.helpers = [subprocess.Popen(remove_argv(self.spec.host, self.pidfile), stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             start_new_session=True)]
        self.pidfile = None


def _reap(helper: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait for an ssh helper (ssh gives up by its own connect timeout), then kill it if it still runs."""
    try:
        helper.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.wait()


def forward_stdin(ranks: list[Rank]) -> None:
    """Copy this process's stdin to every rank, only when there is input; run in a daemon thread.

    A terminal is watched with a one-second ``select`` and read only while this
    process is in the terminal's foreground (reading it from the background
    would stop the launcher with SIGTTIN). A pipe or file is read with blocking
    reads until its end. The terminal's modes and blocking flag are untouched.
    """
    try:
        fd = sys.stdin.fileno()
        tty = os.isatty(fd)
    except (AttributeError, OSError, ValueError):
        return
    while True:
        if tty:
            ready, _, _ = select.select([fd], [], [], 1.0)
            try:
                if not ready or os.tcgetpgrp(fd) != os.getpgrp():
                    continue
            except OSError:
                return
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        for rank in ranks:
            rank.write_stdin(data or None)
        if not data:
            return
