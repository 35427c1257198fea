"""Elastic restarts: a job that outlives a killed, stopped or unreachable rank and stays exact.

The pieces first (who computes which rows when ranks are missing, which checkpoint a
restart takes, what the launcher restarts), then real jobs under
``mlx-dp launch --restarts``: a rank killed, a rank stopped, failures beyond the budget,
a Ctrl-C during the backoff, and ranks standing in for missing ones against the full job.
The emulated two-host cluster over ssh (a host's link pulled for good, then plugged back
in) is in tests/test_launch_ssh.py.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import (MLX_DP, ROOT, TINY_DATA, fake_split, mlx_dp_command, read_metrics, read_status, read_weights,
                      run, start_ranks, tiny_recipe, trainer_pids, wait_for_step, worker_result)
from trainer.cluster import elastic
from trainer.data.batches import BatchStream
from trainer.data.membership import Membership
from trainer.errors import DistributedError
from trainer.run.pick import LaunchCheckpoints, restart_resume

# ---------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("nominal, present", [(2, (0,)), (3, (0, 2)), (4, (3, 1)), (5, (0, 1, 2)), (3, (0, 1, 2))])
def test_every_nominal_rank_is_computed_by_exactly_one_running_rank(nominal, present):
    hosted = [Membership.of(r, len(present), nominal, present).hosted for r in range(len(present))]
    assert sorted(v for h in hosted for v in h) == list(range(nominal))
    assert [h[0] for h in hosted] == list(present), "a running rank keeps its own rows"
    assert max(map(len, hosted)) - min(map(len, hosted)) <= 1, "the missing ones are shared out in turn"


def test_a_launcher_description_that_does_not_add_up_is_refused():
    for size, nominal, present in ((2, 1, ()), (2, 3, (0, 0)), (1, 2, (2,)), (2, 3, (0,))):
        with pytest.raises(DistributedError, match="does not add up"):
            Membership.of(0, size, nominal, present)


def test_a_stream_standing_in_for_two_ranks_serves_both_ranks_rows():
    split = fake_split(97)
    alone = BatchStream(split, 3, 0, 2, seed=5, pad_multiple=8, hosted=(0, 1))
    ranks = [BatchStream(split, 3, r, 2, seed=5, pad_multiple=8) for r in (0, 1)]
    for stream in (alone, *ranks):
        stream.set_split([2, 4])  # an uneven split (parallel.balance) is dealt the same way
    for _ in range(40):  # across an epoch boundary
        group = alone.take(2)
        expected = [next(ranks[0]), next(ranks[1]), next(ranks[0]), next(ranks[1])]
        for got, want in zip(group, expected):
            assert np.array_equal(got.indices, want.indices) and np.array_equal(got.inputs, want.inputs)
            assert got.global_tokens == want.global_tokens
    assert alone.position() == ranks[0].position()


def test_a_restart_resumes_only_checkpoints_of_its_own_launch(tmp_path):
    root = tmp_path / "checkpoints"
    for step, job in ((2, "older"), (4, "ours"), (6, "older")):
        (root / f"step_{step:07d}").mkdir(parents=True)
        (root / f"step_{step:07d}" / "state.json").write_text(json.dumps({"job": job}))
    assert restart_resume(tmp_path, "ours", None) == LaunchCheckpoints("ours")
    assert restart_resume(tmp_path, "other", True) is True, "before a checkpoint of its own: as first asked"
    assert restart_resume(tmp_path, "other", None) is None


def _supervisor(failure, reports=None):
    return SimpleNamespace(failure=failure, reports=reports or {})


def test_what_the_launcher_restarts_and_whom_it_blames():
    hosts = [SimpleNamespace(ssh_hostname=name) for name in ("127.0.0.1", "mac2", "mac3")]
    present = [0, 2]  # mac2 was left out: rank 1 of this attempt is mac3
    killed = elastic._failure(_supervisor((1, -9), {0: {"cause": "lost rank 1", "blamed": [1]}}), present, hosts)
    assert killed.final == "" and killed.blamed == [2] and "rank 1 (mac3) was killed by SIGKILL" in killed.cause
    assert "lost rank 1" not in killed.cause, "a killed rank has no words; the others only echo its end"
    hung = elastic._failure(_supervisor((0, 4), {0: {"cause": "watchdog: ...", "blamed": [1]}}), present, hosts)
    assert hung.blamed == [2] and "rank 0 (this machine) exited with status 4: watchdog" in hung.cause
    never = elastic._failure(_supervisor((0, 3), {0: {"cause": "never connected", "blamed": [1],
                                                      "connecting": True}}), present, hosts)
    assert never.connecting and never.blamed == [2]
    assert elastic._failure(_supervisor((1, 2)), present, hosts).final.endswith("(exit status 2)")
    for stopped in (143, 130, 129, -15):
        assert "signal of its own" in elastic._failure(_supervisor((1, stopped)), present, hosts).final
    disagree = _supervisor((0, 3), {0: {"cause": "ranks disagree before training: ...", "final": True}})
    assert "a restart would repeat" in elastic._failure(disagree, present, hosts).final
    chosen, left = elastic._choose(hosts, 2, {2}, {0: "", 1: "ssh failed (timed out)", 2: ""})
    assert chosen == [0] and left == {1: "ssh failed (timed out)", 2: "its rank never connected at the last start"}
    assert elastic._choose(hosts, None, {2}, {}) == ([0, 1, 2], {}), "without --min-ranks every host, always"
    assert elastic.probe(hosts[0]) == "", "this machine is always there"


def test_peer_silence_is_short_only_when_a_restart_follows(monkeypatch):
    from trainer.config.load import load_config
    from trainer.run.guard import _peer_silence_s
    from trainer.tools.recipes import find_recipe

    recipe = str(find_recipe("tiny-lora"))
    monkeypatch.delenv("MLX_DP_RESTARTS", raising=False)
    assert _peer_silence_s(load_config(recipe, ["parallel.timeout_s=300"])) == 300  # a peer may come back
    assert _peer_silence_s(load_config(recipe, ["parallel.peer_silence_s=7"])) == 7
    monkeypatch.setenv("MLX_DP_RESTARTS", "3")
    assert _peer_silence_s(load_config(recipe, ["parallel.timeout_s=300"])) == 15  # a restart follows
    assert _peer_silence_s(load_config(recipe, ["parallel.timeout_s=8"])) == 8


def test_a_restart_takes_over_the_lock_of_an_earlier_attempt_of_its_own_launch(tmp_path, monkeypatch):
    """A remote rank 0 of attempt 0 may still look alive (a sleeping host's lock, a process not yet reaped
    over ssh): attempt 1 of the same launch takes its lock over; another launch still may not."""
    import socket

    from trainer.cluster import runlock
    from trainer.errors import CheckpointError

    def held(job: str, attempt: int):
        (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                       "run_id": "earlier", "job": job, "attempt": attempt}))

    monkeypatch.setenv("MLX_DP_JOB_ID", "job-a")
    monkeypatch.setenv("MLX_DP_ATTEMPT", "1")
    held("job-a", 0)
    lock, note = runlock.acquire(tmp_path)
    assert "took over the lock of a run that is gone" in note and runlock.read_holder(tmp_path).attempt == 1
    lock.release()
    for job, attempt in (("job-b", 0), ("job-a", 1)):  # another launch, or this very attempt: alive
        held(job, attempt)
        with pytest.raises(CheckpointError, match="is in use by another run"):
            runlock.acquire(tmp_path)


@pytest.mark.e2e
def test_bad_restart_arguments_are_one_line():
    for args, expected in ((["--restarts", "-1"], "--restarts must be 0 or more"),
                           (["--min-ranks", "3", "-n", "2"], "--min-ranks 3 is more than the 2 rank(s)"),
                           (["--min-ranks", "0"], "not a positive whole number"),
                           (["--probe-timeout", "0"], "--probe-timeout must be positive")):
        result = run([MLX_DP, "launch", *args, "--", "true"], timeout=60)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- real jobs


def _recipe(tmp_path, name="recipe.yaml", **sections):
    merged = {"training": {"steps": 30, "batch_size": 2}, "checkpoint": {"every": 10, "keep_last": 10},
              "parallel": {"timeout_s": 60, "peer_silence_s": 4}, "logging": {"every": 1}}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return tiny_recipe(tmp_path, name, **merged)


# Rank 1 holds update 13 for 1.5 s, on every attempt: a test that acts on the job after update 10 (of 30) does so
# before update 20 however fast an update is. The pause changes no number.
HOLD_UPDATE_13 = "stall:rank=1:step=13:seconds=1.5"


def _start(args: list[str], recipe, faults: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([MLX_DP, "launch", "--grace", "5", *args, "--", *mlx_dp_command(faults), "train",
                             str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)


def _finish(proc, timeout=300):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()


def _uninterrupted(tmp_path, n=2, **sections):
    """Adapters of the same recipe run without faults (the reference)."""
    recipe = _recipe(tmp_path / "reference", **sections)
    result = run([MLX_DP, "launch", "-n", str(n), "--", MLX_DP, "train", str(recipe)], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return read_weights(tmp_path / "reference" / "run")


def _assert_same(weights, reference, rounding: bool = False):
    """Bit for bit, or (``rounding``) within 1e-5 of the largest weight: float rounding, as tests/test_equivalence.py."""
    assert weights.keys() == reference.keys()
    scale = max(float(np.abs(v).max()) for v in reference.values())
    for key in reference:
        np.testing.assert_allclose(weights[key], reference[key], rtol=0, atol=1e-5 * scale if rounding else 0,
                                   err_msg=key)


@pytest.mark.e2e
def test_a_killed_rank_is_restarted_and_the_training_is_exactly_the_uninterrupted_one(tmp_path):
    recipe = _recipe(tmp_path)
    proc = _start(["-n", "2", "--restarts", "2"], recipe, faults=HOLD_UPDATE_13)  # killed between checkpoints 10, 20
    wait_for_step(tmp_path / "run", 12, [proc], timeout=240)
    os.kill(trainer_pids(proc.pid)[1], signal.SIGKILL)
    out, err = _finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "mlx-dp launch: restart 1 of 2 in 1 s, from this launch's newest checkpoint, after: rank 1 (this " \
           "machine) was killed by SIGKILL" in err
    status = read_status(tmp_path / "run")
    assert status["state"] == "completed" and status["step"] == 30
    assert [r["attempt"] for r in status["restarts"]] == [1] and "SIGKILL" in status["restarts"][0]["cause"]
    restarted = [r for r in read_metrics(tmp_path / "run") if r.get("event") == "restarted"]
    assert len(restarted) == 1 and restarted[0]["step"] == 10 and restarted[0]["ranks"] == 2
    assert "[mlx-dp] restart 1 of 2 after: rank 1 (this machine) was killed by SIGKILL" in out
    _assert_same(read_weights(tmp_path / "run"), _uninterrupted(tmp_path))


@pytest.mark.e2e
def test_a_stopped_rank_is_ended_by_the_watchdog_and_the_job_restarts(tmp_path):
    recipe = _recipe(tmp_path)
    proc = _start(["-n", "2", "--restarts", "1"], recipe, faults=HOLD_UPDATE_13)  # cannot finish before the SIGSTOP
    wait_for_step(tmp_path / "run", 10, [proc], timeout=240)
    stopped_at = time.monotonic()
    os.kill(trainer_pids(proc.pid)[1], signal.SIGSTOP)
    out, err = _finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "heartbeats stopped over parallel.peer_silence_s=4" in err
    # killed at once, not after the grace: as the rank rank 0 blamed, or as a stopped rank (whichever the
    # launcher sees first: rank 0's report, or its exit)
    assert "is the one rank 0 lost or waited for; killing it" in err or "is stopped and cannot stop cleanly" in err
    restart = read_status(tmp_path / "run")["restarts"][0]
    assert restart["cause"].startswith("rank 0 (this machine) exited with status 4: watchdog")
    assert re.search(r"rank 1 \(\S+\) has not been heard from", restart["cause"]), restart
    assert read_status(tmp_path / "run")["state"] == "completed"
    assert time.monotonic() - stopped_at < 120


@pytest.mark.e2e
def test_more_failures_than_allowed_end_with_one_message_and_the_last_cause(tmp_path):
    recipe = _recipe(tmp_path, training={"steps": 30, "batch_size": 2}, checkpoint={"every": 4})
    proc = _start(["-n", "2", "--restarts", "1"], recipe, faults="kill:rank=1:step=6")  # on every attempt
    out, err = _finish(proc)
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert err.count("mlx-dp launch: restart 1 of 1") == 1
    assert "mlx-dp launch: giving up after 1 restart(s); the last failure: rank 1 (this machine) was killed by " \
           "SIGKILL" in err
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and "lost rank 1" in status["reason"], status
    assert len(status["restarts"]) == 1


@pytest.mark.e2e
def test_an_error_a_restart_would_repeat_is_not_restarted(tmp_path):
    recipe = _recipe(tmp_path, data={"path": str(tmp_path / "missing")})
    proc = _start(["-n", "2", "--restarts", "3"], recipe)
    out, err = _finish(proc)
    assert proc.returncode == 2
    assert "not restarting: rank" in err and "error is one a restart would repeat" in err
    assert "restart 1 of" not in err


@pytest.mark.e2e
def test_ctrl_c_during_the_backoff_stops_everything(tmp_path):
    recipe = _recipe(tmp_path)
    proc = _start(["-n", "2", "--restarts", "3"], recipe, faults="kill:rank=1:step=3")
    lines, seen = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "restart 1 of 3 in" in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    assert seen.wait(240), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    proc.wait(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - start < 10
    time.sleep(0.5)
    assert "SIGINT: not restarting" in "".join(lines)
    assert not [r for r in read_metrics(tmp_path / "run") if r.get("event") == "restarted"]


@pytest.mark.e2e
@pytest.mark.untimed  # compares weights; no watchdog or restart is timed
def test_ranks_standing_in_for_missing_ones_train_what_the_full_job_trains(tmp_path):
    """1 rank for 2, and 2 ranks for 3, with dropout, accumulation and an uneven split, against the full job."""
    # SGD, as tests/test_equivalence.py: Adam can flip the sign of an element whose gradient is about zero.
    sections = {"method": {"type": "lora", "rank": 4, "scale": 4.0, "dropout": 0.1},
                "training": {"steps": 6, "batch_size": 2, "grad_accumulation": 2, "optimizer": "sgd",
                             "momentum": 0.9, "learning_rate": 0.05},
                "eval": {"every": 3, "at_start": True, "max_batches": 2}}  # a subset of the validation rows: the same one
    two = _uninterrupted(tmp_path, n=2, parallel={"balance": [1.0, 2.0]}, **sections)
    alone = _recipe(tmp_path / "alone", parallel={"balance": [1.0, 2.0]}, **sections)
    result = run([MLX_DP, "train", str(alone)], env={"MLX_DP_NOMINAL_RANKS": "2", "MLX_DP_PRESENT": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 of 2 ranks running" in result.stdout and "global batch = 2 x 2 x 2 = 8" in result.stdout
    # To float rounding: one process adds the micro-batches in another order than two ranks do. Drawing
    # dropout masks other than each rank's own would move the weights far more.
    _assert_same(read_weights(tmp_path / "alone" / "run"), two, rounding=True)
    assert _val_losses(tmp_path / "alone" / "run") == pytest.approx(_val_losses(tmp_path / "reference" / "run"),
                                                                    rel=1e-5), "validation scores the same rows"

    three = _uninterrupted(tmp_path / "three", n=3, **sections)
    pair = _recipe(tmp_path / "pair", **sections)
    result = run([MLX_DP, "launch", "-n", "2", "--env", "MLX_DP_NOMINAL_RANKS=3", "--env", "MLX_DP_PRESENT=0,2",
                  "--", MLX_DP, "train", str(pair)], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_same(read_weights(tmp_path / "pair" / "run"), three, rounding=True)
    assert _val_losses(tmp_path / "pair" / "run") == pytest.approx(
        _val_losses(tmp_path / "three" / "reference" / "run"), rel=1e-5)


def _val_losses(run_dir) -> list:
    losses = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
    assert len(losses) == 3, losses  # at the start, at update 3 and at the end
    return losses


@pytest.mark.e2e
def test_a_time_based_cadence_saves_on_every_rank_together(tmp_path):
    # 200 updates take about 4 s on OpenBLAS here (20 ms each), so saves 0.3 s apart are a dozen or so
    recipe = _recipe(tmp_path, training={"steps": 200, "batch_size": 2},
                     checkpoint={"every": 0, "every_minutes": 0.005, "keep_last": 1000})
    result = run([MLX_DP, "launch", "-n", "2", "--", MLX_DP, "train", str(recipe)], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved[-1] == 200 and len(saved) >= 3, f"0.3 s apart over a run of several seconds: {saved}"
    rows = [r for r in read_metrics(tmp_path / "run") if "train_loss" in r]
    assert len({r["step"] for r in rows}) == 200


@pytest.mark.e2e
@pytest.mark.untimed  # compares weights; no watchdog or restart is timed
def test_ranks_with_disks_of_their_own_resume_from_rank_0s_checkpoint(tmp_path):
    """A desk cluster without a shared folder: each rank's ``~`` is its own (HOME), and only rank 0's holds
    checkpoints. Rank 0 picks, sends its copy to rank 1, and the resumed run is the uninterrupted one."""
    reference = _uninterrupted(tmp_path, training={"steps": 12}, method={"dropout": 0.1})
    recipe = _recipe(tmp_path / "own-disks", training={"steps": 12}, method={"dropout": 0.1},
                     checkpoint={"dir": "~/run", "every": 4})
    homes = [tmp_path / "mac1", tmp_path / "mac2"]
    for home in homes:
        home.mkdir()
    env = [{"HOME": str(home)} for home in homes]
    procs = start_ranks(tmp_path, [["train", str(recipe)]] * 2, faults="stop:step=6", env_per_rank=env)
    assert [p.wait(timeout=240) for p in procs] != [0, 0]
    assert (homes[0] / "run" / "checkpoints" / "step_0000006").is_dir()
    assert not (homes[1] / "run" / "checkpoints").exists()  # rank 1 never writes checkpoints
    procs = start_ranks(tmp_path, [["train", str(recipe), "--resume"]] * 2, env_per_rank=env)
    assert [p.wait(timeout=240) for p in procs] == [0, 0], (tmp_path / "rank1.log").read_text()[-2000:]
    log = (tmp_path / "rank0.log").read_text()
    assert "rank(s) 1 do not hold checkpoint step_0000006: sending them rank 0's copy" in log
    assert "resumed from" in log and "step_0000006 at update 6" in log
    _assert_same(read_weights(homes[0] / "run"), reference)


@pytest.mark.e2e
@pytest.mark.untimed  # compares bytes; nothing is timed
def test_broadcast_bytes_delivers_rank_0s_bytes_to_every_rank_in_chunks():
    assert worker_result(3, "broadcast_check.py", timeout=120) == {"sizes": [0, 1, 4321, 10_000], "ranks": 3}


@pytest.mark.e2e
def test_a_crash_at_start_up_under_many_restarts_ends_within_a_minute_with_a_true_status(tmp_path):
    """The same failure twice with no checkpoint in between ends the launch: --restarts 50 does not run for hours."""
    recipe = _recipe(tmp_path)
    start = time.monotonic()
    proc = _start(["-n", "2", "--restarts", "50"], recipe, faults="raise:rank=1:step=1")  # on every attempt
    out, err = _finish(proc, timeout=120)
    assert time.monotonic() - start < 60, err[-2000:]
    assert proc.returncode == 1, err[-3000:]
    assert err.count("mlx-dp launch: restart 1 of 50") == 1 and "restart 2 of 50" not in err
    assert "not restarting: the same failure twice with no checkpoint saved in between" in err
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed", status
    assert "stopped restarting" in status["reason"] and "injected crash at update 1" in status["reason"], status
    shown = run([MLX_DP, "status", str(tmp_path / "run")])
    assert shown.returncode == 1 and "failed" in shown.stdout


def _until_backoff(proc, lines: list) -> threading.Event:
    seen = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "restart 1 of 3 in" in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    return seen


@pytest.mark.e2e
def test_status_says_restarting_in_a_backoff_and_stopped_after_a_signal_there(tmp_path):
    recipe = _recipe(tmp_path, training={"steps": 30, "batch_size": 2}, checkpoint={"every": 2})
    proc = _start(["-n", "2", "--restarts", "3"], recipe, faults="kill:rank=1:step=3")
    lines = []
    assert _until_backoff(proc, lines).wait(240), "".join(lines)[-3000:]
    during = read_status(tmp_path / "run")
    assert during["state"] == "restarting" and during["pid"] == proc.pid, during
    assert "restart 1 of 3" in during["reason"] and "SIGKILL" in during["reason"]
    shown = run([MLX_DP, "status", str(tmp_path / "run")])
    assert shown.returncode == 3 and "restarting" in shown.stdout
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    after = read_status(tmp_path / "run")
    assert after["state"] == "stopped" and "SIGTERM while mlx-dp launch was between attempts" in after["reason"]


@pytest.mark.e2e
def test_a_launcher_killed_in_a_backoff_reads_as_lost(tmp_path):
    recipe = _recipe(tmp_path, training={"steps": 30, "batch_size": 2}, checkpoint={"every": 2})
    proc = _start(["-n", "2", "--restarts", "3"], recipe, faults="kill:rank=1:step=3")
    lines = []
    assert _until_backoff(proc, lines).wait(240), "".join(lines)[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    shown = run([MLX_DP, "status", str(tmp_path / "run")])
    assert shown.returncode == 1 and "lost" in shown.stdout and "says restarting" in shown.stdout, shown.stdout


@pytest.mark.e2e
def test_a_restart_that_ends_on_a_data_error_records_that_error(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(TINY_DATA, data)
    recipe = _recipe(tmp_path, data={"path": str(data)}, training={"steps": 30, "batch_size": 2},
                     checkpoint={"every": 2})
    proc = _start(["-n", "2", "--restarts", "3"], recipe, faults="kill:rank=1:step=3")
    lines = []
    assert _until_backoff(proc, lines).wait(240), "".join(lines)[-3000:]
    (data / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')  # broken in the backoff
    proc.wait(timeout=240)
    assert proc.returncode == 2, "".join(lines)[-3000:]
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and "train.jsonl line 2" in status["reason"], status
