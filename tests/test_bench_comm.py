"""`mlx-dp bench comm` runs end to end and reports what the issue asks for."""

import json

from conftest import mlx_dp

KEYS = {"step_time_s", "exposed_comm_fraction", "hidden_comm_ratio", "busbw_ratio", "peak_memory_bytes"}


def test_bench_comm_end_to_end(tmp_path):
    out = tmp_path / "comm.json"
    result = mlx_dp("bench", "comm", "-n", "2", "--arch", "qwen3-0.6b", "--layers", "1", "--width-divisor", "8",
                    "--seq", "16", "--steps", "2", "--warmup", "1", "--sweep-reps", "1", "--sweep-max-mb", "4",
                    "--json", str(out), timeout=600, env={"MLX_DP_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
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
