"""`mlx-dp recipes memory`: what fits on a Mac, from each recipe's real model config."""

import pytest

from conftest import mlx_dp
from trainer.config.load import load_config
from trainer.tools.memory_plan import estimate, model_bytes
from trainer.tools.recipes import all_recipes, find_recipe


def test_optimizer_state_is_counted_exactly_and_divided_by_sharding():
    cfg = load_config(find_recipe("tiny-full"))  # full fine-tune, AdamW, fp32 weights on disk
    weights, trainable, _ = model_bytes(cfg)
    assert trainable == weights and 0.9e6 < weights / 4 < 0.93e6, "every fp32 weight of the 0.92M model trains"
    whole, half, quarter = (estimate(cfg, n, sharded=True) for n in (1, 2, 4))
    assert whole.optimizer == 2 * trainable and half.optimizer == trainable and quarter.optimizer == trainable // 2
    assert estimate(cfg, 4, sharded=False).optimizer == 2 * trainable
    assert half.weights == whole.weights and half.grads == whole.grads, "sharding leaves weights and gradients"


def test_quantized_base_counts_packed_weights():
    qlora, lora = load_config(find_recipe("qwen3-8b-qlora")), load_config(find_recipe("qwen3-8b-lora"))
    q, b = model_bytes(qlora)[0], model_bytes(lora)[0]
    assert 0.25 < q / b < 0.35, "4-bit weights with scales and biases are about 0.28 of bf16"


@pytest.mark.e2e
def test_recipes_memory_prints_every_recipe_with_the_formula():
    result = mlx_dp("recipes", "memory")
    assert result.returncode == 0, result.stderr
    for path in all_recipes():
        assert f"| `{path.stem}` |" in result.stdout
    assert "per rank = W + G + O / S + A" in result.stdout
    full = next(line for line in result.stdout.splitlines() if "`qwen3-0.6b-full`" in line)
    plain, sharded = full.split("|")[2].split("/")[2].split("(")  # N=4: whole (sharded)
    assert float(sharded.strip(" )")) < 0.7 * float(plain), "a full fine-tune's state shrinks with sharding"


def test_recipe_headers_state_the_memory_recipes_memory_computes():
    """One source: the `# Memory` line of every recipe is the estimate `mlx-dp recipes memory` prints,
    labelled as the worst case (rewrite them with `python scripts/lab recipe-memory --write`)."""
    from trainer.tools.memory_plan import HEADER, header_line

    for path in all_recipes():
        lines = [line for line in path.read_text().splitlines() if line.startswith(HEADER)]
        assert lines == [header_line(path)], path.name
        assert "worst case" in lines[0]
