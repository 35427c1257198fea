"""The recipe schema: one frozen dataclass per section, a one-line doc per key.

``trainer.config.load`` loads YAML into these classes strictly; this module only
declares them and checks values that are impossible on their own
(``__post_init__``). It imports nothing from MLX.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ..errors import ConfigError, short


def _suggest(name: str, options) -> str:
    """`; did you mean X?` for the closest option, or an empty string."""
    import difflib

    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


# Bounds of values that MLX, numpy or Python cannot take, whatever the recipe means.
MAX_COUNT = 2**31 - 1  # counts and lengths: MLX's shapes and the schedule's step counter are 32-bit integers
MAX_BYTES = 2**63 - 1  # a byte count compared with MLX's (64-bit) memory counters
SEED_LIMIT = 2**64  # mx.random.seed takes an unsigned 64-bit seed (numpy's default_rng any integer >= 0)
MAX_WAIT_S = 1e9  # Python's thread and socket waits overflow past about 9.2e9 s (threading.TIMEOUT_MAX)


def _refuse(key: str, rule: str, value) -> ConfigError:
    """``ConfigError("{key} must be {rule}, got {value}")``: the one wording of an impossible value."""
    return ConfigError(f"{key} must be {rule}, got {short(value)}")


def _count(key: str, value: Optional[int], low: int = 1, rule: Optional[str] = None) -> None:
    """Refuse an integer below ``low`` or above ``MAX_COUNT``; ``None`` ("not set") passes.

    ``rule`` words the lower bound (default ``at least 1`` / ``>= 0``).
    """
    if value is None:
        return
    if value < low:
        raise _refuse(key, rule or ("at least 1" if low == 1 else f">= {low}"), value)
    if value > MAX_COUNT:
        raise _refuse(key, f"at most {MAX_COUNT} (MLX's counts and shapes are 32-bit)", value)


def _named(key: str, value: Optional[str], what: str = "a name") -> None:
    """Refuse an empty (or blank) string; ``None`` ("not set") passes."""
    if value is not None and not value.strip():
        raise _refuse(key, f"{what}, not an empty string", value)


def _seconds(key: str, value: Optional[float]) -> None:
    """Refuse a duration that is not positive or that Python's waits cannot take; ``None`` passes."""
    if value is not None and not 0 < value <= MAX_WAIT_S:
        raise _refuse(key, f"positive and at most {MAX_WAIT_S:g} s", value)


