"""The package a user installs: the product alone, whole after a plain ``pip install``, and apart from the lab.

* No module of ``trainer/`` imports the lab (``scripts/lab``), and a training,
  an eval, an export and a launch, run where the lab *could* be imported, import
  none of it.
* The package changes no process-wide state of mlx-lm's: its model changes stay
  in its own model objects.
* A non-editable install of the repository, in a fresh environment, from an
  empty directory: the recipe library, copying and training the tiny recipe, the
  memory table, and an mlx_lm.lora config trained as it is.
"""

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

from conftest import PYTHON, ROOT, TINY_DATA, TINY_MODEL, run, tiny_recipe

LAB_PACKAGES = {"lab"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_no_product_module_imports_the_lab():
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / "trainer").rglob("*.py"))
                 for name in _imports(path) if name.split(".")[0] in LAB_PACKAGES]
    assert not offenders, offenders


def test_the_lab_imports_the_product_not_the_other_way_round():
    lab = {name for path in (ROOT / "scripts" / "lab").rglob("*.py") for name in _imports(path)}
    assert any(name.startswith("trainer.") for name in lab), "the lab builds on the product"


def test_pyproject_lists_every_package_and_ships_the_library():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.relative_to(ROOT).parts[:-1]) for p in (ROOT / "trainer").rglob("*.py")}
    listed = set(config["packages"])
    data = {"trainer.library.recipes", "trainer.library.data", "trainer.library.data.archs"}  # files, not modules
    assert found == listed - data, "a folder of modules left out"
    assert config["package-dir"] == {"trainer.library.recipes": "recipes", "trainer.library.data": "data"}


MODULES = """
import atexit, json, os, sys
def report():
    root = os.environ["ROOT"]
    lab = sorted(n for n, m in list(sys.modules.items())
                 if n == "lab" or n.startswith("lab.") or
                 str(getattr(m, "__file__", "") or "").startswith(os.path.join(root, "scripts")))
    print("LAB_MODULES " + json.dumps(lab), flush=True)
atexit.register(report)
from trainer.cli import main
main(sys.argv[1:])
"""


