"""DPO's reference cache is checked before use: a manifest, a checksum, the shape and finite values; a bad one is
computed again, with a line that says why, and training then equals a clean run's."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import ROOT, TINY_MODEL, mlx_dp, read_weights, start_ranks
from trainer.config.load import DataConfig, MethodConfig
from trainer.errors import ModelError
from trainer.objectives import reference
from trainer.parallel import World

SETTINGS = {"attention_block": 0, "fused_exp": False, "pad_multiple": 16}
WORLD = World(None, 0, 1, "local")


@pytest.fixture(scope="module")
def model():
    from mlx_lm import load

    from trainer.model.load import apply_method

    m, _ = load(str(TINY_MODEL))
    apply_method(m, MethodConfig(rank=4, scale=4.0), seed=0)
    return m


@pytest.fixture(scope="module")
def valid(tokenizer, tmp_path_factory):
    """A few held-out pairs of tiny-preference: every reference pass here is short."""
    from trainer.data.pairs import load_pair_splits

    data = tmp_path_factory.mktemp("reference-pairs")
    rows = (ROOT / "data" / "tiny-preference" / "valid.jsonl").read_text().splitlines()[:20]
    (data / "train.jsonl").write_text("\n".join(rows[:4]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(rows[4:]) + "\n")
    cfg = DataConfig(path=str(data), max_seq_length=64)
    return load_pair_splits(cfg, tokenizer, ("valid",), show_progress=False)["valid"]


@pytest.fixture(scope="module")
def clean(model, valid, tmp_path_factory):
    """A clean cache: its directory, its file and the values computed into it."""
    cache = tmp_path_factory.mktemp("clean-reference")
    found = reference.attach(WORLD, model, {"valid": valid}, str(cache), SETTINGS)
    assert found["valid"]["reference"] == "computed"
    return cache, Path(found["valid"]["file"]), valid.reference.copy()


def test_the_manifest_vouches_for_the_bytes_shape_and_key(clean):
    import hashlib

    cache, path, values = clean
    manifest = json.loads(reference.manifest_path(path).read_text())
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["shape"] == [len(values), 2] and manifest["dtype"] == "float32" and manifest["key"] == path.stem
    assert {"reference_version", "mlx", "numpy"} <= set(manifest)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, f"{path.stem}.json"]), "no temporaries"


def _copy(clean, tmp_path):
    cache, path, values = clean
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "cache" / path.relative_to(cache), values


def _forge(path, fill: float, manifest: str) -> None:
    """Overwrite the values with ``fill`` (right shape and dtype); keep the manifest (its checksum now stale),
    delete it, or forge one for the new bytes' shape and key with a checksum that is not theirs."""
    values = np.load(path)
    np.save(path, np.full_like(values, fill))
    if manifest == "none":
        reference.manifest_path(path).unlink()
    elif manifest == "forged":
        forged = json.loads(reference.manifest_path(path).read_text())
        forged["sha256"] = "0" * 64
        reference.manifest_path(path).write_text(json.dumps(forged))


@pytest.mark.parametrize("fill, manifest, why", [
    (np.nan, "stale", "holds {values} values that are not finite"),
    (np.nan, "none", "holds {values} values that are not finite"),
    (0.0, "stale", "does not match the checksum in its manifest"),
    (0.0, "forged", "does not match the checksum in its manifest"),
    (0.0, "none", "has no manifest"),
])
def test_a_bad_cache_is_computed_again_with_a_line_that_says_why(clean, model, valid, tmp_path, capsys, fill,
                                                                  manifest, why):
    path, values = _copy(clean, tmp_path)
    _forge(path, fill, manifest)
    capsys.readouterr()
    found = reference.attach(WORLD, model, {"valid": valid}, str(tmp_path / "cache"), SETTINGS)
    out = capsys.readouterr().out
    assert found["valid"] == {"reference": "computed", "file": str(path)}
    why = why.format(values=values.size)
    assert f"reference log-probs of {len(valid)} valid pairs: computing them again, over 1 rank(s), with the model " \
           f"before tuning, because the cache {path} {why}" in out, out
    assert np.array_equal(valid.reference, values), "the values a clean run uses"
    again = reference.attach(WORLD, model, {"valid": valid}, str(tmp_path / "cache"), SETTINGS)
    assert again["valid"]["reference"] == "cached", "the rewritten cache passes its checks"


