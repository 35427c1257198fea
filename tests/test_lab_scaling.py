"""The lab's ``bench scaling`` (scripts/lab/bench/scaling.py): the product's benchmark plus its baselines.

Communication skipped, mlx_lm.lora on the same work, stock mlx.launch, emulated
links and slower ranks: their maths on synthetic numbers, their arguments, and
the real CLI end to end.
"""

import json
import math

import pytest

from conftest import ROOT, _openblas_env, lab, without_matplotlib
from lab.bench import scaling as lab_scaling
from lab.bench import scaling_mlx_lm
from trainer.config.load import load_config

RECIPE = "recipes/tiny-lora.yaml"


def test_exposed_comm_share_uses_the_skip_baseline():
    assert lab_scaling.exposed_comm_share(0.20, 0.15) == pytest.approx(0.25)
    assert lab_scaling.exposed_comm_share(0.20, 0.20) == 0.0
    # Noise can make communication look free or better; reported as measured, not clamped.
    assert lab_scaling.exposed_comm_share(0.20, 0.21) == pytest.approx(-0.05)
    assert lab_scaling.exposed_comm_share(0.20, None) is None


def test_mlx_lm_window_drops_warmup_and_the_validating_last_update():
    # Update u reported at time 10 + u^2 / 10; mlx-lm's own timer says 4 updates/s.
    reports = [{"iteration": u, "time": 10 + u * u / 10, "trained_tokens": 50 * u, "tokens_per_second": 200.0,
                "iterations_per_second": 4.0, "train_loss": 3.0 - u / 10, "peak_memory": 0.1} for u in range(1, 7)]
    w = scaling_mlx_lm.mlx_lm_window(reports, warmup=2, steps=4)
    assert w["steps_measured"] == 3  # updates 3, 4, 5; update 6 also validated
    assert w["step_time_median_s"] == pytest.approx(0.7)  # (16 - 9) / 10
    assert w["updates_per_s"] == pytest.approx(1 / 0.7)
    assert w["self_reported_updates_per_s"] == 4.0
    assert w["self_reported_tokens_per_s"] == pytest.approx(200.0)
    assert w["final_train_loss"] == pytest.approx(2.4)


@pytest.mark.parametrize("schedule,warmup,init", [("constant", 0, 0.0), ("constant", 1, 0.0), ("constant", 10, 0.0),
                                                  ("cosine", 4, 1e-5), ("linear", 3, 0.0), ("cosine", 0, 0.0)])
def test_mlx_lm_schedule_matches_ours(schedule, warmup, init):
    import mlx.core as mx
    from mlx_lm.tuner.utils import build_schedule as mlx_lm_build_schedule

    from trainer.step.optimizer import build_schedule

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
    ([RECIPE, "-n", "2", "--launcher", "fast"], "invalid choice: 'fast'"),
    ([RECIPE, "-n", "2", "--link", "10gbe", "--launcher", "mlx.launch"], "does not apply here"),
    ([RECIPE, "-n", "2", "--vs-mlx-lm", "data.path=data/tiny-task/train.jsonl"],
     "--vs-mlx-lm needs data.path to be a directory"),
    ([RECIPE, "-n", "2", "--slow", "1=2"], "--slow 1=2: the share of a core must be from 0.1 to 1"),
    ([RECIPE, "-n", "2", "--slow", "2=0.5", "--launcher", "mlx-dp"], "--slow names rank 2, but the largest world"),
    ([RECIPE, "-n", "2", "--slow", "1=0.5", "--launcher", "mlx.launch"], "does not apply here"),
    ([RECIPE, "-n", "2", "--variant", "data.packing=true"], "--variant applies to --epoch only"),
])
def test_bad_arguments_are_one_line_and_status_2(argv, expected, capsys):
    assert lab_scaling.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lab bench scaling: error:") and expected in err[0], err


