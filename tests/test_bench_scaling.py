"""Tests of ``mlx-dp bench scaling`` (trainer/bench/scaling*.py), the product's throughput comparison.

The metric maths and the rounds' checks are tested on synthetic numbers. End to
end, the real CLI trains the tiny recipe at 1 and 2 ranks under mlx-dp launch;
one run with matplotlib hidden (the table and the JSON, and a sentence saying how
to get the chart), one with it (the chart). The lab's extensions are
tests/test_lab_scaling.py.
"""

import json

import pytest

from conftest import mlx_dp, without_matplotlib
from trainer.bench import scaling, scaling_plan, scaling_report as report
from trainer.bench import scaling_rounds as rounds
from trainer.bench import scaling_runs as runs

RECIPE = "recipes/tiny-lora.yaml"


# ---------------------------------------------------------------------------- the maths


def test_throughput_is_all_tokens_over_all_time():
    # Not the mean of per-step rates (which would be (100 + 50) / 2 = 75).
    assert report.throughput([100, 100], [1.0, 2.0]) == pytest.approx(200 / 3)
    assert report.throughput([], []) is None


def test_speedup_and_scaling_efficiency():
    assert report.speedup(1500.0, 1000.0) == pytest.approx(1.5)
    assert report.scaling_efficiency(1500.0, 1000.0, 2) == pytest.approx(0.75)
    assert report.scaling_efficiency(4000.0, 1000.0, 4) == pytest.approx(1.0)
    assert report.scaling_efficiency(None, 1000.0, 2) is None
    assert report.scaling_efficiency(1500.0, None, 2) is None


def test_rank_spread_is_the_median_gap_over_common_steps():
    times = {0: {1: 1.0, 2: 1.0, 3: 1.0, 4: 9.9},
             1: {1: 1.1, 2: 1.3, 3: 1.2},  # no step 4: it is left out
             2: {1: 1.0, 2: 1.1, 3: 1.0}}
    assert report.rank_spread(times) == pytest.approx(0.2)  # gaps 0.1, 0.3, 0.2
    assert report.rank_spread({0: {1: 0.5, 2: 0.7}}) == 0.0
    assert report.rank_spread({0: {1: 0.5}, 1: {2: 0.5}}) is None


def _measured(rates: dict, step: float = 0.1, others: dict | None = None) -> dict:
    """Synthetic measurements: ``{(kind, n, launcher, round): tokens/s}`` as ``run_ours`` returns them;
    ``others`` gives other processes' CPU by the same key (default 0.01 cores)."""
    out = {}
    for (kind, n, launcher, round_index), tps in rates.items():
        out[scaling_plan.Run(kind, n, launcher, round_index)] = {
            "other_cpu": (others or {}).get((kind, n, launcher, round_index), 0.01),
            "tokens_per_s": tps, "step_time_median_s": step * 1000 / tps, "step_time_p90_s": step * 1100 / tps,
            "rank_spread_s": 0.001, "peak_memory_gb_per_rank": [0.1] * n, "launcher_cpu": 0.01 * n,
            "tokens_per_step_mean": 100.0, "steps_measured": 3, "final_train_loss": 1.0, "global_batch": 8 * n}
    return out


def _plan(rounds: int, launchers=("mlx-dp launch",)) -> scaling_plan.Plan:
    return scaling_plan.Plan(recipe=RECIPE, overrides=[], cfg=None, sizes=[1, 2], launchers=list(launchers),
                             warmup=1, steps=3, timeout=60, rounds=rounds)


def test_rounds_give_medians_ranges_and_ratios_within_each_round():
    measured = _measured({("ours", 1, "mlx-dp launch", 0): 1000.0, ("ours", 2, "mlx-dp launch", 0): 1800.0,
                          ("ours", 1, "mlx-dp launch", 1): 900.0, ("ours", 2, "mlx-dp launch", 1): 1710.0,
                          ("ours", 1, "mlx-dp launch", 2): 950.0, ("ours", 2, "mlx-dp launch", 2): 1843.0})
    (one, two), problems = rounds.summarize(_plan(3), measured)
    assert problems == [] and one["scaling_efficiency"] == 1.0 and two["valid"]
    assert two["tokens_per_s"] == 1800.0 and two["tokens_per_s_range"] == [1710.0, 1843.0]
    # efficiency per round (0.90, 0.95, 0.97), paired with that round's own 1-rank run
    assert two["scaling_efficiency"] == pytest.approx(0.95) and two["rounds"] == 3
    assert two["scaling_efficiency_range"] == [pytest.approx(0.9), pytest.approx(0.97)]
    assert "exposed_comm_share" not in two, "the lab's figure, not the product's"
    assert two["launcher_cpu"] == pytest.approx(0.02) and two["global_batch"] == 16


