"""Packing: fewer padded tokens, the same loss, attention kept inside each sample."""

import numpy as np
import pytest

from conftest import TINY_DATA, TINY_MODEL, mlx_dp, tiny_recipe
from trainer.data.batches import epoch_batches, make_batch
from trainer.config.load import DataConfig
from trainer.data.tokenized import load_splits
from trainer.data.packing import pack_rows


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from mlx_lm import load

    return load(str(TINY_MODEL))


def test_rows_respect_capacity_and_keep_every_sample():
    lengths = np.random.default_rng(0).integers(5, 60, 300)
    rows = pack_rows(lengths, 128)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(300))
    assert all(lengths[row].sum() <= 128 for row in rows)
    assert len(rows) <= 1.15 * lengths.sum() / 128 + 1, "best fit wastes little room"


def loss_and_padding(model, split, rows):
    from trainer.objectives.base import token_loss_sum
    from trainer.objectives.sft import SFT

    to_arrays = SFT(None).arrays

    loss, tokens, real, cells = 0.0, 0, 0, 0
    for batch_ids in epoch_batches(split.lengths, rows, seed=0, epoch=0, shuffle=False):
        batch = make_batch(split, batch_ids, 0, 1, rows, 16)
        loss += token_loss_sum(model, *to_arrays(batch)).item()
        tokens += batch.tokens
        real += int(split.lengths[batch_ids].sum())
        cells += batch.inputs.shape[0] * (batch.inputs.shape[1] + 1)
    return loss, tokens, 1 - real / cells


def test_packed_loss_equals_unpacked_loss(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cfg = DataConfig(path=str(TINY_DATA), max_seq_length=128)
    plain = load_splits(cfg, tokenizer, ("valid",), show_progress=False)["valid"]
    packed = load_splits(DataConfig(path=str(TINY_DATA), max_seq_length=128, packing=True, pack_length=128), tokenizer,
                         ("valid",), show_progress=False)["valid"]
    assert len(packed) < len(plain) / 4
    loss_a, tokens_a, pad_a = loss_and_padding(model, plain, 8)
    loss_b, tokens_b, pad_b = loss_and_padding(model, packed, 2)
    assert tokens_a == tokens_b, "the same targets count"
    assert loss_b == pytest.approx(loss_a, rel=1e-5), "attention must not cross samples"
    assert pad_b < pad_a


def test_attention_does_not_cross_samples(model_and_tokenizer):
    """Changing one sample of a packed row leaves the others' logits untouched."""
    import mlx.core as mx

    from trainer.data.packing import SegmentMask

    model, _ = model_and_tokenizer
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    segments = mx.array([[0] * 5 + [1] * 3])
    cache = [SegmentMask(segments)] * len(model.layers)
    first = model(mx.array([a + b]), cache=cache)
    second = model(mx.array([[40, 41, 42, 43, 44] + b]), cache=cache)
    alone = model(mx.array([b]))
    assert mx.allclose(first[:, 5:], second[:, 5:], atol=1e-5).item()
    assert mx.allclose(first[:, 5:], alone, atol=1e-4).item(), "a packed sample sees only itself"


@pytest.mark.e2e
def test_training_with_packing_runs(tmp_path):
    recipe = tiny_recipe(tmp_path, data={"packing": True, "max_seq_length": 128}, training={"steps": 2})
    result = mlx_dp("train", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "packed 3168 samples into" in result.stdout


def test_packed_row_length_is_chosen_from_the_data():
    from trainer.data.packing import pack_length

    lengths = np.array([100, 120, 150, 180, 200])  # mean 150
    assert pack_length(lengths, 2048, 16) == 225  # 1.5 x 150 = 225: inputs of 224, a multiple of 16
    assert pack_length(lengths, 200, 16) == 200, "capped by max_seq_length"
    assert pack_length(lengths * 2, 2048, 16) == 465, "follows the data: 450, inputs rounded up to 464"


def test_pack_length_key_is_checked():
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="data.pack_length"):
        DataConfig(path="x", max_seq_length=64, pack_length=100)


def test_samples_longer_than_the_row_get_their_own_row():
    lengths = np.array([300, 40, 50, 60, 200])
    rows = pack_rows(lengths, 128)
    assert [0] in rows and [4] in rows
    assert sorted(i for row in rows for i in row) == list(range(5))


def test_packing_says_when_it_cannot_win():
    from trainer.data.packing import PackedSplit, outlook

    class Split:
        def __init__(self, lengths):
            self.lengths, self.loss_counts = np.array(lengths), np.array(lengths) - 1
            self.name = self.source = "s"

    same = Split([33] * 64)  # equal lengths: unpacked batches are already full
    for blocked in (False, True):
        assert "cannot win" in outlook(PackedSplit(same, pack_rows(same.lengths, 65)), 8, 16, blocked)
    mixed = Split(list(np.random.default_rng(0).integers(5, 120, 256)))
    assert outlook(PackedSplit(mixed, pack_rows(mixed.lengths, 129)), 8, 16, False) is None
    # a few % saved, like the variable-length text set: it lost with whole-row attention, won in blocks
    varlen = Split(list(np.minimum(512, np.random.default_rng(0).lognormal(np.log(116), 0.7, 512).astype(int) + 2)))
    packed = PackedSplit(varlen, pack_rows(varlen.lengths, 225))
    assert "cannot win" in outlook(packed, 16, 16, blocked=False)
    assert outlook(packed, 16, 16, blocked=True) is None
