"""``lab bench pipeline``'s pure parts: its arguments, the RSS it parses, and the maths of its summary."""

import pytest

from lab.bench.pipeline import (bubble, choose_cap, fill_blas_threads, launch_figures, parse_args,
                                parse_microbatches, parse_status_kb, parse_threads, parse_time_v, round_order,
                                speed_variants, summarise_memory, summarise_speed)

TIME_V_KILLED = """\tCommand being timed: ".venv/bin/mlx-dp train recipe.yaml"
\tUser time (seconds): 315.09
\tSystem time (seconds): 5.77
\tPercent of CPU this job got: 41%
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:52.08
\tMaximum resident set size (kbytes): 4450756
\tMajor (requiring I/O) page faults: 6
\tFile system inputs: 3600
\tExit status: 0
"""


def test_time_v_gives_peak_rss_in_bytes_and_the_wall_time_in_seconds():
    got = parse_time_v(TIME_V_KILLED)
    assert got["max_rss_bytes"] == 4450756 * 1024
    assert got["elapsed_s"] == pytest.approx(3600 + 2 * 60 + 52.08)
    assert got["user_s"] == pytest.approx(315.09) and got["fs_inputs"] == 3600
    assert got["exit_status"] == 0 and got["signal"] is None


def test_time_v_reports_the_signal_of_a_killed_command():
    text = "\tCommand terminated by signal 9\n\tElapsed (wall clock) time (h:mm:ss or m:ss): 0:41.50\n" \
           "\tMaximum resident set size (kbytes): 1000\n\tExit status: 0\n"
    got = parse_time_v(text)
    assert got["signal"] == 9 and got["elapsed_s"] == pytest.approx(41.5) and got["max_rss_bytes"] == 1024000


def test_proc_status_memory_lines_in_bytes():
    text = "Name:\tmlx-dp\nVmHWM:\t 1268820 kB\nVmRSS:\t  900000 kB\nRssAnon:\t  800000 kB\nThreads:\t12\n"
    assert parse_status_kb(text) == {"VmHWM": 1268820 * 1024, "VmRSS": 900000 * 1024, "RssAnon": 800000 * 1024}


def test_arguments_defaults_quick_and_explicit_values():
    full = parse_args([])
    assert (full.layers, full.speed_layers, full.rounds, full.microbatches) == (28, 8, 2, [1, 2, 4, 8])
    assert full.one_threads == [None, 1] and full.parts == ["memory", "speed", "cap"]
    quick = parse_args(["--quick", "--rounds", "3"])
    assert (quick.layers, quick.steps, quick.microbatches) == (4, 2, [1, 2])
    assert quick.rounds == 3, "an explicit option wins over --quick"
    assert parse_args(["--speed-batch", "4"]).microbatches == [1, 2, 4], "parts above the batch are dropped"
    with pytest.raises(SystemExit):
        parse_args(["--parts", "memory,bogus"])
    with pytest.raises(SystemExit):
        parse_args(["-n", "1"])


def test_microbatch_and_thread_lists():
    assert parse_microbatches("4, 1,2,4,16", 8) == [4, 1, 2]
    with pytest.raises(ValueError):
        parse_microbatches("0", 8)
    assert parse_threads("default,1,1") == [None, 1]
    assert speed_variants([None, 1], [1, 4]) == ["one", "one-1thread", "pipeline-m1", "pipeline-m4"]
    assert round_order(["a", "b", "c"], 0) == ["a", "b", "c"] and round_order(["a", "b", "c"], 1) == ["c", "b", "a"]


def test_launch_figures_skip_the_warmup_and_take_medians_of_idle_shares():
    records = [{"step": 1, "step_time_s": 100.0, "tokens": 10, "stage_idle_share": [0.9, 0.9]},
               {"step": 2, "step_time_s": 2.0, "tokens": 100, "stage_idle_share": [0.5, 0.1]},
               {"step": 3, "step_time_s": 3.0, "tokens": 200, "stage_idle_share": [0.3, 0.2]},
               {"step": 4, "step_time_s": 5.0, "tokens": 100, "stage_idle_share": [0.4, 0.0]},
               {"step": 4, "val_loss": 1.0}]
    got = launch_figures(records, warmup=1, stages=2)
    assert got["updates"] == 3 and got["tokens_per_s"] == pytest.approx(400 / 10.0)
    assert got["step_time_s"] == 3.0
    assert got["stage_idle_share"] == pytest.approx([0.4, 0.1])
    with pytest.raises(ValueError):
        launch_figures(records, warmup=4)


def test_speed_summary_medians_spreads_and_ratios_against_one_process():
    def run(tps, idle=None):
        figures = {"tokens_per_s": tps, "step_time_s": 100 / tps}
        if idle is not None:
            figures["stage_idle_share"] = idle
        return {"figures": figures}

    raw = {"one": [run(10.0), run(12.0), run(20.0)],
           "pipeline-m2": [run(6.0, [0.5, 0.1]), run(9.0, [0.3, 0.3]), run(5.0, [0.4, 0.2])],
           "pipeline-m4": [{"figures": None}]}
    s = summarise_speed(raw, stages=2)
    assert s["one"]["tokens_per_s"] == {"median": 12.0, "min": 10.0, "max": 20.0, "n": 3}
    assert s["pipeline-m2"]["vs"]["one"] == pytest.approx(6.0 / 12.0)
    assert [x["median"] for x in s["pipeline-m2"]["stage_idle_share"]] == pytest.approx([0.4, 0.2])
    assert s["pipeline-m2"]["stage_idle_share"][0]["min"] == 0.3
    assert s["pipeline-m4"] == {"failed": 1}


def test_memory_summary_ratio_target_and_cap():
    gib = 1 << 30
    m = summarise_memory([int(2.4 * gib), int(2.2 * gib)], [[int(1.2 * gib), int(1.3 * gib)],
                                                           [int(1.4 * gib), int(1.1 * gib)]])
    assert m["one_process_bytes"] == pytest.approx(2.3 * gib, rel=1e-6)
    assert m["stage_bytes"] == pytest.approx([1.3 * gib, 1.2 * gib], rel=1e-6)
    assert m["largest_over_one"] == pytest.approx(1.3 / 2.3, rel=1e-6) and m["meets_target"]
    assert not summarise_memory([100], [[70, 10]])["meets_target"], "0.70 is above the 0.65 target"
    cap = choose_cap(2.3 * gib, 1.3 * gib)
    assert 1.3 * gib < cap < 2.3 * gib and cap == pytest.approx(1.8 * gib, abs=1 << 20) and cap % (1 << 20) == 0
    with pytest.raises(ValueError):
        choose_cap(1.0 * gib, 1.0 * gib)


def test_gpipe_bubble():
    assert bubble(2, 1) == pytest.approx(0.5)
    assert bubble(2, 4) == pytest.approx(0.2)
    assert bubble(4, 8) == pytest.approx(3 / 11)


def test_ranks_without_the_blas_line_take_rank_0s_threads():
    ranks = [{"blas_threads": 1}, {"blas_threads": None}]
    fill_blas_threads(ranks)
    assert ranks[1] == {"blas_threads": 1, "blas_threads_from": "rank 0's log"} and "blas_threads_from" not in ranks[0]
    none = [{"blas_threads": None}, {"blas_threads": None}]
    fill_blas_threads(none)
    assert none == [{"blas_threads": None}, {"blas_threads": None}]
