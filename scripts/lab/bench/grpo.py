"""``python scripts/lab bench grpo``: mlx-dp's GRPO against mlx-lm-lora's GRPO on identical work.

Both tools train the tiny Llama (``builtin:tiny-llama``) on the tiny prompts
(``builtin:tiny-prompts``: finish a sentence of its world and stop) from
``recipes/tiny-grpo.yaml``, with what both support set alike: the same prompt
tokens (plain text, ``tokenizer.encode(prompt)``: ours by ``data.format: text``,
the peer's through its own ``GRPODataset`` plain-text path, which no flag
reaches; ``grpo_peer.py`` says how, and every prompt of every split is compared
before the runs), the same reward (exact match of the ``answer`` column: our
built-in ``exact_match``, the peer's ``grpo_peer_rewards.py``, the same rule),
the same group size, completion limit, temperature (plain softmax sampling on
both: the peer's fixed top-p 0.95 / top-k 20 are switched off), loss type and
clipping, beta (0: no reference pass), LoRA rank, scale, dropout and layers,
optimizer (adam or adamw with the recipe's betas, eps and weight decay) and a
constant learning rate (no warmup, no clipping: the peer has neither), the same
global batch of prompts per update at every world size (mlx-lm-lora's
``--batch-size`` is global and split over ranks, ours is per rank: ours gets
global / ranks) and the same number of updates. The peer's GRPO keys that its
YAML merge ignores are passed as flags; what its trainer really received is
kept in the JSON (``peer_effective_args``).

Every run is started through the product's launcher (``mlx-dp launch -n N
-- ...``); the peer runs its own ``mlx_lm_lora.train`` main() in its own
environment (``--peer-python``, made by this bench if it is missing:
``peer_env.py``). Rounds alternate: ours at 1, peer at 1, ours at 2, peer at 2,
and again, so drift of the machine hits both alike.

Speed, per run, from each tool's own per-update reports (start-up, loading,
tokenizing and validations left out; compilation and everything an update does
in: its rollouts, rewards, loss, backward, reduction and optimizer step):

* **prompts/s** (the headline): prompts of all updates over the wall time of
  all updates. Ours from ``metrics.jsonl`` (``step_time_s`` and ``prompts`` of
  every update, ``logging.every=1``); the peer's from its own per-update
  reports, stamped by this bench's callback as they arrive, from the end of its
  first validation to its last report, less the validation inside its last
  iteration;
* **completion tokens/s**: the completion tokens of all updates (stop tokens
  included; ours ``completion_tokens``, the peer's the growth of its
  ``trained_tokens``) over the same time. The tools' completions differ in
  length as their policies do, so this is reported beside prompts/s, not
  instead of it;
* **steady prompts/s**: the median update after ``--warmup``; **whole s**:
  launch to exit.

Where the time goes: both tools' ranks time their generation per update
(ours ``lab.rank --time-rollouts``, the peer's ``generate_grpo`` in
``grpo_peer.py``), so every run also reports the share of update time spent
generating, and what uneven generation between ranks cost.

Reward: the held-out mean reward of greedy completions of the test prompts,
for every run's final adapters, by one evaluator for both
(``grpo_eval.held_out_reward``). In round 1, both tools' runs at the largest
world size record which prompts each rank completed in their first updates
(``grpo_eval.distinct_prompts``).

Run it alone on the machine, and on a shared one under its lock::

    flock /tmp/cpu.lock .venv/bin/python scripts/lab bench grpo --rounds 3 \\
        --out results/grpo-vs-mlx-lm-lora.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from lab import pythonpath

from . import grpo_eval as check
from .preference import _launch, _peer_versions, _resolved, _source_state, blas_env
from .preference_eval import ratios

ROOT = Path(__file__).resolve().parents[3]
PEER_SCRIPT = Path(__file__).with_name("grpo_peer.py")
PEER_REWARDS = Path(__file__).with_name("grpo_peer_rewards.py")
PEER_REWARD_NAME = "exact_match_answer"
TOOLS = ("mlx-dp", "mlx-lm-lora")


def parse_args(argv):
    from .recipe_args import parse_with_overrides

    p = argparse.ArgumentParser(prog="lab bench grpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs both tools at every world size (default 3)")
    p.add_argument("--ranks", default="1,2", help="world sizes (default 1,2)")
    p.add_argument("--steps", type=int, default=60, help="optimizer updates per run (default 60: the recipe's)")
    p.add_argument("--global-batch", type=int, default=8, help="prompts per update at every world size (default 8)")
    p.add_argument("--warmup", type=int, default=5, help="updates left out of the steady figure (default 5)")
    p.add_argument("--record", type=int, default=4, help="updates whose prompts are recorded per rank in round 1 "
                   "at the largest world size (default 4; 0: none)")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-grpo.yaml"), help="the GRPO recipe (default "
                   "recipes/tiny-grpo.yaml)")
    p.add_argument("--stock-sampling", action="store_true", help="leave the peer's fixed top_p 0.95 / top_k 20 on "
                   "(ours samples softmax(logits / T) alone)")
    p.add_argument("--peer-python", default="/work/peer-venv/bin/python", help="Python of the environment with "
                   "mlx-lm-lora; made (venv + pip) when missing (default /work/peer-venv/bin/python)")
    p.add_argument("--timeout", type=float, default=900, help="give up on one run after this many seconds")
    p.add_argument("--keep", default=None, help="keep every run's logs, metrics and adapters in this directory")
    p.add_argument("--out", default="grpo-vs-mlx-lm-lora.json", help="JSON result")
    p.add_argument("overrides", nargs="*", help="recipe overrides for both tools, e.g. method.group_size=4")
    return parse_with_overrides(p, argv)


# ---------------------------------------------------------------------------- the same work, twice


def our_overrides(args, n: int, run_dir: Path) -> list[str]:
    """The recipe's settings the bench fixes for every run of ours at ``n`` ranks (after ``args.overrides``)."""
    return [*args.overrides, f"training.steps={args.steps}", f"training.batch_size={args.global_batch // n}",
            "training.grad_accumulation=1", "training.warmup_steps=0", "training.lr_schedule=constant",
            "training.max_grad_norm=null", "logging.every=1", "logging.per_rank_timings=true",
            "logging.progress_bar=false", "logging.wandb=false", "eval.every=0", "eval.at_start=false",
            "eval.max_batches=1", "checkpoint.every=0", f"checkpoint.dir={run_dir}",
            f"data.cache_dir={run_dir.parent / 'cache'}"]  # fresh: every run tokenizes, as the peer does


