"""The ``--vs-mlx-lm`` side of the lab's ``bench scaling``: the same work with ``mlx_lm.lora``.

The recipe becomes mlx_lm.lora's command line and ``-c`` config (same adapter,
optimizer, schedule, global batch and number of optimizer updates). Each of
its ranks runs mlx_lm.lora's own ``main()`` with a reporting callback that
timestamps every update (``lab.rank``, started as
``python -m lab.rank mlx-lm REPORTS -- ARGS``). Both
adapters are then scored by one evaluator, ``mlx-dp eval``, and the
comparison is added to the benchmark's JSON (:func:`add_mlx_lm`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from trainer.bench import scaling_report as report
from trainer.bench.scaling_plan import BenchError, Plan, Run, blas_threads
from trainer.bench.scaling_runs import launch_ranks, show_failure
from trainer.bench.stats import median, p90

from trainer.library import resolve as resolve_builtin

from lab import pythonpath

# ---------------------------------------------------------------------------- the same work, in mlx-lm's terms


def check_mlx_lm_comparable(cfg) -> list[str]:
    """Refuse what mlx_lm.lora cannot train alike; return notes on the differences left."""
    d, t = cfg.data, cfg.training
    path = Path(resolve_builtin(d.path)) if d.path else None
    if d.hf_dataset or path is None or not all((path / f"{s}.jsonl").is_file() for s in ("train", "valid")):
        raise BenchError(f"--vs-mlx-lm needs data.path to be a directory with train.jsonl and valid.jsonl "
                         f"(the local format mlx_lm.lora reads); {d.path or d.hf_dataset} is not")
    if d.packing:
        raise BenchError("--vs-mlx-lm compares unpacked batches (mlx_lm.lora does not pack); "
                         "set data.packing=false")
    notes = []
    if t.max_grad_norm is not None:
        notes.append(f"mlx_lm.lora has no gradient clipping; mlx-dp clips the norm at {t.max_grad_norm:g} "
                     "(one more pass over the gradients)")
    if cfg.model.dtype:
        notes.append(f"mlx_lm.lora trains the stored dtype; mlx-dp casts the base to {cfg.model.dtype}")
    if t.warmup_steps == 1 and t.lr_schedule != "constant":
        notes.append("with warmup_steps=1 mlx-lm's decay runs one update ahead of mlx-dp's")
    return notes


def mlx_lm_schedule(t, total_updates: int) -> dict | None:
    """Our learning-rate schedule as mlx-lm's ``lr_schedule`` entry (None: a constant rate).

    Our warmup gives update s (from 0) ``init + (s+1)(peak-init)/W``; mlx-lm's warmup
    of w updates from init' gives ``init' + s(peak-init')/w`` and joins the decay at
    w+1. So w = W-1 and init' = init + (peak-init)/W match ours exactly, decay from update W.

    Args:
        t (TrainingConfig): learning_rate, lr_schedule, warmup_steps, warmup_init, min_learning_rate.
        total_updates (int): Updates of the run (where decay ends).
    """
    peak, floor = t.learning_rate, t.min_learning_rate
    decay = max(1, total_updates - t.warmup_steps)
    if t.lr_schedule == "constant" and t.warmup_steps == 0:
        return None
    name, arguments = {"cosine": ("cosine_decay", [peak, decay, floor]),
                       "linear": ("linear_schedule", [peak, floor, decay]),
                       "constant": ("linear_schedule", [peak, peak, 1])}[t.lr_schedule]
    schedule = {"name": name, "arguments": arguments}
    if t.warmup_steps > 1:
        schedule.update(warmup=t.warmup_steps - 1,
                        warmup_init=t.warmup_init + (peak - t.warmup_init) / t.warmup_steps)
    return schedule


def mlx_lm_config(cfg, total_updates: int) -> dict:
    """mlx_lm.lora's ``-c`` file: adapter shape, optimizer with our hyper-parameters, schedule."""
    t, m, d = cfg.training, cfg.method, cfg.data
    optimizer = {"adamw": {"weight_decay": t.weight_decay, "betas": list(t.betas), "eps": t.eps},
                 "adam": {"betas": list(t.betas), "eps": t.eps},
                 "sgd": {"momentum": t.momentum, "weight_decay": t.weight_decay},
                 "adafactor": {"relative_step": False, "scale_parameter": False}}[t.optimizer]
    config = {"lora_parameters": {"rank": m.rank, "scale": m.scale, "dropout": m.dropout},
              "optimizer": t.optimizer, "optimizer_config": {t.optimizer: optimizer},
              "prompt_feature": d.prompt_feature, "completion_feature": d.completion_feature,
              "text_feature": d.text_feature, "chat_feature": d.chat_feature}
    if m.keys:
        config["lora_parameters"]["keys"] = list(m.keys)
    schedule = mlx_lm_schedule(t, total_updates)
    if schedule:
        config["lr_schedule"] = schedule
    return config


def _is_text_data(cfg) -> bool:
    """mlx-lm refuses --mask-prompt on plain-text rows; ours ignores it there."""
    first = (Path(resolve_builtin(cfg.data.path)) / "train.jsonl").read_text().split("\n", 1)[0]
    row = json.loads(first) if first.strip() else {}
    d = cfg.data
    return d.text_feature in row and d.chat_feature not in row and d.prompt_feature not in row


def mlx_lm_args(cfg, world_size: int, updates: int, config_path: Path, adapter_dir: Path) -> list[str]:
    """mlx_lm.lora's command line for the same work as our run at ``world_size`` ranks.

    Its ``--batch-size`` is the global batch (split over ranks) and an iteration is a
    micro-batch, so it gets batch_size x ranks, and ``updates`` x accumulation iterations.
    """
    t, m, d = cfg.training, cfg.method, cfg.data
    iters = updates * t.grad_accumulation
    args = ["--model", resolve_builtin(cfg.model.path), "--train", "--data", resolve_builtin(d.path),
            "-c", str(config_path),
            "--fine-tune-type", m.type, "--num-layers", str(m.num_layers),
            "--batch-size", str(t.batch_size * world_size), "--grad-accumulation-steps", str(t.grad_accumulation),
            "--iters", str(iters), "--learning-rate", str(t.learning_rate), "--seed", str(t.seed),
            "--max-seq-length", str(d.max_seq_length), "--adapter-path", str(adapter_dir),
            "--steps-per-report", str(t.grad_accumulation),  # one report per optimizer update
            "--steps-per-eval", str(iters + 1), "--val-batches", "1",  # it still validates at 1 and at the end
            "--save-every", str(iters + 1)]
    if d.mask_prompt and not _is_text_data(cfg):
        args.append("--mask-prompt")
    if t.grad_checkpoint:
        args.append("--grad-checkpoint")
    if cfg.model.trust_remote_code:
        args.append("--trust-remote-code")
    return args


# ---------------------------------------------------------------------------- running and timing it


def run_mlx_lm(plan: Plan, run: Run, work: Path) -> tuple[dict, Path]:
    """Train the same work with mlx_lm.lora; returns its measurement and adapter directory."""
    import yaml

    base = work / run.dirname()
    base.mkdir(parents=True, exist_ok=True)
    updates = plan.warmup + plan.steps
    config_path = base / "mlx_lm_config.yaml"
    config_path.write_text(yaml.safe_dump(mlx_lm_config(plan.cfg, updates)))
    reports, adapters = base / "reports.jsonl", base / "adapters"
    command = [sys.executable, "-u", "-m", "lab.rank", "mlx-lm", str(reports), "--",
               *mlx_lm_args(plan.cfg, run.world_size, updates, config_path, adapters)]
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath()}
    if plan.shim:  # the same BLAS as our ranks: the shim, and our thread split
        env.update(LD_PRELOAD=plan.shim,
                   OPENBLAS_NUM_THREADS=str(blas_threads(plan, run.world_size) or os.cpu_count() or 1))
    log_base = base / "log"
    code, cpu = launch_ranks(plan, run, command, env, log_base)
    rows = report.read_jsonl(reports)
    if code != 0 or len(rows) != updates or not (adapters / "adapters.safetensors").is_file():
        show_failure(run.describe(plan), code or 1, log_base)
    return {**mlx_lm_window(rows, plan.warmup, plan.steps), **cpu}, adapters


