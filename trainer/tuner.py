"""mlx-lm's tuner (its LoRA and DoRA layers, ``linear_to_lora_layers``, its dataset classes), imported without
wandb.

Why this exists: ``mlx_lm.tuner``'s package imports mlx-lm's trainer, whose callbacks import wandb at once,
about a third of a second of every training process's start-up on a 2-core CPU, for callbacks mlx-dp never
uses: mlx-dp reports to wandb itself, and imports it only when ``logging.wandb`` asks (``run/report.py``).
So while the tuner is first imported, wandb reads as absent to it (mlx-lm's callbacks then hold
``wandb = None``); wandb stays importable afterwards. Where wandb is already imported, nothing changes.
"""

import importlib
import sys


def _import_tuner_without_wandb() -> None:
    if "mlx_lm.tuner" in sys.modules or "wandb" in sys.modules:
        return
    sys.modules["wandb"] = None  # `import wandb` raises ModuleNotFoundError, which mlx-lm's callbacks expect
    try:
        importlib.import_module("mlx_lm.tuner")
    finally:
        if "wandb" in sys.modules and sys.modules["wandb"] is None:
            del sys.modules["wandb"]


_import_tuner_without_wandb()

from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset  # noqa: E402
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear  # noqa: E402
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402

__all__ = ["ChatDataset", "CompletionsDataset", "TextDataset", "DoRAEmbedding", "DoRALinear", "LoRAEmbedding",
           "LoRALinear", "LoRASwitchLinear", "linear_to_lora_layers"]
