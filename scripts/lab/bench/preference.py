"""``python scripts/lab bench preference``: mlx-dp's DPO against mlx-lm-lora's DPO on identical work.

Both tools train the tiny Llama (``builtin:tiny-llama``) on the tiny preference
task (``builtin:tiny-preference``) from ``recipes/tiny-dpo.yaml``, with what
both support set alike: the same beta (sigmoid loss, no label smoothing), the
same LoRA rank, scale, dropout and layers, the same global batch of pairs per
update at every world size (mlx-lm-lora's ``--batch-size`` is global and split
over ranks, ours is per rank: ours gets global / ranks), the same number of
updates, learning rate and optimizer (adam or adamw with the recipe's betas,
eps and weight decay; a constant rate: no warmup, and no gradient clipping,
which mlx-lm-lora has none of). Every run is started through the product's
launcher (``mlx-dp launch -n N -- ...``); the peer runs its own
``mlx_lm_lora.train`` main() in its own environment (``--peer-python``,
through ``preference_peer.py``). Rounds alternate: ours at 1, peer at 1,
ours at 2, peer at 2, and again, so drift of the machine hits both alike.

Speed, per run:

* **pairs/s** (the headline): pairs of all updates over the wall time of all
  updates, compilation included; loading, tokenizing, our reference log-probs
  (computed once before the first update, into a fresh ``data.cache_dir`` every
  run) and the peer's validations left out. Ours from ``metrics.jsonl``
  (``step_time_s`` of every update, ``pairs``); the peer's from its own
  per-update reports, stamped by this bench as they arrive (not its rounded
  printed it/s), from the end of its first validation to its last report, less
  the validation inside its last iteration;
* **steady pairs/s**: the global batch over the median update after ``--warmup``
  updates (the peer's own it/s beside it);
* **whole s**: launch to exit, everything included.

Accuracy: the held-out preference accuracy of every run's final adapters, by
one evaluator for both (``preference_eval.accuracy``). Before the rounds the
peer's tokenization is compared with ours pair by pair; in round 1 both
tools' runs at the largest world size record which pairs each rank trained on
in their first updates (``preference_eval.distinct_pairs``).

Run it alone on the machine, and on a shared one under its lock::

    flock /tmp/cpu.lock .venv/bin/python scripts/lab bench preference --rounds 3 \\
        --out results/preference-vs-mlx-lm-lora.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lab import pythonpath

from . import preference_eval as check

ROOT = Path(__file__).resolve().parents[3]
PEER_SCRIPT = Path(__file__).with_name("preference_peer.py")
TOOLS = ("mlx-dp", "mlx-lm-lora")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lab bench preference", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs both tools at every world size (default 3)")
    p.add_argument("--ranks", default="1,2", help="world sizes (default 1,2)")
    p.add_argument("--steps", type=int, default=150, help="optimizer updates per run (default 150: the recipe's, "
                   "which takes our held-out accuracy past 90%%)")
    p.add_argument("--global-batch", type=int, default=8, help="pairs per update at every world size (default 8)")
    p.add_argument("--warmup", type=int, default=10, help="updates left out of the steady-state figure (default 10)")
    p.add_argument("--record", type=int, default=4, help="updates whose pairs are recorded per rank in round 1 "
                   "at the largest world size (default 4; 0: none)")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-dpo.yaml"), help="the DPO recipe (default "
                   "recipes/tiny-dpo.yaml)")
    p.add_argument("--peer-python", default="/work/peer-venv/bin/python", help="Python of the environment with "
                   "mlx-lm-lora (default /work/peer-venv/bin/python)")
    p.add_argument("--timeout", type=float, default=900, help="give up on one run after this many seconds")
    p.add_argument("--keep", default=None, help="keep every run's logs, metrics and adapters in this directory")
    p.add_argument("--out", default="preference-vs-mlx-lm-lora.json", help="JSON result")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- the same work, twice


def our_overrides(args, n: int, run_dir: Path) -> list[str]:
    """The recipe's settings the bench fixes for every run of ours at ``n`` ranks."""
    return [f"training.steps={args.steps}", f"training.batch_size={args.global_batch // n}",
            "training.grad_accumulation=1", "training.warmup_steps=0", "training.lr_schedule=constant",
            "training.max_grad_norm=null", "logging.every=1", "logging.per_rank_timings=true",
            "logging.progress_bar=false", "logging.wandb=false", "eval.every=0", "eval.at_start=false",
            "eval.max_batches=1", "checkpoint.every=0", f"checkpoint.dir={run_dir}",
            f"data.cache_dir={run_dir.parent / 'cache'}"]  # fresh: every run tokenizes and computes its reference


