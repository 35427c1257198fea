"""``mlx-dp export --upload-repo NAME``: the fused model (or the adapters) to the Hugging Face Hub, with a card.

mlx-lm's ``upload_to_hub`` is not used: it calls ``HfApi.upload_large_folder``,
which huggingface_hub 2.x no longer has, and only after it has created the
(then empty) repository; it also has no way to make the repository private.
Here it is ``create_repo`` then ``upload_folder``, as ``transformers``'
``push_to_hub`` does, with mlx-lm's card conventions (``library_name: mlx``,
the base model, a "use with mlx-lm" snippet).

The repository is public unless ``--private`` is given, as ``push_to_hub``,
unsloth's ``push_to_hub_merged`` and ``mlx_lm.fuse --upload-repo`` make it
(an organisation's own default for new repositories still applies); an existing
repository keeps its visibility.

Before anything is fused or created, :func:`preflight` says in one sentence
why an upload cannot work: offline mode, no token, or a Hub that does not
answer in 3 s. ``--dry-run`` prints the plan and the card and touches no network
(``upload_folder`` itself sends README.md to the Hub to validate it, so the
dry run never calls it).
"""

import json
import shutil
import time
from pathlib import Path

from .. import log
from ..data.hub import looks_like_hub_id
from ..errors import UserError

HEAD_TIMEOUT_S = 3.0
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
COMMIT_MESSAGE = "Upload from mlx-dp"


class HubError(UserError):
    """An upload cannot start or failed: offline, no token, the Hub unreachable or refusing."""


def offline_or_no_token() -> str | None:
    """Why no upload can work, known without the network (offline mode, no token); ``None`` if neither."""
    from huggingface_hub import get_token, is_offline_mode

    if is_offline_mode():  # read from HF_HUB_OFFLINE when huggingface_hub was imported
        return "the Hub upload cannot run offline: HF_HUB_OFFLINE is set (unset it to upload)"
    if get_token() is None:
        return "the Hub upload needs a token: run `hf auth login` or set HF_TOKEN"
    return None


def preflight(timeout_s: float = HEAD_TIMEOUT_S) -> None:
    """Refuse an upload that cannot work before anything is exported: offline, no token, Hub unreachable.

    Args:
        timeout_s (float): How long the Hub may take to answer a HEAD request. Default: ``3.0``.

    Raises:
        HubError: One sentence saying why.
    """
    reason = offline_or_no_token()
    if reason:
        raise HubError(reason)
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    started = time.perf_counter()
    try:  # huggingface_hub's own session: the proxies and HF_ENDPOINT the upload will use
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception as e:  # httpx's connect and timeout errors are not OSErrors
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"cannot reach the Hub at {constants.ENDPOINT} ({why}, after "
                       f"{time.perf_counter() - started:.1f} s), so nothing was exported or uploaded") from None


def final_metrics(run_dir: Path) -> dict:
    """The run's last training report and last evaluation from ``metrics.jsonl`` (empty without one)."""
    path = Path(run_dir) / "metrics.jsonl"
    train, evaluation = {}, {}
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if "train_loss" in record:
            train = {k: record[k] for k in ("step", "train_loss") if k in record}
        if any(k.startswith("val_") for k in record):
            evaluation = {k: v for k, v in record.items() if k.startswith("val_") or k == "step"}
    if evaluation:
        evaluation = {("eval_step" if k == "step" else k): v for k, v in evaluation.items()}
    return {**train, **evaluation}


def _hub_ids(cfg) -> list[str]:
    """The data sources that are Hub datasets (the card's ``datasets``); local files are not named there."""
    sources = cfg.data.hf_dataset or []
    ids = [s.get("path") for s in (sources if isinstance(sources, list) else [sources]) if isinstance(s, dict)]
    if cfg.data.path and looks_like_hub_id(cfg.data.path) and not Path(cfg.data.path).exists():
        ids.append(cfg.data.path)
    return [i for i in ids if isinstance(i, str)]


def _base_hub_id(cfg) -> str | None:
    """The base model as a Hub id, for the card's metadata (a local path fails the Hub's checks)."""
    path = cfg.model.path
    return path if looks_like_hub_id(path) and not Path(path).expanduser().exists() else None


