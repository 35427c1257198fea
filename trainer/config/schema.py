"""The recipe schema: one frozen dataclass per section, a one-line doc per key.

``trainer.config.load`` loads YAML into these classes strictly; this module only
declares them and checks values that are impossible on their own
(``__post_init__``). What is trained (model, method, data) and the whole recipe
live here; how the run goes (training, eval, checkpoint, logging, parallel) in
``trainer.config.running``, and the value rules in ``trainer.config.rules``.
It imports nothing from MLX.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from ..errors import ConfigError
from .rules import _count, _doc, _named, _refuse, _suggest
from .running import CheckpointConfig, EvalConfig, LoggingConfig, ParallelConfig, TrainingConfig


@dataclass(frozen=True)
class ModelConfig:
    """What to fine-tune."""

    path: str = _doc("local model directory or Hugging Face hub id (mlx-lm format)")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = _doc(
        "cast floating-point base weights to this dtype; null keeps the stored dtype", None)
    trust_remote_code: bool = _doc("let the tokenizer run code from the model repo", False)

    def __post_init__(self):
        if not self.path.strip():
            raise ConfigError("model.path must name a model directory or hub id")


@dataclass(frozen=True)
class MethodConfig:
    """How to fine-tune: adapters or all weights."""

    type: Literal["lora", "dora", "full"] = _doc("lora, dora (QLoRA when the base is quantized) or full", "lora")
    rank: int = _doc("adapter rank; higher: more capacity, more memory", 8)
    scale: float = _doc("adapter output scale (mlx-lm's `scale`, i.e. alpha / rank)", 20.0)
    dropout: float = _doc("dropout on the adapter input", 0.0)
    num_layers: int = _doc("adapt (or train) only the last N transformer blocks; -1: all", -1)
    keys: Optional[list[str]] = _doc(
        "module paths inside a block to adapt, e.g. [self_attn.q_proj, self_attn.v_proj]; null: every linear layer",
        None)
    objective: Literal["sft", "dpo", "orpo", "grpo"] = _doc(
        "what the loss teaches: sft (next tokens of the data), dpo or orpo (preference pairs: rows of prompt, "
        "chosen and rejected; training.batch_size then counts pairs), grpo (rewards of completions it samples "
        "for prompt rows; training.batch_size then counts prompts)", "sft")
    beta: float = _doc("dpo: strength of the pull away from the reference model (the model before tuning); "
                       "higher: stays closer to it. grpo: weight of the KL to the reference; 0: no reference "
                       "pass (faster)", 0.1)
    label_smoothing: float = _doc("dpo: assumed share of pairs whose labels are flipped (conservative DPO); "
                                  "0: plain sigmoid DPO", 0.0)
    orpo_lambda: float = _doc("orpo: weight of the odds-ratio term beside the NLL of the chosen answer", 0.1)
    group_size: int = _doc("grpo: completions sampled per prompt (their rewards are compared within the group); "
                           "more: steadier advantages, more generation", 8)
    max_completion_tokens: int = _doc("grpo: longest completion, in tokens (one ending there is cut)", 256)
    temperature: float = _doc("grpo: sampling temperature of the completions; 0: greedy (a group then agrees "
                              "with itself and teaches nothing)", 1.0)
    epsilon: float = _doc("grpo: clip range of the probability ratio (below 1 - epsilon and above "
                          "1 + epsilon_high the update stops pushing)", 0.2)
    epsilon_high: Optional[float] = _doc("grpo: upper clip range (DAPO's clip-higher, e.g. 0.28); null: epsilon",
                                         None)
    updates_per_generation: int = _doc("grpo: optimizer updates per batch of completions (more than 1 reuses "
                                       "them, with ratio clipping; checkpoints fall between generations)", 1)
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = _doc(
        "grpo: how token losses are normalised: grpo (per completion, then per completion of the update), "
        "dr_grpo (by completions x max_completion_tokens; advantages not divided by the spread) or dapo "
        "(by the completion tokens of the whole update)", "grpo")
    rewards: Optional[list[dict[str, Any]]] = _doc(
        "grpo: the rewards, summed with their weights: built-ins {kind: exact_match | contains | number_match "
        "| format | length, ...} or your own {function: module:function}; a named function is imported and "
        "run (docs/INTERNALS.md, GRPO)", None)

    def __post_init__(self):
        if not self.beta >= 0:
            raise _refuse("method.beta", ">= 0", self.beta)
        self._check_generation()
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"method.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.orpo_lambda < 0:
            raise ConfigError(f"method.orpo_lambda must be >= 0, got {self.orpo_lambda}")
        _count("method.rank", self.rank)
        if not self.scale > 0:
            raise _refuse("method.scale", "positive (it multiplies the adapter's output)", self.scale)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}")
        if self.num_layers != -1:
            _count("method.num_layers", self.num_layers, rule="-1 (all) or a positive count")
        if self.keys is not None and (not self.keys or not all(k.strip() for k in self.keys)):
            raise _refuse("method.keys", "null (every linear layer) or a list of module paths, none empty", self.keys)

    def _check_generation(self):
        """GRPO's keys, checked whatever the objective (a recipe switching to grpo keeps them)."""
        _count("method.group_size", self.group_size, low=2, rule="at least 2 (a group compares its completions)")
        _count("method.max_completion_tokens", self.max_completion_tokens)
        _count("method.updates_per_generation", self.updates_per_generation)
        if not 0 <= self.temperature <= 100:
            raise _refuse("method.temperature", "in [0, 100]", self.temperature)
        if not 0 < self.epsilon < 1:
            raise _refuse("method.epsilon", "in (0, 1)", self.epsilon)
        if self.epsilon_high is not None and not 0 < self.epsilon_high <= 10:
            raise _refuse("method.epsilon_high", "null or in (0, 10]", self.epsilon_high)
        if self.rewards is not None and not self.rewards:
            raise _refuse("method.rewards", "null or a list of rewards", self.rewards)


