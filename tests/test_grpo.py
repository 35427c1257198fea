"""GRPO: rewards, world-size-independent rollouts, N ranks equal to one process, exact resume, tiny-grpo learns.

The reference comparison of tests/test_equivalence.py for an on-policy objective:
the completions of a prompt are keyed by (seed, generation, prompt, sample) and
sampled one prompt's group at a time, so 2 ranks at b prompts draw the very
completions one process draws at 2b; every loss term is normalised over the
whole update, so with SGD the weights match to float rounding.
"""

import json
import re

import numpy as np
import pytest
import yaml

from conftest import ROOT, TINY_MODEL, mlx_dp, one_error_line, read_metrics, read_weights, train_one_and_two
from trainer.errors import ConfigError, DataError
from trainer.objectives.rewards import build_rewards

PROMPTS = ROOT / "data" / "tiny-prompts"
SGD = ["training.optimizer=sgd", "training.learning_rate=0.05"]
CASES = {  # name: overrides of both sides (2 ranks: 2 prompts each per micro-batch; one process: 4)
    "grpo": [*SGD],
    "grpo-accum": [*SGD, "training.grad_accumulation=2"],
    "dapo-beta": [*SGD, "method.loss_type=dapo", "method.beta=0.04", "method.epsilon_high=0.28"],
    "dr-grpo-reuse": [*SGD, "method.loss_type=dr_grpo", "method.updates_per_generation=2"],
}
TWO_RANK_ONLY = {"grpo-uneven": ("grpo-accum", ["parallel.balance=[3, 1]"])}


def grpo_recipe(tmp, **sections) -> str:
    recipe = {
        "model": {"path": str(TINY_MODEL)},
        "data": {"path": str(PROMPTS), "format": "text", "max_seq_length": 32},
        "method": {"type": "lora", "rank": 4, "scale": 4.0, "objective": "grpo", "group_size": 4,
                   "max_completion_tokens": 6, "temperature": 1.0, "beta": 0.0,
                   "rewards": [{"kind": "exact_match", "column": "answer"}, {"kind": "length", "target": 3,
                                                                             "weight": 0.1}]},
        "training": {"steps": 4, "seed": 0},
        "eval": {"every": 2, "at_start": True, "max_batches": 1},
        "checkpoint": {"every": 2},
        "logging": {"every": 1, "progress_bar": False},
    }
    for section, values in sections.items():
        recipe[section].update(values)
    path = tmp / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


# ---------------------------------------------------------------------------- rewards (in process)


class Split:
    texts, locations = ["the owl eats"], ["prompts.jsonl line 7"]

    def __init__(self, row):
        self.rows = [row]

    def row(self, i):
        return self.rows[i]


def score(specs, completion, row, tokens=2):
    rewards = build_rewards(specs)
    return [r("the owl eats", completion, row, tokens, "prompts.jsonl line 7") for r in rewards]


def test_built_in_rewards_score_as_documented():
    row = {"answer": "worms.", "solution": "so it is 3,200 in all. #### 3200"}
    assert score([{"kind": "exact_match"}], " Worms. ", row) == [1.0]
    assert score([{"kind": "exact_match"}], " worms. the owl", row) == [0.0]
    assert score([{"kind": "contains"}], "it eats worms, mostly", row) == [1.0]
    assert score([{"kind": "contains"}], "it eats wormsy things", row) == [0.0]
    assert score([{"kind": "number_match", "column": "solution"}], "that makes 3200", row) == [1.0]
    assert score([{"kind": "number_match", "column": "solution"}], "3200 or 3201", row) == [0.0]
    assert score([{"kind": "format", "pattern": r"^\w+\.$", "match": "full"}], " worms. ", row) == [1.0]
    assert score([{"kind": "length", "target": 4}], "x", row, tokens=4) == [1.0]
    assert score([{"kind": "length", "target": 4}], "x", row, tokens=6) == [0.5]
    assert score([{"kind": "length", "target": 4}], "x", row, tokens=9) == [0.0]


@pytest.mark.parametrize("specs, message", [
    ([], "method.rewards is empty"),
    ([{"kind": "exact"}], r"method.rewards\[0\].kind must be one of exact_match"),
    ([{"kind": "format"}], r"method.rewards\[0\]: format needs a valid regular expression"),
    ([{"kind": "exact_match", "weight": "high"}], r"method.rewards\[0\].weight must be a finite number"),
    ([{"kind": "exact_match", "colum": "a"}], r"unknown key method.rewards\[0\].colum"),
    ([{"function": "no_such_module_here:f"}], r"could not import no_such_module_here"),
    ([{"function": "json:no_such_function"}], r"json has no function no_such_function"),
])
def test_a_bad_reward_is_one_sentence_naming_its_place(specs, message):
    with pytest.raises(ConfigError, match=message):
        build_rewards(specs)


