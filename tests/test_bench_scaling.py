"""Tests of ``mlx-dp bench scaling`` (trainer/bench/scaling*.py).

The metric maths is checked on synthetic numbers. One end-to-end run of the real
CLI (the tiny recipe at 1 and 2 lean-launched ranks, with the mlx_lm.lora
comparison) is shared by the tests that read its table, JSON and chart: each
launch costs seconds of start-up on the stock BLAS, and a second run would repeat
the first one's three launches.
"""

import json
import math

import pytest

from conftest import ROOT, mlx_dp
from trainer.bench import scaling, scaling_mlx_lm, scaling_plan, scaling_report as report
from trainer.core.config import load_config

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


def test_exposed_comm_share_uses_the_skip_baseline():
    assert report.exposed_comm_share(0.20, 0.15) == pytest.approx(0.25)
    assert report.exposed_comm_share(0.20, 0.20) == 0.0
    # Noise can make communication look free or better; reported as measured, not clamped.
    assert report.exposed_comm_share(0.20, 0.21) == pytest.approx(-0.05)
    assert report.exposed_comm_share(0.20, None) is None


def test_rank_spread_is_the_median_gap_over_common_steps():
    times = {0: {1: 1.0, 2: 1.0, 3: 1.0, 4: 9.9},
             1: {1: 1.1, 2: 1.3, 3: 1.2},  # no step 4: it is left out
             2: {1: 1.0, 2: 1.1, 3: 1.0}}
    assert report.rank_spread(times) == pytest.approx(0.2)  # gaps 0.1, 0.3, 0.2
    assert report.rank_spread({0: {1: 0.5, 2: 0.7}}) == 0.0
    assert report.rank_spread({0: {1: 0.5}, 1: {2: 0.5}}) is None


def test_add_ratios_compares_each_launcher_with_its_own_one_rank_run():
    def row(n, launcher, tps, step, skipped=None):
        return {"world_size": n, "launcher": launcher, "tokens_per_s": tps, "step_time_median_s": step,
                "comm_skipped": skipped}

    results = [row(1, "lean", 1000.0, 0.05), row(2, "lean", 1600.0, 0.0625,
                                                 {"tokens_per_s": 1800.0, "step_time_median_s": 0.05}),
               row(1, "mlx.launch", 400.0, 0.125), row(2, "mlx.launch", 400.0, 0.25,
                                                       {"tokens_per_s": 500.0, "step_time_median_s": 0.2})]
    report.add_ratios(results)
    lean1, lean2, ml1, ml2 = results
    assert lean1["scaling_efficiency"] == 1.0 and lean1["exposed_comm_share"] is None
    assert lean2["speedup"] == pytest.approx(1.6)
    assert lean2["scaling_efficiency"] == pytest.approx(0.8)
    assert lean2["exposed_comm_share"] == pytest.approx(0.2)
    assert lean2["scaling_efficiency_comm_skipped"] == pytest.approx(0.9)
    assert ml2["scaling_efficiency"] == pytest.approx(0.5)  # against mlx.launch's 400, not lean's 1000
    assert ml2["scaling_efficiency_comm_skipped"] == pytest.approx(0.625)


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


def test_mlx_lm_window_drops_warmup_and_the_validating_last_update():
    # Update u reported at time 10 + u^2 / 10; mlx-lm's own timer says 4 updates/s.
    reports = [{"iteration": u, "time": 10 + u * u / 10, "trained_tokens": 50 * u, "tokens_per_second": 200.0,
                "iterations_per_second": 4.0, "train_loss": 3.0 - u / 10, "peak_memory": 0.1} for u in range(1, 7)]
    w = report.mlx_lm_window(reports, warmup=2, steps=4)
    assert w["steps_measured"] == 3  # updates 3, 4, 5; update 6 also validated
    assert w["step_time_median_s"] == pytest.approx(0.7)  # (16 - 9) / 10
    assert w["updates_per_s"] == pytest.approx(1 / 0.7)
    assert w["self_reported_updates_per_s"] == 4.0
    assert w["self_reported_tokens_per_s"] == pytest.approx(200.0)
    assert w["final_train_loss"] == pytest.approx(2.4)


# ---------------------------------------------------------------------------- mlx_lm.lora's side


@pytest.mark.parametrize("schedule,warmup,init", [("constant", 0, 0.0), ("constant", 1, 0.0), ("constant", 10, 0.0),
                                                  ("cosine", 4, 1e-5), ("linear", 3, 0.0), ("cosine", 0, 0.0)])
