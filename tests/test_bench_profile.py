"""``mlx-dp bench profile``: the per-phase split of an update, and how compile time is estimated."""

import json

from conftest import mlx_dp, tiny_recipe
from trainer.bench.profile import estimate_compile, summarize


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


def test_profile_prints_the_split_and_counts_a_compile_per_new_shape(tmp_path):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "profile.json"
    result = mlx_dp("bench", "profile", str(recipe), "--steps", "6", "--json", str(out), "data.packing=true")
    assert result.returncode == 0, result.stderr
    assert "trace+compile" in result.stdout and "of which mask" in result.stdout
    doc = json.loads(out.read_text())
    updates = doc["per_update"]
    assert len(updates) == 6
    assert doc["summary"]["compiles"] == len(doc["distinct_shapes"]) == sum(u["new_shape"] for u in updates)
    assert all(u["mask"] > 0 for u in updates), "packed rows build a mask"
    assert updates[0]["new_shape"]
    assert all(u["compile"] == 0 for u in updates if not u["new_shape"]), "only a new shape compiles"