def check_comparable(cfg) -> None:
    """Refuse what mlx-lm-lora's DPO cannot train alike."""
    from trainer.errors import ConfigError

    m, t = cfg.method, cfg.training
    problems = [f"method.objective={m.objective} (the peer's side here is DPO)" if m.objective != "dpo" else "",
                f"method.type={m.type} (lora or dora)" if m.type not in ("lora", "dora") else "",
                f"method.label_smoothing={m.label_smoothing} (the peer's sigmoid loss has none)"
                if m.label_smoothing else "",
                f"training.optimizer={t.optimizer} (adam or adamw)" if t.optimizer not in ("adam", "adamw") else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("bench preference cannot run the peer alike with " + "; ".join(problems))


def peer_config(cfg, args, adapters: Path) -> dict:
    """mlx-lm-lora's ``--config`` for the same work: its keys (CONFIG_DEFAULTS in mlx_lm_lora/train.py)."""
    from trainer.library import resolve

    m, t, d = cfg.method, cfg.training, cfg.data
    optimizer = {"betas": list(t.betas), "eps": t.eps} | ({"weight_decay": t.weight_decay}
                                                           if t.optimizer == "adamw" else {})
    lora = {"rank": m.rank, "scale": m.scale, "dropout": m.dropout} | ({"keys": list(m.keys)} if m.keys else {})
    never = args.steps + 1  # it still validates (one batch) at iteration 1 and at the last
    return {"model": resolve(cfg.model.path), "data": resolve(d.path), "train": True, "train_mode": "dpo",
            "train_type": m.type, "beta": m.beta, "dpo_cpo_loss_type": "sigmoid", "optimizer": t.optimizer,
            "optimizer_config": {t.optimizer: optimizer}, "lora_parameters": lora, "num_layers": m.num_layers,
            "batch_size": args.global_batch, "gradient_accumulation_steps": 1, "iters": args.steps,
            "learning_rate": t.learning_rate, "seed": t.seed, "max_seq_length": d.max_seq_length,
            "steps_per_report": 1, "steps_per_eval": never, "val_batches": 1, "save_every": never,
            "adapter_path": str(adapters), "fuse": False}


def blas_env(tool: str, threads: int | None) -> dict:
    """The same fp32 BLAS for both (``MLX_DP_BLAS``): ours through its own switch, the peer through the shim."""
    from trainer.tools import fastblas

    if not fastblas.requested():
        return {}
    if tool == "mlx-dp":
        return {fastblas.THREADS_ENV: str(threads)}
    return {"LD_PRELOAD": str(fastblas.build_shim()), "OPENBLAS_NUM_THREADS": str(threads)}


# ---------------------------------------------------------------------------- one run of each


def _launch(args, n: int, command: list[str], env: dict, base: Path) -> tuple[int, dict, float, float]:
    """Start ``command`` on ``n`` ranks under ``mlx-dp launch``; (code, cpu, wall start, whole seconds)."""
    from trainer.bench.scaling_plan import Plan, Run
    from trainer.bench.scaling_runs import launch_ranks

    plan = Plan(recipe=args.recipe, overrides=[], cfg=None, sizes=[n], launchers=["mlx-dp launch"],
                warmup=args.warmup, steps=args.steps, timeout=args.timeout)
    started, clock = time.time(), time.monotonic()
    code, cpu = launch_ranks(plan, Run("bench", n, "mlx-dp launch"), command, env, base / "log")
    return code, cpu, started, time.monotonic() - clock


def _steady(times: list[float], warmup: int, batch: int) -> float | None:
    from trainer.bench.stats import median

    later = times[warmup:]
    return batch / median(later) if later else None


def run_ours(args, n: int, base: Path, record: bool, threads) -> dict:
    from trainer.bench.scaling_report import read_jsonl
    from trainer.bench.scaling_runs import show_failure

    run_dir = base / "run"
    extra = ["--record-pairs", str(base / "pairs"), str(args.record)] if record else []
    command = [sys.executable, "-u", "-m", "lab.rank", "mlx-dp", *extra, "--", "train", args.recipe,
               *our_overrides(args, n, run_dir)]
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath(), "MLX_DP_JIT": "mlx", **blas_env("mlx-dp", threads)}
    code, cpu, started, whole = _launch(args, n, command, env, base)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in r]
    if code != 0 or len(rows) != args.steps or not (run_dir / "adapters.safetensors").is_file():
        show_failure(f"mlx-dp at {n} rank(s)", code or 1, base / "log")
    times = [r["step_time_s"] for r in rows]
    pairs = sum(r["pairs"] for r in rows)
    return {"pairs_per_s": pairs / sum(times), "train_s": sum(times), "pairs": pairs,
            "steady_pairs_per_s": _steady(times, args.warmup, args.global_batch),
            "setup_s": rows[0]["time"] - rows[0]["step_time_s"] - started, "whole_s": whole,
            "final_train_loss": rows[-1]["train_loss"], "peak_memory_gb": rows[-1].get("peak_memory_gb"),
            "update_times_s": [round(t, 4) for t in times], "adapters": str(run_dir), **cpu}