# ---------------------------------------------------------------------------- scoring and the comparison


def evaluate_adapters(plan: Plan, adapters: dict[str, Path], work: Path) -> dict[str, float]:
    """Valid loss of each adapter directory with one evaluator, ``mlx-dp eval`` (run side by side)."""
    procs = {}
    for name, directory in adapters.items():
        out = work / f"eval-{name}.json"
        command = [sys.executable, "-u", "-m", "trainer", "eval", plan.recipe, "eval.exact_match=false",
                   *plan.overrides, "--checkpoint", str(directory), "--split", "valid", "--json", str(out)]
        log = open(work / f"eval-{name}.log", "w")
        procs[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL), out, log)
    losses = {}
    for name, (proc, out, log) in procs.items():
        try:
            code = proc.wait(timeout=plan.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = 124
        log.close()
        if code != 0 or not out.is_file():
            show_failure(f"mlx-dp eval of the {name} adapters", code or 1, work / f"eval-{name}")
        losses[name] = json.loads(out.read_text())["loss"]
    return losses


def combine_rounds(per_round: list[dict]) -> dict:
    """One comparison from several rounds' (``scaling_report.comparison``): medians, the ratio's range."""
    last = per_round[-1]

    def mid(side: str, key: str):
        values = [c[side][key] for c in per_round if c[side].get(key) is not None]
        return median(values) if values else None

    ours = {**last["ours"], **{k: mid("ours", k) for k in ("updates_per_s", "step_time_median_s",
                                                           "self_reported_tokens_per_s")}}
    theirs = {**last["mlx_lm"], **{k: mid("mlx_lm", k) for k in (
        "updates_per_s", "step_time_median_s", "step_time_p90_s", "self_reported_tokens_per_s",
        "self_reported_updates_per_s", "tokens_per_s_our_definition", "launcher_cpu", "other_cpu")}}
    ratios = [c["tokens_per_s_ratio"] for c in per_round if c["tokens_per_s_ratio"] is not None]
    own = [c["tokens_per_s_ratio_vs_its_own_timer"] for c in per_round
           if c["tokens_per_s_ratio_vs_its_own_timer"] is not None]
    return {**last, "ours": ours, "mlx_lm": theirs, "rounds": len(per_round),
            "tokens_per_s_ratio": median(ratios) if ratios else None,
            "tokens_per_s_ratio_range": [min(ratios), max(ratios)] if ratios else None,
            "tokens_per_s_ratio_per_round": ratios,
            "tokens_per_s_ratio_vs_its_own_timer": median(own) if own else None}


def add_mlx_lm(plan: Plan, doc: dict, measured: dict, adapters: dict, work: Path) -> None:
    """The comparisons (one per launcher, over every round), the headline ratio and both valid losses, into ``doc``.

    Args:
        plan (Plan): The benchmark.
        doc (dict): The JSON document, completed in place.
        measured (dict): Measurement of every :class:`Run`.
        adapters (dict): Adapter directories of the last round, by ``("ours", launcher, n)`` and
            ``("mlx_lm", launcher)``.
        work (Path): Where the evaluations write their results and logs.
    """
    n, primary, updates = plan.world_size, plan.primary_launcher, plan.warmup + plan.steps
    doc["vs_mlx_lm"] = []
    for launcher in plan.launchers:
        rounds = sorted(run.round for run in measured if run.kind == "mlx_lm" and run.launcher == launcher)
        per_round = [comparison(n, updates, launcher, measured[Run("ours", n, launcher, r)],
                                       measured[Run("mlx_lm", n, launcher, r)])
                     for r in rounds if Run("ours", n, launcher, r) in measured]
        doc["vs_mlx_lm"].append(combine_rounds(per_round))
    losses = evaluate_adapters(plan, {"mlx-dp": adapters[("ours", primary, n)],
                                      "mlx_lm": adapters[("mlx_lm", primary, n)]}, work)
    for c in doc["vs_mlx_lm"]:
        if c["launcher"] == primary:
            c["ours"]["valid_loss"], c["mlx_lm"]["valid_loss"] = losses["mlx-dp"], losses["mlx_lm"]
    headline = next(c for c in doc["vs_mlx_lm"] if c["launcher"] == primary)
    doc["vs_mlx_lm_tokens_per_s_ratio"] = headline["tokens_per_s_ratio"]
    doc["vs_mlx_lm_launcher"] = primary
    doc["final_losses"] = {"evaluator": "mlx-dp eval --split valid", "launcher": primary,
                           "mlx_dp_valid_loss": losses["mlx-dp"], "mlx_lm_valid_loss": losses["mlx_lm"],
                           "mlx_dp_final_train_loss": headline["ours"]["final_train_loss"],
                           "mlx_lm_final_train_loss": headline["mlx_lm"]["final_train_loss"]}
    doc["notes"].append("vs_mlx_lm_tokens_per_s_ratio is mlx-dp's optimizer updates per second over mlx_lm.lora's "
                        "(same sequences per update), i.e. the tokens/s ratio under one token definition, taken "
                        "within each round under the same launcher and reported as the median over rounds; "
                        "mlx_lm.lora ran through its own main() with a reporting callback that timestamps "
                        "each update")


# ---------------------------------------------------------------------------- its numbers


def mlx_lm_window(reports: list[dict], warmup: int, steps: int) -> dict:
    """Update times of an mlx_lm.lora run from its per-update reports.

    ``reports`` hold, per optimizer update u (1-based, in order), the wall time
    ``time`` at which mlx-lm reported it and its own ``tokens_per_second``,
    ``iterations_per_second``, ``trained_tokens`` and ``train_loss``. Update u
    took ``time[u] - time[u-1]``: from the end of one report to the next, like
    our trainer's step time (batch building included). mlx-lm validates inside
    its last update, so the window is updates warmup+1 .. warmup+steps-1.
    """
    by_update = {i + 1: r for i, r in enumerate(reports)}
    window = [u for u in range(warmup + 1, warmup + steps) if u in by_update and u - 1 in by_update]
    times = [by_update[u]["time"] - by_update[u - 1]["time"] for u in window]
    own_tokens = [by_update[u]["trained_tokens"] - by_update[u - 1]["trained_tokens"] for u in window]
    own_time = [n / by_update[u]["tokens_per_second"] for n, u in zip(own_tokens, window)]
    last = reports[-1] if reports else {}
    return {
        "step_time_median_s": median(times) if times else None,
        "step_time_p90_s": p90(times) if times else None,
        "updates_per_s": 1 / median(times) if times else None,
        "steps_measured": len(times),
        "self_reported_tokens_per_s": report.throughput(own_tokens, own_time),
        "self_reported_updates_per_s": median([by_update[u]["iterations_per_second"] for u in window])
        if window else None,
        "final_train_loss": last.get("train_loss"),
        "peak_memory_gb": last.get("peak_memory"),
    }




def comparison(world_size: int, updates: int, launcher: str, ours: dict, theirs: dict) -> dict:
    """mlx-dp against mlx_lm.lora at N ranks under one launcher.

    Both process the same sequences per update, so the fair speed ratio is updates per
    second (ours / theirs): the tokens/s ratio under one token definition. Also given
    against mlx-lm's own timer, which leaves out building each batch (and, in the first
    epoch, tokenizing its samples: mlx-lm tokenizes lazily).

    Args:
        world_size (int): N.
        updates (int): Optimizer updates each run made.
        launcher (str): How both were launched.
        ours (dict): :func:`measure_ours` of our run at N.
        theirs (dict): :func:`mlx_lm_window` of mlx-lm's run at N.
    """
    ours_rate = 1 / ours["step_time_median_s"]
    theirs_rate, theirs_own = theirs["updates_per_s"], theirs["self_reported_updates_per_s"]
    theirs = {**theirs, "tokens_per_s_our_definition":
              theirs_rate * ours["tokens_per_step_mean"] if theirs_rate else None}
    return {"world_size": world_size, "launcher": launcher, "global_batch": ours["global_batch"],
            "updates": updates,
            "ours": {"updates_per_s": ours_rate, "step_time_median_s": ours["step_time_median_s"],
                     "self_reported_tokens_per_s": ours["tokens_per_s"], "final_train_loss": ours["final_train_loss"],
                     "steps_measured": ours["steps_measured"]},
            "mlx_lm": theirs,
            "tokens_per_s_ratio": ours_rate / theirs_rate if theirs_rate else None,
            "tokens_per_s_ratio_vs_its_own_timer": ours_rate / theirs_own if theirs_own else None}




def format_vs_mlx_lm(comparisons: list[dict]) -> str:
    """The mlx_lm.lora comparison: one block per launcher."""
    lines = []
    for c in comparisons:
        ours, theirs = c["ours"], c["mlx_lm"]
        lines += [f"\nvs mlx_lm.lora at {c['world_size']} ranks, both under {c['launcher']}, global batch "
                  f"{c['global_batch']}, {c['updates']} updates each, median of {c.get('rounds', 1)} round(s):",
                  f"{'':12s} {'updates/s':>9s} {'median update':>13s} {'own tok/s':>9s} "
                  f"{'final train loss (own)':>22s} {'valid loss (mlx-dp eval)':>24s}"]
        for name, side in (("mlx-dp", ours), ("mlx_lm.lora", theirs)):
            lines.append(f"{name:12s} {report.fmt(side['updates_per_s'], '9.2f')} "
                         f"{report.fmt(side['step_time_median_s'], '12.3f', 's')} "
                         f"{report.fmt(side['self_reported_tokens_per_s'], '9.0f')} "
                         f"{report.fmt(side['final_train_loss'], '22.4f')} {report.fmt(side.get('valid_loss'), '24.4f')}")
        lines.append(f"speed ratio (mlx-dp / mlx_lm.lora updates per second = tokens/s under one token "
                     f"definition): {report.fmt(c['tokens_per_s_ratio'], '.2f', 'x')} "
                     f"{report.fmt_range(c.get('tokens_per_s_ratio_range'), '.2f', 1, 'x')} of wall time "
                     f"({report.fmt(c['tokens_per_s_ratio_vs_its_own_timer'], '.2f', 'x')} against mlx-lm's own "
                     "step timer, which leaves out batch building and lazy tokenization)")
    lines.append("own tok/s is each tool's self-report: mlx-lm also scores the pad after each sample's EOS (one "
                 "extra target per sample) and times only the step; its train loss includes that target too, "
                 "so compare losses in the valid column")
    return "\n".join(lines)