def test_mlx_lm_schedule_matches_ours(schedule, warmup, init):
    import mlx.core as mx
    from mlx_lm.tuner.utils import build_schedule as mlx_lm_build_schedule

    from trainer.core.optim import build_schedule

    total = 12
    cfg = load_config(ROOT / RECIPE, [f"training.lr_schedule={schedule}", f"training.warmup_steps={warmup}",
                                      f"training.warmup_init={init}", "training.min_learning_rate=1e-5"]).training
    theirs = scaling_mlx_lm.mlx_lm_schedule(cfg, total)
    ours = build_schedule(cfg, total)
    for step in range(total):
        want = ours(mx.array(step)) if callable(ours) else ours
        got = mlx_lm_build_schedule(theirs)(mx.array(step)) if theirs else cfg.learning_rate
        assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-9), step


def test_mlx_lm_args_give_the_same_work():
    cfg = load_config(ROOT / RECIPE, ["training.grad_accumulation=2", "training.weight_decay=0.05"])
    args = scaling_mlx_lm.mlx_lm_args(cfg, world_size=2, updates=5, config_path="c.yaml", adapter_dir="out")

    def value(flag):
        return args[args.index(flag) + 1]

    assert value("--batch-size") == "16"  # mlx-lm's is global: 8 per rank x 2 ranks
    assert value("--grad-accumulation-steps") == "2"
    assert value("--iters") == "10"  # its iterations are micro-batches
    assert value("--steps-per-report") == "2"  # one report per optimizer update
    assert int(value("--steps-per-eval")) > 10 and int(value("--save-every")) > 10
    assert value("--num-layers") == "-1" and value("--fine-tune-type") == "lora"
    assert value("--max-seq-length") == "64" and "--mask-prompt" in args
    config = scaling_mlx_lm.mlx_lm_config(cfg, 5)
    assert config["lora_parameters"] == {"rank": 8, "scale": 10.0, "dropout": 0.0}
    assert config["optimizer"] == "adamw"
    assert config["optimizer_config"]["adamw"]["weight_decay"] == 0.05
    # The recipe's 0.0 is passed on, not left to mlx's AdamW default of 0.01.
    default = scaling_mlx_lm.mlx_lm_config(load_config(ROOT / RECIPE), 5)
    assert default["optimizer_config"]["adamw"]["weight_decay"] == 0.0


# ---------------------------------------------------------------------------- errors for people


@pytest.mark.parametrize("argv,expected", [
    (["recipes/missing.yaml", "-n", "2"], "recipe recipes/missing.yaml does not exist"),
    ([RECIPE], "give the world size with -n N"),
    ([RECIPE, "-n", "2", "training.steps=5"], "the benchmark sets training.steps itself"),
    ([RECIPE, "--sizes", "1,two"], "--sizes '1,two' must be world sizes"),
    ([RECIPE, "-n", "2", "--warmup", "0"], "--warmup must be at least 1"),
    ([RECIPE, "-n", "2", "--launcher", "fast"], "invalid choice: 'fast'"),
    ([RECIPE, "-n", "2", "--link", "10gbe", "--launcher", "mlx.launch"], "does not apply here"),
    ([RECIPE, "-n", "2", "--blas-threads", "1"], "--blas-threads needs MLX_DP_BLAS=openblas"),
    ([RECIPE, "-n", "2", "--vs-mlx-lm", "data.path=data/tiny-task/train.jsonl"],
     "--vs-mlx-lm needs data.path to be a directory"),
])
def test_bad_arguments_are_one_line_and_status_2(argv, expected, capsys):
    assert scaling.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlx-dp bench scaling: error:") and expected in err[0], err


def test_a_hostfile_sets_the_world_size_and_mlx_launch(tmp_path, capsys):
    hosts = tmp_path / "hosts.json"
    two = [{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]
    hosts.write_text(json.dumps({"hosts": two}))
    plan = scaling_plan.make_plan(scaling_plan.parse_args([RECIPE, "--hostfile", str(hosts)]))
    assert plan.sizes == [1, 2] and plan.launchers == ["mlx.launch"]
    assert scaling.main([RECIPE, "--hostfile", str(hosts), "-n", "3"]) == 2
    assert "fixes the world size at its 2 hosts" in capsys.readouterr().err
    hosts.write_text(json.dumps({"hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac1", "ips": []}]}))
    assert scaling.main([RECIPE, "--hostfile", str(hosts)]) == 2
    assert "lists host mac1 twice" in capsys.readouterr().err