def test_a_reward_that_raises_or_returns_no_number_names_itself_and_the_row(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def boom(p, c, row):\n    return 1 / 0\n\n"
                                            "def text(p, c, row):\n    return 'good'\n")
    monkeypatch.chdir(tmp_path)
    boom, text = build_rewards([{"function": "my_rewards:boom"}, {"function": "my_rewards:text"}])
    with pytest.raises(DataError, match=r"^reward my_rewards:boom raised ZeroDivisionError on prompts.jsonl line 7"):
        boom("p", "c", {}, 1, "prompts.jsonl line 7")
    with pytest.raises(DataError, match=r"reward my_rewards:text returned 'good' on prompts.jsonl line 7; a reward"):
        text("p", "c", {}, 1, "prompts.jsonl line 7")


# ---------------------------------------------------------------------------- through the CLI


@pytest.mark.e2e
def test_a_row_without_the_reward_column_and_a_raising_reward_stop_the_run_in_one_sentence(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": "the owl eats", "answer": "worms."}] * 7 + [{"prompt": "the cow eats"}]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    missing = mlx_dp("train", grpo_recipe(tmp_path), f"data.path={data}", "training.batch_size=2")
    assert missing.returncode == 2
    assert one_error_line(missing).endswith(f"{data}/train.jsonl line 8: no 'answer' column, which reward exact_match "
                                            "reads")
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:7]))
    (tmp_path / "bad_rewards.py").write_text("def score(prompt, completion, row):\n    raise ValueError('no')\n")
    raising = mlx_dp("train", grpo_recipe(tmp_path), f"data.path={data}", "training.batch_size=2",
                     f"checkpoint.dir={tmp_path}/run2", 'method.rewards=[{"function": "bad_rewards:score"}]',
                     env={"PYTHONPATH": str(tmp_path)})
    assert raising.returncode == 2
    assert "rewards: running your function(s) bad_rewards:score on every completion" in raising.stdout
    assert re.search(rf"reward bad_rewards:score raised ValueError on {data}/train.jsonl line [1-7]: no$",
                     one_error_line(raising))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo-equivalence")
    path = grpo_recipe(tmp)
    single, multi = [], []
    for name, overrides in CASES.items():
        single.append([path, *overrides, "training.batch_size=4", f"checkpoint.dir={tmp}/one-{name}"])
        multi.append([path, *overrides, "training.batch_size=2", f"checkpoint.dir={tmp}/two-{name}"])
    for name, (base, extra) in TWO_RANK_ONLY.items():
        multi.append([path, *CASES[base], *extra, "training.batch_size=2", f"checkpoint.dir={tmp}/two-{name}"])
    single.append([path, *CASES["grpo"], "training.batch_size=4", "training.seed=1", f"checkpoint.dir={tmp}/other"])
    stop = [path, *CASES["grpo-accum"], "training.batch_size=4", f"checkpoint.dir={tmp}/resumed"]
    single += [{"recipe": stop[0], "overrides": stop[1:], "faults": "stop:step=2"},
               {"recipe": stop[0], "overrides": stop[1:], "resume": True}]
    train_one_and_two(tmp, single, multi, timeout=900)
    return tmp


def worst_difference(a, b):
    assert a.keys() == b.keys()
    scale = max(np.abs(v).max() for v in a.values())
    return max(np.abs(a[k] - b[k]).max() for k in a) / scale


def _trained(run_dir) -> list:
    return [m for m in read_metrics(run_dir) if "train_loss" in m]


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_what_one_process_trains(runs, case):
    one, two = read_weights(runs / f"one-{case}"), read_weights(runs / f"two-{case}")
    assert worst_difference(one, two) <= 1e-5
    assert worst_difference(one, read_weights(runs / "other")) > 1e-3, "another seed samples and trains otherwise"
    sides = [_trained(runs / f"{side}-{case}") for side in ("one", "two")]
    for key in ("reward", "completion_tokens", "completion_length_max", "zero_spread_share"):
        assert [m[key] for m in sides[0]] == [m[key] for m in sides[1]], (key, "the same completions")
    assert np.allclose([m["train_loss"] for m in sides[0]], [m["train_loss"] for m in sides[1]], rtol=1e-4,
                       atol=1e-6)