def run_peer(args, cfg, n: int, base: Path, record: bool, threads) -> dict:
    from trainer.bench.scaling_report import read_jsonl
    from trainer.bench.scaling_runs import show_failure
    from trainer.bench.stats import median

    adapters, reports = base / "adapters", base / "reports.jsonl"
    config = base / "peer.yaml"
    config.write_text(yaml.safe_dump(peer_config(cfg, args, adapters)))
    extra = ["--record-batches", str(args.record)] if record else []
    command = [args.peer_python, "-u", str(PEER_SCRIPT), "train", str(reports), *extra, "--", "--config", str(config)]
    env = {"PYTHONUNBUFFERED": "1", **blas_env("mlx-lm-lora", threads)}
    code, cpu, started, whole = _launch(args, n, command, env, base)
    rows, vals = read_jsonl(reports), read_jsonl(Path(f"{reports}.val"))
    if code != 0 or len(rows) != args.steps or len(vals) < 2 or not (adapters / "adapters.safetensors").is_file():
        show_failure(f"mlx-lm-lora at {n} rank(s)", code or 1, base / "log")
    # update u took time[u] - time[u-1], from the end of the first validation; the last holds a validation
    stamps = [vals[0]["time"]] + [r["time"] for r in rows]
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    times[-1] -= vals[-1]["val_time"]
    pairs = args.global_batch * len(rows)
    own = [r["iterations_per_second"] for r in rows[args.warmup:]]
    return {"pairs_per_s": pairs / sum(times), "train_s": sum(times), "pairs": pairs,
            "steady_pairs_per_s": _steady(times, args.warmup, args.global_batch),
            "own_steady_pairs_per_s": args.global_batch * median(own) if own else None,
            "setup_s": vals[0]["time"] - vals[0]["val_time"] - started, "whole_s": whole,
            "final_train_loss": rows[-1]["train_loss"], "peak_memory_gb": rows[-1].get("peak_memory"),
            "update_times_s": [round(t, 4) for t in times], "adapters": str(adapters), **cpu}


# ---------------------------------------------------------------------------- the report


