"""``mlx-dp export --gguf`` writes a file llama.cpp's reader accepts; ``--upload-repo`` plans, refuses, never half-acts.

The GGUF is read back with the ``gguf`` package (llama.cpp's Python reader, a
test extra), not with MLX, and checked for what llama.cpp needs and mlx-lm's
writer gets wrong (int32 token types, a byte-level BPE vocabulary with its
merges, f32 norms) and against the fused model's own weights. llama.cpp itself
is too slow to build here to be a test dependency. No test reaches the Hub:
the suite runs with HF_HUB_OFFLINE=1, and the other refusals point
HF_ENDPOINT at a closed local port.
"""

import json
import re

import numpy as np
import pytest

from conftest import TINY_MODEL, mlx_dp, one_error_line, tiny_recipe

CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens: a request fails at once


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA run (4 updates, evaluated at the end) and its recipe."""
    tmp = tmp_path_factory.mktemp("gguf-run")
    recipe = tiny_recipe(tmp, eval={"every": 4, "at_start": False, "max_batches": 1})
    result = mlx_dp("train", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp, str(recipe)


def _string(reader, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode()


@pytest.mark.e2e
def test_gguf_export_is_what_llama_cpp_reads(trained, tmp_path):
    from gguf import GGUFReader, GGUFValueType
    import mlx.core as mx
    from mlx_lm.gguf import permute_weights

    tmp, recipe = trained
    out, path = tmp_path / "fused", tmp_path / "m.gguf"
    result = mlx_dp("export", recipe, "--out", str(out), "--gguf", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"GGUF written to {path}: 38 tensors, architecture llama" in result.stdout
    reader = GGUFReader(str(path))
    # 4 blocks x 9 tensors, the embedding and the final norm; the output layer is tied to the embedding
    assert len(reader.tensors) == 38
    assert _string(reader, "general.architecture") == "llama"
    token_type = reader.fields["tokenizer.ggml.token_type"]
    assert token_type.types == [GGUFValueType.ARRAY, GGUFValueType.INT32]  # mlx-lm writes UINT32: llama.cpp refuses
    assert len(token_type.data) == 1024
    assert _string(reader, "tokenizer.ggml.model") == "gpt2" and _string(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokenizer = json.loads((TINY_MODEL / "tokenizer.json").read_text())
    assert len(reader.fields["tokenizer.ggml.merges"].data) == len(tokenizer["model"]["merges"]) > 0
    norms = [t for t in reader.tensors if "norm" in t.name]
    assert len(norms) == 9 and {t.tensor_type.name for t in norms} == {"F32"}
    # the tensors are the fused model's: names mapped, q/k rows in llama.cpp's rotary order
    fused = mx.load(str(out / "model.safetensors"))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    config = json.loads((out / "config.json").read_text())
    q = permute_weights(fused["model.layers.2.self_attn.q_proj.weight"], 4, 4)
    k = permute_weights(fused["model.layers.2.self_attn.k_proj.weight"], 4, 2)
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    np.testing.assert_array_equal(tensors["blk.2.attn_q.weight"], np.array(q))
    np.testing.assert_array_equal(tensors["blk.2.attn_k.weight"], np.array(k))
    v = fused["model.layers.2.self_attn.v_proj.weight"]
    np.testing.assert_array_equal(tensors["blk.2.attn_v.weight"], np.array(v))
    np.testing.assert_array_equal(tensors["token_embd.weight"], np.array(fused["model.embed_tokens.weight"]))
    refused = mlx_dp("export", recipe, "--gguf", str(path))
    assert refused.returncode == 2 and f"--gguf {path} already exists" in one_error_line(refused)


def _random_model(tmp_path, arch: str, quantize_bits=None):
    """A 1-layer random model of a real architecture, narrowed, with the tiny tokenizer (the lab's builder)."""
    from lab import synth

    config = synth.reduce_config(synth.load_arch(arch), num_layers=1, vocab_size=synth.tokenizer_vocab_size(TINY_MODEL),
                                 width_divisor=8)
    return synth.make_random_model(config, tmp_path / arch, TINY_MODEL, quantize_bits=quantize_bits)


@pytest.mark.e2e
def test_gguf_export_refuses_other_architectures_and_quantized_models_in_one_sentence(tmp_path):
    qwen = tiny_recipe(tmp_path, "qwen.yaml", model={"path": str(_random_model(tmp_path, "qwen3-0.6b"))})
    result = mlx_dp("export", str(qwen), "--out", str(tmp_path / "fused"), "--gguf", str(tmp_path / "q.gguf"))
    assert result.returncode == 2
    assert ("GGUF export supports llama, mistral, mixtral models (mlx-lm's GGUF writer), and this model is qwen3; "
            "export it with --out and convert that folder") in one_error_line(result)
    assert not (tmp_path / "q.gguf").exists() and not (tmp_path / "fused").exists()  # refused before writing
    llama4bit = tiny_recipe(tmp_path, "q4.yaml", model={"path": str(_random_model(tmp_path, "llama-3.2-1b", 4))},
                            method={"type": "lora", "rank": 4, "scale": 4.0})
    result = mlx_dp("export", str(llama4bit), "--gguf", str(tmp_path / "l.gguf"))
    assert result.returncode == 2
    assert "GGUF export needs full-precision weights and this model is quantized; add --dequantize" in \
        one_error_line(result)
    assert not (tmp_path / "l.gguf").exists()


@pytest.mark.e2e
def test_upload_dry_run_lists_the_files_and_the_card_without_the_network(trained, tmp_path):
    tmp, recipe = trained
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    # HF_HUB_OFFLINE=1 (conftest): any request the dry run made would fail it
    result = mlx_dp("export", recipe, "--upload-repo", "me/tiny-lora", "--dry-run", env={"TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "would create https://huggingface.co/me/tiny-lora, public" in text
    for name in ("README.md", "config.json", "model.safetensors", "tokenizer.json"):
        assert f"\n    {name} " in text
    assert "an upload now would be refused: the Hub upload cannot run offline" in text
    card = text.split("README.md (the model card):\n", 1)[1]
    assert card.startswith("---\nlibrary_name: mlx\n") and "base_model" not in card  # a local base is no Hub id
    metrics = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    val_loss = [m["val_loss"] for m in metrics if "val_loss" in m][-1]
    assert f"| val_loss | {val_loss:.4g} |" in card and "| step | 4 |" in card
    assert "model, tokenizer = load('me/tiny-lora')" in card and f"path: {TINY_MODEL}" in card
    assert not list(scratch.glob("mlx-dp-export-*"))  # the fused model staged for the upload is gone
    adapters = mlx_dp("export", recipe, "--upload-repo", "me/tiny-lora", "--adapters-only", "--private", "--dry-run")
    assert adapters.returncode == 0, adapters.stderr[-2000:]
    listed = [line.split()[0] for line in adapters.stdout.splitlines() if line.startswith("    ")]
    assert listed == ["README.md", "adapter_config.json", "adapters.safetensors"]
    assert ", private," in adapters.stdout and "adapter_path=snapshot_download('me/tiny-lora')" in adapters.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("env,expected", [
    ({}, "the Hub upload cannot run offline: HF_HUB_OFFLINE is set (unset it to upload)"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": "", "HF_ENDPOINT": CLOSED_PORT},
     "the Hub upload needs a token: run `hf auth login` or set HF_TOKEN"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_token", "HF_ENDPOINT": CLOSED_PORT},
     f"cannot reach the Hub at {CLOSED_PORT}"),
], ids=["offline", "no-token", "unreachable"])
def test_an_upload_that_cannot_work_is_one_sentence_and_nothing_is_written(trained, tmp_path, env, expected):
    tmp, recipe = trained
    env = {**env, "HF_HOME": str(tmp_path / "hf-home")}  # no token file there
    out, path = tmp_path / "fused", tmp_path / "m.gguf"
    result = mlx_dp("export", recipe, "--upload-repo", "me/tiny-lora", "--out", str(out), "--gguf", str(path),
                    env=env)
    assert result.returncode == 2
    assert expected in one_error_line(result)
    assert not out.exists() and not path.exists()


def test_final_metrics_are_the_last_training_report_and_the_last_evaluation(tmp_path):
    from trainer.tools.publish import final_metrics

    lines = [{"step": 1, "train_loss": 2.0}, {"step": 2, "val_loss": 1.5}, {"step": 3, "train_loss": 1.0},
             {"step": 4, "train_loss": 0.5, "tokens": 9}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"step\": 5, \"tr")
    assert final_metrics(tmp_path) == {"step": 4, "train_loss": 0.5, "eval_step": 2, "val_loss": 1.5}
    assert final_metrics(tmp_path / "nowhere") == {}


def test_a_hub_base_model_and_dataset_are_named_in_the_card_metadata(tmp_path):
    from trainer.config.load import load_config
    from trainer.tools.publish import model_card

    recipe = tiny_recipe(tmp_path, model={"path": "Qwen/Qwen3-0.6B"}, data={"path": "someone/some-data"})
    card = model_card("me/x", load_config(recipe), "model: {}\n", {"val_loss": 0.25}, adapters_only=True)
    front = card.split("---")[1]
    assert "base_model: Qwen/Qwen3-0.6B" in front and "base_model_relation: adapter" in front
    assert "- someone/some-data" in front and "| val_loss | 0.25 |" in card
    assert "load('Qwen/Qwen3-0.6B', adapter_path=snapshot_download('me/x'))" in card


@pytest.mark.parametrize("args,expected", [
    ([], "mlx-dp export needs --out DIR, --gguf FILE or --upload-repo NAME"),
    (["--gguf", "x.gguf", "--dry-run"], "--dry-run applies to --upload-repo, which was not given"),
    (["--upload-repo", "just-a-name"], "--upload-repo just-a-name is not a Hub repository name like owner/name"),
])
def test_export_options_that_cannot_work_are_refused_before_loading(tmp_path, args, expected):
    from trainer.config.load import load_config
    from trainer.errors import UserError
    from trainer.tools.export import ExportRequest, run_export

    gguf = args[args.index("--gguf") + 1] if "--gguf" in args else None
    request = ExportRequest(gguf=gguf and str(tmp_path / gguf), dry_run="--dry-run" in args,
                            upload_repo=args[args.index("--upload-repo") + 1] if "--upload-repo" in args else None)
    with pytest.raises(UserError, match=re.escape(expected)):
        run_export(load_config(tiny_recipe(tmp_path)), request)
