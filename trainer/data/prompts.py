"""Prompt rows for on-policy objectives (GRPO): the prompt to complete, and the row its rewards read.

A row is a prompt (``data.prompt_feature``: a string or chat messages, with an
optional ``data.system_feature``) and whatever columns its rewards read (an
``answer`` column for exact or number match, say), as mlx-lm-lora's GRPO
datasets are. A string prompt is rendered with the tokenizer's chat template as
a user message (as mlx-lm's ``CompletionsDataset`` renders a prompt), messages
as they are, both with the assistant's turn opened; with ``data.format: text``
(a base model continuing text), or without a chat template, a string prompt is
tokenized as it is.

Every row's columns are kept (as JSON) beside its tokens, so a reward sees the
row as the file holds it, and an error names the row's file and line.
Tokenizing is cached by ``datasets`` as for the other row formats. This module
imports no MLX.
"""

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..config.load import DataConfig
from ..errors import ConfigError, DataError
from .batches import Batch, BatchStream, rank_rows
from .balance import rows_of
from .mix import WholeEpochs
from .sources import Source, quiet_datasets, row_location
from .tokenized import load_parts

PROMPT_TOKENIZE_VERSION = 1


@dataclass
class PromptSplit(WholeEpochs):
    """Tokenized prompts with the rows they came from.

    Attributes:
        tokens, starts, lengths: The prompts' tokens, flat, with each one's start and length.
        rows: Each row's columns as JSON text (what rewards read).
        texts: Each prompt as the model sees it, decoded (what rewards get as the prompt).
        locations: Each row's file and line (or row number), for messages.
    """

    name: str
    source: str
    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    rows: list
    texts: list
    locations: list
    notes: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.lengths)

    def prompt(self, i: int) -> list[int]:
        return self.tokens[self.starts[i]:self.starts[i] + self.lengths[i]].tolist()

    def row(self, i: int) -> dict:
        return json.loads(self.rows[i])

    def fingerprint(self) -> str:
        """Hash of the prompts and rows training sees (for agreement and resume)."""
        h = hashlib.sha1()
        for i in range(len(self)):
            h.update(self.tokens[self.starts[i]:self.starts[i] + self.lengths[i]].tobytes())
            h.update(self.rows[i].encode())
        return h.hexdigest()


def _render(row: dict, cfg: DataConfig, tokenizer) -> tuple[list[int], str] | str:
    """The prompt's tokens and text, or why the row has none (a phrase for the error line)."""
    prompt = row.get(cfg.prompt_feature)
    system = row.get(cfg.system_feature) if cfg.system_feature else None
    template = bool(getattr(tokenizer, "chat_template", None)) and cfg.format != "text"
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                   and isinstance(m.get("content"), str) for m in prompt):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    elif isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    else:
        return f"'{cfg.prompt_feature}' is missing, empty, or neither a string nor a list of chat messages"
    if isinstance(system, str) and system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    if not template:
        if not isinstance(prompt, str):
            return "chat-message prompts need a chat template, but the tokenizer has none"
        tokens = list(tokenizer.encode(prompt))
    else:
        tokens = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    return tokens, tokenizer.decode(tokens)


def tokenize_prompts(source: Source, ds, tokenizer, cfg: DataConfig, tok_fp: str, show_progress: bool):
    """Tokenize prompt rows with datasets' map, cached by an explicit fingerprint; the rows are kept as JSON."""
    import datasets

    settings = [cfg.prompt_feature, cfg.system_feature, bool(getattr(tokenizer, "chat_template", None)),
                cfg.format, PROMPT_TOKENIZE_VERSION]
    key = hashlib.sha1(json.dumps([ds._fingerprint, tok_fp, settings]).encode()).hexdigest()[:16]
    if cfg.prompt_feature not in ds.column_names:
        raise DataError(f"rows of {source.description} have no '{cfg.prompt_feature}' field, which the prompts of "
                        f"method.objective=grpo need (data.prompt_feature); found {ds.column_names}")

    def tokenize(batch, indices):
        out = {"prompt_ids": [], "prompt_text": [], "row_json": []}
        for j, index in enumerate(indices):
            row = {k: batch[k][j] for k in batch}
            rendered = _render(row, cfg, tokenizer)
            if isinstance(rendered, str):
                raise DataError(f"{row_location(source, index)}: {rendered}")
            out["prompt_ids"].append(rendered[0])
            out["prompt_text"].append(rendered[1])
            out["row_json"].append(json.dumps(row, default=str, ensure_ascii=False))
        return out

    features = datasets.Features({"prompt_ids": datasets.Sequence(datasets.Value("int32")),
                                  "prompt_text": datasets.Value("string"), "row_json": datasets.Value("string")})
    with quiet_datasets(progress=show_progress):
        return ds.map(tokenize, batched=True, with_indices=True, remove_columns=ds.column_names, features=features,
                      new_fingerprint=key, load_from_cache_file=True, desc=f"tokenizing prompts of {source.description}")


