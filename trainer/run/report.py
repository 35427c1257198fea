"""Metrics: windows of training numbers between reports, and where reports go.

* :class:`MetricWindow` accumulates one reporting window's loss, tokens,
  time and padding; its device scalars are read only when it is summarised.
* :class:`Reporter` writes rank 0's records to a tqdm bar, ``metrics.jsonl``
  and optionally wandb. Other ranks get :class:`NullReporter`, so the
  training loop never checks ranks to log. Every record appended to
  ``metrics.jsonl`` is one JSON object.
"""

import json
import math
import os
import sys
import time
from pathlib import Path


class MetricWindow:
    """One reporting window: updates since the last report.

    :meth:`add` keeps device values lazy (they are summed as MLX arrays);
    :meth:`summary` reads them, so it is a sync point and is called only at
    report time.
    """

    def __init__(self):
        import mlx.core as mx

        self.loss_sum = mx.array(0.0, mx.float32)  # summed over ranks (it rides with the gradients)
        self.nonfinite = mx.array(0, mx.int32)  # updates skipped because their loss or norm was NaN/inf
        self.tokens = 0  # global loss tokens
        self.seconds = 0.0
        self.updates = 0
        self.real_tokens = 0  # non-padding tokens in this rank's rows
        self.cells = 0  # token cells this rank computed, padding included
        self.objective = None  # what the loss teaches; its statistics are summarised with it
        self.stats = None  # the objective's sums over ranks (lazy)
        self.counts = {}  # global pairs and answer tokens the statistics divide by

    def add(self, out: dict, micro_batches: list, seconds: float) -> None:
        """Count one update: ``out`` from ``trainer.step.grads.run_update``, this rank's batches, its wall time."""
        import mlx.core as mx

        self.loss_sum = self.loss_sum + out["loss_sum"]
        self.nonfinite = self.nonfinite + (1 - out["finite"].astype(mx.int32))
        self.tokens += out["tokens"]
        self.seconds += seconds
        self.updates += 1
        self.real_tokens += sum(b.real_tokens for b in micro_batches)
        self.cells += sum(b.inputs.shape[0] * (b.inputs.shape[1] + 1) for b in micro_batches)
        if getattr(out.get("objective"), "preference", False):
            self.objective = out["objective"]
            self.stats = out["stats"] if self.stats is None else self.stats + out["stats"]
            for key, value in out["counts"].items():
                self.counts[key] = self.counts.get(key, 0) + value

    def skipped(self) -> int:
        """Updates of this window not applied (non-finite). Reads a device value."""
        return int(self.nonfinite.item())  # note: sync point

    def summary(self) -> dict:
        """Loss per token (or the objective's loss and metrics), throughput and padding. Reads device values."""
        out = {
            "train_loss": self.loss_sum.item() / max(self.tokens, 1),  # note: sync point
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "step_time_s": self.seconds / max(self.updates, 1),
            "tokens": self.tokens,
            "padded_share": round(1 - self.real_tokens / max(self.cells, 1), 4),
        }
        if getattr(self.objective, "preference", False):
            out.update(self.objective.summary(self.stats.tolist(), self.tokens, self.counts))  # note: sync point
            out["pairs"] = self.counts["pairs"]
            out["pairs_per_s"] = self.counts["pairs"] / max(self.seconds, 1e-9)
        return out


class NullReporter:
    """What ranks other than 0 report to: nothing."""

    def log(self, record: dict) -> None:
        pass

    def advance(self, steps: int = 1, postfix: dict | None = None) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def checkpoint(self, path) -> None:
        pass

    def close(self) -> None:
        pass


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class Reporter(NullReporter):
    """Rank 0's reporter.

    Args:
        metrics_path (Path): ``metrics.jsonl``, appended to.
        total_steps (int): Optimizer updates of the run (for the bar).
        start_step (int): Updates already done (resume). Default: ``0``.
        progress_bar (bool): Show tqdm. Default: ``True``.
        wandb_run: A wandb run or ``None``. Default: ``None``.
    """

    def __init__(self, metrics_path: Path, total_steps: int, start_step: int = 0, progress_bar: bool = True,
                 wandb_run=None):
        self.path = Path(metrics_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        self.wandb = wandb_run
        self.bar = None
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, leave=True)

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **{k: _jsonable(v) for k, v in record.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            step = record.get("step")
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def advance(self, steps: int = 1, postfix: dict | None = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)

    def note(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def checkpoint(self, path) -> None:
        if self.wandb is not None:
            step = int(Path(path).name.split("_")[-1])
            self.wandb.summary["last_checkpoint"] = str(path)
            self.wandb.log({"checkpoint": str(path), "checkpoint_step": step}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(project: str, run_name: str, run_dir: Path, config: dict):
    """Start a wandb run in ``run_dir``; offline when the network or a login is missing.

    Returns:
        tuple: ``(run, mode)`` where mode is ``"online"`` or ``"offline"``.
    """
    import wandb

    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        mode = "online" if _wandb_reachable() else "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=project, name=run_name, dir=str(run_dir), config=config, mode=mode)
    return run, mode


def _wandb_reachable(timeout: float = 2.0) -> bool:
    """True if wandb has an API key and its server answers."""
    import socket
    from urllib.parse import urlparse

    if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").exists():
        return False
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