def _modules_of(*args: str, env: dict | None = None) -> list[str]:
    """The lab modules a ``mlx-dp ARGS`` process imported, with the lab importable on its path."""
    result = run([PYTHON, "-c", MODULES, *args], timeout=300,
                 env={"ROOT": str(ROOT), "PYTHONPATH": str(ROOT / "scripts"), **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("LAB_MODULES "))
    return json.loads(line[len("LAB_MODULES "):])


@pytest.mark.e2e
def test_training_eval_export_and_launch_import_none_of_the_lab(tmp_path):
    recipe = str(tiny_recipe(tmp_path, training={"steps": 2}))
    assert _modules_of("train", recipe) == []
    assert _modules_of("eval", recipe, "eval.max_batches=1", "eval.exact_match=false") == []
    assert _modules_of("export", recipe, "--out", str(tmp_path / "fused")) == []
    assert _modules_of("launch", "-n", "2", "--", PYTHON, "-c", "print('hi')") == []
    assert _modules_of("bench", "scaling", "--help") == []


def test_model_changes_stay_in_the_models_own_modules():
    """attention blocks and fused exps route this model's modules, never mlx-lm's module globals."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models import activations, base, llama

    from trainer.model import attention, fused

    model, _ = load(str(TINY_MODEL))
    other, _ = load(str(TINY_MODEL))
    routed = attention.use_blocks(model, 16, fused=True) + fused.use_fused(model, True)
    try:
        assert "mlx_lm.models.llama" in routed
        assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
        assert llama.swiglu is activations.swiglu
        assert type(model.layers[0].self_attn) is not llama.Attention
        assert isinstance(model.layers[0].self_attn, llama.Attention)
        assert type(other.layers[0].self_attn) is llama.Attention, "another model of the same type is untouched"
        tokens = mx.array([[1, 5, 9, 13, 2, 7] * 6])
        assert mx.allclose(model(tokens), other(tokens), atol=1e-4).item(), "the same model, computed another way"
    finally:
        attention.use_blocks(model, 0)
        fused.use_fused(model, False)
    assert type(model.layers[0].self_attn) is llama.Attention and type(model.layers[0].mlp) is llama.MLP


def test_gradient_checkpointing_one_model_leaves_another_of_its_class_untouched():
    """training.grad_checkpoint goes through this model's own blocks; mlx-lm's grad_checkpoint rewrote the class."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.models import llama

    from trainer.model.checkpointing import checkpoint_blocks, uncheckpoint_blocks

    model, _ = load(str(TINY_MODEL))
    other, _ = load(str(TINY_MODEL))
    call = llama.TransformerBlock.__call__
    tokens = mx.array([[1, 5, 9, 13, 2, 7] * 6])

    def loss_and_grads(m):
        return nn.value_and_grad(m, lambda x: m(x).astype(mx.float32).square().mean())(tokens)

    expected = loss_and_grads(model)
    checkpoint_blocks(model)
    checkpoint_blocks(model)  # twice is once
    try:
        assert llama.TransformerBlock.__call__ is call, "the class everyone shares is untouched"
        assert type(other.layers[0]) is llama.TransformerBlock, "another model of the same class is untouched"
        assert type(model.layers[0]) is not llama.TransformerBlock and isinstance(model.layers[0], llama.TransformerBlock)
        assert type(model.layers[0]).__mro__[1] is llama.TransformerBlock, "checkpointed once, not wrapped twice"
        got = loss_and_grads(model)
        assert mx.allclose(got[0], expected[0]).item(), "the same loss, recomputed in backward"
        for (name, g), (_, e) in zip(tree_flatten(got[1]), tree_flatten(expected[1])):
            assert mx.allclose(g, e, atol=1e-6).item(), name
    finally:
        uncheckpoint_blocks(model)
    assert type(model.layers[0]) is llama.TransformerBlock


# ---------------------------------------------------------------------------- a plain pip install


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh environment holding a wheel of the repository (built here, installed without -e).

    Its dependencies come from this environment's site-packages through a path entry
    (which, unlike a site directory, runs none of its .pth files: the editable install
    of the repository there stays out of sight).
    """
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    built = run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--quiet", str(ROOT), "-w", str(wheels)], timeout=600)
    if built.returncode != 0 and "Could not find a version" in built.stderr + built.stdout:
        pytest.skip("building the wheel needs setuptools from the package index, which is out of reach")
    assert built.returncode == 0, built.stderr[-3000:]
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = subprocess.run([PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (site / "dependencies.pth").write_text(ours + "\n")
    wheel = next(wheels.glob("mlx_dp-*.whl"))
    done = run([PYTHON, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
               timeout=300)
    if done.returncode != 0:  # pip older than 22.3 has no --python: unpack the wheel ourselves
        import zipfile

        zipfile.ZipFile(wheel).extractall(site)
        (env_dir / "bin" / "mlx-dp").write_text(f"#!{python}\nfrom trainer.cli import main\nmain()\n")
        (env_dir / "bin" / "mlx-dp").chmod(0o755)
    empty = tmp / "empty"
    empty.mkdir()
    return env_dir / "bin" / "mlx-dp", python, empty


def _in_empty_dir(installed, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    mlx_dp, _, empty = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return subprocess.run([str(mlx_dp), *args], capture_output=True, text=True, cwd=empty, env=env, timeout=timeout)


@pytest.mark.e2e
def test_a_plain_install_is_the_whole_product(installed):
    _, python, empty = installed
    where = subprocess.run([str(python), "-c", "import trainer, trainer.library as l; print(trainer.__file__); "
                            "print(l.root())"], capture_output=True, text=True, cwd=empty)
    package, library = where.stdout.split()
    assert "site-packages" in package and not package.startswith(str(ROOT)), "the wheel, not the repository"
    assert library.startswith(str(Path(package).parent)), "the library ships inside the package"

    listed = _in_empty_dir(installed, "recipes", "list")
    assert listed.returncode == 0, listed.stderr
    assert "tiny-lora" in listed.stdout and "qwen3-0.6b-lora" in listed.stdout

    copied = _in_empty_dir(installed, "recipes", "cp", "tiny-lora", "t.yaml")
    assert copied.returncode == 0, copied.stderr
    # one validation batch, at the end: the whole valid split, before and after, proves nothing more here
    trained = _in_empty_dir(installed, "train", "t.yaml", "training.steps=3", "eval.every=0", "eval.at_start=false",
                            "eval.max_batches=1", "logging.progress_bar=false", "checkpoint.dir=run")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads((empty / "run" / "status.json").read_text())["state"] == "completed"
    by_name = _in_empty_dir(installed, "train", "tiny-lora", "training.steps=1", "eval.at_start=false",
                            "eval.max_batches=1", "logging.progress_bar=false", "checkpoint.dir=run-by-name")
    assert by_name.returncode == 0, by_name.stderr[-3000:]

    memory = _in_empty_dir(installed, "recipes", "memory", "qwen3-0.6b-lora")
    assert memory.returncode == 0, memory.stderr
    assert "| `qwen3-0.6b-lora` |" in memory.stdout


@pytest.mark.e2e
def test_a_plain_install_trains_an_mlx_lm_config_as_it_is(installed):
    _, python, empty = installed
    data = subprocess.run([str(python), "-c", "from trainer.library import data_dir; print(data_dir())"],
                          capture_output=True, text=True, cwd=empty).stdout.strip()
    (empty / "mlxlm.yaml").write_text(
        f"model: {data}/tiny-llama\ntrain: true\ndata: {data}/tiny-task\nbatch_size: 8\niters: 4\n"
        "learning_rate: 3.0e-4\nnum_layers: 4\nval_batches: 1\nsteps_per_eval: 100\nadapter_path: out-adapters\n"
        "max_seq_length: 64\nlora_parameters:\n  rank: 4\n  scale: 10.0\n  dropout: 0.0\n")
    result = _in_empty_dir(installed, "train", "mlxlm.yaml", "logging.progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mlxlm.yaml is an mlx_lm.lora config" in result.stdout
    assert "batch_size 8 is mlx-lm's global batch" in result.stdout
    adapters = empty / "out-adapters"
    assert (adapters / "adapters.safetensors").is_file()
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 4
    written = _in_empty_dir(installed, "recipes", "cp", "mlxlm.yaml", "recipe.yaml")
    assert written.returncode == 0 and "training:" in (empty / "recipe.yaml").read_text()


def test_the_library_files_are_the_repositorys():
    """What the wheel ships is exactly recipes/ and data/ (nothing lost on the way)."""
    from trainer.library import data_dir, recipes_dir

    assert recipes_dir() == ROOT / "recipes" and data_dir() == ROOT / "data", "a clone reads its own folders"
    assert (data_dir() / "tiny-llama") == TINY_MODEL and (data_dir() / "tiny-task") == TINY_DATA


def test_no_function_in_the_product_is_over_60_lines():
    """A function a reader must hold in their head at once stays under a screen (decorators and docstring included)."""
    long = []
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