def test_a_cache_of_another_shape_or_an_unreadable_manifest_is_not_used(clean, model, valid, tmp_path, capsys):
    path, values = _copy(clean, tmp_path)
    np.save(path, values[:-1])
    assert reference._read(path, len(values), path.stem) == (None, f"holds float32 values of shape "
                                                                    f"({len(values) - 1}, 2), not float32 of shape "
                                                                    f"({len(values)}, 2)")
    np.save(path, values)
    reference.manifest_path(path).write_text("{not json")
    assert reference._read(path, len(values), path.stem)[1] == f"has an unreadable manifest ({path.stem}.json)"
    reference.manifest_path(path).write_text(json.dumps({"sha256": "x", "key": "another"}))
    assert reference._read(path, len(values), path.stem)[1] == "has a manifest written for another key"
    assert reference._read(tmp_path / "missing.npy", len(values), "missing") == (None, None), "absent: no note"


def test_a_model_that_gives_non_finite_log_probs_is_refused_by_name(model, valid, tmp_path):
    layer = model.layers[0].mlp.down_proj.linear
    saved = layer.weight
    layer.weight = mx.full(saved.shape, np.nan, saved.dtype)
    try:
        with pytest.raises(ModelError, match=rf"the model before tuning gives {len(valid)} of the {len(valid)} valid pairs a log-prob "
                                             r"that is not finite \(pair \d+ first\)"):
            reference.attach(WORLD, model, {"valid": valid}, str(tmp_path), SETTINGS)
    finally:
        layer.weight = saved
    assert not list(tmp_path.rglob("*.npy")), "nothing cached"


# ---------------------------------------------------------------------------- through the CLI


QUIET = ["eval.every=0", "eval.at_start=false", "checkpoint.every=0", "logging.progress_bar=false",
         "training.steps=3", "training.batch_size=4"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference-e2e")
    rows = (ROOT / "data" / "tiny-preference" / "train.jsonl").read_text().splitlines()[:16]
    (tmp / "data").mkdir()
    (tmp / "data" / "train.jsonl").write_text("\n".join(rows) + "\n")
    return tmp


@pytest.mark.e2e
def test_training_on_a_zeroed_cache_equals_a_clean_run(pairs_dir, blas_env, tmp_path):
    """The silent case: zeros of the right shape, under the manifest of the values they replaced."""
    common = ["train", "tiny-dpo", f"data.path={pairs_dir}/data", f"data.cache_dir={tmp_path}/cache", *QUIET]
    first = mlx_dp(*common, f"checkpoint.dir={tmp_path}/clean", env=blas_env)
    assert first.returncode == 0, first.stderr[-3000:]
    (path,) = (tmp_path / "cache" / "mlx-dp-reference").glob("*.npy")
    _forge(path, 0.0, "stale")
    second = mlx_dp(*common, f"checkpoint.dir={tmp_path}/zeroed", env=blas_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"because the cache {path} does not match the checksum in its manifest" in second.stdout, second.stdout
    clean, zeroed = read_weights(tmp_path / "clean"), read_weights(tmp_path / "zeroed")
    assert clean.keys() == zeroed.keys() and all(np.array_equal(clean[k], zeroed[k]) for k in clean)


@pytest.mark.e2e
def test_one_rank_with_a_bad_cache_makes_every_rank_compute(pairs_dir, blas_env, tmp_path):
    """Each rank has a disk of its own (its own ``~``): rank 0's cache is good, rank 1's is zeroed. Every rank
    computes together, rank 0 says why, and rank 1's cache is rewritten to rank 0's bytes."""
    homes = [tmp_path / "home0", tmp_path / "home1"]
    common = ["train", "tiny-dpo", f"data.path={pairs_dir}/data", "data.cache_dir=~/cache", *QUIET]
    first = mlx_dp(*common, f"checkpoint.dir={tmp_path}/one", env={**blas_env, "HOME": str(homes[0])})
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(homes[0] / "cache" / "mlx-dp-reference", homes[1] / "cache" / "mlx-dp-reference")
    (bad,) = (homes[1] / "cache" / "mlx-dp-reference").glob("*.npy")
    _forge(bad, 0.0, "stale")
    args = [*common, f"checkpoint.dir={tmp_path}/two", "training.batch_size=2"]
    procs = start_ranks(tmp_path, [args, args], env=blas_env, env_per_rank=[{"HOME": str(h)} for h in homes])
    codes = [p.wait(timeout=300) for p in procs]
    log = (tmp_path / "rank0.log").read_text()
    assert codes == [0, 0], log[-3000:] + (tmp_path / "rank1.log").read_text()[-3000:]
    assert "computing them again, over 2 rank(s), with the model before tuning, because the cache on 1 other " \
           "rank(s) failed its checks" in log, log[-3000:]
    good = homes[0] / "cache" / "mlx-dp-reference" / bad.name
    assert bad.read_bytes() == good.read_bytes(), "the same values on 1 or 2 ranks"
    assert reference.manifest_path(bad).read_text() == reference.manifest_path(good).read_text()
