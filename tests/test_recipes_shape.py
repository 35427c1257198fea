"""Every real-model recipe trains, by shape, on 2 ranks: so a recipe cannot rot.

No hub access here, so each recipe's model is rebuilt from its real config.json
(``data/archs``) with fewer layers, the tiny tokenizer's vocabulary and random
weights (4-bit quantized for QLoRA bases), then the recipe runs a few updates on
2 ranks with only what cannot be downloaded replaced: the model path and the data.
Everything else (method, rank, keys, optimizer, schedule, gradient checkpointing,
buckets) is the recipe's own.
"""

import json

import pytest

from conftest import TINY_DATA, TINY_MODEL, launched
from lab import synth
from trainer.config.load import load_config
from trainer.tools.recipes import all_recipes

REAL = [p for p in all_recipes() if not load_config(p).model.path.startswith("builtin:")]
PARAM_BUDGET = 200e6  # keep each reduced model small enough for a 2-core CI machine


def arch_for(model_path: str):
    """(arch name, quantized?) whose recorded hub ids include the recipe's model.path."""
    return synth.arch_for_model_path(model_path)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shape-models")


def reduced_model(cache, arch: str, quantized: bool):
    out = cache / f"{arch}{'-4bit' if quantized else ''}"
    if (out / "config.json").exists():
        return out
    vocab = synth.tokenizer_vocab_size(TINY_MODEL)
    real = synth.load_arch(arch)
    layers = 2 if synth.count_params(synth.reduce_config(real, num_layers=2, vocab_size=vocab)) <= PARAM_BUDGET else 1
    config = synth.reduce_config(real, num_layers=layers, vocab_size=vocab)
    return synth.make_random_model(config, out, TINY_MODEL, seed=0, quantize_bits=4 if quantized else None)


def test_every_real_recipe_names_a_known_architecture():
    assert len(REAL) >= 8
    for path in REAL:
        arch_for(load_config(path).model.path)


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", REAL, ids=[p.stem for p in REAL])
def test_recipe_trains_on_its_real_shape(recipe, tmp_path, blas_env, model_cache):
    cfg = load_config(recipe)
    arch, quantized = arch_for(cfg.model.path)
    model = reduced_model(model_cache, arch, quantized)
    run_dir = tmp_path / "run"
    data = TINY_DATA if cfg.method.objective == "sft" else TINY_DATA.parent / "tiny-preference"  # pairs for DPO
    result = launched(2, "train", str(recipe), f"model.path={model}", "model.dtype=null",
                      "data.hf_dataset=null", f"data.path={data}", "data.max_seq_length=48",
                      "training.steps=2", "training.batch_size=1", "training.grad_accumulation=1",
                      "training.warmup_steps=0", "eval.at_start=false", "eval.max_batches=1",
                      f"checkpoint.dir={run_dir}", "checkpoint.every=0", "logging.every=1",
                      "logging.progress_bar=false", env=blas_env, timeout=900)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-3000:]
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter["fine_tune_type"] == cfg.method.type
    if cfg.method.type != "full":
        assert adapter["lora_parameters"]["rank"] == cfg.method.rank
    losses = [json.loads(l)["train_loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in l]
    assert len(losses) == 2 and all(isinstance(x, float) for x in losses)