def summarize(runs: list[dict], sizes: list[int]) -> dict:
    """Per world size: the per-round ratios ours / peer, each tool's figures, and the rounds next to other load.

    A run during which other processes took more than ``DISTURBED`` cores (``bench scaling``'s
    threshold) is named, and its round's ratio is also given without it; nothing is re-measured.
    """
    from trainer.bench.scaling_rounds import DISTURBED, spread

    out = {}
    for n in sizes:
        mine = [r for r in runs if r["world_size"] == n]
        disturbed = [{"round": r["round"], "tool": r["tool"], "other_cpu": r["other_cpu"]} for r in mine
                     if (r.get("other_cpu") or 0) > DISTURBED]
        calm = [r for r in mine if r["round"] not in {d["round"] for d in disturbed}]
        out[str(n)] = {
            "disturbed_runs": disturbed,
            "pairs_per_s_ratio_undisturbed_rounds": check.ratios(calm, "pairs_per_s", n) if disturbed else None,
            "pairs_per_s_ratio": check.ratios(mine, "pairs_per_s", n),
            "steady_pairs_per_s_ratio": check.ratios(mine, "steady_pairs_per_s", n),
            "whole_run_speed_ratio": check.ratios([{**r, "speed": 1 / r["whole_s"]} for r in mine], "speed", n),
            **{tool: {key: spread([r[key] if key != "first_update_s" else r["update_times_s"][0]
                                   for r in mine if r["tool"] == tool])
                      for key in ("pairs_per_s", "steady_pairs_per_s", "whole_s", "setup_s", "first_update_s",
                                  "peak_memory_gb", "test_accuracy")}
               for tool in TOOLS}}
    return out


