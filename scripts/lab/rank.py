"""The body of one rank of a benchmark's run, started by the benchmark's launcher, never by hand.

    PYTHONPATH=scripts python -m lab.rank mlx-dp [--no-reduce] [--record-pairs PATH K] [--time-rollouts PATH]
        [--balance-rollouts] -- train RECIPE [overrides]
    PYTHONPATH=scripts python -m lab.rank mlx-lm REPORTS [--sort-by-tokens] -- MLX_LM_LORA_ARGS

``mlx-dp`` runs the trainer's own command; ``--no-reduce`` passes the
trainer a reducer that skips every ``all_sum`` (``lab.reducers.LocalReducer``),
the compute-only baseline of ``bench scaling`` (ranks then train apart);
``--record-pairs PATH K`` writes the pair indices each rank trains on in its
first K updates to ``PATH.rank<R>.json`` (``bench preference``, ``bench grpo``);
``--time-rollouts PATH`` writes each update's generation seconds on this
rank (GRPO) to ``PATH.rank<R>.jsonl`` (:class:`RolloutTimer`), and
``--balance-rollouts`` adds them to the compute time ``parallel.balance:
auto`` measures (``bench rollouts``: the balancer as it would be if it
counted generation). ``mlx-lm``
runs ``mlx_lm.lora`` for the comparison; ``--sort-by-tokens`` repairs its
length sort first (:func:`repair_length_sort`).
"""

import json
import sys
import time

from trainer.env import launch_env


def pair_recorder(path: str, keep: int):
    """Hooks that write the indices of the rows (pairs) this rank trains on in its first ``keep`` updates."""
    from pathlib import Path

    from trainer.run.hooks import Hooks

    class PairRecorder(Hooks):
        def __init__(self):
            self.seen = []

        def before_update(self, step: int, micro_batches: list) -> list:
            if step <= keep:  # per update, per micro-batch: this rank's indices into the split
                self.seen.append([[int(i) for i in b.indices] for b in micro_batches])
                Path(f"{path}.rank{launch_env().rank}.json").write_text(json.dumps(self.seen))
            return micro_batches

    return PairRecorder()


class RolloutTimer:
    """Time GRPO's generation on this rank, per update, without touching the trainer's code.

    ``GRPO._complete`` (one prompt's group: sampling and rewards, all local) is
    timed and summed per update; ``GRPO.rollout`` is timed whole, which also
    holds the rollout's one small collective, where a rank that finished early
    waits for the others. One JSON line per update to ``PATH.rank<R>.jsonl``:
    ``generate_s`` (local work), ``rollout_s`` (with that wait), this rank's
    prompts and completion tokens and its longest completion.
    """

    def __init__(self, path: str):
        self.path, self.generate_s, self.last = path, 0.0, {}

    def install(self) -> None:
        from trainer.objectives.grpo import GRPO

        complete, rollout, timer = GRPO._complete, GRPO.rollout, self

        def timed_complete(objective, *args, **kwargs):
            start = time.perf_counter()
            try:
                return complete(objective, *args, **kwargs)
            finally:
                timer.generate_s += time.perf_counter() - start

        def timed_rollout(objective, model, take, step, hosted=1):
            timer.generate_s, start = 0.0, time.perf_counter()
            rows = rollout(objective, model, take, step, hosted)
            masks = [b.mask for b in rows]
            timer.last = {"step": step, "rank": launch_env().rank, "generate_s": timer.generate_s,
                          "rollout_s": time.perf_counter() - start, "prompts": sum(len(b.indices) for b in rows),
                          "completion_tokens": int(sum(m.sum() for m in masks)),
                          "longest": int(max([m.sum(axis=-1).max() for m in masks if m.size] or [0]))}
            with open(f"{timer.path}.rank{launch_env().rank}.jsonl", "a") as f:
                f.write(json.dumps(timer.last) + "\n")
            return rows

        GRPO._complete, GRPO.rollout = timed_complete, timed_rollout


def rollout_hooks(inner, timer: RolloutTimer):
    """``inner``'s hooks, with this update's generation seconds added to the compute time the balancer sees."""
    from trainer.run.hooks import Hooks

    class CountGeneration(Hooks):
        def before_update(self, step: int, micro_batches: list) -> list:
            return inner.before_update(step, micro_batches)

        def compute_seconds(self, step: int, seconds: float) -> float:
            measured = inner.compute_seconds(step, seconds)
            if timer.last.get("step") != step or measured <= 0:
                return measured
            return measured + timer.last["generate_s"]

        def mid_save(self, step: int) -> None:
            inner.mid_save(step)

    return CountGeneration()