def test_a_round_next_to_other_load_is_left_out_and_re_measured():
    rates = {("ours", n, "mlx-dp launch", i): 1000.0 * n * (0.9 if n == 2 else 1) for n in (1, 2) for i in range(3)}
    rates[("ours", 2, "mlx-dp launch", 1)] = 1100.0  # another process took a core meanwhile
    busy = {("ours", 2, "mlx-dp launch", 1): 0.9}
    rows, problems = rounds.summarize(_plan(3), _measured(rates, others=busy))
    assert problems == ["mlx-dp launch, round 2: other processes took 0.9 cores during it"]
    assert rows[1]["rounds"] == 2 and rows[1]["scaling_efficiency"] == pytest.approx(0.9)
    # when no round is quiet, the figures come from all of them and a note says so
    every = {key: 0.9 for key in rates}
    rows, problems = rounds.summarize(_plan(3), _measured(rates, others=every))
    assert rows[1]["rounds"] == 3 and rows[1]["other_cpu"] == pytest.approx(0.9)
    assert any("every round ran next to other load" in note for note in rounds.notes(rows))


def test_a_baseline_far_below_its_other_rounds_is_left_out_and_re_measured():
    rates = {("ours", 1, "mlx-dp launch", 0): 700.0, ("ours", 2, "mlx-dp launch", 0): 1300.0,
             ("ours", 1, "mlx-dp launch", 1): 62.0, ("ours", 2, "mlx-dp launch", 1): 1300.0,  # 2100% efficiency
             ("ours", 1, "mlx-dp launch", 2): 690.0, ("ours", 2, "mlx-dp launch", 2): 1290.0}
    rows, problems = rounds.summarize(_plan(3), _measured(rates))
    assert len(problems) == 1 and "round 2: 62 tok/s at 1 rank, far below" in problems[0]
    one, two = rows
    assert two["rounds"] == 2 and two["valid"] and two["scaling_efficiency"] < 1.0
    # once another round replaced it, nothing is left to re-measure; the note still says what was left out
    rates.update({("ours", 1, "mlx-dp launch", 3): 695.0, ("ours", 2, "mlx-dp launch", 3): 1295.0})
    rows, problems = rounds.summarize(_plan(3), _measured(rates))
    assert problems == [] and rows[1]["rounds"] == 3
    assert any("rounds left out" in note and "far below" in note for note in rounds.notes(rows))


@pytest.mark.parametrize("tps_two,valid", [((2100.0, 2120.0), False),  # 105-106% against 1% noise
                                           ((1980.0, 2040.0), True)])  # 101% within its 3% noise
def test_an_efficiency_above_100_percent_plus_noise_is_not_a_result(tps_two, valid):
    rates = {("ours", 1, "mlx-dp launch", 0): 1000.0, ("ours", 1, "mlx-dp launch", 1): 1005.0,
             ("ours", 2, "mlx-dp launch", 0): tps_two[0], ("ours", 2, "mlx-dp launch", 1): tps_two[1]}
    rows, problems = rounds.summarize(_plan(2), _measured(rates))
    assert rows[1]["valid"] is valid and bool(problems) is not valid
    if not valid:
        assert "above 100% + the measured noise" in rows[1]["invalid_reason"]
        table = report.format_table({"recipe": RECIPE, "setup": {"per_rank_batch": 8, "grad_accumulation": 1},
                                     "steps": 3, "warmup": 1, "rounds": 2, "blas": "mlx", "link": "loopback",
                                     "results": rows, "notes": rounds.notes(rows)})
        row_line = next(line for line in table.splitlines() if line.startswith("mlx-dp launch     2"))
        assert "invalid" in row_line and "105%" not in row_line  # never shown as a result
        assert "not a result" in table


