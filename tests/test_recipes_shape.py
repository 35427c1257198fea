"""Every real-model recipe trains, by shape, on 2 ranks: so a recipe cannot rot.

No hub access here, so each recipe's model is rebuilt from its real config.json
(``data/archs``) with fewer layers, the tiny tokenizer's vocabulary and random
weights (4-bit quantized for QLoRA bases), then the recipe runs a few updates on
2 ranks with only what cannot be downloaded replaced: the model path and the data.
Everything else (method, rank, keys, optimizer, schedule, gradient checkpointing,
buckets) is the recipe's own.

Kept cheap for a 2-core CI machine without changing what each run exercises:
the data are the first rows of the shipped sets (2 updates of batch 1 on 2 ranks
and one validation batch read a handful; DPO computes its reference log-probs
over the whole train split, so a short split keeps that pass short), and a
QLoRA base is its architecture at an eighth of the width (``width_divisor``:
head_dim, the GQA ratio, qk-norm and the 4-bit quantization stay), because
MLX's CPU quantized matmul is slow enough at full width to cost more than all
the other recipes together; the same architecture at full width is trained by
its LoRA recipe. GRPO's completions are cut short (:data:`SHORTER`).
"""

import json

import pytest

from conftest import TINY_DATA, TINY_MODEL, launched
from lab import synth
from trainer.config.load import load_config
from trainer.tools.recipes import all_recipes

REAL = [p for p in all_recipes() if not load_config(p).model.path.startswith("builtin:")]
PARAM_BUDGET = 200e6  # keep each reduced model small enough for a 2-core CI machine
QUANTIZED_WIDTH_DIVISOR = 8  # a 4-bit base at an eighth of its width (see the module docstring)
ROWS = {"train": 16, "valid": 4, "test": 4}  # rows per split; 2 updates read 4 train rows, validation 2


def arch_for(model_path: str):
    """(arch name, quantized?) whose recorded hub ids include the recipe's model.path."""
    return synth.arch_for_model_path(model_path)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shape-models")


# The shipped set each objective trains on (the recipes' hub sets are out of reach); DPO and ORPO train on pairs.
DATA = {"sft": TINY_DATA, "grpo": TINY_DATA.parent / "tiny-prompts"}
PAIRS = TINY_DATA.parent / "tiny-preference"
# Random weights never end a completion early: GRPO generates to its cap, group_size completions per prompt.
# The shape is tested, not the length: a short cap (the recipe's group size, rewards and loss stay).
SHORTER = {"grpo": ["method.max_completion_tokens=16"]}


@pytest.fixture(scope="session")
def short_data(tmp_path_factory):
    """The first rows of each shipped set a recipe may train on, by source folder name."""
    out = tmp_path_factory.mktemp("shape-data")
    for source in {*DATA.values(), PAIRS}:
        (out / source.name).mkdir()
        for split, rows in ROWS.items():
            lines = (source / f"{split}.jsonl").read_text().splitlines(keepends=True)[:rows]
            (out / source.name / f"{split}.jsonl").write_text("".join(lines))
    return out


def reduced_model(cache, arch: str, quantized: bool):
    out = cache / f"{arch}{'-4bit' if quantized else ''}"
    if (out / "config.json").exists():
        return out
    vocab = synth.tokenizer_vocab_size(TINY_MODEL)
    real = synth.load_arch(arch)
    narrow = {"width_divisor": QUANTIZED_WIDTH_DIVISOR} if quantized else {}
    two = synth.reduce_config(real, num_layers=2, vocab_size=vocab, **narrow)
    layers = 2 if synth.count_params(two) <= PARAM_BUDGET else 1
    config = synth.reduce_config(real, num_layers=layers, vocab_size=vocab, **narrow)
    return synth.make_random_model(config, out, TINY_MODEL, seed=0, quantize_bits=4 if quantized else None)


def test_every_real_recipe_names_a_known_architecture():
    assert len(REAL) >= 8
    for path in REAL:
        arch_for(load_config(path).model.path)


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", REAL, ids=[p.stem for p in REAL])
def test_recipe_trains_on_its_real_shape(recipe, tmp_path, blas_env, model_cache, short_data):
    cfg = load_config(recipe)
    arch, quantized = arch_for(cfg.model.path)
    model = reduced_model(model_cache, arch, quantized)
    run_dir = tmp_path / "run"
    data = short_data / DATA.get(cfg.method.objective, PAIRS).name
    result = launched(2, "train", str(recipe), f"model.path={model}", "model.dtype=null",
                      "data.hf_dataset=null", f"data.path={data}", "data.max_seq_length=48",
                      "training.steps=2", "training.batch_size=1", "training.grad_accumulation=1",
                      "training.warmup_steps=0", "eval.at_start=false", "eval.max_batches=1",
                      f"checkpoint.dir={run_dir}", "checkpoint.every=0", "logging.every=1",
                      "logging.progress_bar=false", *SHORTER.get(cfg.method.objective, []), env=blas_env,
                      timeout=900)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-3000:]
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter["fine_tune_type"] == cfg.method.type
    if cfg.method.type != "full":
        assert adapter["lora_parameters"]["rank"] == cfg.method.rank
    losses = [json.loads(l)["train_loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in l]
    assert len(losses) == 2 and all(isinstance(x, float) for x in losses)
