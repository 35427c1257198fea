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

from .. import log
from ..state.rundir import open_append


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
        self.stage_wait = None  # a pipeline's seconds each stage waited on its neighbours (lazy)

    def add(self, out: dict, micro_batches: list, seconds: float) -> None:
        """Count one update: ``out`` from ``trainer.step.step.Step``, this rank's batches, its wall time."""
        import mlx.core as mx

        self.loss_sum = self.loss_sum + out["loss_sum"]
        self.nonfinite = self.nonfinite + (1 - out["finite"].astype(mx.int32))
        self.tokens += out["tokens"]
        self.seconds += seconds
        self.updates += 1
        self.real_tokens += sum(b.real_tokens for b in micro_batches)
        self.cells += sum(b.inputs.shape[0] * (b.inputs.shape[1] + 1) for b in micro_batches)
        self.objective = out["objective"]
        self.stats = out["stats"] if self.stats is None else self.stats + out["stats"]
        if "stage_wait_s" in out:
            self.stage_wait = out["stage_wait_s"] if self.stage_wait is None else self.stage_wait + out["stage_wait_s"]
        for key, value in out["counts"].items():  # sums; a maximum stays one; samples are listed
            if key not in self.counts:
                self.counts[key] = value
            else:
                self.counts[key] = max(self.counts[key], value) if key.endswith("_max") else self.counts[key] + value

    def skipped(self) -> int:
        """Updates of this window not applied (non-finite). Reads a device value."""
        return int(self.nonfinite.item())  # note: sync point

    def summary(self) -> dict:
        """The objective's loss and metrics, throughput and padding. Reads device values."""
        out = {
            "train_loss": self.loss_sum.item() / max(self.tokens, 1),  # note: sync point
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "step_time_s": self.seconds / max(self.updates, 1),
            "tokens": self.tokens,
            "padded_share": round(1 - self.real_tokens / max(self.cells, 1), 4),
        }
        if self.stage_wait is not None:  # the share of the window's time each pipeline stage sat idle
            out["stage_idle_share"] = [round(w / max(self.seconds, 1e-9), 4) for w in self.stage_wait.tolist()]
        if self.objective is not None:
            out.update(self.objective.summary(self.stats.tolist(), self.tokens, self.counts))  # note: sync point
            unit = self.objective.unit
            if unit in self.counts:  # pairs or prompts per second, beside tokens
                out[f"{unit}_per_s"] = self.counts[unit] / max(self.seconds, 1e-9)
        return out


class NullReporter:
    """What ranks other than 0 report to: nothing."""

    def log(self, record: dict) -> None:
        pass

    def advance(self, steps: int = 1, postfix: dict | None = None) -> None:
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
        self.file = open_append(self.path)  # never through a planted link
        self.wandb = wandb_run
        self.bar = None
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, leave=True)
            # rank 0's lines go through the bar while it is open, so they do not break it
            log.route(lambda text: self.bar.write(text, file=sys.stderr))

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **{k: _jsonable(v) for k, v in record.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(_for_wandb(record), step=record.get("step"))

    def advance(self, steps: int = 1, postfix: dict | None = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)

    def checkpoint(self, path) -> None:
        if self.wandb is not None:
            step = int(Path(path).name.split("_")[-1])
            self.wandb.summary["last_checkpoint"] = str(path)
            self.wandb.log({"checkpoint": str(path), "checkpoint_step": step}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            log.route(None)
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _for_wandb(record: dict) -> dict:
    """A record's numbers, and its lists of rows (a few sampled completions) as wandb tables."""
    out = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, rows in record.items():
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            import wandb

            columns = list(rows[0])
            out[key] = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
    return out


def open_reporter(run):
    """Rank 0 reports to the bar, metrics.jsonl and wandb; the other ranks to nothing."""
    if not run.world.is_main:
        return NullReporter()
    cfg, wandb_run = run.cfg, None
    if cfg.logging.wandb:
        wandb_run, mode = start_wandb(cfg.logging.wandb_project, cfg.logging.wandb_run_name or run.run_dir.name,
                                      run.run_dir, {**cfg.to_dict(), "world_size": run.world.size,
                                                    "global_batch": run.state.global_batch})
        log.info(f"wandb: {mode} run in {run.run_dir / 'wandb'}"
                 + (" (no network or login: offline mode)" if mode == "offline" else ""))
    return Reporter(run.run_dir / "metrics.jsonl", run.total_steps, run.state.step, cfg.logging.progress_bar,
                    wandb_run)


def start_wandb(project: str, run_name: str, run_dir: Path, config: dict):
    """Start a wandb run in ``run_dir``; offline when the network or a login is missing.

    Returns:
        tuple: ``(run, mode)`` where mode is ``"online"`` or ``"offline"``.
    """
    import wandb

    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        mode = "online" if _wandb_reachable() else "offline"
    quiet = os.environ.get("WANDB_SILENT", "true").lower() not in ("false", "0")  # the user's choice wins
    run = wandb.init(project=project, name=run_name, dir=str(run_dir), config=config, mode=mode,
                     settings=wandb.Settings(silent=quiet))
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