def test_link_without_root_is_a_clear_error(monkeypatch, capsys):
    from lab import netem

    monkeypatch.setattr(netem, "check_permitted", lambda: "emulate_cluster needs root; run it with sudo")
    assert lab_scaling.main([RECIPE, "-n", "2", "--link", "10gbe"]) == 2
    assert "--link: emulate_cluster needs root; run it with sudo" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One real run with matplotlib hidden: tiny recipe at 1 and 2 ranks under
    mlx-dp launch, one round, 3 measured updates, vs mlx_lm.lora."""
    out = tmp_path_factory.mktemp("scaling")
    result = lab("bench", "scaling", RECIPE, "-n", "2", "--launcher", "mlx-dp", "--steps", "3", "--warmup", "1",
                 "--rounds", "1", "--max-extra-rounds", "0", "--vs-mlx-lm", "--json", str(out / "scaling.json"),
                 "--keep", str(out / "runs"), "training.batch_size=4", "eval.max_batches=2", timeout=400,
                 env=without_matplotlib(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((out / "scaling.json").read_text()), out


@pytest.mark.e2e
@pytest.mark.serial  # the bench's figures are checked for shape, never for speed
def test_communication_skipped_prices_what_nothing_hid(bench_run):
    result, doc, _ = bench_run
    assert "[bench] 3/4: round 1, world size 2, mlx-dp launch, mlx-dp, communication skipped" in result.stdout
    one, two = doc["results"]
    assert one["comm_skipped"] is None
    assert two["comm_skipped"]["step_time_median_s"] > 0 and two["scaling_efficiency_comm_skipped"] > 0
    assert two["exposed_comm_share"] == pytest.approx(
        1 - two["comm_skipped"]["step_time_median_s"] / two["step_time_median_s"])
    assert "exposed communication" in result.stdout


@pytest.mark.e2e
@pytest.mark.serial  # the bench's figures are checked for shape, never for speed
def test_vs_mlx_lm_reports_the_ratio_and_both_final_losses(bench_run):
    result, doc, out = bench_run
    assert doc["vs_mlx_lm_tokens_per_s_ratio"] > 0
    losses = doc["final_losses"]
    for key in ("mlx_dp_valid_loss", "mlx_lm_valid_loss", "mlx_dp_final_train_loss", "mlx_lm_final_train_loss"):
        assert math.isfinite(losses[key]) and losses[key] > 0, key
    (comparison,) = doc["vs_mlx_lm"]
    assert comparison["global_batch"] == 8 and comparison["updates"] == 4 and comparison["rounds"] == 1
    assert comparison["mlx_lm"]["steps_measured"] == 2  # updates 2 and 3; the 4th also validated
    assert "vs mlx_lm.lora at 2 ranks, both under mlx-dp launch" in result.stdout
    # mlx_lm.lora got the recipe's optimizer, not mlx's AdamW default weight decay of 0.01.
    import yaml

    config = yaml.safe_load((out / "runs" / "mlx-dp-launch-n2-mlx_lm-r0" / "mlx_lm_config.yaml").read_text())
    assert config["optimizer_config"] == {"adamw": {"weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}}


@pytest.mark.e2e
def test_slow_rank_and_balance_auto_end_to_end(tmp_path):
    from lab.cpulimit import check_permitted

    reason = check_permitted()
    if reason:
        pytest.skip(reason)
    result = lab("bench", "scaling", RECIPE, "-n", "2", "--steps", "4", "--warmup", "4", "--rounds", "1",
                 "--max-extra-rounds", "0", "--no-skip", "--slow", "1=0.4", "--json", str(tmp_path / "balance.json"),
                 "training.batch_size=4", timeout=400, env=_openblas_env())  # the same split on either BLAS, sooner
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads((tmp_path / "balance.json").read_text())
    assert doc["launchers"] == ["mlx-dp launch"] and doc["slow"] == {"1": 0.4}  # mlx.launch cannot be capped
    (block,) = doc["balance"]
    off, auto = block["settings"]
    assert (off["balance"], auto["balance"]) == ("off", "auto")
    assert off["rows_per_rank"] == [4, 4] and sum(auto["rows_per_rank"]) == 8
    # rank 1 at 0.4 of a core: with an even split it computes longer, and auto gives it fewer rows
    assert off["compute_s_per_rank"][1] > 1.5 * off["compute_s_per_rank"][0]
    assert auto["rows_per_rank"][0] > auto["rows_per_rank"][1] >= 1
    assert "parallel.balance at 2 ranks under mlx-dp launch (rank 1 at 0.4 of a core)" in result.stdout


@pytest.mark.e2e
def test_mlx_launch_runs_one_rank_too_and_its_cpu_is_measured(tmp_path):
    # mlx.launch -n 1 still runs its busy relay loop, so one rank is measured under it as well.
    # on MLX's own BLAS, where 20 updates last long enough to sample the launcher's CPU (not so on OpenBLAS)
    result = lab("bench", "scaling", RECIPE, "-n", "1", "--launcher", "mlx.launch", "--steps", "20",
                 "--warmup", "1", "--rounds", "1", "--json", str(tmp_path / "one.json"), "training.batch_size=2",
                 timeout=300, env={"MLX_DP_BLAS": "mlx"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "one.json").read_text())["results"]
    assert row["launcher"] == "mlx.launch" and row["world_size"] == 1 and row["tokens_per_s"] > 0
    assert row["launcher_cpu"] > 0.5, "mlx.launch's relay spins even for one rank"


