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
    from trainer.tools.memory_plan import HEADER
    from trainer.tools.stage_plan import recipe_header as header_line

    for path in all_recipes():
        lines = [line for line in path.read_text().splitlines() if line.startswith(HEADER)]
        assert lines == [header_line(path)], path.name
        assert "worst case" in lines[0]


def test_a_model_bigger_than_any_mac_gets_the_pipeline_that_fits():
    """Llama 3.3 70B 4-bit on four 32 GB Macs: data parallelism cannot fit; four stages can, each on its Mac."""
    import re

    from trainer.tools.stage_plan import model_parts, parse_macs, plan, stage_bytes

    cfg = load_config(find_recipe("llama-3.3-70b-pipeline"))
    parts = model_parts(cfg)
    assert len(parts.blocks) == 80 and 38e9 < sum(parts.blocks) + parts.embed + parts.head < 42e9
    text = plan(cfg, parse_macs("4x32GB"))
    assert "data parallel does not fit" in text and "a pipeline of 4 stages fits" in text, text
    stages = re.findall(r"blocks (\d+)-(\d+) \((\d+)\), .* = ([\d.]+) GB of ([\d.]+)", text)
    assert len(stages) == 4 and sum(int(n) for *_, n, _, _ in stages) == 80
    assert all(float(used) <= float(cap) for *_, used, cap in stages)
    assert int(stages[0][0]) == 0 and int(stages[-1][1]) == 79
    # the head's weights sit on the last stage, the embedding on the first (untied)
    first = stage_bytes(cfg, parts, (0, 1), True, False)["weights"]
    middle = stage_bytes(cfg, parts, (1, 2), False, False)["weights"]
    assert first == parts.blocks[0] + parts.embed and middle == parts.blocks[1]
    # a recipe that fits every Mac needs no pipeline
    assert "data parallel fits" in plan(load_config(find_recipe("tiny-lora")), parse_macs("2x16GB"))


@pytest.mark.parametrize("bad", ["4x", "x64GB", "0x64GB", "64TB", ""])
def test_macs_that_cannot_be_read_are_one_sentence(bad):
    from trainer.errors import ConfigError
    from trainer.tools.stage_plan import parse_macs

    with pytest.raises(ConfigError, match="--macs"):
        parse_macs(bad)
