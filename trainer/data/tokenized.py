"""Datasets: load with `datasets`, tokenize with mlx-lm's formats, cache, check.

A split goes from rows (``trainer.data.sources`` reads them) to a
:class:`TokenizedSplit`: one flat token array plus per-sample start, length
and prompt length. Tokenizing happens once: the result is stored by
``datasets``' own map cache under a fingerprint of the raw data (a local
file's by its bytes, see ``sources``), the tokenizer and the format settings.

Row formats are mlx-lm's (``text``, ``prompt``/``completion``, chat
``messages``), tokenized by mlx-lm's own dataset classes so that prompts are
rendered and masked exactly as ``mlx_lm.lora`` does.

Batching and sharding are in ``trainer.data.batches``; this module imports no MLX.
"""

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..config.load import DataConfig
from .mix import WholeEpochs, plan_mix
from .sources import Source, load_rows, quiet_datasets, row_location, source_parts
from ..errors import DataError

# Bump when tokenization output changes meaning, to invalidate old caches.
TOKENIZE_VERSION = 1


@dataclass
class TokenizedSplit(WholeEpochs):
    """A tokenized split: flat tokens with per-sample start, length and prompt length."""

    name: str
    source: str
    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def loss_counts(self) -> np.ndarray:
        """Targets per sample that count in the loss."""
        return self.lengths - np.maximum(self.prompt_lengths, 1)

    def sample(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i]:self.starts[i] + self.lengths[i]]

    def target_mask(self, i: int) -> np.ndarray:
        mask = np.zeros(int(self.lengths[i]) - 1, np.float32)
        mask[max(int(self.prompt_lengths[i]), 1) - 1:] = 1.0
        return mask

    def segment_ids(self, i: int):
        return None

    def fingerprint(self) -> str:
        """Hash of exactly what training will see (for cross-rank agreement)."""
        h = hashlib.sha1()
        for i in range(len(self)):
            h.update(self.sample(i).tobytes())
        h.update(self.lengths.astype(np.int64).tobytes())
        h.update(self.prompt_lengths.astype(np.int64).tobytes())
        return h.hexdigest()

    def total_tokens(self) -> int:
        return int(self.lengths.sum())


# --------------------------------------------------------------------------- tokenizing


def detect_format(columns: list[str], cfg: DataConfig, source: Source) -> str:
    if cfg.format != "auto":
        needed = {"text": [cfg.text_feature], "completion": [cfg.prompt_feature, cfg.completion_feature],
                  "chat": [cfg.chat_feature]}[cfg.format]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"rows of {source.description} have no {', '.join(missing)} field "
                            f"(data.format={cfg.format}); found {columns}")
        return cfg.format
    if cfg.prompt_feature in columns and cfg.completion_feature in columns:
        return "completion"
    if cfg.chat_feature in columns:
        return "chat"
    if cfg.text_feature in columns:
        return "text"
    raise DataError(
        f"rows of {source.description} have no usable field: expected '{cfg.text_feature}', "
        f"'{cfg.prompt_feature}' + '{cfg.completion_feature}' or '{cfg.chat_feature}', found {columns}")


def _processor(fmt: str, tokenizer, cfg: DataConfig):
    """mlx-lm's own dataset class for the format; we only use its ``process(row)``."""
    from ..tuner import ChatDataset, CompletionsDataset, TextDataset

    if fmt == "completion":
        return CompletionsDataset([], tokenizer, cfg.prompt_feature, cfg.completion_feature, cfg.mask_prompt)
    if fmt == "chat":
        return ChatDataset([], tokenizer, chat_key=cfg.chat_feature, mask_prompt=cfg.mask_prompt)
    return TextDataset([], tokenizer, text_key=cfg.text_feature)