def test_link_without_root_is_a_clear_error(monkeypatch, capsys):
    from trainer.cluster import netem

    monkeypatch.setattr(netem, "check_permitted", lambda: "emulate_cluster needs root; run it with sudo")
    assert scaling.main([RECIPE, "-n", "2", "--link", "10gbe"]) == 2
    assert "--link: emulate_cluster needs root; run it with sudo" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One real run: tiny recipe at 1 and 2 lean ranks, 3 measured updates, vs mlx_lm.lora."""
    out = tmp_path_factory.mktemp("scaling")
    result = mlx_dp("bench", "scaling", RECIPE, "-n", "2", "--launcher", "lean", "--steps", "3", "--warmup", "1",
                    "--vs-mlx-lm", "--json", str(out / "scaling.json"), "--keep", str(out / "runs"),
                    "training.batch_size=4", "eval.max_batches=2", timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((out / "scaling.json").read_text()), out


def test_end_to_end_writes_table_json_and_png(bench_run):
    result, doc, out = bench_run
    assert "[bench] 1/5: world size 1, lean, mlx-dp" in result.stdout
    assert "[bench] 3/5: world size 2, lean, mlx-dp, communication skipped" in result.stdout
    assert "scaling efficiency" in result.stdout or "effic." in result.stdout
    assert doc["blas"] == "mlx" and doc["machine"]["cpu_count"] >= 1 and doc["launchers"] == ["lean"]
    assert [(r["world_size"], r["launcher"]) for r in doc["results"]] == [(1, "lean"), (2, "lean")]
    for r in doc["results"]:
        assert r["blas"] == "mlx" and r["steps_measured"] == 3
        assert r["tokens_per_s"] > 0 and r["step_time_median_s"] > 0 and r["scaling_efficiency"] > 0
        peaks = r["peak_memory_gb_per_rank"]
        assert len(peaks) == r["world_size"] and all(m > 0 for m in peaks)
        assert r["rank_spread_s"] >= 0
    one, two = doc["results"]
    assert one["scaling_efficiency"] == 1.0 and one["comm_skipped"] is None
    assert two["global_batch"] == 2 * one["global_batch"] == 8
    assert two["comm_skipped"]["step_time_median_s"] > 0
    assert two["exposed_comm_share"] is not None and two["scaling_efficiency_comm_skipped"] > 0
    assert two["scaling_efficiency"] == pytest.approx(two["tokens_per_s"] / (2 * one["tokens_per_s"]))
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vs_mlx_lm_reports_the_ratio_and_both_final_losses(bench_run):
    result, doc, out = bench_run
    assert doc["vs_mlx_lm_tokens_per_s_ratio"] > 0
    losses = doc["final_losses"]
    for key in ("mlx_dp_valid_loss", "mlx_lm_valid_loss", "mlx_dp_final_train_loss", "mlx_lm_final_train_loss"):
        assert math.isfinite(losses[key]) and losses[key] > 0, key
    (comparison,) = doc["vs_mlx_lm"]
    assert comparison["global_batch"] == 8 and comparison["updates"] == 4
    assert comparison["mlx_lm"]["steps_measured"] == 2  # updates 2 and 3; the 4th also validated
    assert "vs mlx_lm.lora at 2 ranks" in result.stdout
    # mlx_lm.lora got the recipe's optimizer, not mlx's AdamW default weight decay of 0.01.
    import yaml

    config = yaml.safe_load((out / "runs" / "lean-n2-mlx_lm" / "mlx_lm_config.yaml").read_text())
    assert config["optimizer_config"] == {"adamw": {"weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}}


def test_mlx_launch_runs_one_rank_too(tmp_path):
    # mlx.launch -n 1 still runs its busy relay loop, so one rank is measured under it as well.
    result = mlx_dp("bench", "scaling", RECIPE, "-n", "1", "--launcher", "mlx.launch", "--steps", "1",
                    "--warmup", "1", "--json", str(tmp_path / "one.json"), "training.batch_size=2", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "one.json").read_text())["results"]
    assert row["launcher"] == "mlx.launch" and row["world_size"] == 1 and row["tokens_per_s"] > 0


def test_a_failing_run_shows_its_tail_and_one_error_line(tmp_path):
    result = mlx_dp("bench", "scaling", RECIPE, "-n", "1", "--launcher", "lean", "--steps", "1", "--warmup", "1",
                    f"data.path={tmp_path / 'no-such-data'}", timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "last" in result.stderr and "no-such-data" in result.stderr  # the trainer's own error, relayed
    assert result.stderr.strip().splitlines()[-1] == (
        "mlx-dp bench scaling: error: world size 1, lean, mlx-dp failed (exit status 2); "
        "the end of its output is above")