def check_comparable(cfg) -> None:
    """Refuse what mlx-lm-lora's GRPO cannot train alike."""
    from trainer.errors import ConfigError

    m, t, d = cfg.method, cfg.training, cfg.data
    rewards = [r.get("kind") == "exact_match" and r.get("column", "answer") == "answer" and r.get("weight", 1) == 1
               for r in m.rewards]
    problems = [f"method.objective={m.objective} (the peer's side here is GRPO)" if m.objective != "grpo" else "",
                f"method.type={m.type} (lora or dora)" if m.type not in ("lora", "dora") else "",
                f"method.loss_type={m.loss_type} (grpo or dr_grpo)" if m.loss_type not in ("grpo", "dr_grpo") else "",
                f"method.updates_per_generation={m.updates_per_generation} (the peer has 1)"
                if m.updates_per_generation != 1 else "",
                "method.rewards (one exact_match on the answer column, weight 1)" if rewards != [True] else "",
                f"data.format={d.format} (text: the peer's prompts are given as plain text)"
                if d.format != "text" else "",
                f"training.optimizer={t.optimizer} (adam or adamw)" if t.optimizer not in ("adam", "adamw") else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("bench grpo cannot run the peer alike with " + "; ".join(problems))


def peer_config(cfg, args, adapters: Path) -> dict:
    """mlx-lm-lora's ``--config`` for the same work (its keys: CONFIG_DEFAULTS in mlx_lm_lora/train.py).

    Only keys its YAML merge honours (argparse default ``None``); the GRPO keys it ignores are in
    :func:`peer_flags`.
    """
    from trainer.library import resolve

    m, t, d = cfg.method, cfg.training, cfg.data
    optimizer = {"betas": list(t.betas), "eps": t.eps} | ({"weight_decay": t.weight_decay}
                                                           if t.optimizer == "adamw" else {})
    lora = {"rank": m.rank, "scale": m.scale, "dropout": m.dropout} | ({"keys": list(m.keys)} if m.keys else {})
    never = args.steps + 1  # it still validates (one batch) at iteration 1 and at the last
    return {"model": str(resolve(cfg.model.path)), "data": str(resolve(d.path)), "train": True, "train_mode": "grpo",
            "train_type": m.type, "beta": m.beta, "epsilon_high": m.epsilon_high, "optimizer": t.optimizer,
            "optimizer_config": {t.optimizer: optimizer}, "lora_parameters": lora, "num_layers": m.num_layers,
            "batch_size": args.global_batch, "gradient_accumulation_steps": 1, "iters": args.steps,
            "learning_rate": t.learning_rate, "seed": t.seed, "max_seq_length": d.max_seq_length,
            "steps_per_report": 1, "steps_per_eval": never, "val_batches": 1, "save_every": never,
            "adapter_path": str(adapters), "fuse": False}


def peer_flags(cfg) -> list[str]:
    """The GRPO settings as flags: its YAML values for these are silently ignored (non-None argparse defaults)."""
    m = cfg.method
    return ["--group-size", str(m.group_size), "--max-completion-length", str(m.max_completion_tokens),
            "--temperature", str(m.temperature), "--epsilon", str(m.epsilon), "--grpo-loss-type", m.loss_type,
            "--importance-sampling-level", "token", "--reward-functions-file", str(PEER_REWARDS),
            "--reward-functions", PEER_REWARD_NAME]


# ---------------------------------------------------------------------------- one run of each


def run_ours(args, n: int, base: Path, record: bool, threads) -> dict:
    from trainer.bench.scaling_report import read_jsonl
    from trainer.bench.scaling_runs import show_failure

    run_dir = base / "run"
    extra = ["--record-pairs", str(base / "prompts"), str(args.record)] if record else []
    command = [sys.executable, "-u", "-m", "lab.rank", "mlx-dp", *extra, "--time-rollouts", str(base / "rollouts"),
               "--", "train", args.recipe, *our_overrides(args, n, run_dir)]
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath(), "MLX_DP_JIT": "mlx", **blas_env("mlx-dp", threads)}
    code, cpu, started, whole = _launch(args, n, command, env, base)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in r]
    if code != 0 or len(rows) != args.steps or not (run_dir / "adapters.safetensors").is_file():
        show_failure(f"mlx-dp at {n} rank(s)", code or 1, base / "log")
    f = check.our_figures(rows)
    generated = generation_share(base / "rollouts", n, f["times"])
    return {**check.rates(f["times"], f["prompts"], f["completion_tokens"], args.warmup),
            "setup_s": rows[0]["time"] - rows[0]["step_time_s"] - started, "whole_s": whole,
            "final_train_reward": rows[-1].get("reward"), "peak_memory_gb": rows[-1].get("peak_memory_gb"),
            "update_times_s": [round(t, 4) for t in f["times"]], "completion_tokens_per_update": f["completion_tokens"],
            **generated, "adapters": str(run_dir), **cpu}