def table(doc: dict) -> str:
    lines = ["| ranks | round | tool | pairs/s (train) | steady pairs/s | whole s | setup s | test accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["runs"]:
        lines.append(f"| {r['world_size']} | {r['round'] + 1} | {r['tool']} | {r['pairs_per_s']:.1f} | "
                     f"{r['steady_pairs_per_s']:.1f} | {r['whole_s']:.1f} | {r['setup_s']:.1f} | "
                     f"{r['test_accuracy']:.1%} |")
    lines.append("")
    for n, s in doc["summary"].items():
        for key, label in (("pairs_per_s_ratio", "pairs/s"), ("steady_pairs_per_s_ratio", "steady pairs/s"),
                           ("whole_run_speed_ratio", "whole-run speed")):
            x = s[key]
            if x["median"] is not None:
                each = ", ".join(f"{v:.2f}" for v in x["per_round"])
                lines.append(f"{n} rank(s): mlx-dp / mlx-lm-lora {label}: {x['median']:.2f}x "
                             f"(range {x['min']:.2f}-{x['max']:.2f}; per round {each})")
        for d in s["disturbed_runs"]:
            lines.append(f"{n} rank(s): round {d['round'] + 1}'s {d['tool']} ran next to {d['other_cpu']:.2f} cores "
                         f"of other load; without that round, pairs/s ratio "
                         f"{s['pairs_per_s_ratio_undisturbed_rounds']['median']:.2f}x")
    return "\n".join(lines)


def run_all(args, sizes: list[int], cfg, threads) -> dict:
    """The token check, every round's runs, the one evaluator and the pairs' record; the JSON document."""
    from trainer.bench.scaling import Progress
    from trainer.bench.scaling_report import machine_info
    from trainer.config.load import load_config
    from trainer.tools import fastblas

    runs, record_n = [], max(sizes) if max(sizes) > 1 and args.record else None
    source = {"at_start": _source_state()}  # others may change the shared work tree while this runs
    with tempfile.TemporaryDirectory(prefix="mlx-dp-preference-") as tmp:
        work = Path(args.keep or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        eval_cfg = load_config(args.recipe, our_overrides(args, 1, work / "eval" / "run"))
        splits = check.our_splits(eval_cfg)
        peer_tokens = work / "peer-tokens.json"
        subprocess.run([args.peer_python, str(PEER_SCRIPT), "tokens", _resolved(eval_cfg.data.path),
                        _resolved(eval_cfg.model.path), str(peer_tokens)],
                       check=True, capture_output=True, text=True, timeout=args.timeout)
        peer_split_tokens = json.loads(peer_tokens.read_text())
        tokens = check.compare_tokens(splits, peer_split_tokens)
        counts = ", ".join(f"{k} {v['identical']}/{v['ours']}" for k, v in tokens["splits"].items())
        print(f"[bench] tokenization: the peer's and ours identical: {tokens['identical']} ({counts})", flush=True)
        progress = Progress(args.rounds * len(sizes) * len(TOOLS))
        for r in range(args.rounds):
            for n in sizes:
                for tool in TOOLS:
                    base = work / f"r{r}-n{n}-{tool}"
                    base.mkdir(parents=True, exist_ok=True)
                    record = r == 0 and n == record_n
                    progress.begin(f"round {r + 1}, {tool} at {n} rank(s)")
                    m = (run_ours(args, n, base, record, threads) if tool == "mlx-dp"
                         else run_peer(args, cfg, n, base, record, threads))
                    runs.append({"round": r, "world_size": n, "tool": tool, **m})
                    progress.end(f"{m['pairs_per_s']:.1f} pairs/s training, {m['whole_s']:.0f} s whole", m["whole_s"])
        print("[bench] held-out accuracy of every run's adapters, one evaluator ...", flush=True)
        model_path, test = _resolved(eval_cfg.model.path), splits["test"]
        base_accuracy = check.accuracy(model_path, None, test)
        for run in runs:
            scored = check.accuracy(model_path, Path(run["adapters"]), test)
            run.update(test_accuracy=scored["accuracy"], test_ties=scored["ties"],
                       adapters=str(Path(run["adapters"]).relative_to(work)))
        signatures = {tool: check.adapter_signature(work / next(r["adapters"] for r in runs if r["tool"] == tool))
                      for tool in TOOLS}
        pairs_seen = None
        if record_n:
            pairs_seen = check.distinct_pairs(
                splits["train"], work / f"r0-n{record_n}-mlx-dp" / "pairs",
                work / f"r0-n{record_n}-mlx-lm-lora" / "reports.jsonl", record_n, args.global_batch,
                peer_split_tokens["splits"]["train"])
    source["at_end"] = _source_state()
    return {"benchmark": "preference", "recipe": args.recipe, "settings": vars(args), "world_sizes": sizes,
            "our_overrides_at_1": our_overrides(args, 1, Path("RUN")),
            "peer_config": peer_config(cfg, args, Path("ADAPTERS")),
            "blas": "openblas" if fastblas.requested() else "mlx", "blas_threads_per_rank": threads,
            "machine": machine_info(), "mlx_dp_source": source, "peer": _peer_versions(args.peer_python),
            "tokenization": tokens, "adapters_identical_in_shape": signatures["mlx-dp"] == signatures["mlx-lm-lora"],
            "base_model_test_accuracy": base_accuracy, "distinct_pairs": pairs_seen,
            "runs": runs, "summary": summarize(runs, sizes), "notes": NOTES, "peer_as_read": PEER_AS_READ}


def main(argv: list[str]) -> int:
    from trainer.bench.scaling import _stop_on_termination
    from trainer.config.load import load_config
    from trainer.errors import UserError
    from trainer.tools import fastblas, fastjit

    args = parse_args(argv)
    sizes = sorted({int(s) for s in args.ranks.split(",") if s.strip()})
    if not sizes or min(sizes) < 1 or any(args.global_batch % n for n in sizes) or args.rounds < 1:
        print("lab bench preference: --ranks must be world sizes that divide --global-batch, --rounds at least 1",
              file=sys.stderr)
        return 2
    if args.steps <= args.warmup + 1 or not Path(args.peer_python).is_file():
        print(f"lab bench preference: need --steps above --warmup + 1 and a peer Python ({args.peer_python})",
              file=sys.stderr)
        return 2
    _stop_on_termination()
    try:
        if fastjit.active_setting() != "mlx":  # the peer's Python cannot take our kernel compiler
            raise UserError("unset MLX_DP_JIT: the peer runs MLX's own compiled kernels, and so must we here")
        threads = fastblas.threads_per_rank(max(sizes)) if fastblas.requested() else None
        fastblas.maybe_enable(max(sizes))  # this process evaluates too; before mlx.core is imported
        cfg = load_config(args.recipe, our_overrides(args, 1, Path(tempfile.gettempdir()) / "bench-preference"))
        check_comparable(cfg)
    except UserError as e:
        print(f"lab bench preference: {e}", file=sys.stderr)
        return 2
    try:
        doc = run_all(args, sizes, cfg, threads)
    except UserError as e:
        print(f"lab bench preference: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("\nlab bench preference: interrupted", file=sys.stderr)
        return 130
    print(table(doc))
    from .recipe_args import write_json

    write_json(args.out, doc)
    return 0


def _resolved(path: str) -> str:
    from trainer.library import resolve

    return str(resolve(path))


def _source_state() -> dict:
    """The commit our runs trained from, and the trainer files that differed from it (a shared work tree)."""
    def git(*a):
        out = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return out.stdout.rstrip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "trainer")
    return {"commit": git("rev-parse", "HEAD"), "trainer_changes": status.splitlines() if status else []}


def _peer_versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('mlx-lm-lora', 'mlx', 'mlx-lm')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]}


