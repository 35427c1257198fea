"""Preference pairs in one process: row formats, bad rows, pair batches, the losses' maths, the reference cache."""


import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
import pytest

from conftest import TINY_MODEL, tiny_recipe, write_jsonl
from trainer.config.load import DataConfig, MethodConfig, load_config
from trainer.data.pair_batches import PairStream, make_pair_batch
from trainer.data.pairs import load_pair_splits
from trainer.parallel import World
from trainer.errors import ConfigError, DataError

TEMPLATE_PAIRS = [  # (row, prompt messages, chosen messages, rejected messages)
    ({"prompt": "what pet does vito have?", "chosen": "vito has a dog.", "rejected": "vito likes tea."},
     [{"role": "user", "content": "what pet does vito have?"}],
     [{"role": "assistant", "content": "vito has a dog."}], [{"role": "assistant", "content": "vito likes tea."}]),
    ({"prompt": "hi", "chosen": "hello.", "rejected": "go away.", "system": "be kind."},
     [{"role": "system", "content": "be kind."}, {"role": "user", "content": "hi"}],
     [{"role": "assistant", "content": "hello."}], [{"role": "assistant", "content": "go away."}]),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello."}],
      "rejected": [{"role": "assistant", "content": "no."}]},
     [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello."}],
     [{"role": "assistant", "content": "no."}]),
    ({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}],
      "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no."}]},
     [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello."}],
     [{"role": "assistant", "content": "no."}]),
    ({"prompt": "hi", "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}],
      "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no."}], "score_chosen": 9.0},
     [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello."}],
     [{"role": "assistant", "content": "no."}]),
    ({"prompt": "hi", "chosen": {"content": "hello."}, "rejected": {"messages": [{"role": "assistant",
                                                                                   "content": "no."}]},
      "preference_score": 0.5},
     [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello."}],
     [{"role": "assistant", "content": "no."}]),
    ({"prompt": [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hi"}],
      "chosen": "hello.", "rejected": "no.", "system": "be kind."},
     [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hi"}],
     [{"role": "assistant", "content": "hello."}], [{"role": "assistant", "content": "no."}]),
    ({"prompt": "hi", "chosen": [{"role": "assistant", "content": "hello."}], "rejected": "no."},
     [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello."}],
     [{"role": "assistant", "content": "no."}]),
]


def load(path, tokenizer, **data):
    return load_pair_splits(DataConfig(path=str(path), **data), tokenizer, ("train",), show_progress=False)["train"]


@pytest.mark.parametrize("index", range(len(TEMPLATE_PAIRS)),
                         ids=["prompt-strings", "system", "conversational", "implicit-conversation",
                              "string-prompt-beside-conversations", "mlx-lm-lora-dicts",
                              "own-system-message-wins", "string-prompt-beside-replies"])
def test_each_format_renders_like_the_chat_row_of_the_same_turns(tokenizer, tmp_path, index):
    row, prompt, chosen, rejected = TEMPLATE_PAIRS[index]
    split = load(write_jsonl(tmp_path / "pairs.jsonl", [row] * 2), tokenizer)
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    for side, answer in ((split.chosen, chosen), (split.rejected, rejected)):
        assert side.sample(0).tolist() == list(tokenizer.apply_chat_template(prompt + answer))
        assert side.prompt_lengths[0] == len(head)
        assert side.target_mask(0)[:len(head) - 1].sum() == 0 and side.target_mask(0)[len(head) - 1:].all()


def test_implicit_text_prompt_is_the_shared_beginning_tokenized_as_text(tokenizer, tmp_path):
    row = {"chosen": "\n\nHuman: what pet does vito have?\n\nAssistant: a dog.",
           "rejected": "\n\nHuman: what pet does vito have?\n\nAssistant: tea."}
    split = load(write_jsonl(tmp_path / "hh.jsonl", [row] * 2), tokenizer)
    prompt = tokenizer.encode("\n\nHuman: what pet does vito have?\n\nAssistant:")
    assert split.chosen.prompt_lengths[0] == len(prompt) == split.rejected.prompt_lengths[0]
    assert split.chosen.sample(0).tolist() == prompt + tokenizer.encode(" a dog.", add_special_tokens=False) + [
        tokenizer.eos_token_id]


@pytest.mark.parametrize("bad, reason", [
    ({"prompt": "a", "chosen": "b"}, "'rejected' is missing"),
    ({"prompt": "a", "chosen": "b", "rejected": 3}, "'rejected' is neither a string nor a list of chat messages"),
    ({"prompt": "a", "chosen": "b", "rejected": [{"content": "c"}]}, "'rejected' is neither a string nor"),
    ({"chosen": "yes", "rejected": "no"}, "share no beginning"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     "begin with different messages"),
    ({"prompt": "a", "chosen": [{"role": "assistant"}], "rejected": "c"}, "'chosen' is neither a string nor"),
    ({"prompt": 7, "chosen": "b", "rejected": "c"}, "'prompt' is neither a string nor"),
])
def test_a_bad_row_is_one_sentence_naming_file_and_line(tokenizer, tmp_path, bad, reason):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, good, bad, good])
    with pytest.raises(DataError, match=rf"^{path} line 3: .*{reason}") as error:
        load(path, tokenizer)
    assert "\n" not in str(error.value)


USER, ASSISTANT = {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}
OR_CONVERSATIONS = " (or both must be whole conversations that begin with the same messages)"


@pytest.mark.parametrize("bad, reason", [
    ({"prompt": "a", "chosen": [USER], "rejected": [{"role": "user", "content": "c"}]},
     "'chosen' begins with a 'user' message and 'rejected' begins with a 'user' message, but an answer to 'prompt' "
     "must begin with an 'assistant' message" + OR_CONVERSATIONS),
    ({"prompt": "a", "chosen": "b", "rejected": [USER]},
     "'rejected' begins with a 'user' message, but an answer to 'prompt' must begin with an 'assistant' message"
     + OR_CONVERSATIONS),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [USER], "rejected": [ASSISTANT]},
     "'chosen' begins with a 'user' message, but an answer to 'prompt' must begin with an 'assistant' message"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [ASSISTANT],
      "rejected": [{"role": "system", "content": "c"}]},
     "'rejected' begins with a 'system' message, but an answer to 'prompt' must begin with an 'assistant' message"),
    ({"chosen": [USER, {"role": "user", "content": "again"}], "rejected": [USER, ASSISTANT]},
     "'chosen' begins with a 'user' message, but an answer after the messages both conversations share must "
     "begin with an 'assistant' message"),
])
def test_answers_with_the_wrong_role_name_the_roles_found_and_expected(tokenizer, tmp_path, bad, reason):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, bad, good])
    with pytest.raises(DataError) as error:
        load(path, tokenizer)
    assert str(error.value) == f"{path} line 2: {reason}"