def generation_share(path: Path, n: int, times: list[float]) -> dict:
    """:func:`grpo_eval.generation` of the per-rank rollout records at ``path.rank<R>.jsonl``."""
    from trainer.bench.scaling_report import read_jsonl

    return check.generation([read_jsonl(Path(f"{path}.rank{k}.jsonl")) for k in range(n)], times)


def run_peer(args, cfg, n: int, base: Path, record: bool, threads) -> dict:
    from trainer.bench.scaling_report import read_jsonl
    from trainer.bench.scaling_runs import show_failure
    from trainer.bench.stats import median

    adapters, reports = base / "adapters", base / "reports.jsonl"
    config = base / "peer.yaml"
    config.write_text(yaml.safe_dump(peer_config(cfg, args, adapters)))
    extra = (["--record-batches", str(args.record)] if record else []) + (["--stock-sampling"]
                                                                          if args.stock_sampling else [])
    command = [args.peer_python, "-u", str(PEER_SCRIPT), "train", str(reports), *extra, "--", "--config", str(config),
               *peer_flags(cfg)]
    env = {"PYTHONUNBUFFERED": "1", **blas_env("mlx-lm-lora", threads)}
    code, cpu, started, whole = _launch(args, n, command, env, base)
    rows, vals = read_jsonl(reports), read_jsonl(Path(f"{reports}.val"))
    if code != 0 or len(rows) != args.steps or len(vals) < 2 or not (adapters / "adapters.safetensors").is_file():
        show_failure(f"mlx-lm-lora at {n} rank(s)", code or 1, base / "log")
    times = check.peer_update_times(rows, vals)
    tokens = check.peer_completion_tokens(rows)
    own = [r["iterations_per_second"] for r in rows[args.warmup:]]
    generated = generation_share(Path(f"{reports}.rollouts"), n, times)
    return {**check.rates(times, [args.global_batch] * len(rows), tokens, args.warmup),
            "own_steady_prompts_per_s": args.global_batch * median(own) if own else None,
            "setup_s": vals[0]["time"] - vals[0]["val_time"] - started, "whole_s": whole,
            "final_train_reward": rows[-1].get("train_total_rewards_mean"),
            "peak_memory_gb": rows[-1].get("peak_memory"),
            "update_times_s": [round(t, 4) for t in times], "completion_tokens_per_update": tokens,
            **generated, "adapters": str(adapters), **cpu}


