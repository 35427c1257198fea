"""The training state: everything besides arrays that a checkpoint must hold to resume exactly.

Like torchtune's ``TrainingProgress``: a typed record that the loop updates,
the checkpoint writes as ``state.json`` (:meth:`TrainingState.to_dict`) and
resume reads back (:meth:`TrainingState.from_dict`). Weights and optimizer
moments are arrays and live beside it in safetensors files
(``trainer.state.checkpoint``).

This module imports nothing from MLX.
"""

from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 2  # 1: the RNG key lived in rng.safetensors and the state was an untyped dict


@dataclass
class DataPosition:
    """Where the data order continues: the next global micro-batch to serve.

    Attributes:
        epoch: The epoch being served (each epoch reshuffles from the seed).
        index: Global micro-batches of this epoch already served.
        micro_batch: Sequences per global micro-batch that ``index`` counts
            in (per-rank batch x ranks). A run with another micro-batch size
            continues at the same fraction of the epoch
            (``trainer.data.batches.BatchStream.restore``).
        ranks: With ``data.streaming``, each rank's place in its own share
            (``trainer.data.stream.ShareReader.position``: window start, window,
            micro-batches served from it, share used up); empty otherwise, where
            the position above is all there is.
    """

    epoch: int = 0
    index: int = 0
    micro_batch: int = 1
    ranks: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> "DataPosition":
        return cls(epoch=int(data["epoch"]), index=int(data["index"]), micro_batch=int(data["micro_batch"]),
                   ranks=[[int(v) for v in place] for place in data.get("ranks") or []])


@dataclass
class BestCheckpoint:
    """The checkpoint with the lowest validation loss so far."""

    val_loss: float
    path: str


@dataclass
class TrainingState:
    """Progress, provenance and shape of a run: what ``state.json`` holds.

    Attributes:
        step: Optimizer updates done.
        data: Position in the data order.
        rng_key: ``mx.random``'s key as two uint32 words (dropout draws from it).
        world_size: Ranks the global batch is made for (fewer may run: ``trainer.data.membership``).
        batch_size: Sequences per rank per micro-batch.
        grad_accumulation: Micro-batches per update.
        total_steps: Updates the run was planned for (the schedule's length).
        val_loss: Validation loss at ``step``, if measured there.
        best: The best checkpoint by validation loss, if any.
        versions: ``trainer``, ``mlx`` and ``mlx_lm`` versions that wrote it.
        recipe_digest: Hash of the resolved recipe.
        balance: The balancer's state (split of each micro-batch across
            ranks, speed estimates), so a resumed run splits as it would have.
        dataset: Fingerprint of the training split it trained on (resume
            refuses other data unless told to accept changes).
        job: The launch that wrote it (``mlx-dp launch --restarts``: a restart
            continues from that launch's own checkpoints), or "".
        early_stop: ``eval.early_stop_patience``'s count (``trainer.run.early_stop``): the best
            metric so far, its update and checkpoint, and evaluations since it improved.
    """

    step: int = 0
    data: DataPosition = field(default_factory=DataPosition)
    rng_key: tuple[int, int] = (0, 0)
    world_size: int = 1
    batch_size: int = 1
    grad_accumulation: int = 1
    total_steps: int = 0
    val_loss: float | None = None
    best: BestCheckpoint | None = None
    versions: dict = field(default_factory=dict)
    recipe_digest: str = ""
    balance: dict | None = None  # trainer.data.balance.Balancer.to_dict(): the split and its speed estimates
    dataset: str = ""
    job: str = ""
    early_stop: dict | None = None

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer update: batch_size x world_size x grad_accumulation."""
        return self.batch_size * self.world_size * self.grad_accumulation

    def note_val_loss(self, val_loss: float | None, checkpoint_path: str) -> None:
        """Record the validation loss of the checkpoint about to be written at ``checkpoint_path``."""
        self.val_loss = val_loss
        if val_loss is not None and (self.best is None or val_loss < self.best.val_loss):
            self.best = BestCheckpoint(val_loss, checkpoint_path)

    def to_dict(self) -> dict:
        """Plain JSON-able data; ``global_batch`` is included for people reading the file."""
        out = asdict(self)
        out["rng_key"] = list(self.rng_key)
        out["global_batch"] = self.global_batch
        out["format_version"] = FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict, rng_key: tuple[int, int] | None = None) -> "TrainingState":
        """Read :meth:`to_dict`'s output, or a format-1 ``state.json`` (with its RNG key given).

        Raises:
            KeyError, TypeError, ValueError: A field is missing or malformed
                (the checkpoint reader turns these into one clear line).
        """
        version = int(data.get("format_version", 1))
        if version == 1:
            position = data["data_position"]
            micro = int(data["batch_size"]) * int(data["world_size"])
            data = {**data, "data": {"epoch": position["epoch"], "index": position["index"], "micro_batch": micro},
                    "rng_key": rng_key or (0, 0),
                    "best": {"val_loss": data["best"][0], "path": data["best"][1]} if data.get("best") else None}
        elif version > FORMAT_VERSION:
            raise ValueError(f"format_version {version} is newer than this mlx-dp reads ({FORMAT_VERSION})")
        best = data.get("best")
        hi, lo = data["rng_key"]
        return cls(step=int(data["step"]), data=DataPosition.from_dict(data["data"]),
                   rng_key=(int(hi), int(lo)), world_size=int(data["world_size"]),
                   batch_size=int(data["batch_size"]), grad_accumulation=int(data["grad_accumulation"]),
                   total_steps=int(data.get("total_steps", 0)), val_loss=data.get("val_loss"),
                   best=BestCheckpoint(float(best["val_loss"]), str(best["path"])) if best else None,
                   versions=dict(data.get("versions") or {}), recipe_digest=str(data.get("recipe_digest", "")),
                   balance=data.get("balance"), dataset=str(data.get("dataset", "")), job=str(data.get("job", "")),
                   early_stop=data.get("early_stop"))