def test_pairs_with_an_empty_or_blank_answer_are_dropped_and_counted(tokenizer, tmp_path):
    """Dropped with a count, not refused: such a pair teaches the model to prefer saying nothing (or to avoid
    it), and a hub dataset with a few cannot be mended in place; the note says how many there were."""
    good = {"prompt": "what pet does vito have?", "chosen": "vito has a dog.", "rejected": "vito likes tea."}
    rows = [good, {**good, "chosen": ""}, {**good, "chosen": "  \n "}, {**good, "rejected": ""},
            {**good, "chosen": [{"role": "assistant", "content": " "}]}, good,
            {"chosen": "Human: hi\n\nAssistant:", "rejected": "Human: hi\n\nAssistant: go away."}]
    split = load(write_jsonl(tmp_path / "pairs.jsonl", rows), tokenizer)
    assert len(split) == 2
    assert "dropped 5 of 7 pairs with an empty or blank answer (4 chosen, 1 rejected)" in split.notes, split.notes
    assert split.chosen.fingerprint() == load(write_jsonl(tmp_path / "good.jsonl", [good] * 2),
                                              tokenizer).chosen.fingerprint()
    with pytest.raises(DataError, match=r"no usable pairs remain in .*dropped 2 of 2 pairs with an empty or blank "
                                        r"answer \(1 chosen, 1 rejected\)"):
        load(write_jsonl(tmp_path / "blank.jsonl", rows[1:4:2]), tokenizer)