# ---------------------------------------------------------------------------- the report

FIGURES = ("prompts_per_s", "completion_tokens_per_s", "steady_prompts_per_s", "whole_s", "setup_s",
           "completion_tokens_per_prompt", "test_reward", "generation_share", "uneven_generation_share")


def summarize(runs: list[dict], sizes: list[int]) -> dict:
    """Per world size: the per-round ratios ours / peer, each tool's figures (median, range), and the rounds
    next to other load (named, with the prompts/s ratio without them; nothing is re-measured)."""
    from trainer.bench.scaling_rounds import DISTURBED, spread

    out = {}
    for n in sizes:
        mine = [r for r in runs if r["world_size"] == n]
        disturbed = [{"round": r["round"], "tool": r["tool"], "other_cpu": r["other_cpu"]} for r in mine
                     if (r.get("other_cpu") or 0) > DISTURBED]
        calm = [r for r in mine if r["round"] not in {d["round"] for d in disturbed}]
        out[str(n)] = {
            "disturbed_runs": disturbed,
            "prompts_per_s_ratio_undisturbed_rounds": ratios(calm, "prompts_per_s", n) if disturbed else None,
            "prompts_per_s_ratio": ratios(mine, "prompts_per_s", n),
            "completion_tokens_per_s_ratio": ratios(mine, "completion_tokens_per_s", n),
            "steady_prompts_per_s_ratio": ratios(mine, "steady_prompts_per_s", n),
            "whole_run_speed_ratio": ratios([{**r, "speed": 1 / r["whole_s"]} for r in mine], "speed", n),
            **{tool: {key: spread([r[key] for r in mine if r["tool"] == tool and r.get(key) is not None])
                      for key in FIGURES}
               for tool in TOOLS}}
    return out


