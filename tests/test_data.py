"""Loading and tokenizing: formats, masking, caching, and bad rows named by line."""


import numpy as np
import pytest

from conftest import TINY_DATA, write_jsonl
from trainer.data import tokenized as data_mod
from trainer.config.load import DataConfig
from trainer.data.tokenized import load_splits
from trainer.errors import DataError


def test_completion_rows_mask_the_prompt(tokenizer, tmp_path):
    rows = [{"prompt": f"what does cow number {i} eat?", "completion": "the cow eats grass."} for i in range(6)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    split = load_splits(DataConfig(path=str(tmp_path)), tokenizer, ("train",), show_progress=False)["train"]
    messages = [{"role": "user", "content": rows[0]["prompt"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": rows[0]["completion"]}])
    i = int(np.where(split.lengths == len(full))[0][0])
    assert split.sample(i).tolist() == list(full)
    assert split.prompt_lengths[i] == len(prompt)
    mask = split.target_mask(i)
    assert mask[:len(prompt) - 1].sum() == 0 and mask[len(prompt) - 1:].all()
    unmasked = load_splits(DataConfig(path=str(tmp_path), mask_prompt=False), tokenizer, ("train",),
                           show_progress=False)["train"]
    assert (unmasked.prompt_lengths == 0).all()


def test_text_and_chat_formats(tokenizer, tmp_path):
    write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat sat on the mat."}] * 3)
    split = load_splits(DataConfig(path=str(tmp_path / "text.jsonl")), tokenizer, ("train",), False)["train"]
    assert split.sample(0)[-1] == tokenizer.eos_token_id and (split.prompt_lengths == 0).all()
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there."}]}]
    write_jsonl(tmp_path / "chat.jsonl", chat * 3)
    split = load_splits(DataConfig(path=str(tmp_path / "chat.jsonl")), tokenizer, ("train",), False)["train"]
    assert 0 < split.prompt_lengths[0] < split.lengths[0]


def test_directory_with_splits_and_formats(tokenizer):
    splits = load_splits(DataConfig(path=str(TINY_DATA), max_seq_length=512), tokenizer, ("train", "valid", "test"),
                         show_progress=False)
    assert set(splits) == {"train", "valid", "test"}
    assert len(splits["train"]) > len(splits["valid"]) > 0


def test_malformed_jsonl_row_names_file_and_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok one"}, {"text": "ok two"}, '{"text": "broken', {"text": "x"}])
    with pytest.raises(DataError, match=rf"{path} line 3 is not valid JSON"):
        load_splits(DataConfig(path=str(path)), tokenizer, ("train",), False)


def test_row_without_the_field_names_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"},
                                                 {"prompt": "e", "completion": "f"}])
    with pytest.raises(DataError, match=rf"{path} line 2: 'completion' is missing"):
        load_splits(DataConfig(path=str(path)), tokenizer, ("train",), False)


def test_rows_with_no_usable_field(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}] * 2)
    with pytest.raises(DataError, match=r"no usable field.*found \['question', 'answer'\]"):
        load_splits(DataConfig(path=str(path)), tokenizer, ("train",), False)


def test_empty_and_missing_files(tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_splits(DataConfig(path=str(tmp_path / "empty.jsonl")), tokenizer, ("train",), False)
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(path=str(tmp_path / "nope.jsonl")), tokenizer, ("train",), False)
    with pytest.raises(DataError, match="has no train file"):
        load_splits(DataConfig(path=str(tmp_path)), tokenizer, ("train",), False)


def test_long_samples_dropped_truncated_or_refused(tokenizer, tmp_path):
    rows = [{"text": "word " * 40}] * 3 + [{"text": "short one."}] * 3
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    dropped = load_splits(DataConfig(path=str(path), max_seq_length=20), tokenizer, ("train",), False)["train"]
    assert len(dropped) == 3 and "dropped 3 of 6" in dropped.notes[0]
    cut = load_splits(DataConfig(path=str(path), max_seq_length=20, long_samples="truncate"), tokenizer,
                      ("train",), False)["train"]
    assert len(cut) == 6 and cut.lengths.max() == 20
    only_long = write_jsonl(tmp_path / "all_long.jsonl", rows[:3])
    with pytest.raises(DataError, match=r"all 3 samples .* longer than data.max_seq_length=20"):
        load_splits(DataConfig(path=str(only_long), max_seq_length=20), tokenizer, ("train",), False)


def test_tokenization_is_cached(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"sample {i}."} for i in range(20)])
    first = load_splits(DataConfig(path=str(path)), tokenizer, ("train",), False)["train"]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(data_mod, "_processor", no_tokenizing)
    second = load_splits(DataConfig(path=str(path)), tokenizer, ("train",), False)["train"]
    assert first.fingerprint() == second.fingerprint()
    # a changed file is tokenized again (and here fails, proving the cache was bypassed)
    write_jsonl(path, [{"text": f"other {i}."} for i in range(20)])
    with pytest.raises(AssertionError, match="tokenized again"):
        load_splits(DataConfig(path=str(path)), tokenizer, ("train",), False)


def test_parquet_and_csv(tokenizer, tmp_path):
    import datasets

    rows = [{"prompt": f"p {i}", "completion": f"c {i}."} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "valid.csv"), index=False)
    splits = load_splits(DataConfig(path=str(tmp_path)), tokenizer, ("train", "valid"), False)
    assert len(splits["train"]) == 5 and len(splits["valid"]) == 5
    assert splits["train"].fingerprint() == splits["valid"].fingerprint()


