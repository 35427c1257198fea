"""Forming the group, and signals: a rank that never connects is named with its address in time; a signal
while connecting, a double Ctrl-C and a closed terminal each leave a truthful status.

Ranks are real processes on loopback started by hand, so one of them can be
missing, broken or signalled.
"""

import pytest
import json
import signal
import subprocess
import time

from conftest import read_status, mlx_dp_command, start_ranks, tiny_recipe, wait_for_step

pytestmark = pytest.mark.e2e  # every test here starts real processes

TIMEOUT_S = 6.0


def recipe(tmp_path, **sections):
    return str(tiny_recipe(tmp_path, **{"parallel": {"timeout_s": TIMEOUT_S}, **sections}))


def test_a_rank_that_fails_at_start_is_heard_and_named_with_its_address_in_time(tmp_path):
    # a stale override on one machine: rank 1 stops before connecting, rank 0 must not wait forever
    start = time.monotonic()
    procs = start_ranks(tmp_path, [["train", recipe(tmp_path)], ["train", recipe(tmp_path), "training.batch_sise=2"]])
    codes = [p.wait(timeout=TIMEOUT_S + 60) for p in procs]
    assert time.monotonic() - start < TIMEOUT_S + 15
    assert codes == [3, 2]
    rank1 = json.loads((tmp_path / "hosts.json").read_text())[1][0]
    log0, log1 = (tmp_path / "rank0.log").read_text(), (tmp_path / "rank1.log").read_text()
    assert "Traceback" not in log0 + log1
    assert "mlx-dp: error: [rank 1]" in log1 and "unknown key training.batch_sise" in log1
    assert f"mlx-dp: error: rank 0 could not reach rank 1 at {rank1} within parallel.timeout_s=6: connection " \
           "refused" in log0
    record = read_status(tmp_path / "run")
    assert record["state"] == "failed" and record["rank"] == 0 and f"rank 1 at {rank1}" in record["reason"]


def test_a_missing_rank_among_three_is_named_by_both_neighbours(tmp_path):
    procs = start_ranks(tmp_path, [["train", recipe(tmp_path)]] * 3)
    procs[2].kill()  # never gets to connect
    start = time.monotonic()
    codes = [p.wait(timeout=TIMEOUT_S + 60) for p in procs]
    assert time.monotonic() - start < TIMEOUT_S + 15
    assert codes[:2] == [3, 3]
    rank2 = json.loads((tmp_path / "hosts.json").read_text())[2][0]
    assert f"rank 2 ({rank2}) never connected to rank 0" in (tmp_path / "rank0.log").read_text()
    assert f"rank 1 could not reach rank 2 at {rank2}" in (tmp_path / "rank1.log").read_text()
    assert read_status(tmp_path / "run")["state"] == "failed" and "rank 2" in read_status(tmp_path / "run")["reason"]


def test_a_signal_while_connecting_stops_at_once_with_a_status(tmp_path):
    procs = start_ranks(tmp_path, [["train", recipe(tmp_path, parallel={"timeout_s": 300})]] * 2)
    procs[1].kill()
    time.sleep(4)
    procs[0].send_signal(signal.SIGTERM)
    assert procs[0].wait(timeout=10) == 128 + signal.SIGTERM
    log = (tmp_path / "rank0.log").read_text()
    assert "mlx-dp: stopped: SIGTERM while the ranks connected; nothing was trained" in log
    record = read_status(tmp_path / "run")
    assert record["state"] == "stopped" and "nothing was trained" in record["reason"]


def test_a_quick_double_ctrl_c_leaves_a_truthful_status(tmp_path):
    run_recipe = recipe(tmp_path, training={"steps": 100000, "batch_size": 2}, checkpoint={"every": 1000})
    proc = subprocess.Popen([*mlx_dp_command(), "train", run_recipe], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "run", 2, [proc])
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    record = read_status(tmp_path / "run")
    if record["state"] == "stopped":
        # the first Ctrl-C's stop (one tiny update and its checkpoint) finished within the 50 ms before
        # the second arrived: then "stopped" is the truth, and its checkpoint must be there, complete
        from trainer.state.checkpoint import step_dir_name

        saved = tmp_path / "run" / "checkpoints" / step_dir_name(record["step"])
        assert (saved / "adapters.safetensors").is_file() and (saved / "adapter_config.json").is_file()
    else:
        assert record["state"] == "failed" and record["reason"].startswith("interrupted: a second Ctrl-C")


def test_closing_the_terminal_stops_with_a_checkpoint(tmp_path):
    # a real terminal: the run's controlling tty is a pty whose master we close, as a terminal window does
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))

    def own_terminal():
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    run_recipe = recipe(tmp_path, training={"steps": 100000, "batch_size": 2}, checkpoint={"every": 1000},
                        logging={"every": 1, "progress_bar": True})
    proc = subprocess.Popen([*mlx_dp_command(), "train", run_recipe], stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=own_terminal, pass_fds=(slave,))
    os.close(slave)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([master], [], [], 0.2)[0]:
            try:
                os.read(master, 65536)  # the terminal shows the output
            except OSError:
                break
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
    os.close(master)  # the window closes: SIGHUP, and the terminal is gone
    assert proc.wait(timeout=60) == 128 + signal.SIGHUP
    record = read_status(tmp_path / "run")
    assert record["state"] == "stopped" and record["reason"].startswith("SIGHUP: stopped after saving update")
    assert (tmp_path / "run" / "checkpoints" / f"step_{record['step']:07d}").is_dir()