def model_card(repo_id: str, cfg, recipe_text: str, metrics: dict, adapters_only: bool,
               gguf_name: str | None = None) -> str:
    """The README.md: Hub metadata, what was trained on what, the final metrics, how to load it in mlx-lm.

    Args:
        repo_id (str): The repository, ``owner/name``.
        cfg (trainer.config.load.Config): The recipe.
        recipe_text (str): The recipe as trained (the run's ``config.yaml``).
        metrics (dict): :func:`final_metrics`.
        adapters_only (bool): The upload holds adapters, not a fused model.
        gguf_name (str | None): A GGUF file in the upload. Default: ``None``.
    """
    from huggingface_hub import ModelCardData

    base = _base_hub_id(cfg)
    data = ModelCardData(library_name="mlx", pipeline_tag="text-generation", base_model=base,
                         base_model_relation=("adapter" if adapters_only else "finetune") if base else None,
                         datasets=_hub_ids(cfg) or None,
                         tags=["mlx", "mlx-dp", cfg.method.type] + (["gguf"] if gguf_name else []))
    kind = {"lora": "LoRA adapters", "dora": "DoRA adapters"}.get(cfg.method.type, "Fine-tuned weights")
    what = f"{kind} for" if adapters_only else "A fine-tune of"
    data_text = cfg.data.path or ", ".join(_hub_ids(cfg)) or "the recipe's data"
    lines = [f"---\n{data.to_yaml()}\n---\n", f"# {repo_id.split('/')[-1]}\n",
             f"{what} `{cfg.model.path}`, trained with mlx-dp on `{data_text}`.\n",
             "## Final metrics\n", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if not metrics:
        lines.append("| (none recorded) | |")
    lines += ["", "## Use with mlx-lm\n", "```python"]
    if adapters_only:
        lines += ["from huggingface_hub import snapshot_download", "from mlx_lm import load, generate", "",
                  f"model, tokenizer = load({cfg.model.path!r}, adapter_path=snapshot_download({repo_id!r}))"]
    else:
        lines += ["from mlx_lm import load, generate", "", f"model, tokenizer = load({repo_id!r})"]
    lines += ["print(generate(model, tokenizer, prompt=\"hello\", max_tokens=64))", "```", ""]
    if not adapters_only:
        lines += ["```bash", f"mlx_lm.generate --model {repo_id} --prompt \"hello\"", "```", ""]
    if gguf_name:
        lines += [f"`{gguf_name}` runs in llama.cpp: `llama-cli -hf {repo_id}` or `llama-cli -m {gguf_name}`.\n"]
    lines += ["## Recipe\n", "<details><summary>The recipe as trained (save it as recipe.yaml; "
              "<code>mlx-dp train recipe.yaml</code> trains it again)</summary>\n",
              "```yaml", recipe_text.rstrip(), "```\n", "</details>", ""]
    return "\n".join(lines)


def stage_adapters(source: Path, folder: Path) -> Path:
    """Copy the run's adapters (``adapters.safetensors``, ``adapter_config.json``) into ``folder`` for upload.

    A checkpoint with a manifest is verified first: a damaged file is refused, never uploaded.

    Raises:
        CheckpointError: A file is missing or damaged.
    """
    from ..errors import CheckpointError
    from ..state import checkpoint

    for name in ADAPTER_FILES:
        if not (source / name).is_file():
            raise CheckpointError(f"no {name} in {source}; train first or pass --checkpoint")
    problem = checkpoint.verify(source) if (source / checkpoint.MANIFEST).is_file() else None
    if problem:
        raise CheckpointError(f"checkpoint {source} is damaged: {problem}")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy2(source / name, folder / name)
    return folder


def plan(folder: Path, extra: list[Path] = ()) -> list[tuple[str, int]]:
    """``(path in the repository, bytes)`` of each file an upload sends: ``folder``'s files, then ``extra``."""
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    names = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    kept = filter_repo_objects(names, ignore_patterns=DEFAULT_IGNORE_PATTERNS)  # what upload_folder leaves out
    return [(name, (folder / name).stat().st_size) for name in kept] + [(p.name, p.stat().st_size) for p in extra]


def describe(repo_id: str, private: bool, files: list[tuple[str, int]], card: str) -> str:
    """What ``--dry-run`` prints: the repository, its visibility, each file and its size, the card, the verdict."""
    from huggingface_hub import constants

    total = sum(size for _, size in files)
    visibility = "private" if private else "public (the Hub's default; --private makes it private)"
    lines = [f"dry run: would create {constants.ENDPOINT}/{repo_id}, {visibility}, or keep it as it is if it "
             f"exists, and upload {len(files)} files ({log.format_bytes(total)}):"]
    lines += [f"    {name:40s} {log.format_bytes(size):>10s}" for name, size in files]
    blocker = offline_or_no_token()
    lines.append(f"an upload now would be refused: {blocker}" if blocker else
                 "an upload now would start (the Hub itself was not asked)")
    lines += ["README.md (the model card):", card]
    return "\n".join(lines)


def upload(repo_id: str, folder: Path, private: bool, extra: list[Path] = ()) -> str:
    """Create the repository (kept if it exists) and upload ``folder`` and ``extra`` files; returns its URL.

    Raises:
        HubError: One sentence with the Hub's reason (no permission, a bad name, the connection).
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=COMMIT_MESSAGE)
        for path in extra:
            api.upload_file(path_or_fileobj=path, path_in_repo=path.name, repo_id=repo_id, repo_type="model",
                            commit_message=COMMIT_MESSAGE)
    except Exception as e:  # HfHubHTTPError (401, 403, 409...), httpx transport errors, OfflineModeIsEnabled
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"the upload to {repo_id} failed{f' (HTTP {status})' if status else ''}: {why}") from None
    return str(url)
