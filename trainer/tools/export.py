"""``mlx-dp export``: the trained run as a model directory mlx-lm loads, a GGUF file, and/or a Hub repository.

Fusing is mlx-lm's own fuse path (``mlx_lm.fuse``): load the base with the
adapters, replace each adapter layer by its ``fuse()`` result, save with
``mlx_lm.utils.save``. It is repeated here only because ``mlx_lm.fuse``
exposes it as a command-line ``main()``, not as a function. The model is
fused once for every output; ``--gguf`` is written by ``trainer.tools.gguf``
and ``--upload-repo`` pushed by ``trainer.tools.publish``::

    mlx-dp export tiny-lora --out runs/tiny-lora-fused
    mlx-dp export tiny-lora --gguf tiny.gguf
    mlx-dp export tiny-lora --upload-repo me/tiny-lora --adapters-only --dry-run

Nothing is overwritten: ``--out`` must be new or empty and must not be the
run directory, and ``--gguf`` must not exist; each is written under a
temporary name beside it and renamed into place, so a failed export leaves
nothing half-written.
"""

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import log
from ..errors import CheckpointError, ConfigError, ModelError


def check_destination(out: Path, run_dirs) -> None:
    """Refuse an ``--out`` that holds files, or that is the run directory itself.

    Raises:
        CheckpointError: Naming the directory and a file that would be overwritten.
    """
    target = out.resolve()
    for run_dir in run_dirs:
        if target == Path(run_dir).resolve():
            raise CheckpointError(f"--out {out} is the run directory itself; export into a new directory")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"--out {out} is a file; export into a new directory")
    blocking = next((parent for parent in target.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise CheckpointError(f"--out {out}: {blocking} is a file, so no directory can be made under it")
    if target.is_dir():
        present = sorted(p.name for p in target.iterdir())
        if present:
            raise CheckpointError(f"--out {out} already holds files ({', '.join(present[:3])}"
                                  f"{', ...' if len(present) > 3 else ''}); export into a new or empty directory")


def check_fits(cfg, source: Path, dequantize: bool, memory: int | None = None) -> None:
    """Refuse, in one sentence, to fuse a model larger than this machine's memory (one trained on a pipeline's
    stages, say): fusing holds the whole model at once. The adapters themselves load in mlx-lm as they are."""
    from ..model.load import resolve_model_path
    from ..run.stages import machine_memory

    folder = Path(resolve_model_path(cfg.model.path))
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    try:
        quantized = json.loads((folder / "config.json").read_text()).get("quantization") or {}
    except (OSError, ValueError):
        quantized = {}
    if dequantize and quantized.get("bits"):
        weights = weights * 16 // int(quantized["bits"])
    memory = machine_memory() if memory is None else memory
    if weights > memory:
        raise ModelError(f"the fused model {cfg.model.path} needs about {weights / 1e9:.0f} GB at once and this "
                         f"machine has {memory / 1e9:.0f} GB; fuse it on a machine with more memory, or use the "
                         f"adapters as they are (mlx_lm.generate --model {cfg.model.path} --adapter-path {source})")


def fuse_trained(cfg, source: Path, dequantize: bool = False):
    """The recipe's base model with the trained adapters in ``source`` fused in.

    Args:
        cfg (trainer.config.load.Config): The recipe (model.path names the base).
        source (Path): A run directory or one of its ``checkpoints/step_*``.
        dequantize (bool): Dequantize a quantized (QLoRA) base. Default: ``False``.

    Returns:
        tuple: ``(model, tokenizer, config)`` as mlx-lm's ``load`` gives them, ``config`` without its
        quantization once dequantized.
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    from ..model.load import load_base
    from .adapters import load_trained

    check_fits(cfg, source, dequantize)
    model, tokenizer, config = load_base(cfg.model)
    load_trained(model, cfg, source)
    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return model, tokenizer, config


def save_fused(cfg, model, tokenizer, config: dict, target: Path) -> Path:
    """Save a fused model as an mlx-lm model directory at ``target``, through a temporary beside it.

    Raises:
        CheckpointError: The directory cannot be written, or files appeared in it meanwhile.
    """
    from mlx_lm.utils import save

    from ..model.load import resolve_model_path

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp{os.getpid()}"
    try:
        save(staging, resolve_model_path(cfg.model.path), model, tokenizer, config, donate_model=False)
        check_destination(target, [])  # nothing appeared there meanwhile
        os.replace(staging, target)  # an empty directory is replaced; a new one created
    except OSError as e:
        raise CheckpointError(f"could not write the model to {target}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def export(cfg, out: str, checkpoint: str | None = None, dequantize: bool = False) -> Path:
    """Write the fused model to ``out`` and return its path.

    Args:
        cfg (trainer.config.load.Config): The recipe (model.path names the base).
        out (str): Destination directory: new, or empty.
        checkpoint (str | None): Adapters to fuse: a run directory or a
            ``checkpoints/step_*`` directory; default ``checkpoint.dir``.
        dequantize (bool): Write a dequantized (full-precision) model from a
            quantized (QLoRA) base. Default: ``False``.
    """
    source = Path(checkpoint) if checkpoint else cfg.checkpoint.run_dir
    target = Path(out)
    check_destination(target, [source, cfg.checkpoint.run_dir])
    model, tokenizer, config = fuse_trained(cfg, source, dequantize)
    return save_fused(cfg, model, tokenizer, config, target)


@dataclass(frozen=True)
class ExportRequest:
    """What ``mlx-dp export`` writes and where it pushes it."""

    out: str | None = None  # directory for the fused model (mlx-lm format)
    gguf: str | None = None  # GGUF file of the fused model
    upload_repo: str | None = None  # Hub repository (owner/name) to push to
    adapters_only: bool = False  # push the adapters, not the fused model
    private: bool = False  # create the repository private (the Hub's default is public)
    dry_run: bool = False  # print what would be uploaded and the card; no network
    checkpoint: str | None = None  # run dir or checkpoints/step_* (default checkpoint.dir)
    dequantize: bool = False  # full-precision weights from a quantized (QLoRA) base


def check_gguf_destination(path: Path) -> None:
    """Refuse a ``--gguf`` path that exists or cannot be a file; nothing is overwritten.

    Raises:
        CheckpointError: Naming the path.
    """
    if path.is_dir():
        raise CheckpointError(f"--gguf {path} is a directory; name a file such as {path / 'model.gguf'}")
    if path.exists():
        raise CheckpointError(f"--gguf {path} already exists; write to a new file")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise CheckpointError(f"--gguf {path}: {blocking} is a file, so nothing can be written under it")


def _check_request(cfg, request: ExportRequest, source: Path) -> None:
    """Refuse a request that cannot work before anything is loaded: no output, a stray flag, a taken path."""
    if not (request.out or request.gguf or request.upload_repo):
        raise ConfigError("mlx-dp export needs --out DIR, --gguf FILE or --upload-repo NAME (or several)")
    stray = [flag for flag, on in (("--adapters-only", request.adapters_only), ("--private", request.private),
                                   ("--dry-run", request.dry_run)) if on]
    if stray and not request.upload_repo:
        raise ConfigError(f"{stray[0]} applies to --upload-repo, which was not given")
    if request.upload_repo and not re.fullmatch(r"[\w.-]+/[\w.-]+", request.upload_repo):
        raise ConfigError(f"--upload-repo {request.upload_repo} is not a Hub repository name like owner/name")
    if request.out:
        check_destination(Path(request.out), [source, cfg.checkpoint.run_dir])
    if request.gguf:
        check_gguf_destination(Path(request.gguf))
        config = _base_config(cfg)
        if config is not None:  # refused before the model loads; else after, before anything is written
            from .gguf import check_supported

            quantized = bool(config.get("quantization") or config.get("quantization_config"))
            check_supported(config, quantized and not request.dequantize)


def _base_config(cfg) -> dict | None:
    """The base model's config.json where it is on disk (a folder or the hub cache); ``None`` if not yet."""
    from ..model.load import resolve_model_path

    path = Path(resolve_model_path(cfg.model.path))
    file = path / "config.json" if path.exists() else None
    if file is None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(path), "config.json")
        file = Path(cached) if isinstance(cached, str) else None
    try:
        return json.loads(file.read_text()) if file else None
    except (OSError, ValueError):
        return None  # mlx-lm's load says what is wrong with it


def _write_local(cfg, request: ExportRequest, source: Path, scratch: Path) -> Path | None:
    """Fuse once and write what was asked: ``--out`` (or a scratch folder to upload) and ``--gguf``.

    Returns:
        Path | None: The fused model's folder, where one was written.
    """
    from ..model.load import is_quantized
    from .gguf import GGUF_ARCHITECTURE, check_supported, write_gguf

    folder_needed = bool(request.out) or bool(request.upload_repo and not request.adapters_only)
    if not (folder_needed or request.gguf):
        return None
    model, tokenizer, config = fuse_trained(cfg, source, request.dequantize)
    if request.gguf:
        check_supported(config, is_quantized(model))  # before anything is written
    folder = None
    if folder_needed:
        folder = save_fused(cfg, model, tokenizer, config, Path(request.out) if request.out else scratch / "model")
        if request.out:
            log.info(f"fused model written to {folder}; try: mlx_lm.generate --model {folder} --prompt \"hello\"")
    if request.gguf:
        path = Path(request.gguf)
        path.parent.mkdir(parents=True, exist_ok=True)
        count, notes = write_gguf(model, tokenizer, config, path)
        log.info(f"GGUF written to {path}: {count} tensors, architecture {GGUF_ARCHITECTURE}; try: "
                 f"llama-cli -m {path} -p \"hello\"")
        for note in notes:
            log.note(note)
    return folder


def _metrics_dir(cfg, source: Path) -> Path:
    """The run directory whose metrics.jsonl describes ``source`` (a checkpoints/step_* belongs to its run)."""
    if (source / "metrics.jsonl").is_file():
        return source
    if source.parent.name == "checkpoints":
        return source.parent.parent
    return cfg.checkpoint.run_dir


def _publish(cfg, request: ExportRequest, source: Path, folder: Path) -> None:
    """Write the model card into ``folder`` and upload it (with the GGUF file), or print the dry run."""
    from . import publish

    recipe = source / "config.yaml"
    recipe_text = recipe.read_text() if recipe.is_file() else cfg.to_yaml()
    gguf = Path(request.gguf) if request.gguf else None
    extra = [gguf] if gguf and not gguf.resolve().is_relative_to(folder.resolve()) else []
    card = publish.model_card(request.upload_repo, cfg, recipe_text, publish.final_metrics(_metrics_dir(cfg, source)),
                              request.adapters_only, gguf.name if gguf else None)
    if request.dry_run:
        files = [f for f in publish.plan(folder, extra) if f[0] != "README.md"] + [("README.md", len(card.encode()))]
        print(publish.describe(request.upload_repo, request.private, sorted(files), card), flush=True)
        return
    (folder / "README.md").write_text(card)
    files = publish.plan(folder, extra)
    log.info(f"uploading {len(files)} files ({log.format_bytes(sum(s for _, s in files))}) to {request.upload_repo}")
    log.info(f"uploaded: {publish.upload(request.upload_repo, folder, request.private, extra)}")


def run_export(cfg, request: ExportRequest) -> None:
    """``mlx-dp export``: the fused model to ``--out``, a GGUF file, and/or an upload to the Hub.

    The model is loaded and fused once for all outputs. An upload is checked
    first (offline, no token, no answer from the Hub), so a refused upload
    leaves nothing behind. Without ``--out``, the fused model an upload needs
    is written to a temporary folder (under ``$TMPDIR``) and removed at the end.

    Args:
        cfg (trainer.config.load.Config): The recipe.
        request (ExportRequest): The command's options.

    Raises:
        UserError: One sentence: a bad option, a taken path, an unsupported model, a refused upload.
    """
    from . import publish

    source = Path(request.checkpoint) if request.checkpoint else cfg.checkpoint.run_dir
    _check_request(cfg, request, source)
    if request.upload_repo and not request.dry_run:
        publish.preflight()
    with tempfile.TemporaryDirectory(prefix="mlx-dp-export-") as scratch:
        folder = _write_local(cfg, request, source, Path(scratch))
        if request.upload_repo:
            if request.adapters_only:
                folder = publish.stage_adapters(source, Path(scratch) / "adapters")
            _publish(cfg, request, source, folder)
