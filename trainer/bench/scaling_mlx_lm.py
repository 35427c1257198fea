"""The ``--vs-mlx-lm`` side of ``mlx-dp bench scaling``: the same work with ``mlx_lm.lora``.

The recipe becomes mlx_lm.lora's command line and ``-c`` config (same adapter,
optimizer, schedule, global batch and number of optimizer updates). Each of
its ranks runs mlx_lm.lora's own ``main()`` with a reporting callback that
timestamps every update (``trainer.bench_rank``, started as
``python -m trainer.bench_rank mlx-lm REPORTS -- ARGS``). Both
adapters are then scored by one evaluator, ``mlx-dp eval``, and the
comparison is added to the benchmark's JSON (:func:`add_mlx_lm`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from . import scaling_report as report
from .scaling_plan import BenchError, Plan, Run, blas_threads
from .scaling_runs import launch_ranks, show_failure
from .stats import median

# ---------------------------------------------------------------------------- the same work, in mlx-lm's terms


def check_mlx_lm_comparable(cfg) -> list[str]:
    """Refuse what mlx_lm.lora cannot train alike; return notes on the differences left."""
    d, t = cfg.data, cfg.training
    path = Path(d.path) if d.path else None
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
    first = (Path(cfg.data.path) / "train.jsonl").read_text().split("\n", 1)[0]
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
    args = ["--model", cfg.model.path, "--train", "--data", d.path, "-c", str(config_path),
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
    command = [sys.executable, "-u", "-m", "trainer.bench_rank", "mlx-lm", str(reports), "--",
               *mlx_lm_args(plan.cfg, run.world_size, updates, config_path, adapters)]
    env = {"PYTHONUNBUFFERED": "1"}
    if plan.shim:  # the same BLAS as our ranks: the shim, and our thread split
        env.update(LD_PRELOAD=plan.shim,
                   OPENBLAS_NUM_THREADS=str(blas_threads(plan, run.world_size) or os.cpu_count() or 1))
    log_base = base / "log"
    code, cpu = launch_ranks(plan, run, command, env, log_base)
    rows = report.read_jsonl(reports)
    if code != 0 or len(rows) != updates or not (adapters / "adapters.safetensors").is_file():
        show_failure(run.describe(plan), code or 1, log_base)
    return {**report.mlx_lm_window(rows, plan.warmup, plan.steps), **cpu}, adapters


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
        per_round = [report.comparison(n, updates, launcher, measured[Run("ours", n, launcher, r)],
                                       measured[Run("mlx_lm", n, launcher, r)])
                     for r in rounds if Run("ours", n, launcher, r) in measured]
        doc["vs_mlx_lm"].append(combine_rounds(per_round))
    losses = evaluate_adapters(plan, {"mlx-dp": adapters[("ours", primary, n)],
                                      "mlx_lm": adapters[("mlx_lm", primary)]}, work)
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
