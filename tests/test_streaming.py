"""Streaming (``data.streaming``): each rank reads its own share, resumes exactly, and says what it cannot do."""

import json

import numpy as np
import pytest

from conftest import (MLX_DP, PYTHON, ROOT, TINY_DATA, mlx_dp, one_error_line, read_metrics, read_weights, run,
                      tiny_recipe, write_jsonl)
from trainer.config.load import DataConfig
from trainer.data.shares import HubShare, JsonlShare, ParquetShare
from trainer.data.sources import Source
from trainer.data.stream import stream_splits
from trainer.data.stream_batches import RowStream
from trainer.data.tokenized import load_splits
from trainer.errors import ConfigError, DataError, UserError
from trainer.state.progress import DataPosition, TrainingState

ROWS_WORKER = str(ROOT / "tests" / "workers" / "rows.py")
TRAIN_MANY = str(ROOT / "tests" / "workers" / "train_many.py")
TINY_ROWS = [json.loads(line) for line in (TINY_DATA / "train.jsonl").read_text().splitlines()]


def _read_all(share, start=None, count=7) -> list:
    position, rows, ended = share.start if start is None else start, [], False
    while not ended:
        got, position, ended = share.read(position, count)
        rows.extend(got)
    return rows


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
@pytest.mark.parametrize("lines", [0, 1, 3, 50])
def test_every_line_of_a_jsonl_file_is_read_by_exactly_one_rank(tmp_path, ending, lines):
    text = "".join(("\n" if i % 7 == 3 else "") + json.dumps({"id": i, "pad": "x" * (i % 13)}) + ending
                   for i in range(lines))
    path = tmp_path / "rows.jsonl"
    path.write_bytes((text[:-len(ending)] if lines % 2 else text).encode())  # odd counts: no final newline
    for world in range(1, 7):
        ids = [row["id"] for rank in range(world) for _, row in _read_all(JsonlShare(str(path), rank, world))]
        assert ids == list(range(lines)), world


def test_a_jsonl_share_resumes_at_a_line_offset_and_names_a_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"id": i} for i in range(40)] + ["{not json"])
    share, before = JsonlShare(str(path), 1, 2), _read_all(JsonlShare(str(path), 0, 2))
    first, after, _ = share.read(share.start, 5)
    start = before[-1][1]["id"] + 1  # rank 1 begins at the line after rank 0's last
    assert [row["id"] for _, row in first] == list(range(start, start + 5))
    again = JsonlShare(str(path), 1, 2)
    assert [r["id"] for _, r in again.read(after, 3)[0]] == [first[-1][1]["id"] + k for k in (1, 2, 3)]
    with pytest.raises(DataError, match=r"rows.jsonl line 41 is not valid JSON"):
        _read_all(again)


def test_parquet_rows_are_shared_by_row_groups_and_resume_at_a_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": list(range(103))}), path, row_group_size=10)
    for world in (1, 2, 3, 4):
        ids = [row["id"] for rank in range(world) for _, row in _read_all(ParquetShare(str(path), rank, world))]
        assert ids == list(range(103))
    share = ParquetShare(str(path), 1, 3)
    assert [row["id"] for _, row in share.read(40, 4)[0]] == [40, 41, 42, 43]


def test_a_hub_style_stream_splits_between_ranks_and_resumes_by_skipping(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"id": i} for i in range(30)])
    source = Source("train", "rows[train]", "json", data_files=str(path), hub_split="train")
    shares = [HubShare(source, rank, 2) for rank in range(2)]
    ids = sorted(row["id"] for share in shares for _, row in _read_all(share, count=4))
    assert ids == list(range(30))
    rows, position, _ = shares[1].read(0, 5)
    resumed = HubShare(source, 1, 2)
    assert resumed.read(3, 2)[0] == [(3, rows[3][1]), (4, rows[4][1])]
    for share in shares + [resumed]:
        share.close()


def _stream(path, tokenizer, **data) -> object:
    cfg = DataConfig(path=str(path), streaming=True, max_seq_length=128, stream_window=2, **data)
    return stream_splits(cfg, tokenizer, ("train", "valid"), False, load_splits)["train"]


