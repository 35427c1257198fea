"""The body of one rank of a benchmark's run, started by the benchmark's launcher, never by hand.

    python -m trainer.bench_rank mlx-dp [--no-reduce] -- train RECIPE [overrides]
    python -m trainer.bench_rank mlx-lm REPORTS -- MLX_LM_LORA_ARGS

``mlx-dp`` runs the trainer's own command; ``--no-reduce`` makes its reducer
skip every ``all_sum``, the compute-only baseline of ``bench scaling``
(ranks then train apart). ``mlx-lm`` runs ``mlx_lm.lora`` for the comparison.
"""

import json
import sys
import time

from .env import launch_env


def mlx_dp_rank(argv: list[str]) -> int:
    """``mlx-dp ARGS`` with the benchmark's switches (exits the process)."""
    from .cli import main as cli_main
    from .run.hooks import RunOptions

    communicate = "--no-reduce" not in argv[: argv.index("--")] if "--" in argv else True
    rest = argv[argv.index("--") + 1:] if "--" in argv else argv
    cli_main(rest, options=RunOptions(communicate=communicate))
    return 0


def mlx_lm_worker(reports_path: str, lora_argv: list[str]) -> int:
    """Rank body: mlx_lm.lora's own ``main()``, with a reporting callback that appends each
    report and the wall time it arrived to ``reports_path`` (rank 0).

    The callback is mlx-lm's own hook (``get_reporting_callbacks``, which also serves
    wandb); its console only prints rounded numbers and no step times.

    Args:
        reports_path (str): JSON-lines file rank 0 appends one record per report to.
        lora_argv (list[str]): mlx_lm.lora's arguments (from ``scaling_mlx_lm.mlx_lm_args``).
    """
    import mlx_lm.lora as lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    if not hasattr(lora, "get_reporting_callbacks"):
        print("mlx-dp bench scaling: this mlx-lm has no mlx_lm.lora.get_reporting_callbacks to time its updates",
              file=sys.stderr)
        return 2

    class Recorder(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            if launch_env().rank != 0:
                return
            record = {"time": time.perf_counter(),
                      **{k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}}
            with open(reports_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    lora.get_reporting_callbacks = lambda *args, **kwargs: Recorder()
    sys.argv = ["mlx_lm.lora", *lora_argv]
    lora.main()
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["mlx-dp"]:
        return mlx_dp_rank(argv[1:])
    if argv[:1] == ["mlx-lm"] and len(argv) >= 2:
        rest = argv[2:]
        return mlx_lm_worker(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
    print("usage: python -m trainer.bench_rank {mlx-dp [--no-reduce] -- ARGS | mlx-lm REPORTS -- ARGS}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