def to_prompt_split(name: str, source: Source, mapped, cfg: DataConfig) -> PromptSplit:
    """Arrow columns to a :class:`PromptSplit`; a prompt over ``data.max_seq_length`` is dropped or cut."""
    column = mapped.data.column("prompt_ids").combine_chunks()
    tokens = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offsets = column.offsets.to_numpy().astype(np.int64)
    starts, lengths = offsets[:-1], np.diff(offsets).astype(np.int64)
    rows, texts = mapped["row_json"], mapped["prompt_text"]
    locations = [row_location(source, i) for i in range(len(rows))] if len(rows) <= 100_000 else \
        [f"{source.description} row {i}" for i in range(len(rows))]
    keep, notes = lengths <= cfg.max_seq_length, []
    over = int((~keep).sum())
    if over and cfg.long_samples == "truncate":  # the prompt's beginning is kept, as mlx-lm cuts samples
        lengths, keep = np.minimum(lengths, cfg.max_seq_length), np.ones_like(keep)
        notes.append(f"truncated {over} prompts to {cfg.max_seq_length} tokens")
    elif over:
        notes.append(f"dropped {over} of {len(keep)} prompts over {cfg.max_seq_length} tokens")
    if not keep.any():
        raise DataError(f"every prompt of {source.description} is longer than data.max_seq_length="
                        f"{cfg.max_seq_length} tokens")
    kept = np.flatnonzero(keep)
    return PromptSplit(name, source.description, tokens, starts[kept], lengths[kept], [rows[i] for i in kept],
                       [texts[i] for i in kept], [locations[i] for i in kept], notes)


def _concatenate(pieces: list[PromptSplit]) -> PromptSplit:
    offsets = np.cumsum([0] + [len(p.tokens) for p in pieces[:-1]])
    return PromptSplit(pieces[0].name, " + ".join(p.source for p in pieces), np.concatenate([p.tokens for p in pieces]),
                       np.concatenate([p.starts + off for p, off in zip(pieces, offsets)]),
                       np.concatenate([p.lengths for p in pieces]), sum((p.rows for p in pieces), []),
                       sum((p.texts for p in pieces), []), sum((p.locations for p in pieces), []),
                       [f"{p.source}: {n}" for p in pieces for n in p.notes])


def load_prompt_splits(cfg: DataConfig, tokenizer, splits=("train", "valid"), show_progress: bool = True) -> dict:
    """Load, tokenize (cached) and check the requested splits of prompt rows.

    Returns:
        dict[str, PromptSplit]: The splits that exist.

    Raises:
        ConfigError: ``data.streaming`` is set (prompt rows are not streamed).
    """
    if cfg.streaming:
        raise ConfigError("data.streaming streams next-token rows (method.objective=sft); prompt rows for grpo are "
                          "few and loaded whole, so set data.streaming=false")
    return load_parts(cfg, tokenizer, splits, show_progress, tokenize_prompts, to_prompt_split, _concatenate)


@dataclass(frozen=True)
class PromptBatch(Batch):
    """One rank's prompts of a global micro-batch, before the objective completes them.

    Attributes:
        global_items: prompts in the whole global micro-batch (every rank's).
    """

    global_items: int = 0


class PromptStream(BatchStream):
    """``BatchStream`` over prompts: the same order, positions, prefetch and balance; prompt batches.

    ``per_rank_batch`` counts prompts; each batch holds only their indices (the
    on-policy objective makes the rows from them, ``trainer.objectives.grpo``).
    """

    def _build(self, split, batch: np.ndarray, row_split: tuple) -> list[PromptBatch]:
        even = len(set(row_split)) == 1
        out = []
        for rank in self.hosted:
            mine = rank_rows(batch, rank, self.world_size) if even else rows_of(batch, rank, list(row_split))
            empty = np.zeros((row_split[rank], 1), np.int32)
            out.append(PromptBatch(inputs=empty, targets=empty, mask=empty.astype(np.float32), tokens=0,
                                   global_tokens=0, indices=mine, global_items=len(batch)))
        return out