def _doc(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    """A dataclass field with a one-line description (shown by `mlx-dp recipes keys`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


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


DEFAULT_STEPS = 100  # training length when a recipe sets neither training.steps nor training.epochs


@dataclass(frozen=True)
class TrainingConfig:
    """The optimisation: batch, length, optimizer and schedule."""

    batch_size: int = _doc("sequences per rank per micro-step (the mean, with parallel.balance); the global batch "
                           "grows with world size", 4)
    grad_accumulation: int = _doc("micro-steps per optimizer update", 1)
    steps: Optional[int] = _doc(f"optimizer updates to run (or use epochs); neither set: {DEFAULT_STEPS}", None)
    epochs: Optional[float] = _doc("passes over the training set, instead of steps", None)
    learning_rate: float = _doc("peak learning rate", 1e-5)
    optimizer: Literal["adamw", "adam", "sgd", "adafactor"] = _doc("optimizer from mlx.optimizers", "adamw")
    weight_decay: float = _doc("decoupled weight decay (adamw, sgd)", 0.0)
    betas: list[float] = _doc("Adam betas", factory=lambda: [0.9, 0.999])
    eps: float = _doc("Adam epsilon", 1e-8)
    momentum: float = _doc("SGD momentum", 0.0)
    lr_schedule: Literal["constant", "cosine", "linear"] = _doc("decay after warmup", "constant")
    warmup_steps: int = _doc("updates of linear warmup, from warmup_init up to learning_rate", 0)
    warmup_init: float = _doc("learning rate the warmup starts from (the first update uses one step above it)", 0.0)
    min_learning_rate: float = _doc("final learning rate of cosine/linear decay", 0.0)
    max_grad_norm: Optional[float] = _doc("clip the global gradient norm; null: no clipping", None)
    grad_checkpoint: bool = _doc("recompute activations in backward: less memory, ~30% more compute", False)
    attention_block: Union[Literal["auto"], int] = _doc(
        "compute causal attention this many queries at a time, skipping the masked keys (same result; faster "
        "on MLX's CPU backend for rows over ~128 tokens); 0: MLX's kernel over whole rows; auto: 64 on a CPU, "
        "0 on a GPU", "auto")
    fused_exp: Union[Literal["auto"], bool] = _doc(
        "write SwiGLU, the loss and attention's softmax so that MLX fuses their exp into compiled kernels "
        "(same result up to float rounding; on MLX's CPU backend ~4x cheaper exps); auto: on a CPU, not on a GPU",
        "auto")
    chunked_loss: bool = _doc(
        "compute the loss a chunk of tokens at a time, never holding the [tokens x vocabulary] logits (same "
        "result up to float rounding; at 4 x 512 tokens and a 151,936-word vocabulary a step's peak memory is "
        "about a quarter of the plain loss's); models whose output head it cannot open keep the plain loss", True)
    clear_cache_threshold: Union[Literal["auto"], int] = _doc(
        "empty MLX's buffer cache after an update when it holds more than this many bytes: 0 after every update "
        "(mlx-lm's default: a Mac's memory goes back to macOS), -1 never; auto: 0 on a GPU, -1 on a CPU (where "
        "reallocating each update's buffers only costs time; docs/RESULTS.md)", "auto")
    skip_nonfinite: bool = _doc("skip an update whose loss or gradient norm is NaN/inf instead of stopping", False)
    seed: int = _doc("seed for adapter init, dropout and data order", 0)

    def __post_init__(self):
        _count("training.batch_size", self.batch_size)
        _count("training.grad_accumulation", self.grad_accumulation)
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS)  # frozen: the one place the default is set
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("set exactly one of training.steps and training.epochs")
        _count("training.steps", self.steps)
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"training.epochs must be positive, got {self.epochs}")
        if self.epochs is not None and self.epochs > MAX_COUNT:  # the updates they make are counted in 32 bits
            raise _refuse("training.epochs", f"at most {MAX_COUNT} (MLX's step counter is 32-bit)", self.epochs)
        if not 0 <= self.seed < SEED_LIMIT:
            raise _refuse("training.seed", "in [0, 2**64) (mx.random.seed takes an unsigned 64-bit seed)", self.seed)
        self._check_optimizer()
        self._check_schedule()
        if self.clear_cache_threshold != "auto" and (isinstance(self.clear_cache_threshold, bool)
                                                     or not -1 <= self.clear_cache_threshold <= MAX_BYTES):
            raise _refuse("training.clear_cache_threshold", f"auto, -1 (never), 0 or a number of bytes up to "
                          f"{MAX_BYTES}", self.clear_cache_threshold)
        if self.fused_exp != "auto" and not isinstance(self.fused_exp, bool):
            raise ConfigError(f"training.fused_exp must be auto, true or false, got {short(self.fused_exp)}")
        if self.attention_block != "auto":
            if isinstance(self.attention_block, bool):
                raise _refuse("training.attention_block", "auto, 0 or a positive number of queries",
                              self.attention_block)
            _count("training.attention_block", self.attention_block, low=0,
                   rule="auto, 0 or a positive number of queries")

    def _check_optimizer(self) -> None:
        if not self.learning_rate > 0:
            raise ConfigError(f"training.learning_rate must be positive, got {self.learning_rate}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"training.betas must be two numbers in [0, 1), got {short(self.betas)}")
        if not self.eps > 0:
            raise _refuse("training.eps", "positive (Adam divides by it where a gradient is 0)", self.eps)
        if not 0 <= self.momentum < 1:
            raise _refuse("training.momentum", "in [0, 1)", self.momentum)
        if self.weight_decay < 0:
            raise ConfigError(f"training.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"training.max_grad_norm must be positive or null, got {self.max_grad_norm}")

    def _check_schedule(self) -> None:
        _count("training.warmup_steps", self.warmup_steps, low=0)
        if self.warmup_steps:
            # below 0 is allowed (an mlx-lm warmup from 0 translates to one), as long as no update's rate is negative
            first = self.warmup_init + (self.learning_rate - self.warmup_init) / self.warmup_steps
            if first < -1e-9 * self.learning_rate:  # so warmup_steps > 1
                bound = -self.learning_rate / (self.warmup_steps - 1)
                raise _refuse("training.warmup_init", f"at least {bound:g} (-learning_rate / (warmup_steps - 1)), "
                              "so that the first update's learning rate is not negative", self.warmup_init)
        if self.min_learning_rate < 0:
            raise _refuse("training.min_learning_rate", ">= 0 (a learning rate)", self.min_learning_rate)


@dataclass(frozen=True)
class EvalConfig:
    """Validation during training and `mlx-dp eval`."""

    every: int = _doc("validate every N updates; 0: only at the end", 0)
    at_start: bool = _doc("also validate before the first update", True)
    max_batches: Optional[int] = _doc("cap on validation global batches; null: the whole split", None)
    batch_size: Optional[int] = _doc("sequences per rank for validation; null: training.batch_size", None)
    split: Literal["valid", "test"] = _doc("split that `mlx-dp eval` scores", "test")
    exact_match: bool = _doc("`mlx-dp eval`: also score greedy generations of completion data", True)
    max_new_tokens: int = _doc("generation length for exact match", 32)
    early_stop_patience: Optional[int] = _doc(
        "end the run (completed) after this many evaluations without an improvement of early_stop_min_delta in "
        "early_stop_metric; the final adapters are then the best evaluation's; null: train to the end", None)
    early_stop_min_delta: float = _doc("the smallest change that counts as an improvement", 0.0)
    early_stop_metric: str = _doc(
        "what early stopping watches: val_loss, or a validation metric the objective logs (val_reward, "
        "val_preference_accuracy, ...); lower is better for names with 'loss' in them, higher for the others",
        "val_loss")

    def __post_init__(self):
        _count("eval.every", self.every, low=0)
        _count("eval.max_batches", self.max_batches, rule="positive or null")
        _count("eval.batch_size", self.batch_size, rule="positive or null")
        _count("eval.max_new_tokens", self.max_new_tokens)
        _count("eval.early_stop_patience", self.early_stop_patience, rule="positive or null")
        if not 0 <= self.early_stop_min_delta < 1e9:
            raise _refuse("eval.early_stop_min_delta", ">= 0", self.early_stop_min_delta)
        if not self.early_stop_metric.startswith("val_"):
            raise _refuse("eval.early_stop_metric", "a validation metric (val_loss, val_reward, ...)",
                          self.early_stop_metric)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often rank 0 saves."""

    dir: str = _doc("run directory: adapters, resumable checkpoints, metrics, config", "runs/default")
    every: int = _doc("save every N updates; 0: only at the end", 100)
    every_minutes: Optional[float] = _doc(
        "also save once this many minutes have passed since the last save (rank 0's clock), so a failure costs at "
        "most about that much work whatever the update time; null: by update count only", None)
    keep_last: int = _doc("resumable checkpoints to keep (the best by val loss is kept too)", 3)
    keep_best: bool = _doc("also keep the checkpoint with the lowest validation loss", True)

    def __post_init__(self):
        _named("checkpoint.dir", self.dir, "a directory")
        _count("checkpoint.every", self.every, low=0)
        if self.every_minutes is not None and not self.every_minutes > 0:
            raise ConfigError(f"checkpoint.every_minutes must be positive (or null), got {self.every_minutes}")
        _count("checkpoint.keep_last", self.keep_last)

    @property
    def run_dir(self) -> "Path":
        """``dir`` with ``~`` expanded on this machine (the recipe keeps ``~``: Macs may have other user names)."""
        return Path(self.dir).expanduser()


@dataclass(frozen=True)
class LoggingConfig:
    """Reports: progress bar, metrics.jsonl, wandb."""

    every: int = _doc("report train loss, tokens/s and memory every N updates", 10)
    progress_bar: bool = _doc("tqdm bar on rank 0", True)
    per_rank_timings: bool = _doc("every rank writes metrics.rank<r>.jsonl with its step times (find stragglers)",
                                  False)
    compute_timings: bool = _doc("time each rank's forward+backward on updates 2-4 and every 16th (compute_s_per_rank "
                                 "in metrics.jsonl; always on with parallel.balance: auto); those updates do not "
                                 "overlap communication and hold every gradient at once", False)
    wandb: bool = _doc("log to Weights & Biases from rank 0 (offline when there is no network)", False)
    wandb_project: str = _doc("wandb project name", "mlx-dp")
    wandb_run_name: Optional[str] = _doc("wandb run name; null: derived from checkpoint.dir", None)

    def __post_init__(self):
        _count("logging.every", self.every)
        _named("logging.wandb_project", self.wandb_project)
        _named("logging.wandb_run_name", self.wandb_run_name, "a name or null")


@dataclass(frozen=True)
class ParallelConfig:
    """Data parallelism: backend, gradient buckets, failure detection."""

    backend: Literal["any", "ring", "jaccl", "mpi", "nccl"] = _doc("mlx.distributed backend", "any")
    overlap: bool = _doc("send gradient buckets while backward still runs; false: reduce after backward", True)
    bucket_mb: float = _doc("gradient bucket size in MiB; 64 reached 96% of the best all_sum bus bandwidth here "
                            "(16: 73%, 4: 38%; docs/RESULTS.md)", 64.0)
    first_bucket_mb: float = _doc("size of the first bucket, sent earliest", 1.0)
    comm_stream: Literal["auto", "separate", "default"] = _doc(
        "stream of the all_sums: separate overlaps with compute where a core or a GPU is free; default shares "
        "the compute stream (faster on a CPU with no idle core); auto: separate on a GPU, default on a CPU", "auto")
    comm_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = _doc(
        "reduce gradients in this dtype; null: one bucket set per gradient dtype", None)
    timeout_s: float = _doc("watchdog: end the job if a step or collective makes no progress this long", 600.0)
    peer_silence_s: Optional[float] = _doc(
        "watchdog: end the job sooner when this rank waits for a peer whose heartbeats have stopped this long "
        "(asleep, stopped, unplugged); null: 15 under mlx-dp launch --restarts (a restart follows), else "
        "timeout_s (a peer may come back); timeout_s still covers hangs with heartbeats", None)
    allow_world_size_change: bool = _doc("resume at a world size that changes the global batch", False)
    shard_optimizer: bool = _doc(
        "keep each rank's 1/N share of the optimizer state only (ZeRO stage 1): full fine-tunes fit in less "
        "memory per Mac; gradients are reduce-scattered and weights all-gathered (adamw, adam, sgd)", False)
    balance: Union[Literal["off", "auto"], list[float]] = _doc(
        "rows of each global micro-batch per rank: off (even), auto (measured: faster ranks take more) or a "
        "list of relative speeds, one per rank; the update is the same either way. With pipeline: each stage's "
        "share of the blocks (a list: relative capacities; auto: in proportion to each Mac's memory)", "off")
    pipeline: bool = _doc(
        "every rank is a pipeline stage holding only its own blocks: a model bigger than one Mac trains on several "
        "(LoRA, DoRA, QLoRA); training.batch_size is then the batch of the whole pipeline", False)
    pipeline_microbatches: int = _doc(
        "pipeline: parts each micro-batch is cut into, so that stages work at once (GPipe; metrics.jsonl's "
        "stage_idle_share says how long each stage waited); more: less waiting, smaller matmuls", 4)
    stage_layers: Optional[list[int]] = _doc(
        "pipeline: blocks per stage, e.g. [30, 50] (first stage first); null: from parallel.balance, else even",
        None)

    def __post_init__(self):
        _count("parallel.pipeline_microbatches", self.pipeline_microbatches)
        if self.stage_layers is not None and (not self.stage_layers or min(self.stage_layers) < 1):
            raise _refuse("parallel.stage_layers", "null or a positive block count per stage", self.stage_layers)
        for key in ("bucket_mb", "first_bucket_mb"):
            if not getattr(self, key) > 0:
                raise _refuse(f"parallel.{key}", "positive", getattr(self, key))
        _seconds("parallel.timeout_s", self.timeout_s)
        _seconds("parallel.peer_silence_s", self.peer_silence_s)
        if isinstance(self.balance, list) and (not self.balance or not all(s > 0 for s in self.balance)):
            raise ConfigError(f"parallel.balance must list a positive speed for every rank, got {self.balance}")


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