def _check_row(row: dict, fmt: str, cfg: DataConfig) -> str | None:
    """Why a row cannot be used, or None."""
    if fmt == "text":
        value = row.get(cfg.text_feature)
        return None if isinstance(value, str) and value.strip() else f"'{cfg.text_feature}' is empty or not a string"
    if fmt == "completion":
        for key in (cfg.prompt_feature, cfg.completion_feature):
            if not isinstance(row.get(key), str):
                return f"'{key}' is missing or not a string"
        return None
    messages = row.get(cfg.chat_feature)
    if not isinstance(messages, list) or not messages:
        return f"'{cfg.chat_feature}' is missing or not a list of messages"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m.get("content") is None:
            return f"'{cfg.chat_feature}' has a message without a role and content"
    return None


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what determines token ids: the vocabulary/merges and the chat template."""
    h = hashlib.sha1()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()


def tokenize_split(source: Source, ds, tokenizer, cfg: DataConfig, tok_fp: str, show_progress: bool):
    """Tokenize rows with datasets' map; cached by an explicit fingerprint.

    Returns the mapped dataset with ``input_ids`` and ``prompt_len`` columns.
    """
    import datasets

    fmt = detect_format(ds.column_names, cfg, source)
    procs = []  # built on first use: a cache hit never tokenizes
    settings = [fmt, cfg.text_feature, cfg.prompt_feature, cfg.completion_feature, cfg.chat_feature,
                cfg.mask_prompt, TOKENIZE_VERSION]
    key = hashlib.sha1(json.dumps([ds._fingerprint, tok_fp, settings]).encode()).hexdigest()[:16]

    def tokenize(batch, indices):
        if not procs:
            procs.append(_processor(fmt, tokenizer, cfg))
        proc = procs[0]
        ids, prompt = [], []
        for j, index in enumerate(indices):
            row = {k: batch[k][j] for k in batch}
            problem = _check_row(row, fmt, cfg)
            if problem:
                raise DataError(f"{row_location(source, index)}: {problem}")
            try:
                tokens, offset = proc.process(row)
            except DataError:
                raise
            except Exception as e:
                if "chat_template" in str(e) or "chat template" in str(e):
                    raise DataError(f"data format {fmt} needs a chat template, but the tokenizer has none; "
                                    "use text rows or a model with a chat template") from None
                raise DataError(f"{row_location(source, index)}: cannot tokenize ({e})") from None
            ids.append(list(tokens))
            prompt.append(int(offset))
        return {"input_ids": ids, "prompt_len": prompt}

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "prompt_len": datasets.Value("int32")})
    with quiet_datasets(progress=show_progress):
        return ds.map(tokenize, batched=True, with_indices=True, remove_columns=ds.column_names,
                      features=features, new_fingerprint=key, load_from_cache_file=True,
                      desc=f"tokenizing {source.description}")


def to_split(name: str, source: Source, mapped, cfg: DataConfig) -> TokenizedSplit:
    """Arrow columns to numpy, then apply the max_seq_length policy."""
    column = mapped.data.column("input_ids").combine_chunks()
    tokens = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offsets = column.offsets.to_numpy().astype(np.int64)
    starts, lengths = offsets[:-1], np.diff(offsets).astype(np.int64)
    prompt = np.asarray(mapped.data.column("prompt_len").to_numpy(), np.int64)
    notes = []
    n = len(lengths)
    keep = np.ones(n, bool)
    too_long = lengths > cfg.max_seq_length
    if too_long.any():
        if too_long.all() and cfg.long_samples == "drop":
            raise DataError(
                f"all {n} samples of {source.description} are longer than data.max_seq_length="
                f"{cfg.max_seq_length} tokens (shortest: {int(lengths.min())}); raise data.max_seq_length "
                "or set data.long_samples=truncate")
        if cfg.long_samples == "drop":
            keep &= ~too_long
            notes.append(f"dropped {int(too_long.sum())} of {n} samples over {cfg.max_seq_length} tokens")
        else:
            lengths = np.minimum(lengths, cfg.max_seq_length)
            notes.append(f"truncated {int(too_long.sum())} of {n} samples to {cfg.max_seq_length} tokens")
    empty = (lengths - np.maximum(prompt, 1)) <= 0
    if (empty & keep).any():
        keep &= ~empty
        notes.append(f"dropped {int(empty.sum())} samples with no tokens to learn (prompt fills them)")
    if not keep.any():
        raise DataError(f"no usable samples remain in {source.description} ({'; '.join(notes)})")
    return TokenizedSplit(name, source.description, tokens, starts[keep], lengths[keep], prompt[keep], notes)


def concatenate(pieces: list[TokenizedSplit]) -> TokenizedSplit:
    """One split from the same split of several datasets (``data.hf_dataset`` as a list), in order."""
    offsets = np.cumsum([0] + [len(p.tokens) for p in pieces[:-1]])
    return TokenizedSplit(pieces[0].name, " + ".join(p.source for p in pieces),
                          np.concatenate([p.tokens for p in pieces]),
                          np.concatenate([p.starts + off for p, off in zip(pieces, offsets)]),
                          np.concatenate([p.lengths for p in pieces]),
                          np.concatenate([p.prompt_lengths for p in pieces]),
                          [f"{p.source}: {note}" for p in pieces for note in p.notes])


def load_splits(cfg: DataConfig, tokenizer, splits=("train", "valid"), show_progress: bool = True):
    """Load, tokenize (cached) and check the requested splits.

    Args:
        cfg (DataConfig): The recipe's data section.
        tokenizer: mlx-lm's TokenizerWrapper (or a Hugging Face tokenizer).
        splits (tuple[str]): Which splits to load; ``train`` is required when
            asked for, others are skipped when absent. Default: ``("train", "valid")``.
        show_progress (bool): Show datasets' progress bars. Default: ``True``.

    Returns:
        dict[str, TokenizedSplit]: The splits that exist.
    """
    out = load_parts(cfg, tokenizer, splits, show_progress, tokenize_split, to_split, concatenate)
    if cfg.packing:
        from .packing import pack, pack_length

        for name in splits:
            if name in out:
                # every split packs to the training split's row length (the same shapes to compile)
                basis = getattr(out["train"], "base", out["train"]) if "train" in out else out[name]
                length = cfg.pack_length or pack_length(basis.lengths, cfg.max_seq_length, cfg.pad_multiple)
                out[name] = pack(out[name], length)
    return out


def load_parts(cfg: DataConfig, tokenizer, splits, show_progress: bool, tokenize, build, combine) -> dict:
    """Each requested split: its rows from every part of the data (``sources.source_parts``), each part
    tokenized (``tokenize(source, rows, tokenizer, part, tokenizer fingerprint, show_progress)``) and built
    (``build(name, source, mapped, part)``), the parts' pieces ``combine``d in order. What SFT and
    preference data share (``load_splits``, ``trainer.data.pairs.load_pair_splits``).

    Raises:
        DataError: ``train`` was asked for and no part has it.
    """
    parts = source_parts(cfg)  # every hub dataset of a list, or the one data.path; a split concatenates them
    tok_fp = tokenizer_fingerprint(tokenizer)
    out = {}
    for name in splits:
        pieces = []
        for part, sources in parts:
            if name not in sources:
                continue
            required = name == "train" or part.hf_dataset is not None
            ds = load_rows(sources[name], part.cache_dir, required=required)
            if ds is not None:
                mapped = tokenize(sources[name], ds, tokenizer, part, tok_fp, show_progress)
                pieces.append(build(name, sources[name], mapped, part))
        if pieces:
            out[name] = pieces[0] if len(pieces) == 1 else combine(pieces)
            if name == "train" and cfg.mix is not None:  # each epoch's samples are drawn by weight
                out[name].mix = plan_mix(cfg, pieces)
    if "train" in splits and "train" not in out:
        raise DataError(f"no training split found for {cfg.path or cfg.hf_dataset or 'data.mix'}")
    return out