def test_a_file_replaced_in_place_is_read_again(tokenizer, tmp_path):
    # datasets keys its cache by path and mtime; the same size and mtime with other bytes must not hit it
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"text": "the cow eats grass."}] * 4)
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"))
    first = load_splits(cfg, tokenizer, ("train",), show_progress=False)["train"]
    stat = path.stat()
    write_jsonl(path, [{"text": "the dog eats bones."}] * 4)
    assert path.stat().st_size == stat.st_size
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = load_splits(cfg, tokenizer, ("train",), show_progress=False)["train"]
    assert first.fingerprint() != second.fingerprint()
    assert tokenizer.decode(second.sample(0).tolist()).count("dog") == 1


def test_bytes_that_are_not_utf8_and_blank_files_are_named(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n\n{"text": "bad \xff byte"}\n')
    with pytest.raises(DataError, match=r"train.jsonl line 4 is not valid UTF-8 \(byte 0xff at byte 15"):
        load_splits(DataConfig(path=str(path)), tokenizer, ("train",), show_progress=False)
    path.write_text("\n \n\t\n\n")
    with pytest.raises(DataError, match="holds only blank lines, no rows"):
        load_splits(DataConfig(path=str(path)), tokenizer, ("train",), show_progress=False)


def test_truncate_trains_what_mlx_lm_trains(tokenizer, tmp_path):
    """data.long_samples=truncate keeps a long sample's first max_seq_length tokens and scores the same
    targets as mlx_lm.lora's iterate_batches + default_loss on the same row (so comparisons use
    identical samples)."""
    import mlx.core as mx
    from mlx_lm.tuner.trainer import iterate_batches

    from trainer.data.batches import make_batch

    row = {"text": " ".join(f"word{i}" for i in range(60))}
    path = write_jsonl(tmp_path / "long.jsonl", [row])
    full = load_splits(DataConfig(path=str(path), max_seq_length=4096), tokenizer, ("train",), False)["train"]
    cut = load_splits(DataConfig(path=str(path), max_seq_length=24, long_samples="truncate"), tokenizer,
                      ("train",), False)["train"]
    tokens = list(full.sample(0))
    assert len(tokens) > 24
    theirs, lengths = next(iterate_batches([(tokens, 0)], 1, 24))
    ours = make_batch(cut, np.array([0]), 0, 1, 1, 1)
    assert np.array_equal(np.asarray(theirs)[0, :24], cut.sample(0)), "the same first 24 tokens"
    steps = mx.arange(1, theirs.shape[1])
    their_mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])  # mlx-lm's default_loss
    assert ours.tokens == int(their_mask.sum().item()) == 23, "the same targets count"
    assert np.array_equal(ours.targets[0, :23], np.asarray(theirs)[0, 1:24])


@pytest.mark.parametrize("name, text, message", [
    ("cut.jsonl", '{"text": "broken row cut here\n',
     "line 3 is not valid JSON (the row ends at column 29 inside a string that opens at column 10)"),
    ("cut-crlf.jsonl", '{"text": "broken row cut here\r\n',
     "line 3 is not valid JSON (the row ends at column 29 inside a string that opens at column 10)"),
    ("cut-list.jsonl", '{"text": "x", "tags": [1, 2\n', "line 3 is not valid JSON (the row ends at column 27 before "
                                                         "its JSON is complete)"),
    ("colon.jsonl", '{"text" "ok"}\n', "line 3 is not valid JSON (expecting ':' delimiter at column 9)"),
    ("tab.jsonl", '{"text": "a\tb"}\n', "line 3 is not valid JSON (invalid control character at column 12)"),
    ("document.json", None, "is not valid JSON (expecting ',' delimiter at line 3 column 15)"),
])
def test_a_json_error_names_the_true_line_and_column(tokenizer, tmp_path, name, text, message):
    path = tmp_path / name
    if text is None:  # one JSON list over several lines: the line and column are the file's
        path.write_text('[{"text": "ok one"},\n {"text": "ok two"},\n {"text": "x" "y"}]\n')
    else:
        path.write_bytes(b'{"text": "ok one"}\n{"text": "ok two"}\n' + text.encode())
    with pytest.raises(DataError) as error:
        load_splits(DataConfig(path=str(path)), tokenizer, ("train",), False)
    assert str(error.value) == f"{path} {message}"
    assert " at at " not in str(error.value)


def test_a_malformed_file_is_our_one_sentence_and_datasets_state_is_put_back(tokenizer, tmp_path, capfd):
    """datasets logs pyarrow's (or pandas') words and leaves a progress bar before it raises; none of that is
    printed, and its verbosity and progress-bar switch are as they were, after a failure and a success."""
    import datasets
    from datasets.utils import logging as datasets_logging

    before = datasets_logging.get_verbosity(), datasets.utils.are_progress_bars_disabled()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text" "ok"}\n')
    (tmp_path / "bad.csv").write_text('prompt,completion\na,b\n"c,d\n')
    (tmp_path / "good.jsonl").write_text('{"text": "a fine row."}\n')
    capfd.readouterr()
    for name, message in (("bad.jsonl", "line 2 is not valid JSON"), ("bad.csv", "could not load")):
        with pytest.raises(DataError, match=message) as error:
            load_splits(DataConfig(path=str(tmp_path / name)), tokenizer, ("train",), False)
        assert "An error occurred while generating the dataset" not in str(error.value), "the parser's words"
        assert (datasets_logging.get_verbosity(), datasets.utils.are_progress_bars_disabled()) == before
    load_splits(DataConfig(path=str(tmp_path / "good.jsonl")), tokenizer, ("train",), False)
    assert (datasets_logging.get_verbosity(), datasets.utils.are_progress_bars_disabled()) == before
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == "", printed