def test_one_round_cannot_vouch_for_an_efficiency_above_100_percent():
    rates = {("ours", 1, "mlx-dp launch", 0): 1000.0, ("ours", 2, "mlx-dp launch", 0): 2010.0}
    rows, problems = rounds.summarize(_plan(1), _measured(rates))
    assert not rows[1]["valid"] and "one round" in rows[1]["invalid_reason"] and problems


def test_every_world_size_gets_the_same_blas_threads(monkeypatch):
    from trainer.tools import fastblas

    monkeypatch.setattr(fastblas, "requested", lambda: True)
    monkeypatch.setattr(fastblas, "threads_per_rank", lambda local_ranks=1: 4 // local_ranks)
    plan = scaling_plan.make_plan(scaling_plan.parse_args([RECIPE, "-n", "2"]))
    assert plan.blas == "openblas" and plan.blas_threads == 2
    assert scaling_plan.blas_threads(plan, 1) == scaling_plan.blas_threads(plan, 2) == 2


@pytest.mark.e2e
@pytest.mark.alone  # a spinner must get over half a core
def test_the_launchers_own_cpu_is_read_from_the_system():
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    # A spinning "launcher" and a sleeping one, measured at the same time: each is the other's stranger.
    spin = "import time\nend = time.time() + 3.5\nwhile time.time() < end: pass"
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(runs.wait_measuring_cpu, subprocess.Popen([sys.executable, "-c", spin]), timeout=30)
        idle = pool.submit(runs.wait_measuring_cpu,
                           subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3.5)"]), timeout=30)
        busy, idle = busy.result(), idle.result()
    assert busy[0] == 0 and idle[0] == 0
    assert busy[1]["launcher_cpu"] > 0.5 and idle[1]["launcher_cpu"] < 0.05
    if sys.platform.startswith("linux"):  # other processes' CPU comes from /proc/stat
        assert idle[1]["other_cpu"] > 0.5, "the spinner beside it shows up as other load"


def test_measure_ours_reads_the_window_after_warmup(tmp_path):
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("metrics.jsonl", [{"step": s, "train_loss": 2.0 - s / 10, "step_time_s": t, "tokens": 100,
                             "global_batch": 16} for s, t in [(1, 9.0), (2, 0.2), (3, 0.4), (4, 0.3)]]
          + [{"step": 4, "val_loss": 1.5}])
    write("metrics.rank0.jsonl", [{"step": s, "step_time_s": t, "peak_memory_gb": 0.1 * s}
                                  for s, t in [(1, 9.0), (2, 0.2), (3, 0.4), (4, 0.3)]])
    write("metrics.rank1.jsonl", [{"step": s, "step_time_s": t, "peak_memory_gb": 0.5}
                                  for s, t in [(1, 8.0), (2, 0.25), (3, 0.3), (4, 0.3)]])
    m = report.measure_ours(tmp_path, world_size=2, warmup=1, steps=3)
    assert m["steps_measured"] == 3
    assert m["tokens_per_s"] == pytest.approx(300 / 0.9)  # step 1 (compile) left out
    assert m["step_time_median_s"] == pytest.approx(0.3)
    assert m["rank_spread_s"] == pytest.approx(0.05)  # gaps 0.05, 0.1, 0.0
    assert m["peak_memory_gb_per_rank"] == [pytest.approx(0.4), 0.5]
    assert m["final_train_loss"] == pytest.approx(1.6) and m["global_batch"] == 16
    with pytest.raises(ValueError, match="2 of the 4 measured updates"):
        report.measure_ours(tmp_path, world_size=2, warmup=2, steps=4)


# ---------------------------------------------------------------------------- errors for people


@pytest.mark.parametrize("argv,expected", [
    (["recipes/missing.yaml", "-n", "2"], "recipe recipes/missing.yaml is neither a file nor a recipe of the library"),
    ([RECIPE], "give the world size with -n N"),
    ([RECIPE, "-n", "2", "training.steps=5"], "the benchmark sets training.steps itself"),
    ([RECIPE, "--sizes", "1,two"], "--sizes '1,two' must be world sizes"),
    ([RECIPE, "-n", "2", "--warmup", "0"], "--warmup must be at least 1"),
    ([RECIPE, "-n", "2", "--launcher", "mlx.launch"], "unrecognized arguments: --launcher"),
    ([RECIPE, "-n", "2", "--blas-threads", "1"], "--blas-threads needs MLX_DP_BLAS=openblas"),
    ([RECIPE, "-n", "2", "--balance", "off,fast"], "parallel.balance must be one of 'off', 'auto' or a list of numbers, got 'fast'"),
    ([RECIPE, "-n", "1", "--balance", "off,auto"], "--balance compares settings at N ranks"),
])
def test_bad_arguments_are_one_line_and_status_2(argv, expected, capsys):
    assert scaling.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlx-dp bench scaling: error:") and expected in err[0], err


def test_balance_settings_are_compared_within_each_round():
    from trainer.bench.scaling_balance import format_balance, summarize_balance

    plan = _plan(3)
    plan.balances = ["off", "auto", "[2, 1]"]

    class Caps:  # the lab's --slow, seen through the plan's extensions
        def slow(self, plan):
            return {1: 0.5}

    plan.extensions.append(Caps())
    rates = {("off", 0): 1000.0, ("auto", 0): 1400.0, ("[2, 1]", 0): 1300.0,
             ("off", 1): 800.0, ("auto", 1): 1200.0, ("[2, 1]", 1): 1000.0,   # a slower round: ratio 1.5
             ("off", 2): 1000.0, ("auto", 2): 3000.0, ("[2, 1]", 2): 1000.0}  # next to other load
    measured = {}
    for (setting, i), tps in rates.items():
        measured[scaling_plan.Run("balance", 2, "mlx-dp launch", i, balance=setting)] = {
            "tokens_per_s": tps, "step_time_median_s": 100 / tps, "other_cpu": 0.9 if i == 2 else 0.01,
            "rows_per_rank": [3, 1] if setting == "auto" else [2, 2], "rank_step_time_median_s": [0.1, 0.1],
            "compute_s_per_rank": [0.05, 0.1] if setting == "off" else [0.075, 0.075]}
    (block,) = summarize_balance(plan, measured)
    off, auto, fixed = block["settings"]
    assert block["rounds_used"] == [1, 2] and block["rounds_left_out"] == [3]
    assert off["vs_off"] == 1.0 and auto["vs_off_per_round"] == [pytest.approx(1.4), pytest.approx(1.5)]
    assert auto["vs_off"] == pytest.approx(1.45) and auto["vs_off_range"] == [pytest.approx(1.4), pytest.approx(1.5)]
    assert auto["rows_per_rank"] == [3, 1] and off["compute_s_per_rank"] == [0.05, 0.1]
    assert fixed["tokens_per_s"] == 1150.0 and fixed["tokens_per_s_range"] == [1000.0, 1300.0]
    text = format_balance([block])
    assert "rank 1 at 0.5 of a core" in text and "auto" in text and "1.45x" in text and "3/1" in text


def test_a_hostfile_sets_the_world_size_and_mlx_dp_launch(tmp_path, capsys):
    hosts = tmp_path / "hosts.json"
    two = [{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]
    hosts.write_text(json.dumps({"hosts": two}))
    plan = scaling_plan.make_plan(scaling_plan.parse_args([RECIPE, "--hostfile", str(hosts)]))
    assert plan.sizes == [1, 2] and plan.launchers == ["mlx-dp launch"]
    assert scaling.main([RECIPE, "--hostfile", str(hosts), "-n", "3"]) == 2
    assert "fixes the world size at its 2 hosts" in capsys.readouterr().err
    hosts.write_text(json.dumps({"hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac1", "ips": []}]}))
    assert scaling.main([RECIPE, "--hostfile", str(hosts)]) == 2
    assert "lists host mac1 twice" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One real run with matplotlib hidden: tiny recipe at 1 and 2 ranks under
    mlx-dp launch, one round, 20 measured updates, on MLX's own BLAS: long enough there to sample the
    launcher's CPU every half second (on OpenBLAS 20 updates took under a second, and sometimes no sample)."""
    out = tmp_path_factory.mktemp("scaling")
    result = mlx_dp("bench", "scaling", RECIPE, "-n", "2", "--steps", "20", "--warmup", "2", "--rounds", "1",
                    "--max-extra-rounds", "0", "--json", str(out / "scaling.json"), "--keep", str(out / "runs"),
                    "training.batch_size=4", timeout=600, env={**without_matplotlib(out), "MLX_DP_BLAS": "mlx"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((out / "scaling.json").read_text()), out


@pytest.mark.e2e
def test_end_to_end_writes_table_and_json_and_says_how_to_get_the_chart(bench_run):
    result, doc, out = bench_run
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    chart = next(i for i, line in enumerate(lines) if "no chart: matplotlib is not installed" in line)
    first_run = next(i for i, line in enumerate(lines) if line.startswith("[bench] 1/2: round 1"))
    assert chart < first_run, "said before anything is measured"
    assert "pip install 'mlx-dp[plot]'" in lines[chart]
    assert "[bench] 2/2: round 1, world size 2, mlx-dp launch, mlx-dp" in result.stdout
    assert "effic." in result.stdout and "launcher CPU while ranks trained" in result.stdout
    assert doc["blas"] == "mlx" and doc["machine"]["cpu_count"] >= 1 and doc["launchers"] == ["mlx-dp launch"]
    assert doc["rounds"] == 1 and doc["blas_threads_per_rank"] == 1
    assert [(r["world_size"], r["launcher"]) for r in doc["results"]] == [(1, "mlx-dp launch"), (2, "mlx-dp launch")]
    for r in doc["results"]:
        assert r["blas"] == "mlx" and r["steps_measured"] == 20 and r["blas_threads_per_rank"] == 1
        assert r["tokens_per_s"] > 0 and r["step_time_median_s"] > 0 and r["scaling_efficiency"] > 0
        peaks = r["peak_memory_gb_per_rank"]
        assert len(peaks) == r["world_size"] and all(m > 0 for m in peaks)
        assert 0 <= r["launcher_cpu"] < 0.2, "mlx-dp launch sleeps while its ranks train"
    one, two = doc["results"]
    assert one["scaling_efficiency"] == 1.0 and one["rank_spread_s"] == 0.0
    assert two["rank_spread_s"] > 0, "two ranks never finish an update at the same instant"
    assert two["global_batch"] == 2 * one["global_batch"] == 8
    assert two["scaling_efficiency"] == pytest.approx(two["tokens_per_s"] / (2 * one["tokens_per_s"]))
    # The speed itself is the machine's business (a busy 1-rank round can make 2 ranks look above 2x);
    # the bench's rule is not: above 100% from one round is never reported as a result.
    if two["scaling_efficiency"] > 1.0:
        assert not two["valid"] and "from one round, whose noise is unknown" in two["invalid_reason"]
        assert "2 ranks: not a result" in result.stdout
    else:
        assert two["valid"] and two["invalid_reason"] is None and "not a result" not in result.stdout
    assert not (out / "scaling.png").exists() and str(out / "scaling.json") in result.stdout


@pytest.mark.e2e
def test_the_chart_is_drawn_where_matplotlib_is_installed(bench_run, tmp_path):
    pytest.importorskip("matplotlib", reason="the test extra installs matplotlib (pip install -e '.[test]')")
    from trainer.bench.scaling_chart import write_chart

    _, doc, _ = bench_run
    write_chart(doc, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_chart(doc, tmp_path / "chart.svg")  # a vector chart whose labels are text
    svg = (tmp_path / "chart.svg").read_text()
    assert "scaling efficiency" in svg and "global tokens/s" in svg


@pytest.mark.e2e
def test_a_failing_run_shows_its_tail_and_one_error_line(tmp_path):
    result = mlx_dp("bench", "scaling", RECIPE, "-n", "1", "--steps", "1", "--warmup", "1",
                    "--rounds", "1", f"data.path={tmp_path / 'no-such-data'}", timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "last" in result.stderr and "no-such-data" in result.stderr  # the trainer's own error, relayed
    assert result.stderr.strip().splitlines()[-1] == (
        "mlx-dp bench scaling: error: world size 1, mlx-dp launch, mlx-dp failed (exit status 2); "
        "the end of its output is above")
