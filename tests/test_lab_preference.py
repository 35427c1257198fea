"""The lab's ``bench preference``: ratios within rounds, the peer's batching, the same work in its terms."""

from pathlib import Path

import yaml

from lab.bench.preference import our_overrides, parse_args, peer_config
from lab.bench.preference_eval import _overlap, peer_reachable, ratios
from trainer.config.load import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_ratios_are_taken_within_each_round():
    runs = []
    # round 0 ran on a machine 2x slower than round 1: each round's ratio is still 1.5
    for r, slow in ((0, 2.0), (1, 1.0)):
        runs += [{"round": r, "world_size": 1, "tool": "mlx-dp", "pairs_per_s": 60 / slow},
                 {"round": r, "world_size": 1, "tool": "mlx-lm-lora", "pairs_per_s": 40 / slow},
                 {"round": r, "world_size": 2, "tool": "mlx-dp", "pairs_per_s": 100 / slow}]
    one = ratios(runs, "pairs_per_s", 1)
    assert one["per_round"] == [1.5, 1.5] and one["median"] == 1.5
    assert ratios(runs, "pairs_per_s", 2)["median"] is None  # no peer run at 2: no ratio, not a guess


def test_peer_batching_reaches_one_pair_in_n_at_n_ranks():
    # 32 pairs of distinct lengths, batch 8: at 2 ranks every rank takes pairs 0, 2, 4, 6 of each chunk
    train = [{"chosen": [0] * (i + 1)} for i in range(32)]
    assert peer_reachable(train, 8, 1) == 32
    assert peer_reachable(train, 8, 2) == 16
    assert peer_reachable(train[:30], 8, 1) == 24  # a short last chunk is never dealt


def test_overlap_tells_shared_from_disjoint_pairs():
    same = _overlap([[[1, 2], [1, 2]], [[3, 4], [3, 4]]], "test")
    assert same["pairs_shared_by_ranks_per_update"] == [2, 2] and same["distinct_pairs_per_update"] == [2, 2]
    assert not same["ranks_disjoint"]
    apart = _overlap([[[1, 2], [3, 4]]], "test")
    assert apart["ranks_disjoint"] and apart["distinct_pairs_per_update"] == [4]


def test_the_peer_gets_the_global_batch_and_ours_a_share(tmp_path):
    args = parse_args(["--global-batch", "8", "--steps", "20"])
    assert "training.batch_size=4" in our_overrides(args, 2, tmp_path / "run")
    cfg = load_config(str(ROOT / "recipes" / "tiny-dpo.yaml"), our_overrides(args, 2, tmp_path / "run"))
    peer = peer_config(cfg, args, tmp_path / "adapters")
    assert peer["batch_size"] == 8 and peer["iters"] == 20 and peer["beta"] == cfg.method.beta
    assert peer["lora_parameters"] == {"rank": cfg.method.rank, "scale": cfg.method.scale,
                                       "dropout": cfg.method.dropout}
    # our adamw's defaults, spelled out: mlx's AdamW would otherwise decay weights by 0.01
    assert peer["optimizer_config"] == {"adamw": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}}
    assert cfg.training.max_grad_norm is None and cfg.training.warmup_steps == 0  # the peer has neither
    yaml.safe_dump(peer)  # its --config file
