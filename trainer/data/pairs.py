"""Preference pairs: rows of a prompt, a chosen and a rejected answer, tokenized into two samples each.

The row formats are the ones TRL documents and mlx-lm-lora reads, so existing
preference files load as they are. Each row is recognised on its own:

* standard, explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``,
  optionally with ``"system": str`` (mlx-lm-lora's DPO and ORPO datasets);
* standard, implicit prompt: ``{"chosen": str, "rejected": str}``, whole texts
  (e.g. Anthropic HH's ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``); the prompt is
  their longest common beginning;
* conversational: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``;
* conversational, implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``,
  whole conversations; the prompt is their common first messages. A string
  ``prompt`` beside whole conversations (UltraFeedback) is ignored, as TRL's
  ``maybe_extract_prompt`` ignores it;
* mlx-lm-lora's ORPO answers ``{"content": str}`` or ``{"messages": [...]}``.

A prompt given explicitly is rendered with the tokenizer's chat template (a
string prompt as a user message, a string answer as an assistant message), as
mlx-lm's ``CompletionsDataset`` and mlx-lm-lora's ``DPODataset`` render it,
so a pair tokenizes like the SFT row of the same prompt and answer. Implicit
string prompts carry their dialogue format inside them and are tokenized as
text: prompt, then answer and EOS, as TRL does. The prompt is never in the
loss. Other columns (``preference_score``, ids, scores) are ignored. A chat
answer begins with the assistant's message (a row whose answer begins with a
user's is refused, naming the roles); a pair with an empty or blank answer is
dropped and counted in the split's notes.

Tokenizing is cached by ``datasets`` under a fingerprint of the rows, the
tokenizer and these settings, as ``trainer.data.tokenized`` does for SFT rows.
This module imports no MLX.
"""

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..config.load import DataConfig
from .mix import WholeEpochs
from .tokenized import TokenizedSplit, concatenate, load_parts
from .sources import Source, quiet_datasets, row_location
from ..errors import DataError

PAIR_TOKENIZE_VERSION = 2  # bump when the tokenized pairs change meaning


@dataclass
class PairSplit(WholeEpochs):
    """Tokenized preference pairs: pair ``i`` is sample ``i`` of ``chosen`` and of ``rejected``.

    Attributes:
        lengths: Per pair, the longer of its two samples (what a batch pads to
            and what length grouping sorts by).
        reference: ``(pairs, 2)`` float32 sequence log-probs of the chosen and
            rejected answers under the reference model (DPO), or ``None``.
    """

    name: str
    source: str
    chosen: TokenizedSplit
    rejected: TokenizedSplit
    notes: list[str] = field(default_factory=list)
    reference: np.ndarray | None = None
    lengths: np.ndarray = field(init=False)

    def __post_init__(self):
        self.lengths = np.maximum(self.chosen.lengths, self.rejected.lengths)

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def loss_counts(self) -> np.ndarray:
        """Answer tokens per pair, chosen and rejected together."""
        return self.chosen.loss_counts + self.rejected.loss_counts

    def fingerprint(self) -> str:
        """Hash of exactly the token pairs training sees (for agreement, resume and the reference cache)."""
        return hashlib.sha1((self.chosen.fingerprint() + self.rejected.fingerprint()).encode()).hexdigest()

    def total_tokens(self) -> int:
        return self.chosen.total_tokens() + self.rejected.total_tokens()


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Pair:
    """One row, normalised: chat messages (``chat``) or plain text."""

    prompt: object  # list of messages, or a string
    chosen: object
    rejected: object
    chat: bool


def _messages(value):
    """A list of ``{role, content}`` messages (also mlx-lm-lora's ``{"messages": [...]}``), else ``None``."""
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        value = value["messages"]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def _text(value):
    """A string answer (also mlx-lm-lora's ``{"content": str}``), else ``None``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str) and "messages" not in value:
        return value["content"]
    return None


def common_prefix(a, b) -> int:
    """Length of the common beginning of two strings or message lists.

    For strings, as TRL's ``extract_prompt``: a prompt does not end in the
    middle of a word's leading space, so a shared trailing space goes to the answers.
    """
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if isinstance(a, str) and n < min(len(a), len(b)) and n > 0 and a[n - 1] == " ":
        n -= 1
    return n


def _role_problem(answers: dict, context: str) -> str | None:
    """Why answers that do not begin with an assistant's message cannot be trained as answers, naming the
    roles found and the one expected; ``None`` when both begin with the assistant's."""
    wrong = [(key, messages[0]["role"]) for key, messages in answers.items() if messages[0]["role"] != "assistant"]
    if not wrong:
        return None
    found = " and ".join(f"'{key}' begins with a '{role}' message" for key, role in wrong)
    return f"{found}, but {context} must begin with an 'assistant' message"