def _local_reducer(*args, **kwargs):
    # lab.reducers imports mlx.core, which must wait until the trainer has loaded its BLAS
    # (MLX_DP_BLAS=openblas refuses to start once mlx.core is in), so it is imported at first use
    from .reducers import local_reducer

    return local_reducer(*args, **kwargs)


def mlx_dp_rank(argv: list[str]) -> int:
    """``mlx-dp ARGS`` with the benchmark's switches (exits the process)."""
    from trainer.cli import main as cli_main
    from trainer.run.hooks import Hooks, RunOptions

    options = argv[: argv.index("--")] if "--" in argv else []
    rest = argv[argv.index("--") + 1:] if "--" in argv else argv
    hooks = Hooks()
    if "--record-pairs" in options:
        at = options.index("--record-pairs")
        hooks = pair_recorder(options[at + 1], int(options[at + 2]))
    if "--time-rollouts" in options:
        import trainer.cli as cli

        timer, prepare = RolloutTimer(options[options.index("--time-rollouts") + 1]), cli.prepare_runtime

        def prepare_then_time():  # the trainer imports MLX only after its runtime is prepared (MLX_DP_BLAS)
            prepare()
            timer.install()

        cli.prepare_runtime = prepare_then_time
        if "--balance-rollouts" in options:
            hooks = rollout_hooks(hooks, timer)
    cli_main(rest, options=RunOptions(reducer=_local_reducer if "--no-reduce" in options else None, hooks=hooks))
    return 0


def repair_length_sort() -> None:
    """Make mlx_lm.lora sort samples by their token count, as mlx-lm PR #1029 proposed.

    mlx-lm 0.32's ``iterate_batches`` sorts a ``CacheDataset`` by ``itemlen``,
    which returns ``len()`` of the raw row: the number of fields of a dict (1 for
    ``{"text": ...}``), not its tokens. The sort is then a no-op, batches are
    random in length and padded to their longest sample. Comparing against that
    flatters any trainer that groups by length, so the fair peer sorts by tokens
    (tokenizing every row once, before the first batch: outside the timed updates).
    """
    from mlx_lm.tuner.datasets import CacheDataset

    CacheDataset.itemlen = lambda self, idx: len(self[idx][0])


def mlx_lm_worker(reports_path: str, lora_argv: list[str], sort_by_tokens: bool = False) -> int:
    """Rank body: mlx_lm.lora's own ``main()``, with a reporting callback that appends each
    report and the wall time it arrived to ``reports_path`` (rank 0).

    The callback is mlx-lm's own hook (``get_reporting_callbacks``, which also serves
    wandb); its console only prints rounded numbers and no step times. Validation
    reports (with their wall time) go to ``reports_path + ".val"``: mlx-lm validates
    inside its first and last iterations, and an epoch's timing leaves that out.

    Args:
        reports_path (str): JSON-lines file rank 0 appends one record per report to.
        lora_argv (list[str]): mlx_lm.lora's arguments (from ``scaling_mlx_lm.mlx_lm_args``).
        sort_by_tokens (bool): :func:`repair_length_sort` first. Default: ``False``.
    """
    from trainer.tools import fastjit

    fastjit.maybe_enable()  # the same compiled kernels as our ranks (MLX_DP_JIT decides for both)
    import mlx_lm.lora as lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    if sort_by_tokens:
        repair_length_sort()

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

        def on_val_loss_report(self, info: dict) -> None:
            if launch_env().rank != 0:
                return
            record = {"time": time.perf_counter(),
                      **{k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}}
            with open(reports_path + ".val", "a") as f:
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
        sort_by_tokens = rest[:1] == ["--sort-by-tokens"]
        rest = rest[1:] if sort_by_tokens else rest
        return mlx_lm_worker(argv[1], rest[1:] if rest[:1] == ["--"] else rest, sort_by_tokens)
    print("usage: python -m lab.rank {mlx-dp [--no-reduce] [--record-pairs PATH K] [--time-rollouts PATH "
          "[--balance-rollouts]] -- ARGS | "
          "mlx-lm REPORTS [--sort-by-tokens] -- ARGS}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