def table(doc: dict) -> str:
    lines = ["| ranks | round | tool | prompts/s | completion tok/s | steady prompts/s | tokens/prompt | whole s | "
             "setup s | test reward |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["runs"]:
        lines.append(f"| {r['world_size']} | {r['round'] + 1} | {r['tool']} | {r['prompts_per_s']:.2f} | "
                     f"{r['completion_tokens_per_s']:.1f} | {r['steady_prompts_per_s']:.2f} | "
                     f"{r['completion_tokens_per_prompt']:.1f} | {r['whole_s']:.1f} | {r['setup_s']:.1f} | "
                     f"{r['test_reward']:.3f} |")
    lines.append("")
    lines.append(f"base model test reward: {doc['base_model_test_reward']['reward']:.3f}")
    for n, s in doc["summary"].items():
        for key, label in (("prompts_per_s_ratio", "prompts/s"), ("completion_tokens_per_s_ratio", "completion tok/s"),
                           ("steady_prompts_per_s_ratio", "steady prompts/s"),
                           ("whole_run_speed_ratio", "whole-run speed")):
            x = s[key]
            if x["median"] is not None:
                each = ", ".join(f"{v:.2f}" for v in x["per_round"])
                lines.append(f"{n} rank(s): mlx-dp / mlx-lm-lora {label}: {x['median']:.2f}x "
                             f"(range {x['min']:.2f}-{x['max']:.2f}; per round {each})")
        for d in s["disturbed_runs"]:
            lines.append(f"{n} rank(s): round {d['round'] + 1}'s {d['tool']} ran next to {d['other_cpu']:.2f} cores "
                         "of other load")
        calm = s["prompts_per_s_ratio_undisturbed_rounds"]
        if calm is not None:
            lines.append(f"{n} rank(s): prompts/s ratio without those rounds: " + (
                f"{calm['median']:.2f}x over {len(calm['per_round'])} round(s)" if calm["median"] is not None
                else "none left (every round ran next to other load)"))
    return "\n".join(lines)


def run_all(args, sizes: list[int], cfg, threads) -> dict:
    """The prompt check, every round's runs, the one evaluator and the prompts' record; the JSON document."""
    from trainer.bench.scaling import Progress
    from trainer.bench.scaling_report import machine_info
    from trainer.config.load import load_config
    from trainer.tools import fastblas

    runs, record_n = [], max(sizes) if max(sizes) > 1 and args.record else None
    source = {"at_start": _source_state()}  # others may change the shared work tree while this runs
    with tempfile.TemporaryDirectory(prefix="mlx-dp-grpo-") as tmp:
        work = Path(args.keep or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        eval_cfg = load_config(args.recipe, our_overrides(args, 1, work / "eval" / "run"))
        splits = check.our_splits(eval_cfg)
        peer_file = work / "peer-prompts.json"
        subprocess.run([args.peer_python, str(PEER_SCRIPT), "prompts", _resolved(eval_cfg.data.path),
                        _resolved(eval_cfg.model.path), str(peer_file)],
                       check=True, capture_output=True, text=True, timeout=args.timeout)
        prompts = check.compare_prompts(splits, json.loads(peer_file.read_text()))
        counts = ", ".join(f"{k} {v['identical']}/{v['ours']}" for k, v in prompts["splits"].items())
        print(f"[bench] prompts: the peer's tokens and ours identical: {prompts['identical']} ({counts})", flush=True)
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
                    progress.end(f"{m['prompts_per_s']:.2f} prompts/s training, {m['whole_s']:.0f} s whole",
                                 m["whole_s"])
        print("[bench] held-out reward of every run's adapters, one evaluator ...", flush=True)
        test = splits["test"]
        base_reward = check.held_out_reward(eval_cfg, None, test)
        for run in runs:
            scored = check.held_out_reward(eval_cfg, Path(run["adapters"]), test)
            run.update(test_reward=scored["reward"], adapters=str(Path(run["adapters"]).relative_to(work)))
        effective = json.loads((work / f"r0-n{sizes[0]}-mlx-lm-lora" / "reports.jsonl.args.json").read_text())
        seen = None
        if record_n:
            seen = check.distinct_prompts(splits["train"], work / f"r0-n{record_n}-mlx-dp" / "prompts",
                                          work / f"r0-n{record_n}-mlx-lm-lora" / "reports.jsonl", record_n)
    source["at_end"] = _source_state()
    return {"benchmark": "grpo", "recipe": args.recipe, "settings": vars(args), "world_sizes": sizes,
            "our_overrides_at_1": our_overrides(args, 1, Path("RUN")),
            "peer_config": peer_config(cfg, args, Path("ADAPTERS")), "peer_flags": peer_flags(cfg),
            "peer_effective_args": effective, "blas": "openblas" if fastblas.requested() else "mlx",
            "blas_threads_per_rank": threads, "machine": machine_info(), "mlx_dp_source": source,
            "peer": _peer_versions(args.peer_python), "prompts": prompts, "base_model_test_reward": base_reward,
            "distinct_prompts": seen, "runs": runs, "summary": summarize(runs, sizes), "notes": NOTES,
            "peer_as_read": PEER_AS_READ}


def main(argv: list[str]) -> int:
    from trainer.bench.scaling import _stop_on_termination
    from trainer.config.load import load_config
    from trainer.errors import UserError
    from trainer.tools import fastblas, fastjit

    from .peer_env import ensure_peer_python

    args = parse_args(argv)
    sizes = sorted({int(s) for s in args.ranks.split(",") if s.strip()})
    if not sizes or min(sizes) < 1 or any(args.global_batch % n for n in sizes) or args.rounds < 1:
        print("lab bench grpo: --ranks must be world sizes that divide --global-batch, --rounds at least 1",
              file=sys.stderr)
        return 2
    if args.steps <= args.warmup + 1:
        print("lab bench grpo: need --steps above --warmup + 1", file=sys.stderr)
        return 2
    _stop_on_termination()
    try:
        if fastjit.active_setting() != "mlx":  # the peer's Python cannot take our kernel compiler
            raise UserError("unset MLX_DP_JIT: the peer runs MLX's own compiled kernels, and so must we here")
        ensure_peer_python(args.peer_python, "mlx-lm-lora==5.10.2")
        threads = fastblas.threads_per_rank(max(sizes)) if fastblas.requested() else None
        fastblas.maybe_enable(max(sizes))  # this process evaluates too; before mlx.core is imported
        cfg = load_config(args.recipe, our_overrides(args, 1, Path(tempfile.gettempdir()) / "bench-grpo"))
        check_comparable(cfg)
    except UserError as e:
        print(f"lab bench grpo: {e}", file=sys.stderr)
        return 2
    try:
        doc = run_all(args, sizes, cfg, threads)
    except UserError as e:
        print(f"lab bench grpo: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("\nlab bench grpo: interrupted", file=sys.stderr)
        return 130
    print(table(doc))
    from .recipe_args import write_json

    write_json(args.out, doc)
    return 0


NOTES = [
    "prompts_per_s: prompts of all updates over the wall time of all updates (rollouts, rewards, loss, backward, "
    "reduction, optimizer step and compilation included; start-up, loading, tokenizing and validations excluded). "
    "Ours: sum of metrics.jsonl step_time_s and prompts; the peer's: its per-update reports as this bench's "
    "callback stamped them (from the end of its first validation to its last report, less the validation inside "
    "its last iteration); own_steady_prompts_per_s is the global batch x its own median it/s",
    "completion_tokens_per_s: completion tokens (stop tokens included) of all updates over the same time; ours "
    "metrics.jsonl completion_tokens, the peer's the growth of its trained_tokens (summed completion masks)",
    "test_reward: mean exact-match reward of greedy completions (method.max_completion_tokens) of every test "
    "prompt, for every run's final adapters, scored in one process by mlx-dp's GRPO.held_out_reward on the model "
    "mlx_lm.load(base, adapter_path=...) returns",
    "generation_share: the slowest rank's generation seconds per update (ours GRPO._complete: sampling and "
    "rewards; the peer's generate_grpo: sampling) summed, over "
    "the updates' wall time; uneven_generation_share: per update, the slowest rank's generation minus the ranks' "
    "mean, summed, over the updates' wall time (the most that perfectly even generation could save)",
]

# What mlx-lm-lora 5.10.2's GRPO does, as read in its source (mlx_lm_lora/train.py, trainer/grpo_trainer.py,
# trainer/datasets.py) and met while running it here.
PEER_AS_READ = [
    "prompts: GRPODataset renders each prompt through the chat template with a default R1 system prompt; its "
    "plain-text path (text_completion_key) is not reachable from the command line (create_dataset never passes "
    "it); grpo_peer.py builds the dataset with it",
    "sampling: make_sampler(temperature, top_p, min_p, top_k) with top_p 0.95 and top_k 20 fixed "
    "(GRPOTrainingArgs defaults, no flags); grpo_peer.py sets top_p 1 and top_k 0 unless --stock-sampling",
    "YAML: group_size, max_completion_length, temperature, epsilon, grpo_loss_type and importance_sampling_level "
    "have non-None argparse defaults, so their YAML values are ignored; the bench passes them as flags and "
    "records the GRPOTrainingArgs its trainer received (peer_effective_args)",
    "rollouts: one BatchGenerator per update with completion_batch_size = the global --batch-size (so 8 rows "
    "decode at once however many completions a rank holds), a shared prompt prefill forked per row for "
    "prompts of 8+ tokens, global mx.random state (a completion depends on its batch)",
    "ranks: iterate_grpo_batches deals idx[i + rank : i + batch : world] of length-sorted prompts, every rank "
    "seeds numpy alike, so ranks take distinct prompts of the same global batch (distinct_prompts shows it)",
    "advantages: (r - mean) / (std + 1e-4) with numpy's population std (ddof 0), ours the sample std (ddof 1), as "
    "TRL: the peer's advantages are sqrt(G / (G - 1)) larger (1.07x at G = 8) for the same rewards",
    "reference: a second copy of the model is loaded for GRPO even with beta 0 (it is not run then)",
]
