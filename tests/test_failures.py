"""No silent hangs, nothing lost: dead, stopped and stalled peers, signals, NaNs, bad saves.

Ranks are real processes on loopback, started by hand (no launcher) unless the
test is about mlx.launch.
"""

import json
import signal
import subprocess
import time

import pytest

from conftest import read_status, BIN, MLX_DP, launched, mlx_dp, one_error_line, start_ranks, tiny_recipe, wait_for_step
from trainer.state.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.e2e  # every test here starts real processes

# A 10 s watchdog: these tests run beside another deadline test (tests/conftest.py), and three at a time
# one peer lagged its first update by 7 s; the watchdog fires on what is named, not on a neighbour's load.
LONG = {"training": {"batch_size": 2, "steps": 100000, "learning_rate": 1e-3},
        "checkpoint": {"every": 5}, "parallel": {"timeout_s": 10.0}}


def long_recipe(tmp_path, **extra):
    sections = {k: dict(v) for k, v in LONG.items()}
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return str(tiny_recipe(tmp_path, **sections))


def finish(procs, timeout=60):
    """Wait for every process; return exit codes (killing stragglers)."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def assert_checkpoint_intact(tmp_path):
    found = list_checkpoints(tmp_path / "run")
    assert found, "no checkpoint survived"
    ckpt = load_checkpoint(found[-1])
    assert ckpt.weights and ckpt.state.step >= 5


def test_killed_peer_without_launcher(tmp_path):
    recipe = long_recipe(tmp_path)
    procs = start_ranks(tmp_path, [["train", recipe]] * 2)
    wait_for_step(tmp_path / "run", 7, procs)
    start = time.monotonic()
    procs[1].kill()
    code = procs[0].wait(timeout=60)
    assert time.monotonic() - start < 60
    finish(procs)
    assert code == 3
    log = (tmp_path / "rank0.log").read_text()
    assert "mlx-dp: error: lost rank 1" in log and "Traceback" not in log
    assert read_status(tmp_path / "run")["state"] == "failed" and "lost rank 1" in read_status(tmp_path / "run")["reason"]
    assert_checkpoint_intact(tmp_path)


def test_killed_peer_under_mlx_launch(tmp_path):
    recipe = long_recipe(tmp_path)
    proc = subprocess.Popen([str(BIN / "mlx.launch"), "-n", "2", "--", MLX_DP, "train", recipe],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (tmp_path / "run" / "checkpoints" / "step_0000005").exists():
        time.sleep(0.2)
    found = subprocess.run(["pgrep", "-f", recipe], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    victim = None  # rank 1 among the trainer processes, told apart by its environment
    for pid in pids:
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"MLX_RANK=1" in env and b"mlx-dp" in open(f"/proc/{pid}/cmdline", "rb").read():
            victim = pid
    assert victim, "rank 1 not found"
    start = time.monotonic()
    subprocess.run(["kill", "-9", str(victim)])
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - start < 60
    # mlx.launch itself exits 0 here (measured with mlx 0.32.4); the trainer makes the failure visible
    assert "Traceback" not in out
    if "lost rank 1" in out:
        assert read_status(tmp_path / "run")["state"] == "failed"
    else:
        # mlx.launch races the trainer: it SIGTERMs the surviving rank when it sees rank 1 die, and
        # that may land before rank 0's next collective notices the loss. The status must then say
        # the run ended (stopped by that signal, or failed), never "running".
        assert "Node with rank 0 exited with code" in out
        assert read_status(tmp_path / "run")["state"] in ("failed", "stopped")
    assert_checkpoint_intact(tmp_path)


def test_stopped_peer_is_named_by_the_watchdog_and_cannot_rewrite_the_status_when_it_wakes(tmp_path):
    procs = start_ranks(tmp_path, [["train", long_recipe(tmp_path)]] * 2)
    wait_for_step(tmp_path / "run", 6, procs)
    procs[1].send_signal(signal.SIGSTOP)
    try:
        code = procs[0].wait(timeout=60)
        recorded = read_status(tmp_path / "run")
    finally:
        procs[1].send_signal(signal.SIGCONT)  # the laptop wakes up: rank 1 finds rank 0 gone
    late = finish(procs[1:])
    assert code == 4 and late[0] != 0
    log = (tmp_path / "rank0.log").read_text()
    assert "watchdog: rank 0" in log and "rank 1 (" in log and "has not been heard from" in log
    assert recorded["state"] == "failed" and recorded["rank"] == 0 and "rank 1 (" in recorded["reason"]
    assert read_status(tmp_path / "run") == recorded, "the rank that woke up must not overwrite the record and blame rank 0"
    assert "not recording 'failed'" in (tmp_path / "rank1.log").read_text()


def test_stall_inside_a_step_trips_the_watchdog_naming_that_rank(tmp_path):
    procs = start_ranks(tmp_path, [["train", long_recipe(tmp_path)]] * 2,
                        faults="stall:rank=1:step=4:seconds=120")
    codes = finish(procs, timeout=90)
    assert 4 in codes, codes  # a watchdog ended the job
    logs = (tmp_path / "rank0.log").read_text() + (tmp_path / "rank1.log").read_text()
    assert "rank 1 (" in logs and "still in compute at update 4 while the others wait" in logs


def test_sigterm_and_sighup_save_stop_cleanly_and_resume(tmp_path):
    recipe = long_recipe(tmp_path, training={"steps": 400})
    procs = start_ranks(tmp_path, [["train", recipe]] * 2)
    wait_for_step(tmp_path / "run", 3, procs)
    procs[0].send_signal(signal.SIGHUP)  # a closed terminal stops like SIGTERM: checkpoint first
    procs[1].send_signal(signal.SIGTERM)
    assert finish(procs) == [128 + signal.SIGHUP, 128 + signal.SIGTERM]  # not 0: stopped is not completed
    state = read_status(tmp_path / "run")
    assert state["state"] == "stopped" and state["reason"].startswith("SIGHUP: stopped after saving update")
    stopped_at = state["step"]
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped_at:07d}").is_dir()
    more = launched(2, "train", recipe, "training.steps=" + str(stopped_at + 2), "--resume")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "resumed from" in more.stdout
    final = read_status(tmp_path / "run")
    assert final["state"] == "completed" and final["step"] == stopped_at + 2


def test_config_mismatch_between_ranks_is_refused_before_training(tmp_path):
    recipe = long_recipe(tmp_path, training={"steps": 3})
    procs = start_ranks(tmp_path, [["train", recipe], ["train", recipe, "training.learning_rate=0.5"]])
    codes = finish(procs)
    assert codes == [3, 3]
    log = (tmp_path / "rank0.log").read_text()
    assert "ranks disagree before training: recipe differs from rank 0" in log and "rank 1 (" in log
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "train_loss" not in (
        tmp_path / "run" / "metrics.jsonl").read_text()


def test_crash_while_saving_leaves_the_previous_checkpoint(tmp_path):
    recipe = long_recipe(tmp_path, training={"steps": 12})
    result = mlx_dp("train", recipe, "training.batch_size=4", faults="crash_in_save:step=10")
    assert result.returncode != 0
    found = list_checkpoints(tmp_path / "run")
    assert [p.name for p in found] == ["step_0000005"]
    assert any(p.name.startswith(".tmp-step_0000010") for p in (tmp_path / "run" / "checkpoints").iterdir())
    resumed = mlx_dp("train", recipe, "training.batch_size=4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step_0000005" in resumed.stdout
    # the dead writer's partial directory is cleaned up at the next start, and said so
    assert "removed 1 temporary file(s) left by an earlier run that died: checkpoints/.tmp-step_0000010" \
        in resumed.stdout
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert read_status(tmp_path / "run")["state"] == "completed"


@pytest.mark.parametrize("skip", [True, False])
def test_nonfinite_loss_on_one_rank_is_one_decision_for_all(tmp_path, skip):
    recipe = long_recipe(tmp_path, training={"steps": 6, "skip_nonfinite": skip}, logging={"every": 1})
    result = launched(2, "train", recipe, faults="nan:rank=1:step=3")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train_loss" in m]
    if skip:
        assert result.returncode == 0, result.stderr[-2000:]
        assert [m.get("skipped_updates", 0) for m in train] == [0, 0, 1, 0, 0, 0]
    else:
        assert result.returncode == 2
        assert "non-finite loss or gradient norm in 1 update(s) up to update 3" in result.stderr
        assert result.stderr.count("mlx-dp: error:") == 2, "both ranks stop, at the same update"
        assert read_status(tmp_path / "run")["state"] == "failed"


def test_unwritable_checkpoint_dir_is_found_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = mlx_dp("train", long_recipe(tmp_path), f"checkpoint.dir={blocker}/run")
    assert result.returncode == 2
    assert f"checkpoint.dir {blocker}/run is not writable" in one_error_line(result)
