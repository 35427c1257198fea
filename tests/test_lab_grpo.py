"""The lab's ``bench grpo``: each tool's reports read alike, ratios within rounds, the same work in the peer's terms."""

from pathlib import Path

import pytest
import yaml

from lab.bench import grpo_peer_rewards
from lab.bench.grpo import check_comparable, our_overrides, parse_args, peer_config, peer_flags
from lab.bench.grpo_eval import generation, our_figures, peer_completion_tokens, peer_indices, peer_update_times, rates
from lab.bench.preference_eval import ratios
from trainer.config.load import load_config
from trainer.errors import ConfigError
from trainer.objectives.rewards import build_rewards

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "tiny-grpo.yaml")


def test_peer_update_times_start_after_its_first_validation_and_drop_its_last():
    # validation 1 ends at t=10 (inside iteration 1); updates report at 12, 13, 15; the last iteration
    # held a 0.5 s validation before its rollout
    vals = [{"time": 10.0, "val_time": 3.0}, {"time": 14.5, "val_time": 0.5}]
    rows = [{"time": 12.0}, {"time": 13.0}, {"time": 15.0}]
    assert peer_update_times(rows, vals) == [2.0, 1.0, 1.5]


def test_peer_completion_tokens_are_the_growth_of_its_running_total():
    rows = [{"trained_tokens": 300.0}, {"trained_tokens": 520.0}, {"trained_tokens": 700.0}]
    assert peer_completion_tokens(rows) == [300, 220, 180]


def test_rates_count_every_update_and_the_steady_median_after_warmup():
    times, prompts, tokens = [4.0, 1.0, 2.0, 1.0], [8, 8, 8, 8], [400, 100, 200, 100]
    r = rates(times, prompts, tokens, warmup=1)
    assert r["prompts_per_s"] == 32 / 8 and r["completion_tokens_per_s"] == 800 / 8
    assert r["steady_prompts_per_s"] == 8.0  # median of 8, 4, 8 prompts/s: the compiling first update left out
    assert r["completion_tokens_per_prompt"] == 25.0


def test_our_figures_read_one_metrics_record_per_update():
    rows = [{"step_time_s": 0.5, "prompts": 8, "completion_tokens": 300.0},
            {"step_time_s": 0.25, "prompts": 8, "completion_tokens": 200.0}]
    assert our_figures(rows) == {"times": [0.5, 0.25], "prompts": [8, 8], "completion_tokens": [300, 200]}


def test_uneven_generation_is_the_slowest_rank_minus_the_mean():
    # update 1: rank 1 generates 1 s longer; update 2: even; rank 0 also reported an update rank 1 did not
    ranks = [[{"step": 1, "generate_s": 1.0}, {"step": 2, "generate_s": 2.0}, {"step": 3, "generate_s": 9.0}],
             [{"step": 1, "generate_s": 2.0}, {"step": 2, "generate_s": 2.0}]]
    g = generation(ranks, times=[4.0, 4.0])
    assert g["generate_s_per_rank"] == [3.0, 4.0]
    assert g["generation_share"] == (2.0 + 2.0) / 8.0
    assert g["uneven_generation_s"] == 0.5 and g["uneven_generation_share"] == 0.5 / 8.0
    assert generation([[], []], [1.0]) == {}


def test_ratios_are_taken_within_each_round():
    runs = []
    for r, slow in ((0, 2.0), (1, 1.0)):  # round 0 ran on a machine 2x slower: the ratio is still 2
        runs += [{"round": r, "world_size": 2, "tool": "mlx-dp", "prompts_per_s": 10 / slow},
                 {"round": r, "world_size": 2, "tool": "mlx-lm-lora", "prompts_per_s": 5 / slow}]
    assert ratios(runs, "prompts_per_s", 2)["per_round"] == [2.0, 2.0]


def test_peer_prompts_map_to_our_indices_by_prompt_and_answer():
    index = {("the owl eats", "worms."): [3], ("the owl is", "pink."): [7, 9]}
    assert peer_indices({"prompts": ["the owl is", "the owl eats"], "answers": ["pink.", "worms."]}, index) == [3, 7]
    assert peer_indices({"prompts": ["a fox"], "answers": ["x."]}, index) == [None]


@pytest.mark.parametrize("completion, answer", [(" worms.", "worms."), ("Worms", "worms."),
                                                (" worms. the owl", "worms."), ("", "worms."),
                                                ("  two   words. ", "two words.")])
def test_the_peer_reward_file_is_our_exact_match(completion, answer):
    ours = build_rewards([{"kind": "exact_match"}])[0]
    mine = ours("p", completion, {"answer": answer}, 3, "row 1")
    assert grpo_peer_rewards.exact_match_answer(["p"], [completion], [answer]) == [mine]


def test_the_peer_gets_the_global_batch_and_its_grpo_keys_as_flags(tmp_path):
    args = parse_args(["--global-batch", "8", "--steps", "20", "method.group_size=4"])
    overrides = our_overrides(args, 2, tmp_path / "run")
    assert "training.batch_size=4" in overrides and overrides[0] == "method.group_size=4"
    cfg = load_config(RECIPE, overrides)
    check_comparable(cfg)
    peer = peer_config(cfg, args, tmp_path / "adapters")
    assert peer["batch_size"] == 8 and peer["iters"] == 20 and peer["beta"] == cfg.method.beta == 0
    assert peer["lora_parameters"] == {"rank": cfg.method.rank, "scale": cfg.method.scale,
                                       "dropout": cfg.method.dropout}
    assert peer["optimizer_config"] == {"adamw": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}}
    assert cfg.training.max_grad_norm is None and cfg.training.warmup_steps == 0  # the peer has neither
    flags = peer_flags(cfg)
    # its YAML merge drops these: they must be flags
    assert flags[flags.index("--group-size") + 1] == "4"
    assert flags[flags.index("--max-completion-length") + 1] == str(cfg.method.max_completion_tokens)
    assert flags[flags.index("--temperature") + 1] == str(cfg.method.temperature)
    assert not {"group_size", "max_completion_length", "temperature", "epsilon", "grpo_loss_type"} & set(peer)
    yaml.safe_dump(peer)  # its --config file


def test_work_the_peer_cannot_do_alike_is_refused(tmp_path):
    args = parse_args([])
    for override in ("method.loss_type=dapo", "data.format=auto", "method.updates_per_generation=2"):
        cfg = load_config(RECIPE, our_overrides(args, 1, tmp_path / "run") + [override, "checkpoint.every=2"])
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            check_comparable(cfg)


def test_rollouts_compares_each_setting_with_off_in_its_own_round():
    from lab.bench.rollouts import summarize

    runs = [{"round": 0, "setting": "off", "prompts_per_s": 10.0, "uneven_generation_share": 0.1},
            {"round": 0, "setting": "auto", "prompts_per_s": 12.0, "uneven_generation_share": 0.1},
            {"round": 1, "setting": "off", "prompts_per_s": 5.0},  # a slower round: the ratio still counts alone
            {"round": 1, "setting": "auto", "prompts_per_s": 7.5}]
    s = summarize(runs, ["off", "auto"])
    assert s["auto"]["ratio_to_off"]["per_round"] == [1.2, 1.5] and s["off"]["ratio_to_off"]["median"] == 1.0
    assert s["auto"]["uneven_generation_share"]["median"] == 0.1  # a run without timings is left out