@pytest.mark.parametrize("packing", [False, True])
def test_a_stream_resumed_from_its_position_serves_what_it_would_have_served(tmp_path, tokenizer, packing):
    path = write_jsonl(tmp_path / "rows.jsonl", TINY_ROWS[:101])
    train = _stream(path, tokenizer, packing=packing)

    def served(stream, updates):
        return [(b.indices.tolist(), b.global_tokens, b.inputs.shape) for _ in range(updates) for b in stream.take(2)]

    whole = served(RowStream(train, 3, 0, 2, 5, 16, hosted=(0, 1), prefetch=True), 40)
    first = RowStream(train, 3, 0, 2, 5, 16, hosted=(0, 1), prefetch=True)
    before = served(first, 13)
    saved = TrainingState.from_dict({**TrainingState(data=first.position()).to_dict()}).data  # through state.json
    again = RowStream(train, 3, 0, 2, 5, 16, hosted=(0, 1), prefetch=True)
    assert again.restore(saved) is None
    assert before + served(again, 27) == whole
    assert again.epoch >= 2  # the 40 updates crossed epochs


def test_two_shares_are_disjoint_and_cover_an_epoch_padding_the_shorter_one(tmp_path, tokenizer):
    # shares are equal in bytes: long lines (an unused column) at the start leave rank 0 fewer rows
    rows = [{**row, "note": "x" * 1000} if i < 20 else row for i, row in enumerate(TINY_ROWS[:101])]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    train = _stream(path, tokenizer)
    stream = RowStream(train, 4, 0, 2, 0, 16, hosted=(0, 1))
    seen, empty = [[], []], 0
    while True:
        batches = stream.take(1)
        if stream.epoch > 0:
            break
        for k, batch in enumerate(batches):
            seen[k].extend(batch.indices.tolist())
            empty += batch.tokens == 0
    lines = [0] + list(np.cumsum([len(line) + 1 for line in path.read_text().splitlines()]))[:-1]
    assert not set(seen[0]) & set(seen[1])  # row ids are the lines' byte offsets
    assert sorted(seen[0] + seen[1]) == lines
    assert empty >= 1  # 101 rows do not split evenly: a share ran out first and got padding rows


def test_a_parquet_stream_covers_its_rows_once_an_epoch_and_says_how_far_it_is(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(TINY_ROWS[:90]), path, row_group_size=16)
    stream = RowStream(_stream(path, tokenizer), 4, 0, 2, 0, 16, hosted=(0, 1))
    seen, progress = [], []
    while True:
        batches = stream.take(1)
        if stream.epoch > 0:
            break
        seen += [i for b in batches for i in b.indices.tolist()]
        progress.append(stream.epoch_progress())
    assert sorted(seen) == list(range(90))  # row numbers, each once
    assert progress == sorted(progress) and 0 < progress[-1] <= 1.0


def test_a_stream_resumes_only_on_the_ranks_and_rows_it_was_saved_with(tmp_path, tokenizer):
    train = _stream(write_jsonl(tmp_path / "rows.jsonl", TINY_ROWS[:40]), tokenizer)
    stream = RowStream(train, 4, 0, 2, 0, 16, hosted=(0, 1))
    stream.take(1)
    with pytest.raises(UserError, match=r"saved 2 rank\(s\) at 4 rows each.*resume on 2 rank\(s\)"):
        RowStream(train, 4, 0, 1, 0, 16).restore(stream.position())
    with pytest.raises(UserError, match="saved without streaming"):
        RowStream(train, 4, 0, 2, 0, 16, hosted=(0, 1)).restore(DataPosition(micro_batch=8))
    with pytest.raises(UserError, match="parallel.balance=off"):
        stream.set_split([5, 3])