def _chat_pair(prompt, chosen: list, rejected: list, system: list, cfg: DataConfig) -> Pair | str:
    """A pair of chat answers with its prompt (given, or the messages both answers begin with), or why not.

    The answers are what the loss trains, so each must begin with the assistant's message: a user's message
    there is a prompt in the wrong column, and the sentence says which roles were found.
    """
    keys, replies = (cfg.chosen_feature, cfg.rejected_feature), chosen[0]["role"] == rejected[0]["role"] == "assistant"
    context = f"an answer to '{cfg.prompt_feature}'"
    if isinstance(prompt, str) and replies:
        prompt = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        prompt = _messages(prompt)
    else:  # whole conversations: the prompt is what they share (TRL's maybe_extract_prompt); a string one is ignored
        n = common_prefix(chosen, rejected)
        if n == 0 and prompt is not None:  # a string prompt beside answers that are neither replies nor conversations
            return (f"{_role_problem(dict(zip(keys, (chosen, rejected))), context)} (or both must be whole "
                    "conversations that begin with the same messages)")
        if n == 0:
            return (f"has no prompt: '{cfg.prompt_feature}' is missing and '{keys[0]}' and '{keys[1]}' begin with "
                    f"different messages (a '{chosen[0]['role']}' and a '{rejected[0]['role']}' message)")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not chosen or not rejected:
            return f"'{keys[0]}' or '{keys[1]}' has no message after the prompt they share"
        context = "an answer after the messages both conversations share"
    problem = _role_problem(dict(zip(keys, (chosen, rejected))), context)
    if problem:
        return problem
    lead = system if system and prompt[0]["role"] != "system" else []  # a prompt's own system message wins
    return Pair(lead + prompt, chosen, rejected, chat=True)


def normalise(row: dict, cfg: DataConfig, has_template: bool) -> Pair | str:
    """The row as a :class:`Pair`, or why it cannot be one (a phrase for the error line)."""
    keys = (cfg.chosen_feature, cfg.rejected_feature)
    answers = []
    for key in keys:
        value = row.get(key)
        if value is None:
            return f"'{key}' is missing"
        as_messages, as_text = _messages(value), _text(value)
        if as_messages is None and as_text is None:
            return f"'{key}' is neither a string nor a list of chat messages with a role and content"
        answers.append(as_messages if as_messages is not None else as_text)
    chosen, rejected = answers
    if isinstance(chosen, list) != isinstance(rejected, list):  # one string answer beside messages: a reply
        chosen, rejected = ([{"role": "assistant", "content": a}] if isinstance(a, str) else a
                            for a in (chosen, rejected))
    prompt = row.get(cfg.prompt_feature)
    if prompt is not None and _messages(prompt) is None and not isinstance(prompt, str):
        return f"'{cfg.prompt_feature}' is neither a string nor a list of chat messages with a role and content"
    system = row.get(cfg.system_feature) if cfg.system_feature else None
    system = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    if isinstance(chosen, list):
        return _chat_pair(prompt, chosen, rejected, system, cfg)
    if prompt is None:  # whole texts: the prompt is their common beginning, tokenized as text
        n = common_prefix(chosen, rejected)
        if n == 0:
            return f"has no '{cfg.prompt_feature}' and '{keys[0]}' and '{keys[1]}' share no beginning"
        return Pair(chosen[:n], chosen[n:], rejected[n:], chat=False)
    if isinstance(prompt, list):  # chat prompt, string answers: the answers are assistant messages
        prompt = _messages(prompt)
        lead = system if system and prompt and prompt[0]["role"] != "system" else []  # the prompt's own one wins
        return Pair(lead + prompt, [{"role": "assistant", "content": chosen}],
                    [{"role": "assistant", "content": rejected}], chat=True)
    if has_template:
        user = [{"role": "user", "content": prompt}]
        return Pair(system + user, [{"role": "assistant", "content": chosen}],
                    [{"role": "assistant", "content": rejected}], chat=True)
    return Pair(prompt, chosen, rejected, chat=False)


def blank(answer) -> bool:
    """Whether an answer (a string or messages) holds nothing but white space."""
    return not answer.strip() if isinstance(answer, str) else all(not m["content"].strip() for m in answer)


