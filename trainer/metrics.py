"""Reports: a tqdm bar, ``metrics.jsonl`` and optionally wandb, all on rank 0.

Other ranks get :class:`NullReporter`, so the training loop never checks ranks
to log. Every record appended to ``metrics.jsonl`` is one JSON object.
"""

import json
import math
import os
import sys
import time
from pathlib import Path


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