def test_what_cannot_stream_says_so_in_one_sentence(tmp_path, tokenizer):
    csv = tmp_path / "rows.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(DataError, match="reads .jsonl and .parquet files and hub datasets, not .*rows.csv"):
        _stream(csv, tokenizer)
    with pytest.raises(DataError, match="whole hub splits, not the slice train\\[:80%\\]"):
        stream_splits(DataConfig(hf_dataset={"path": "org/set"}, streaming=True), tokenizer, ("train",), False,
                      load_splits)
    from trainer.data.prompts import load_prompt_splits

    with pytest.raises(ConfigError, match="prompt rows for grpo"):
        load_prompt_splits(DataConfig(path=str(csv), streaming=True), tokenizer)


@pytest.mark.e2e
def test_epochs_of_a_stream_of_unknown_length_are_refused_and_a_given_length_is_used(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", TINY_ROWS[:64])
    recipe = tiny_recipe(tmp_path, data={"path": str(path), "streaming": True, "max_seq_length": 128},
                         training={"steps": None, "epochs": 1, "batch_size": 8})
    line = one_error_line(mlx_dp("train", str(recipe)))
    assert "training.epochs=1 needs the length of the training set" in line and "data.stream_rows" in line
    given = mlx_dp("train", str(recipe), "data.stream_rows=64", "checkpoint.every=0")
    assert given.returncode == 0, given.stderr[-2000:]
    assert max(r["step"] for r in read_metrics(tmp_path / "run") if "train_loss" in r) == 8  # 64 rows / 8


@pytest.mark.e2e
def test_two_ranks_stream_disjoint_shares_and_a_resumed_stream_equals_an_uninterrupted_one(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", TINY_ROWS[:101])  # about 13 updates an epoch at 2 x 4 rows
    recipe = tiny_recipe(tmp_path, data={"path": str(path), "streaming": True, "stream_window": 2,
                                         "max_seq_length": 128},
                         training={"batch_size": 4, "steps": 20}, checkpoint={"every": 0})
    whole = run([MLX_DP, "launch", "-n", "2", "--", PYTHON, ROWS_WORKER, str(tmp_path / "rows"), "-", "--", "train",
                 str(recipe), f"checkpoint.dir={tmp_path / 'whole'}"], timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    per_rank = [[i for line in (tmp_path / "rows" / f"rank{r}.jsonl").read_text().splitlines()
                 for batch in json.loads(line)["indices"] for i in batch] for r in range(2)]
    lines = [0] + list(np.cumsum([len(line) + 1 for line in path.read_text().splitlines()]))[:-1]
    first_epoch = [set(ids[:len(set(ids))]) for ids in per_rank]
    assert not first_epoch[0] & first_epoch[1] and sorted(first_epoch[0] | first_epoch[1]) == lines
    assert max(r["epoch"] for r in read_metrics(tmp_path / "whole") if "train_loss" in r) >= 1
    stopped = f"checkpoint.dir={tmp_path / 'stopped'}"
    (tmp_path / "spec.json").write_text(json.dumps([
        {"recipe": str(recipe), "overrides": [stopped], "faults": "stop:step=9"},
        {"recipe": str(recipe), "overrides": [stopped], "resume": True}]))
    result = run([MLX_DP, "launch", "-n", "2", "--", PYTHON, TRAIN_MANY, str(tmp_path / "spec.json")], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = read_weights(tmp_path / "whole"), read_weights(tmp_path / "stopped")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    other = mlx_dp("train", str(recipe), stopped, "training.steps=30", "training.batch_size=8", "--resume")
    assert "saved 2 rank(s) at 4 rows each" in one_error_line(other)  # the same global batch, other shares


@pytest.mark.e2e
def test_the_streaming_bench_times_every_variant_and_writes_its_json(tmp_path):
    from conftest import lab

    out = tmp_path / "bench.json"
    result = lab("bench", "streaming", "--rows", "200", "--steps", "1", "--rounds", "1", "--warmup-steps", "0",
                 "--json", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["rows"] == 200 and set(doc["raw"]) == {"streaming", "loaded-cold", "loaded-warm"}
    assert all(run["updates"] == 1 and run["peak_rss_mb_per_rank"][0] > 0 for runs in doc["raw"].values()
               for run in runs)
    assert set(doc["summary"]["ratios"]) == {"streaming/loaded-cold", "streaming/loaded-warm"}
    assert "streaming/loaded-cold: wall" in result.stdout