def render(pair: Pair, tokenizer) -> tuple:
    """``((chosen tokens, prompt length), (rejected tokens, prompt length))``."""
    if pair.chat:
        prompt = tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True, return_dict=False)
        return tuple((list(tokenizer.apply_chat_template(pair.prompt + answer, return_dict=False)), len(prompt))
                     for answer in (pair.chosen, pair.rejected))
    prompt = list(tokenizer.encode(pair.prompt))
    return tuple((prompt + list(tokenizer.encode(answer, add_special_tokens=False)) + [tokenizer.eos_token_id],
                  len(prompt)) for answer in (pair.chosen, pair.rejected))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# --------------------------------------------------------------------------- tokenizing


def tokenize_pairs(source: Source, ds, tokenizer, cfg: DataConfig, tok_fp: str, show_progress: bool):
    """Tokenize preference rows with datasets' map, cached by an explicit fingerprint.

    Returns the mapped dataset with ``chosen_ids``, ``chosen_prompt``,
    ``rejected_ids`` and ``rejected_prompt`` columns, and ``chosen_blank`` and
    ``rejected_blank``: the answer is empty or white space (no tokens then).

    Raises:
        DataError: A row that is not a preference pair, naming its file and line.
    """
    import datasets

    template = has_chat_template(tokenizer)
    settings = [cfg.prompt_feature, cfg.chosen_feature, cfg.rejected_feature, cfg.system_feature, template,
                PAIR_TOKENIZE_VERSION]
    key = hashlib.sha1(json.dumps([ds._fingerprint, tok_fp, settings]).encode()).hexdigest()[:16]
    if cfg.chosen_feature not in ds.column_names or cfg.rejected_feature not in ds.column_names:
        raise DataError(f"rows of {source.description} have no '{cfg.chosen_feature}' and '{cfg.rejected_feature}' "
                        f"fields, which preference tuning needs (data.chosen_feature, data.rejected_feature); "
                        f"found {ds.column_names}")

    def tokenize(batch, indices):
        out = {f"{side}_{column}": [] for side in ("chosen", "rejected") for column in ("ids", "prompt", "blank")}
        for j, index in enumerate(indices):
            pair = normalise({k: batch[k][j] for k in batch}, cfg, template)
            if isinstance(pair, str):
                raise DataError(f"{row_location(source, index)}: {pair}")
            if pair.chat and not template:
                raise DataError(f"{row_location(source, index)}: chat-message pairs need a chat template, but the "
                                "tokenizer has none; use string rows or a model with a chat template")
            empty = blank(pair.chosen), blank(pair.rejected)
            try:  # a pair with a blank answer is dropped, with a count (to_pair_split): no need to render it
                rendered = (([], 0), ([], 0)) if any(empty) else render(pair, tokenizer)
            except Exception as e:  # a template that rejects the messages (roles out of order, say)
                raise DataError(f"{row_location(source, index)}: cannot tokenize ({str(e)[:160]})") from None
            for side, (ids, plen), nothing in zip(("chosen", "rejected"), rendered, empty):
                out[f"{side}_ids"].append(ids)
                out[f"{side}_prompt"].append(plen)
                out[f"{side}_blank"].append(nothing)
        return out

    ids, flag, count = datasets.Sequence(datasets.Value("int32")), datasets.Value("bool"), datasets.Value("int32")
    features = datasets.Features({"chosen_ids": ids, "chosen_prompt": count, "chosen_blank": flag,
                                  "rejected_ids": ids, "rejected_prompt": count, "rejected_blank": flag})
    with quiet_datasets(progress=show_progress):
        return ds.map(tokenize, batched=True, with_indices=True, remove_columns=ds.column_names, features=features,
                      new_fingerprint=key, load_from_cache_file=True,
                      desc=f"tokenizing pairs of {source.description}")


def _side(name: str, source: Source, mapped, side: str) -> TokenizedSplit:
    column = mapped.data.column(f"{side}_ids").combine_chunks()
    tokens = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offsets = column.offsets.to_numpy().astype(np.int64)
    prompt = np.asarray(mapped.data.column(f"{side}_prompt").to_numpy(), np.int64)
    return TokenizedSplit(name, source.description, tokens, offsets[:-1], np.diff(offsets).astype(np.int64), prompt)


def _subset(split: TokenizedSplit, keep: np.ndarray, lengths: np.ndarray) -> TokenizedSplit:
    return TokenizedSplit(split.name, split.source, split.tokens, split.starts[keep], lengths[keep],
                          split.prompt_lengths[keep])