@pytest.mark.e2e
def test_an_uneven_split_trains_the_same(runs):
    assert worst_difference(read_weights(runs / "one-grpo-accum"), read_weights(runs / "two-grpo-uneven")) <= 1e-5
    assert [m["rows_per_rank"] for m in _trained(runs / "two-grpo-uneven")] == [[3, 1]] * 4


@pytest.mark.e2e
def test_a_resumed_run_continues_the_same_curve_exactly(runs):
    uninterrupted, resumed = read_weights(runs / "one-grpo-accum"), read_weights(runs / "resumed")
    assert all(np.array_equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert [m["reward"] for m in _trained(runs / "resumed")] == [m["reward"] for m in _trained(runs / "one-grpo-accum")]


@pytest.mark.e2e
def test_metrics_users_look_for_are_logged(runs):
    last = _trained(runs / "one-dapo-beta")[-1]
    for key in ("reward", "reward_std", "reward_exact_match", "reward_length", "completion_length",
                "completion_length_max", "truncated_share", "kl", "clip_fraction", "zero_spread_share", "prompts",
                "prompts_per_s", "tokens_per_s", "samples"):
        assert key in last, key
    assert last["kl"] > 0, "beta > 0: the KL to the reference is measured"
    assert {"prompt", "completion", "reward"} <= set(last["samples"][0])
    val = [m for m in read_metrics(runs / "one-grpo") if "val_reward" in m]
    assert [m["step"] for m in val] == [0, 2, 4] and all(m["val_loss"] == -m["val_reward"] for m in val)


@pytest.mark.e2e
def test_tiny_grpo_learns_to_answer_and_stop_and_eval_prints_the_reward(tmp_path, blas_env):
    """The shipped recipe's global batch on one process (the 2-rank run trains the same, as above)."""
    run_dir = tmp_path / "run"
    trained = mlx_dp("train", "tiny-grpo", "training.batch_size=8", "training.steps=20", "eval.every=20",
                     f"checkpoint.dir={run_dir}", "logging.progress_bar=false", env=blas_env, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    val = [m["val_reward"] for m in read_metrics(run_dir) if "val_reward" in m]
    assert val[0] <= 0.4 and val[-1] >= 0.8, val
    scored = mlx_dp("eval", "tiny-grpo", f"checkpoint.dir={run_dir}", env=blas_env)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "test: mean reward 0." in scored.stdout and "held-out prompts" in scored.stdout


def test_generation_time_is_counted_as_this_ranks_compute_once_per_generation():
    """parallel.balance weighs a rank by its measured compute; GRPO's generation is this rank's work too,
    timed before the sum that makes every rank wait for the slowest, and only on the update that generates
    (updates_per_generation > 1 reuses the rows: nothing to count)."""
    import time
    from types import SimpleNamespace

    from trainer.config.load import load_config
    from trainer.objectives.grpo import GRPO

    cfg = load_config(ROOT / "recipes" / "tiny-grpo.yaml", ["method.updates_per_generation=2"])
    objective = GRPO(cfg.method)

    def complete(model, index, generation):
        time.sleep(0.05)
        return {"index": index}

    # Only the per-prompt work is replaced (and the sum over ranks); GRPO's own rollout and _generate run.
    objective._complete = complete
    objective._rows = lambda batch, done: {"inputs": None, "targets": None, "mask": np.ones((1, 1)), "real": 1,
                                           "advantages": None}
    objective._side_logps = lambda model, rows: (None, None)
    objective._record = lambda prompts, groups, hosted: ({}, [0])
    import trainer.objectives.grpo as grpo

    made = []
    original = grpo.GRPOBatch
    grpo.GRPOBatch = lambda **fields: made.append(fields) or fields
    try:
        model = SimpleNamespace(training=True, eval=lambda: None, train=lambda mode=True: None)
        rows = lambda: [SimpleNamespace(indices=[0, 1], global_items=2)]  # noqa: E731
        objective.rollout(model, rows, step=1)
        assert objective.rollout_seconds >= 0.1  # two prompts of 0.05 s
        objective.rollout(model, rows, step=2)  # the same generation's second update
        assert objective.rollout_seconds == 0.0
        objective.rollout(model, rows, step=3)
        assert objective.rollout_seconds >= 0.1
        assert len(made) == 2
    finally:
        grpo.GRPOBatch = original
