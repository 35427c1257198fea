"""Nothing in a run directory is lost or overwritten: one run at a time, a full disk, leftovers of dead writers."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import (launched, mlx_dp, mlx_dp_command, one_error_line, read_status, small_tmpfs, tiny_recipe,
                      wait_for_step)
from trainer.state.checkpoint import clean_stale_temporaries, process_alive

pytestmark = pytest.mark.e2e  # every test here starts real processes


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_run_into_the_same_directory_is_refused_and_writes_nothing(tmp_path):
    recipe = str(tiny_recipe(tmp_path, training={"steps": 100000, "batch_size": 2}, checkpoint={"every": 3}))
    first = subprocess.Popen([*mlx_dp_command(), "train", recipe], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "run"
    try:
        wait_for_step(run_dir, 2, [first])
        before = read_status(run_dir)
        second = launched(2, "train", recipe, "training.steps=2")
        assert second.returncode == 2
        assert "Traceback" not in second.stderr
        assert f"checkpoint.dir {run_dir} is in use by another run (host {socket.gethostname()}, pid {first.pid}, " \
               "since" in second.stderr
        assert "[rank 1] rank 0 could not lock" in second.stderr
        assert read_status(run_dir)["run_id"] == before["run_id"] and read_status(run_dir)["state"] == "running"
        assert all(json.loads(line).get("world_size", 1) == 1
                   for line in (run_dir / "metrics.jsonl").read_text().splitlines()), "metrics were interleaved"
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 128 + signal.SIGTERM
    assert read_status(run_dir)["state"] == "stopped" and not (run_dir / "run.lock").exists()
    # a lock left by a run that died is taken over, with a note
    (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                                  "run_id": "gone", "started": "earlier"}))
    again = mlx_dp("train", recipe, "training.steps=1", "checkpoint.dir=" + str(run_dir), "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "took over the lock of a run that is gone" in again.stdout


def test_leftover_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "checkpoints").mkdir()
        dead, names = dead_pid(), {}
        for label, pid in (("dead", dead), ("live", live.pid)):
            names[label] = [f"checkpoints/.tmp-step_0000010-{pid}", f".write-test-{pid}", f".status.json.tmp{pid}",
                            f".adapters.safetensors.tmp{pid}.safetensors"]
            (tmp_path / names[label][0]).mkdir()
            (tmp_path / names[label][0] / "adapters.safetensors").write_bytes(b"x" * 100)
            for name in names[label][1:]:
                (tmp_path / name).write_bytes(b"x")
        old = tmp_path / f".write-test-{live.pid}0"  # a live pid's number, but hours old: pids are reused
        old.write_bytes(b"x")
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        (tmp_path / "notes.tmp123").write_text("not ours")
        removed = clean_stale_temporaries(tmp_path)
        assert sorted(removed) == sorted(names["dead"] + [old.name])
        assert all((tmp_path / name).exists() for name in names["live"]) and (tmp_path / "notes.tmp123").exists()
    finally:
        live.kill()
        live.wait()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only); skipped where mounting is not permitted."""
    with small_tmpfs(tmp_path, "2m") as disk:
        yield disk


def test_a_full_disk_while_saving_is_one_line_and_a_failed_status(tmp_path, small_disk):
    # each save holds about 0.5 MB (weights, optimizer, the top-level copy): the fourth does not fit
    run_dir = small_disk / "run"
    recipe = str(tiny_recipe(tmp_path, training={"steps": 40, "batch_size": 2},
                             checkpoint={"dir": str(run_dir), "every": 1, "keep_last": 100}))
    result = mlx_dp("train", recipe)
    assert result.returncode == 2
    line = one_error_line(result)
    assert "no space left on the device holding" in line
    record = read_status(run_dir)
    assert record["state"] == "failed" and "no space left" in record["reason"]
    leftovers = [p.name for p in run_dir.rglob(".*") if "tmp" in p.name or "write-test" in p.name]
    assert leftovers == [], leftovers
    assert not (run_dir / "run.lock").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombies are told apart through /proc")
def test_a_process_that_ended_but_is_not_yet_reaped_is_not_alive():
    # a rank whose launcher was killed outright stays a zombie until something reaps it; it writes nothing
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert process_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never ended"
            time.sleep(0.01)
        assert not process_alive(child.pid), "ended, though its exit status is not collected yet"
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)
