"""The lab's benchmarks (scripts/lab/bench): comm, profile and attention run end to end and report what
they say they do; their maths is checked on synthetic numbers."""

import json
import sys

import mlx.core as mx
import pytest

from conftest import lab, tiny_recipe, without_matplotlib
from lab.bench.profile import estimate_compile, summarize

KEYS = {"step_time_s", "exposed_comm_fraction", "hidden_comm_ratio", "busbw_ratio", "peak_memory_bytes"}


@pytest.mark.e2e
def test_bench_comm_end_to_end(tmp_path):
    # the stock BLAS (MLX_DP_BLAS=mlx) and no matplotlib: progress, an estimate, no traceback
    out = tmp_path / "comm.json"
    result = lab("bench", "comm", "-n", "2", "--arch", "qwen3-0.6b", "--layers", "1", "--width-divisor", "8",
                    "--seq", "16", "--steps", "2", "--warmup", "1", "--sweep-reps", "1", "--sweep-max-mb", "4",
                    "--json", str(out), timeout=600,
                    env={"MLX_DP_CACHE": str(tmp_path / "cache"), "MLX_DP_BLAS": "mlx",
                         **without_matplotlib(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if sys.platform.startswith("linux"):
        assert "the stock Linux BLAS" in result.stdout and "MLX_DP_BLAS=openblas" in result.stdout
    progress = [line for line in result.stdout.splitlines() if line.startswith("[bench] step ")]
    assert len(progress) == 3 * 7  # every variant's every step, warm-up included
    assert "[bench] step 1/3 (warm-up), " in progress[0] and "elapsed" in progress[0] and "left about" in progress[0]
    data = json.loads(out.read_text())
    assert KEYS <= set(data)
    assert set(data["step_time_s"]) == {"compute_only", "serial", "average_gradients", "overlap"}
    assert all(v > 0 for v in data["step_time_s"].values())
    assert data["world_size"] == 2 and data["blas"] in ("mlx", "openblas")
    timeline = data["timeline"]
    assert len(timeline["buckets"]) == data["buckets"] and timeline["backward_end_s"] > 0
    assert data["tcp_gbps"]["one_way"] > 0 and data["busbw_sweep"]
    assert "exposed communication fraction" in result.stdout
    assert set(data["reduce_scatter_s"]) == {"sendrecv", "all_sum"} and all(v > 0 for v in data["reduce_scatter_s"].values())
    assert "reduce-scatter of one" in result.stdout


def test_compile_estimate_removes_the_compiled_cost_of_the_same_size():
    # compiled updates cost 1 ms per 100 slots; the two first-seen shapes took 0.5 s longer than that
    times = [0.5 + 0.01, 0.01, 0.02, 0.5 + 0.02, 0.02]
    slots = [1000, 1000, 2000, 2000, 2000]
    first = [True, False, False, True, False]
    got = estimate_compile(times, slots, first)
    assert [round(g, 6) for g in got] == [0.5, 0.0, 0.0, 0.5, 0.0]


def test_summary_leaves_the_mask_out_of_the_wall_time_it_is_part_of():
    rows = [{"batch": 0.1, "compile": 0.0, "forward_backward": 0.7, "mask": 0.2, "reduce_update": 0.2,
             "new_shape": False, "slots": 100, "real_tokens": 51, "loss_tokens": 40}] * 2
    s = summarize(rows, 1)
    assert abs(s["seconds"] - 2.0) < 1e-9
    assert abs(s["share"]["forward_backward"] - 0.7) < 1e-9 and abs(s["share"]["mask"] - 0.2) < 1e-9
    assert abs(s["padded_share"] - 0.5) < 1e-9
    assert abs(s["loss_tokens_per_s"] - 40.0) < 1e-9


@pytest.mark.e2e
def test_profile_prints_the_split_and_counts_a_compile_per_new_shape(tmp_path):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "profile.json"
    result = lab("bench", "profile", str(recipe), "--steps", "6", "--json", str(out), "data.packing=true")
    assert result.returncode == 0, result.stderr
    assert "trace+compile" in result.stdout and "of which mask" in result.stdout
    doc = json.loads(out.read_text())
    updates = doc["per_update"]
    assert len(updates) == 6
    assert doc["summary"]["compiles"] == len(doc["distinct_shapes"]) == sum(u["new_shape"] for u in updates)
    assert all(u["mask"] > 0 for u in updates), "packed rows build a mask"
    assert updates[0]["new_shape"]
    assert all(u["compile"] == 0 for u in updates if not u["new_shape"]), "only a new shape compiles"


@pytest.mark.e2e
def test_bench_attention_times_both_ways(tmp_path):
    out = tmp_path / "attention.json"
    result = lab("bench", "attention", str(tiny_recipe(tmp_path)), "--widths", "40,70", "--blocks", "16",
                    "--batch", "2", "--rounds", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["fused_exp"] is (mx.default_device().type == mx.cpu), "blocks are timed as training runs them"
    assert [w["width"] for w in doc["widths"]] == [40, 70]
    for width in doc["widths"]:
        assert len(width["rounds"]) == 2 and all(set(r) == {"0", "16"} and min(r.values()) > 0
                                                 for r in width["rounds"])
        ratios = [r["0"] / r["16"] for r in width["rounds"]]  # within a round
        v = width["variants"]["16"]
        assert v["speedup"] == pytest.approx(sum(ratios) / 2), "the median of two rounds"
        assert (v["speedup_min"], v["speedup_max"]) == (min(ratios), max(ratios))
    assert "block 16" in result.stdout


@pytest.mark.e2e
def test_bench_attention_refuses_bad_widths(tmp_path):
    result = lab("bench", "attention", str(tiny_recipe(tmp_path)), "--widths", "0,x")
    assert result.returncode == 2
    assert "--widths" in result.stderr
