"""`mlx-dp bench comm` runs end to end and reports what the issue asks for."""

import json
import sys

from conftest import mlx_dp, without_matplotlib

KEYS = {"step_time_s", "exposed_comm_fraction", "hidden_comm_ratio", "busbw_ratio", "peak_memory_bytes"}


def test_bench_comm_end_to_end(tmp_path):
    # the stock BLAS (conftest unsets MLX_DP_BLAS) and no matplotlib: progress, an estimate, no traceback
    out = tmp_path / "comm.json"
    result = mlx_dp("bench", "comm", "-n", "2", "--arch", "qwen3-0.6b", "--layers", "1", "--width-divisor", "8",
                    "--seq", "16", "--steps", "2", "--warmup", "1", "--sweep-reps", "1", "--sweep-max-mb", "4",
                    "--json", str(out), timeout=600,
                    env={"MLX_DP_CACHE": str(tmp_path / "cache"), **without_matplotlib(tmp_path)})
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