def test_rows_without_answers_name_the_columns_and_the_keys(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    with pytest.raises(DataError, match=r"no 'chosen' and 'rejected' fields.*data.chosen_feature"):
        load(path, tokenizer)


def test_custom_columns_and_whole_pairs_dropped_by_length_or_sameness(tokenizer, tmp_path):
    rows = [{"q": "what pet does vito have?", "good": "vito has a dog.", "bad": "vito likes tea."},
            {"q": "a", "good": "same.", "bad": "same."},
            {"q": "a", "good": "short.", "bad": "a very long answer " * 20}]
    split = load(write_jsonl(tmp_path / "pairs.jsonl", rows * 2), tokenizer, prompt_feature="q",
                 chosen_feature="good", rejected_feature="bad", max_seq_length=40)
    assert len(split) == 2
    assert any("dropped 2 of 6 pairs" in n for n in split.notes) and any("are the same" in n for n in split.notes)
    assert (split.lengths == np.maximum(split.chosen.lengths, split.rejected.lengths)).all()


def test_config_keys_and_impossible_values(tmp_path):
    assert MethodConfig().objective == "sft"
    for override, message in [("method.objective=ppo", "method.objective must be one of"),
                              ("method.beta=-1", "method.beta must be >= 0"),
                              ("method.label_smoothing=0.5", r"method.label_smoothing must be in \[0, 0.5\)"),
                              ("method.orpo_lambda=-1", "method.orpo_lambda must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(tiny_recipe(tmp_path), [override])
    from trainer.objectives.registry import make_objective

    with pytest.raises(ConfigError, match="method.beta must be positive with method.objective=dpo"):
        make_objective(load_config(tiny_recipe(tmp_path), ["method.objective=dpo", "method.beta=0"]))
    with pytest.raises(ConfigError, match="set data.packing=false"):  # the objective says which keys apply to it
        make_objective(load_config(tiny_recipe(tmp_path), ["method.objective=dpo", "data.packing=true"]))
    with pytest.raises(ConfigError, match="keep data.format=auto"):
        make_objective(load_config(tiny_recipe(tmp_path), ["method.objective=orpo", "data.format=chat"]))
    from trainer.config.load import describe_keys

    keys = {key for key, _, _ in describe_keys()}
    assert {"method.objective", "method.beta", "method.label_smoothing", "method.orpo_lambda",
            "data.chosen_feature", "data.rejected_feature", "data.system_feature"} <= keys


# ---------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def pairs(tokenizer):
    from trainer.library import resolve

    return load_pair_splits(DataConfig(path=resolve("builtin:tiny-preference"), max_seq_length=64), tokenizer,
                            ("train", "valid"), show_progress=False)


def test_a_pair_stays_on_one_rank_chosen_rows_then_rejected(pairs):
    split = pairs["train"]
    split.reference = np.stack([-np.arange(len(split)), -np.arange(len(split)) - 0.5], 1).astype(np.float32)
    try:
        batch = np.arange(5)  # a partial global batch of 5 pairs over 2 ranks of 3 rows
        parts = [make_pair_batch(split, batch, r, 2, 3, 16) for r in range(2)]
    finally:
        split.reference = None
    assert sorted(np.concatenate([p.indices for p in parts]).tolist()) == list(range(5))
    for part in parts:
        assert part.inputs.shape[0] == 6 and part.global_pairs == 5 and part.pairs == len(part.indices)
        assert part.valid.tolist() == [1.0] * part.pairs + [0.0] * (3 - part.pairs)
        for k, i in enumerate(part.indices):
            c, r = split.chosen.sample(i), split.rejected.sample(i)
            assert part.inputs[k, :len(c) - 1].tolist() == c[:-1].tolist()
            assert part.inputs[3 + k, :len(r) - 1].tolist() == r[:-1].tolist()
            assert part.reference[k] == -i and part.reference[3 + k] == -i - 0.5
        assert not part.mask[part.pairs:3].any() and not part.mask[3 + part.pairs:].any()
    assert parts[0].global_chosen_tokens == int(split.chosen.loss_counts[batch].sum())


def test_pair_stream_deals_the_same_global_batches_on_any_world_size(pairs):
    split = pairs["train"]
    one = PairStream(split, 4, 0, 1, seed=3, pad_multiple=16)
    two = [PairStream(split, 2, r, 2, seed=3, pad_multiple=16) for r in range(2)]
    two[0].set_split([3, 1]), two[1].set_split([3, 1])
    for _ in range(5):
        whole = next(one)
        halves = [next(s) for s in two]
        assert sorted(whole.indices.tolist()) == sorted(np.concatenate([h.indices for h in halves]).tolist())
        assert [len(h.indices) for h in halves] == [3, 1] and whole.global_pairs == halves[0].global_pairs == 4


# ---------------------------------------------------------------------------- the losses' maths


@pytest.fixture(scope="module")
def model():
    from mlx_lm import load

    from trainer.model.load import apply_method

    m, _ = load(str(TINY_MODEL))
    apply_method(m, MethodConfig(rank=4, scale=4.0), seed=0)
    for layer in m.layers:  # adapters away from their zero start, so the policy is not the reference
        layer.self_attn.q_proj.lora_b = mx.random.normal(layer.self_attn.q_proj.lora_b.shape, key=mx.random.key(1))
    return m


def logps_by_hand(model, batch):
    logits = np.array(model(mx.array(batch.inputs)).astype(mx.float32), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, batch.targets[..., None].astype(np.int64), -1)[..., 0]
    return (picked * batch.mask).sum(-1), batch.mask.sum(-1)


def log_sigmoid(x):
    return -np.logaddexp(0, -x)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_loss_matches_the_papers_formula_and_ignores_padding_pairs(pairs, model, objective):
    from trainer.objectives.registry import OBJECTIVES

    method = MethodConfig(objective=objective, beta=0.3, label_smoothing=0.1, orpo_lambda=0.7)
    obj = OBJECTIVES[objective](method)
    split = pairs["valid"]
    split.reference = np.random.default_rng(0).normal(-10, 2, (len(split), 2)).astype(np.float32)
    try:
        batch = make_pair_batch(split, np.arange(3), 0, 1, 4, 16)  # 3 pairs and one padding pair
    finally:
        split.reference = None
    scales = obj.scales([batch], 1)
    loss, stats = obj.loss(model, scales, *obj.arrays(batch))
    logp, count = logps_by_hand(model, batch)
    pc, pr, ref = logp[:3], logp[4:7], batch.reference.astype(np.float64)
    if objective == "dpo":
        z = 0.3 * ((pc - ref[:3]) - (pr - ref[4:7]))
        expected = (-(0.9) * log_sigmoid(z) - 0.1 * log_sigmoid(-z)).sum() / 3
        assert stats[1].item() == np.sum(z > 0) + 0.5 * np.sum(z == 0)
    else:
        mc, mr = pc / count[:3], pr / count[4:7]
        odds = (mc - mr) - (np.log1p(-np.exp(mc)) - np.log1p(-np.exp(mr)))
        expected = -pc.sum() / count[:3].sum() + 0.7 * (-log_sigmoid(odds)).sum() / 3
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert stats[-1].item() == np.sum(pc > pr) + 0.5 * np.sum(pc == pr)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_gradients_of_two_ranks_shares_sum_to_the_whole_batch(pairs, model, objective):
    """The per-pair and per-token normalisation by global counts, without processes: rank shares (uneven too)
    summed equal the gradient of the whole global batch."""
    from trainer.objectives.registry import OBJECTIVES

    obj = OBJECTIVES[objective](MethodConfig(objective=objective, beta=0.3))
    split = pairs["train"]
    split.reference = np.random.default_rng(1).normal(-10, 2, (len(split), 2)).astype(np.float32)
    try:
        batch = np.arange(8)
        whole = make_pair_batch(split, batch, 0, 1, 8, 16)
        shares = [make_pair_batch(split, batch, r, 2, n, 16, row_split=[6, 2]) for r, n in enumerate([6, 2])]
    finally:
        split.reference = None

    def grads(b, ranks):
        fn = nn.value_and_grad(model, lambda *a: obj.loss(model, obj.scales([b], ranks), *a)[0])
        return dict(tree_flatten(fn(*obj.arrays(b))[1]))

    expected = grads(whole, 1)
    got = [grads(s, 1) for s in shares]
    for name, value in expected.items():
        value, summed = np.array(value), np.array(got[0][name] + got[1][name])
        assert np.abs(summed - value).max() <= 1e-5 * np.abs(value).max(), name


# ---------------------------------------------------------------------------- the reference cache


def test_adapters_off_is_the_base_model_and_puts_the_adapters_back(model):
    from mlx_lm import load

    from trainer.objectives.reference import adapters_off

    base, _ = load(str(TINY_MODEL))
    x = mx.array([[1, 5, 9, 13, 17]])
    assert not np.allclose(np.array(model(x)), np.array(base(x)), atol=1e-4), "the adapters change the output"
    with adapters_off(model):
        assert np.array_equal(np.array(model(x)), np.array(base(x)))
    assert type(model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"


def test_reference_cache_is_keyed_by_data_model_and_settings(pairs, model, tmp_path):
    from trainer.objectives import reference

    world = World(None, 0, 1, "local")
    valid = pairs["valid"]
    settings = {"attention_block": 0, "fused_exp": False, "pad_multiple": 16}
    first = reference.attach(world, model, {"valid": valid}, str(tmp_path), settings)
    assert first["valid"]["reference"] == "computed"
    values = valid.reference.copy()
    again = reference.attach(world, model, {"valid": valid}, str(tmp_path), settings)
    assert again == {"valid": {**first["valid"], "reference": "cached"}}
    assert np.array_equal(valid.reference, values)
    # the reference is the base: the adapters' values do not matter, and nothing else is in the key
    weights = reference.base_digest(model)
    key = reference.cache_key(valid, weights, settings)
    assert reference.cache_path(str(tmp_path), key) == type(reference.cache_path(str(tmp_path), key))(
        first["valid"]["file"])
    other_settings = reference.cache_key(valid, weights, {**settings, "fused_exp": True})
    other_data = reference.cache_key(pairs["train"], weights, settings)
    layer = model.layers[0].mlp.down_proj.linear
    saved = layer.weight
    layer.weight = saved * 1.001
    try:
        other_model = reference.cache_key(valid, reference.base_digest(model), settings)
    finally:
        layer.weight = saved
    import dataclasses

    args = model.args
    model.args = dataclasses.replace(args, rms_norm_eps=args.rms_norm_eps * 2)  # config.json edited, same weights
    try:
        other_config = reference.cache_key(valid, reference.base_digest(model), settings)
    finally:
        model.args = args
    assert len({key, other_settings, other_data, other_model, other_config}) == 5
    # a damaged file is computed anew
    reference.cache_path(str(tmp_path), key).write_bytes(b"not an array")
    redo = reference.attach(world, model, {"valid": valid}, str(tmp_path), settings)
    assert redo["valid"]["reference"] == "computed" and np.array_equal(valid.reference, values)