NOTES = [
    "pairs_per_s: pairs of all updates over the wall time of all updates (compilation included; loading, "
    "tokenizing, our cached reference pass and the peer's validations excluded). Ours: sum of metrics.jsonl "
    "step_time_s and pairs; the peer's: its per-update reports as this bench's callback stamped them (from the "
    "end of its first validation to its last report, less the validation inside its last iteration), not its "
    "printed it/s, which is rounded; own_steady_pairs_per_s is the global batch x its own median it/s",
    "setup_s: launch until the first update starts (ours: tokenizing and the reference log-probs, computed "
    "once into a fresh data.cache_dir every run; the peer's: loading the model twice, tokenizing, its first "
    "validation is excluded); whole_s: launch to exit",
    "pairs are counted as computed (the global batch per update), whether or not the ranks' pairs are distinct "
    "(see distinct_pairs for what each rank really trained on)",
    "test_accuracy: share of test pairs whose chosen answer has the higher summed log-prob under base + adapters "
    "(mlx_lm.load with adapter_path), pairs tokenized once by mlx-dp's loader; ties are not wins",
]

# What mlx-lm-lora 5.10.2 does, as read in its source (mlx_lm_lora/train.py, trainer/dpo_trainer.py)
# and met while running it here; the figures above measure its consequences.
PEER_AS_READ = [
    "reference: load_reference_model() loads the base a second time (a second full copy of the weights, frozen), "
    "and train_dpo's compiled step runs the reference forward of the chosen and rejected rows in every update",
    "batches: train_dpo calls next(iterate_dpo_batches(..., train=True)) in every iteration, so each update "
    "re-sorts all pairs by length and draws one random chunk: sampling with replacement, no epochs",
    "ranks: iterate_dpo_batches deals idx[i : i + batch_size : world_size] with no rank offset, and every rank "
    "seeds numpy alike, so all ranks train the same pairs and the others of each chunk are never drawn",
    "LoRA init: from_pretrained() makes the LoRA layers before train_model() calls mx.random.seed, and MLX's "
    "default seed differs per process, so ranks may start from different adapters (nothing broadcasts them); "
    "distinct_pairs.mlx_lm_lora.ranks_hold_the_same_adapters says what the recorded run held. Every rank then "
    "saves its adapters to the same file",
    "its printed accuracy compares the batch's mean chosen and rejected rewards (0 or 1 per batch), "
    "not pairs",
    "on MLX's CPU backend train_dpo fails at mx.device_info()['max_recommended_working_set_size'] (KeyError); "
    "preference_peer.py supplies 0 there. Under a launcher's -n 1 its mx.distributed.init() fails on the "
    "blank MLX_HOSTFILE (as with stock mlx.launch -n 1); preference_peer.py drops it",
]
