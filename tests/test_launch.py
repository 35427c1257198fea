"""`mlx-dp launch`: mlx.launch's command line, a relay that does not spin, failures and signals handled.

Every test starts the real launcher as a process, with real ranks (small
Python scripts, or the trainer on the tiny model). The remote (ssh) path is in
tests/test_launch_ssh.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import LAB, MLX_DP, PYTHON, ROOT, launched, tiny_recipe, wait_for_step

STATUS_OF = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def launcher(*args: str, **kwargs) -> subprocess.Popen:
    """``mlx-dp launch ARGS`` as a process, with the terminal's default SIGINT (as from a shell prompt)."""
    return subprocess.Popen([MLX_DP, "launch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def rank_script(body: str) -> list[str]:
    """A Python rank; ``RANK`` is its rank. A marker in its argv lets a test find what is left of it."""
    return [PYTHON, "-u", "-c", f"import os, signal, sys, time\nRANK = int(os.environ['MLX_RANK'])\n{body}",
            MARKER]


MARKER = f"mlx-dp-launch-test-{os.getpid()}"


def leftovers(marker: str = MARKER) -> list[str]:
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "pgrep" not in line]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.e2e
def test_a_failing_rank_is_named_at_once_and_nothing_is_left_behind():
    body = ("if RANK == 1:\n    time.sleep(0.3)\n    print('rank 1: bad things', file=sys.stderr)\n    sys.exit(3)\n"
            "time.sleep(120)")
    start = time.monotonic()
    proc = launcher("-n", "3", "--", *rank_script(body))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert time.monotonic() - start < 20  # rank 0 never ends by itself: rank 1's failure ended the job
    lines = err.splitlines()
    assert "rank 1: bad things" in lines  # its own words reach the user, before the launcher's line
    assert lines.index("rank 1: bad things") < lines.index(
        "mlx-dp launch: rank 1 (this machine) exited with status 3; stopping the other ranks")
    assert "Traceback" not in err
    assert leftovers() == []


@pytest.mark.e2e
def test_a_rank_killed_by_sigkill_is_named():
    proc = launcher("-n", "2", "--", *rank_script("print(os.getpid(), flush=True)\ntime.sleep(120)"))
    pids = [int(proc.stdout.readline()) for _ in range(2)]
    victim = next(pid for pid in pids if b"MLX_RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL
    assert "rank 1 (this machine) was killed by SIGKILL; stopping the other ranks" in err
    assert leftovers() == []


@pytest.mark.e2e
def test_ranks_that_ignore_sigterm_are_killed_after_the_grace_period():
    body = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(120)"
    proc = launcher("-n", "2", "--grace", "1", "--", *rank_script(body))
    assert proc.stdout.readline() == "up\n" and proc.stdout.readline() == "up\n"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.monotonic() - start < 10
    assert "has not stopped; killing it" in err
    assert leftovers() == []


@pytest.mark.e2e
def test_timeout_stops_every_rank():
    proc = launcher("-n", "2", "--timeout", "1", "--grace", "5", "--", *rank_script("time.sleep(120)"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 124 and "--timeout 1 s" in err
    assert leftovers() == []


@pytest.mark.e2e
def test_environment_prefix_stdin_and_one_rank():
    body = "line = sys.stdin.readline().strip()\nprint(os.environ['MLX_DP_LAUNCHER'], line, sys.stdin.read() == '')"
    proc = subprocess.run([MLX_DP, "launch", "-n", "2", "--prefix-output", "--", *rank_script(body)],
                          input="hello\n", capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == ["[0] mlx-dp launch hello True", "[1] mlx-dp launch hello True"]
    # one rank: MLX passes a blank MLX_HOSTFILE, which the trainer's environment reader accepts
    check = ("from trainer.env import launch_env\nenv = launch_env()\n"
             "print(env.launcher, env.rank, env.hostfile_blank, env.launched)")
    one = subprocess.run([MLX_DP, "launch", "--", PYTHON, "-c", check], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert (one.returncode, one.stdout) == (0, "mlx-dp launch 0 True False\n"), one.stderr


@pytest.mark.e2e
def test_the_launcher_sleeps_while_ranks_run():
    # mlx.launch's relay busy-polls (about 1.4 cores on 2); this one blocks in read().
    body = "for i in range(6):\n    print('tick', i, flush=True)\n    time.sleep(0.5)"
    proc = launcher("-n", "2", "--", *rank_script(body), stdin=subprocess.DEVNULL)
    proc.stdout.readline()
    before, start = cpu_seconds(proc.pid), time.monotonic()
    time.sleep(2)
    used = (cpu_seconds(proc.pid) - before) / (time.monotonic() - start)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert used < 0.1, f"the launcher used {used:.0%} of a core while its ranks slept"


@pytest.mark.e2e
def test_bad_arguments_are_one_line():
    for args, expected in ((["-n", "2"], "give the command after --"),
                           (["--hostfile", "missing.json", "--", "true"], "missing.json does not exist"),
                           (["-n", "0", "--", "true"], "not a positive whole number"),
                           (["-n", "2", "--slow", "1=0.5", "--", "true"], "unrecognized arguments: --slow")):
        result = subprocess.run([MLX_DP, "launch", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_a_rank_that_cannot_be_started_is_one_line(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                              {"ssh": "mac2.invalid", "ips": ["10.9.9.9"]}]}))
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run([MLX_DP, "launch", "--hostfile", str(hostfile), "--", "true"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PATH": str(empty)}, stdin=subprocess.DEVNULL)
    assert result.returncode == 127 and "Traceback" not in result.stderr
    assert "mlx-dp launch: error: could not start the ranks:" in result.stderr and "'ssh'" in result.stderr


@pytest.mark.e2e
def test_an_mlx_without_the_reused_internals_falls_back_to_mlx_launch(tmp_path):
    # Hide one internal in the mlx-dp process only; mlx.launch itself still has it.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nif sys.argv[0].endswith('mlx-dp'):\n"
        "    import mlx._distributed_utils.launch as launch\n    del launch._launch_with_io\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([MLX_DP, "launch", "-n", "1", "--", "sh", "-c", "echo ran as $MLX_RANK"],
                            capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "lacks the launcher internals mlx-dp reuses (launch._launch_with_io); running stock mlx.launch" \
        in result.stderr
    assert "ran as 0" in result.stdout


# ---------------------------------------------------------------------------- the trainer under the launcher

LONG = {"training": {"batch_size": 2, "steps": 400}, "checkpoint": {"every": 1000},
        "parallel": {"timeout_s": 20.0}}


def _status(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "status.json").read_text())


def _train(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    recipe = str(tiny_recipe(tmp_path, **LONG))
    proc = launcher("-n", "2", "--", MLX_DP, "train", recipe, stdin=subprocess.DEVNULL)
    return proc, recipe


def _trainer_leftovers(recipe: str) -> list[str]:
    return leftovers(recipe)


@pytest.mark.e2e
def test_ctrl_c_makes_every_rank_checkpoint_and_stop_and_resume_continues(tmp_path):
    proc, recipe = _train(tmp_path)
    wait_for_step(tmp_path / "run", 3, [proc])
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Ctrl-C: every rank stops after its current update" in err and "Traceback" not in err
    state = _status(tmp_path)
    assert state["state"] == "stopped", state
    stopped_at = state["step"]
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped_at:07d}").is_dir()
    assert _trainer_leftovers(recipe) == []
    more = launched(2, "train", recipe, f"training.steps={stopped_at + 2}", "--resume")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "resumed from" in more.stdout
    assert _status(tmp_path)["state"] == "completed" and _status(tmp_path)["step"] == stopped_at + 2


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_to_the_launcher_leaves_no_orphans_and_a_true_status(tmp_path, sig):
    proc, recipe = _train(tmp_path)
    wait_for_step(tmp_path / "run", 3, [proc])
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == STATUS_OF[sig], err[-2000:]
    assert _trainer_leftovers(recipe) == []
    state = _status(tmp_path)
    assert state["state"] == "stopped", state
    assert (tmp_path / "run" / "checkpoints" / f"step_{state['step']:07d}").is_dir()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.e2e
@pytest.mark.alone  # a rank's share of a core
def test_the_labs_slow_caps_a_local_rank_at_its_share_of_a_core():
    from lab.cpulimit import check_permitted

    reason = check_permitted()
    if reason:
        pytest.skip(reason)
    # each rank spins for 3 s of wall time and reports the CPU it got; rank 1 may have a quarter core
    body = ("start, cpu = time.time(), time.process_time()\n"
            "while time.time() - start < 3: pass\n"
            "print(RANK, time.process_time() - cpu, flush=True)")
    proc = subprocess.Popen([*LAB, "launch", "--slow", "1=0.25", "-n", "2", "--", *rank_script(body)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    cpu = dict(line.split() for line in out.splitlines())
    assert float(cpu["1"]) < 0.25 * 3 * 1.25  # the quota (with a little slack for accounting)
    assert float(cpu["0"]) > 2 * float(cpu["1"])  # rank 0 is not capped
    assert not [g for g in Path("/sys/fs/cgroup/cpu").iterdir() if g.name.startswith(f"mlx-dp-{proc.pid}-")]


# ---------------------------------------------------------------------------- temporary files and --timeout


def private_tmp(tmp_path: Path) -> tuple[dict, Path, Path]:
    """An environment whose temporary folder is a fresh one (other jobs' files cannot show up in it),
    the folder, and where the launch folders of this user go in it."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**os.environ, "TMPDIR": str(tmp)}, tmp, tmp / f"mlx-dp-launch-{os.geteuid()}"


def files_under(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if not p.is_dir())


@pytest.mark.e2e
@pytest.mark.parametrize("args", [["--", "/nonexistent/command"], ["--restarts", "2", "--python", "/bin/false",
                                                                   "--", "true"]], ids=["plain", "restarts"])
def test_ranks_that_die_before_their_python_starts_leave_no_temporary_files(tmp_path, args):
    # MLX's script made a pidfile and a ring hostfile per rank with mktemp; no Python read and removed the hostfile.
    env, tmp, root = private_tmp(tmp_path)
    result = subprocess.run([MLX_DP, "launch", "-n", "2", *args], capture_output=True, text=True, timeout=120,
                            env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode in (1, 127), result.stderr
    assert files_under(tmp) == [], result.stderr
    assert list(root.iterdir()) == [], "the launch's folder is removed"


@pytest.mark.e2e
def test_each_attempt_removes_its_temporary_files_before_the_next(tmp_path):
    env, tmp, _ = private_tmp(tmp_path)
    # Each rank prints its hostfile and what is beside it; rank 0 fails the first attempt.
    body = ("folder = os.path.dirname(os.environ['MLX_HOSTFILE'])\n"
            "print('ATTEMPT', os.environ['MLX_DP_ATTEMPT'], os.path.basename(os.environ['MLX_HOSTFILE']), "
            "*sorted(os.listdir(folder)), flush=True)\n"
            "if os.environ['MLX_DP_ATTEMPT'] == '0':\n    time.sleep(1.0 if RANK == 0 else 120)\n    sys.exit(1)")
    result = subprocess.run([MLX_DP, "launch", "-n", "2", "--restarts", "1", "--grace", "5", "--",
                             *rank_script(body)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    hostfiles, beside = {"0": set(), "1": set()}, {"0": set(), "1": set()}
    for line in result.stdout.splitlines():
        _, attempt, hostfile, *names = line.split()
        hostfiles[attempt].add(hostfile)
        beside[attempt].update(names)
    assert len(hostfiles["0"]) == 2 and len(hostfiles["1"]) == 2, result.stdout
    assert hostfiles["1"] <= beside["1"]
    assert not hostfiles["0"] & beside["1"], "the first attempt's hostfiles were still there at the restart"
    assert files_under(tmp) == []


def _launch_folder(root: Path, pid: int) -> Path:
    found = list(root.glob(f"{pid}-*"))
    assert len(found) == 1, f"launcher {pid}'s folder in {root}: {found}"
    return found[0]


@pytest.mark.e2e
def test_a_killed_launchers_leftover_folder_is_swept_by_the_next_launch(tmp_path):
    env, tmp, root = private_tmp(tmp_path)
    body = "print('up', flush=True)\ntime.sleep(120)"
    killed = launcher("-n", "2", "--", *rank_script(body), env=env, stdin=subprocess.DEVNULL)
    live = launcher("-n", "2", "--", *rank_script(body), env=env, stdin=subprocess.DEVNULL)
    try:
        for proc in (killed, live):
            assert proc.stdout.readline() == "up\n" and proc.stdout.readline() == "up\n"
        left, kept = _launch_folder(root, killed.pid), _launch_folder(root, live.pid)
        assert files_under(tmp) == sorted(str(p) for p in (*left.iterdir(), *kept.iterdir()))  # nothing outside
        assert len(list(left.iterdir())) == 4  # 2 pidfiles, 2 hostfiles
        killed.kill()  # its ranks die with it (PR_SET_PDEATHSIG); nothing of it can clean up
        killed.communicate(timeout=30)
        assert left.is_dir() and len(list(left.iterdir())) == 4
        # a dead launcher's folder reached through a link is not followed; a live pid with another start time
        # (a reused pid) is a dead launcher's
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "keep").write_text("x")
        (root / "999999999-1-linked").symlink_to(elsewhere)
        (root / f"{os.getpid()}-1-reused").mkdir()
        nxt = subprocess.run([MLX_DP, "launch", "--", "true"], capture_output=True, text=True, timeout=60, env=env,
                             cwd=ROOT, stdin=subprocess.DEVNULL)
        assert nxt.returncode == 0, nxt.stderr
        assert not left.exists() and not (root / f"{os.getpid()}-1-reused").exists()
        assert len(list(kept.iterdir())) == 4, "a live launcher's folder is left alone"
        assert (elsewhere / "keep").exists()
    finally:
        for proc in (killed, live):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    _, err = live.communicate(timeout=60)
    assert live.returncode == 143, err
    assert not kept.exists()
    (root / "999999999-1-linked").unlink()
    assert files_under(tmp) == [] and list(root.iterdir()) == []
    assert leftovers() == []


@pytest.mark.e2e
def test_the_timeout_message_shows_the_value_given_under_restarts():
    # Each attempt runs for what is left of the job's --timeout; the message names the value the user gave.
    proc = launcher("-n", "2", "--restarts", "1", "--timeout", "2", "--grace", "5", "--",
                    *rank_script("time.sleep(120)"), stdin=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 124, err
    assert "ranks still running after --timeout 2 s; stopping them" in err
    assert leftovers() == []


def test_an_mlx_whose_script_makes_its_files_otherwise_is_not_reused(monkeypatch):
    import mlx._distributed_utils.launch as mlx_launch

    from trainer.cluster import mlx_launcher

    assert mlx_launcher.missing_internals() == []
    original = mlx_launch.RemoteProcess.make_launch_script

    def other(rank, python, cwd, files, env, command, is_local):
        script = original(rank, python, cwd, files, env, command, is_local)
        return script.replace("fname=$(mktemp)", "fname=$(mktemp -d)")

    monkeypatch.setattr(mlx_launch.RemoteProcess, "make_launch_script", staticmethod(other))
    assert mlx_launcher.missing_internals() == [
        "RemoteProcess.make_launch_script making its pidfile and files with a bare mktemp"]


@pytest.mark.e2e
def test_a_users_values_are_untouched_by_the_private_temporary_folder(tmp_path):
    from trainer.cluster.mlx_launcher import LOCAL_HOST, RankSpec

    spec = RankSpec(rank=0, host=LOCAL_HOST, python=None, cwd=None, files={"MLX_HOSTFILE": "[]"},
                    env=("X=$(mktemp); pidfile=$(mktemp); ",), command=("sh", "-c", 'echo "$X"; cat "$MLX_HOSTFILE"'),
                    temp_dir=str(tmp_path))
    out = subprocess.run(spec.argv(), capture_output=True, text=True, timeout=30).stdout.splitlines()
    pidfile, value, hostfile = out
    assert value == "$(mktemp); pidfile=$(mktemp); " and hostfile == "[]"
    assert Path(pidfile).parent == tmp_path and Path(pidfile).name.startswith("tmp.")
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("tmp.")]) == 2  # the pidfile and the hostfile



@pytest.mark.e2e
def test_a_planted_link_for_the_launch_folders_is_not_followed(tmp_path):
    env, tmp, root = private_tmp(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root.symlink_to(elsewhere)  # someone made the launch folders' place point where they choose
    result = subprocess.run([MLX_DP, "launch", "-n", "2", "--", "true"], capture_output=True, text=True, timeout=60,
                            env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert f"mlx-dp launch: {root} is not a folder of this user's; temporary files of the ranks go where " \
           "mlx.launch puts them" in result.stderr
    assert list(elsewhere.iterdir()) == []
