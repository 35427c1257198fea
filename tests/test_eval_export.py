"""Distributed evaluation equals one process on the whole set; export gives a model mlx-lm generates from."""

import json
import shutil

import pytest

from conftest import BIN, TINY_MODEL, launched, mlx_dp, one_error_line, run, tiny_recipe

pytestmark = pytest.mark.e2e  # every test here starts real processes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    recipe = tiny_recipe(tmp, training={"steps": 30, "learning_rate": 3e-4, "batch_size": 8},
                         method={"rank": 8, "scale": 10.0}, eval={"max_batches": 3, "max_new_tokens": 12})
    result = mlx_dp("train", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp, str(recipe)


def test_two_ranks_report_what_one_process_reports(trained):
    tmp, recipe = trained
    one = mlx_dp("eval", recipe, "--split", "test", "--json", str(tmp / "one.json"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = launched(2, "eval", recipe, "--split", "test", "eval.batch_size=4", "--json", str(tmp / "two.json"))
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads((tmp / "one.json").read_text()), json.loads((tmp / "two.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert a["tokens"] == b["tokens"] and a["exact_match_samples"] == b["exact_match_samples"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["exact_match"] == a["exact_match"]
    assert "exact match" in one.stdout and "perplexity" in one.stdout


def test_export_fuses_adapters_into_a_model_mlx_lm_generates_from(trained):
    tmp, recipe = trained
    out = tmp / "fused"
    result = mlx_dp("export", recipe, "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    code = (
        "import mlx.core as mx; from mlx_lm import load, generate; "
        f"fused, tok = load({str(out)!r}); base, _ = load({str(TINY_MODEL)!r}, adapter_path={str(tmp / 'run')!r}); "
        "p = tok.apply_chat_template([{'role': 'user', 'content': 'what pet does vito have?'}], "
        "add_generation_prompt=True); "
        "a = generate(fused, tok, p, max_tokens=12); b = generate(base, tok, p, max_tokens=12); "
        "x = mx.array([p]); d = mx.abs(fused(x) - base(x)).max().item(); "
        "print(repr(a)); print(repr(b)); print(d); assert a == b and d < 1e-4 and type(fused.layers[0].self_attn.q_proj).__name__ == 'Linear'")
    check = run([str(BIN / "python"), "-c", code])
    assert check.returncode == 0, check.stdout + check.stderr[-2000:]
    cli = run([str(BIN / "mlx_lm.generate"), "--model", str(out), "--prompt", "what pet does vito have?",
               "--max-tokens", "8"])
    assert cli.returncode == 0, cli.stderr[-2000:]
    refused = mlx_dp("export", recipe, "--out", str(out))
    assert refused.returncode == 2 and "already holds files" in refused.stderr


def test_export_never_overwrites_files_nor_writes_into_the_run_directory(trained):
    tmp, recipe = trained
    out = tmp / "busy"
    out.mkdir()
    (out / "tokenizer.json").write_text("mine")
    result = mlx_dp("export", recipe, "--out", str(out))
    assert result.returncode == 2
    assert f"--out {out} already holds files (tokenizer.json)" in one_error_line(result)
    assert (out / "tokenizer.json").read_text() == "mine" and len(list(out.iterdir())) == 1
    result = mlx_dp("export", recipe, "--out", str(tmp / "run"))
    assert result.returncode == 2 and "is the run directory itself" in one_error_line(result)
    empty = tmp / "empty"
    empty.mkdir()
    assert mlx_dp("export", recipe, "--out", str(empty)).returncode == 0
    assert (empty / "config.json").is_file() and not list(tmp.glob(".empty.tmp*"))


def test_eval_and_export_refuse_a_damaged_or_mismatched_checkpoint_in_one_line(trained, tmp_path):
    tmp, recipe = trained
    # the recipe says rank 16, the run was trained at rank 8: refused, not silently evaluated at rank 8
    for command in (["eval", recipe], ["export", recipe, "--out", str(tmp_path / "x")]):
        result = mlx_dp(*command, "method.rank=16")
        assert result.returncode == 2
        assert "was trained with another method than the recipe says: the recipe has method.rank=16 (it holds 8)" \
            in one_error_line(result)
    step = sorted((tmp / "run" / "checkpoints").iterdir())[-1]
    damaged = tmp_path / "damaged"
    shutil.copytree(step, damaged)
    weights = damaged / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for command in (["eval", recipe], ["export", recipe, "--out", str(tmp_path / "y")]):
        result = mlx_dp(*command, "--checkpoint", str(damaged))
        assert result.returncode == 2 and "is damaged: adapters.safetensors is truncated or corrupt" in \
            one_error_line(result)
    (damaged / "manifest.json").unlink()  # no checksums to compare: the load itself must say it
    result = mlx_dp("eval", recipe, "--checkpoint", str(damaged))
    assert result.returncode == 2 and "cannot be read; it is truncated or corrupt" in one_error_line(result)
    # tensors of another model, under a config that matches the recipe
    import mlx.core as mx

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(step / "adapter_config.json", other)
    mx.save_safetensors(str(other / "adapters.safetensors"),
                        {"model.layers.0.self_attn.q_proj.lora_a": mx.zeros((256, 8))})
    result = mlx_dp("eval", recipe, "--checkpoint", str(other))
    assert result.returncode == 2 and "does not fit this model and method" in one_error_line(result)