def _blank_answers(mapped, notes: list) -> np.ndarray:
    """Which pairs to keep: not those with an empty or blank answer, which are counted in ``notes``.

    Such a pair is dropped with a count rather than refused: like the pairs below that teach nothing, it is
    a row a user cannot always mend (a hub dataset holds a few), and the note says how many there were.
    Trained, it would teach the model to prefer (or avoid) saying nothing.
    """
    chosen, rejected = (np.asarray(mapped.data.column(f"{side}_blank").to_numpy(zero_copy_only=False), bool)
                        for side in ("chosen", "rejected"))
    either = chosen | rejected
    if either.any():
        notes.append(f"dropped {int(either.sum())} of {len(either)} pairs with an empty or blank answer "
                     f"({int(chosen.sum())} chosen, {int(rejected.sum())} rejected)")
    return ~either


def to_pair_split(name: str, source: Source, mapped, cfg: DataConfig) -> PairSplit:
    """Arrow columns to a :class:`PairSplit`, with ``data.max_seq_length`` applied to whole pairs.

    A pair with an empty or blank answer is dropped; a pair with a sample
    over the limit is dropped (``long_samples: drop``) or both its samples
    are cut (``truncate``); a pair left with no answer token on a side, or
    with the same tokens on both, teaches nothing and is dropped; each drop
    is noted.
    """
    chosen, rejected = _side(name, source, mapped, "chosen"), _side(name, source, mapped, "rejected")
    n, limit, notes = len(chosen), cfg.max_seq_length, []
    keep = _blank_answers(mapped, notes)
    longest = np.maximum(chosen.lengths, rejected.lengths)
    c_len, r_len = chosen.lengths, rejected.lengths
    if (longest > limit).any():
        over = int((longest > limit).sum())
        if cfg.long_samples == "drop":
            if over == keep.sum():
                raise DataError(f"all {over} pairs of {source.description} have an answer longer than "
                                f"data.max_seq_length={limit} tokens; raise data.max_seq_length or set "
                                "data.long_samples=truncate")
            keep &= longest <= limit
            notes.append(f"dropped {over} of {n} pairs with a sample over {limit} tokens")
        else:
            c_len, r_len = np.minimum(c_len, limit), np.minimum(r_len, limit)
            notes.append(f"truncated {over} of {n} pairs to {limit} tokens")
    empty = ((c_len - np.maximum(chosen.prompt_lengths, 1)) <= 0) | ((r_len - np.maximum(rejected.prompt_lengths, 1))
                                                                     <= 0)
    if (empty & keep).any():
        notes.append(f"dropped {int((empty & keep).sum())} pairs with no answer token (the prompt fills them)")
        keep &= ~empty
    same = np.array([keep[i] and c_len[i] == r_len[i] and np.array_equal(chosen.sample(i)[:c_len[i]],
                                                                          rejected.sample(i)[:r_len[i]])
                     for i in range(n)], bool)
    if same.any():
        notes.append(f"dropped {int(same.sum())} pairs whose chosen and rejected answers are the same")
        keep &= ~same
    if not keep.any():
        raise DataError(f"no usable pairs remain in {source.description} ({'; '.join(notes)})")
    return PairSplit(name, source.description, _subset(chosen, keep, c_len), _subset(rejected, keep, r_len), notes)


def load_pair_splits(cfg: DataConfig, tokenizer, splits=("train", "valid"), show_progress: bool = True):
    """Load, tokenize (cached) and check the requested splits of preference pairs.

    Args:
        cfg (DataConfig): The recipe's data section.
        tokenizer: mlx-lm's TokenizerWrapper (or a Hugging Face tokenizer).
        splits (tuple[str]): Which splits to load; ``train`` is required when
            asked for. Default: ``("train", "valid")``.
        show_progress (bool): Show datasets' progress bars. Default: ``True``.

    Returns:
        dict[str, PairSplit]: The splits that exist.
    """
    return load_parts(cfg, tokenizer, splits, show_progress, tokenize_pairs, to_pair_split, _concatenate_pairs)


def _concatenate_pairs(pieces: list["PairSplit"]) -> "PairSplit":
    """One split of pairs from the same split of several datasets, in order."""
    return PairSplit(pieces[0].name, " + ".join(p.source for p in pieces), concatenate([p.chosen for p in pieces]),
                     concatenate([p.rejected for p in pieces]),
                     [f"{p.source}: {note}" for p in pieces for note in p.notes])