# Keys of data.hf_dataset, as in mlx-lm's hf_dataset entries.
HF_DATASET_KEYS = ("path", "name", "config", "train_split", "valid_split", "test_split", "text_feature",
                   "prompt_feature", "completion_feature", "chat_feature", "chosen_feature", "rejected_feature",
                   "system_feature")

def _check_hf_entry(entry: dict, where: str) -> None:
    """One hub dataset entry (``data.hf_dataset``, or a source of ``data.mix``): a path and known keys."""
    if not entry.get("path"):
        raise ConfigError(f"{where} needs a `path` (the hub id)")
    for key, value in entry.items():
        if key not in HF_DATASET_KEYS:
            raise ConfigError(f"unknown key {where}.{str(key)[:40]}" + _suggest(
                str(key), HF_DATASET_KEYS).replace("mean ", f"mean {where}."))
        if key == "config" and not isinstance(value, (dict, type(None))):
            raise _refuse(f"{where}.config", "a mapping of load_dataset arguments", value)
        if key != "config" and value is not None and (not isinstance(value, str) or not value.strip()):
            raise _refuse(f"{where}.{key}", "a non-empty string or null", value)


# Keys of one source of data.mix.
MIX_KEYS = ("path", "hf_dataset", "weight")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it becomes token batches."""

    path: Optional[str] = _doc("JSONL/Parquet/CSV file, a directory with train/valid(/test) files, or a hub id", None)
    hf_dataset: Optional[Union[dict[str, Any], list[dict[str, Any]]]] = _doc(
        "hub dataset like mlx-lm's hf_dataset: {path, name, train_split, valid_split, test_split, "
        "text_feature, prompt_feature, completion_feature, chat_feature}, or a list of them (their splits "
        "are concatenated, as mlx-lm does)", None)
    format: Literal["auto", "text", "completion", "chat"] = _doc("row format; auto detects it from the first row", "auto")
    text_feature: str = _doc("column holding plain text", "text")
    prompt_feature: str = _doc("column holding the prompt", "prompt")
    completion_feature: str = _doc("column holding the completion", "completion")
    chat_feature: str = _doc("column holding chat messages", "messages")
    chosen_feature: str = _doc("preference rows (method.objective dpo/orpo): column holding the preferred answer "
                               "(a string or chat messages)", "chosen")
    rejected_feature: str = _doc("preference rows: column holding the answer to avoid", "rejected")
    system_feature: str = _doc("preference rows: optional column holding a system prompt (as mlx-lm-lora)", "system")
    mask_prompt: bool = _doc("exclude prompt tokens from the loss (completion and chat formats)", True)
    max_seq_length: int = _doc("longest sample in tokens; see long_samples", 2048)
    long_samples: Literal["drop", "truncate"] = _doc("what to do with samples over max_seq_length", "drop")
    pad_multiple: int = _doc("pad batches to a multiple of this length (fewer distinct shapes to compile)", 16)
    packing: bool = _doc("pack short samples into shared rows (attention stays within a sample); see pack_length", False)
    prefetch: bool = _doc("build the next batch on a thread while the step computes (same order)", True)
    pack_length: int = _doc("packed row length in tokens; 0: chosen from the data (about 1.5x the mean sample, "
                            "capped by max_seq_length): longer rows waste attention across samples", 0)
    cache_dir: Optional[str] = _doc("where tokenized data is cached; null: the datasets library's cache", None)
    mix: Optional[list[dict[str, Any]]] = _doc(
        "several sources trained together instead of data.path: a list of {path: file, directory or hub id (or "
        "hf_dataset: {...}), weight: its share of every epoch}; weights are relative (3 and 1: 3 of every 4 "
        "samples), not Axolotl's keep-fraction", None)
    epoch_size: Optional[int] = _doc("samples (pairs, prompts) in one epoch of data.mix; null: the sources' total. "
                                     "A source repeats or leaves out samples to give its weight's share", None)
    streaming: bool = _doc("read the training split while training (.jsonl, .parquet or a hub dataset): each rank "
                           "reads its own share and tokenizes rows as needed, so memory stays bounded; needs "
                           "training.steps, or data.stream_rows with training.epochs", False)
    stream_rows: Optional[int] = _doc("streaming: rows in the training split, if you know them; sizes the schedule of "
                                      "training.epochs and the epoch fraction in metrics", None)
    stream_window: int = _doc("streaming: micro-batches of rows each rank reads, tokenizes and groups by length at "
                              "once; more: less padding, more memory", 64)

    def __post_init__(self):
        given = [key for key in ("path", "hf_dataset", "mix") if getattr(self, key) is not None]
        if not given:
            raise ConfigError("data.path (or data.hf_dataset, or data.mix) must name the dataset")
        if len(given) > 1:
            raise ConfigError(f"data.{given[-1]} and data.{given[0]} both name the dataset; set only one of "
                              "data.path, data.hf_dataset and data.mix")
        _named("data.path", self.path, "a file, a directory or a hub id")
        _named("data.cache_dir", self.cache_dir, "a directory or null")
        for name in ("text", "prompt", "completion", "chat", "chosen", "rejected", "system"):
            _named(f"data.{name}_feature", getattr(self, f"{name}_feature"), "a column name")
        _count("data.max_seq_length", self.max_seq_length, low=2, rule="at least 2")
        _count("data.pad_multiple", self.pad_multiple)
        if self.pack_length != 0 and not 2 <= self.pack_length <= self.max_seq_length:
            raise ConfigError(f"data.pack_length must be 0 (chosen from the data) or between 2 and "
                              f"data.max_seq_length={self.max_seq_length}, got {self.pack_length}")
        self._check_hf_datasets()
        self._check_mix()
        _count("data.epoch_size", self.epoch_size, rule="positive or null")
        if self.epoch_size is not None and self.mix is None:
            raise ConfigError("data.epoch_size sizes the epochs of data.mix; set data.mix, or leave it null")
        _count("data.stream_rows", self.stream_rows, rule="positive or null")
        if self.stream_rows is not None and not self.streaming:
            raise ConfigError("data.stream_rows gives the length of a stream; set data.streaming=true, or leave it "
                              "null (without streaming the length is known)")
        _count("data.stream_window", self.stream_window)
        if self.streaming and self.mix is not None:
            raise ConfigError("data.mix cannot stream (data.streaming): a mix draws each epoch from its sources' "
                              "sizes, which a stream does not know; set data.streaming=false")

    def _check_mix(self) -> None:
        """Each source names one dataset and a positive weight; other keys (Axolotl's) are refused."""
        if self.mix is None:
            return
        if not self.mix:
            raise ConfigError("data.mix is an empty list; give at least one {path, weight} source")
        for i, entry in enumerate(self.mix):
            where = f"data.mix[{i}]"
            for key in entry:
                if key not in MIX_KEYS:
                    raise ConfigError(f"unknown key {where}.{str(key)[:40]} (a source takes {', '.join(MIX_KEYS)})"
                                      + _suggest(str(key), MIX_KEYS))
            if ("path" in entry) == ("hf_dataset" in entry):
                raise ConfigError(f"{where} needs exactly one of `path` and `hf_dataset`")
            if "path" in entry and (not isinstance(entry["path"], str) or not entry["path"].strip()):
                raise _refuse(f"{where}.path", "a file, a directory or a hub id", entry["path"])
            if "hf_dataset" in entry:
                if not isinstance(entry["hf_dataset"], dict):
                    raise _refuse(f"{where}.hf_dataset", "a mapping like data.hf_dataset's", entry["hf_dataset"])
                _check_hf_entry(entry["hf_dataset"], f"{where}.hf_dataset")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < 1e12:
                raise _refuse(f"{where}.weight", "a positive number (the source's share of each epoch)", weight)

    def _check_hf_datasets(self) -> None:
        entries = self.hf_datasets()
        if isinstance(self.hf_dataset, list) and not entries:
            raise ConfigError("data.hf_dataset is an empty list; give at least one dataset")
        for i, entry in enumerate(entries):
            _check_hf_entry(entry, "data.hf_dataset" + (f"[{i}]" if isinstance(self.hf_dataset, list) else ""))

    def hf_datasets(self) -> list[dict]:
        """``hf_dataset`` as a list of entries (empty without one)."""
        if self.hf_dataset is None:
            return []
        return list(self.hf_dataset) if isinstance(self.hf_dataset, list) else [self.hf_dataset]


@dataclass(frozen=True)
class Config:
    """A whole recipe."""

    model: ModelConfig
    data: DataConfig
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if self.parallel.shard_optimizer and self.training.optimizer == "adafactor":
            raise ConfigError("parallel.shard_optimizer needs an element-wise optimizer (adamw, adam or sgd); "
                              "adafactor factors each matrix's statistics by rows and columns")
        if self.method.type == "full" and self.method.dropout:
            raise ConfigError("method.dropout applies to adapters; set it to 0 for method.type=full")
        if self.parallel.pipeline:
            self._check_pipeline()

    def _check_pipeline(self):
        """What a pipeline does not do (yet), each in one sentence."""
        p = self.parallel
        if p.shard_optimizer:
            raise ConfigError("parallel.pipeline keeps each stage's optimizer state on its stage already; set "
                              "parallel.shard_optimizer=false")
        if self.method.type == "full":
            raise ConfigError("parallel.pipeline trains adapters (lora, dora, QLoRA on a quantized base), not "
                              "method.type=full")
        if self.data.packing:
            raise ConfigError("parallel.pipeline trains unpacked rows; set data.packing=false")
        if self.training.grad_checkpoint:
            raise ConfigError("parallel.pipeline recomputes each stage's forward in backward already; set "
                              "training.grad_checkpoint=false")

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what gets printed and saved)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTION_CLASSES = {
    "model": ModelConfig, "method": MethodConfig, "data": DataConfig, "training": TrainingConfig,
    "eval": EvalConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig, "parallel": ParallelConfig,
}
