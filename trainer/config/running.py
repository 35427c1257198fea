"""The recipe's sections on how a run goes: training, eval, checkpoint, logging and parallel.

What is trained (the model, the method, the data) and the whole recipe are in
``trainer.config.schema``, which re-exports these. It imports nothing from MLX.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from ..errors import ConfigError, short
from .rules import MAX_BYTES, MAX_COUNT, SEED_LIMIT, _count, _doc, _named, _refuse, _seconds


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
