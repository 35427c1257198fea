"""What ``bench grpo`` checks before and after the runs: one prompt text, one evaluator, whose prompts.

* :func:`compare_prompts`: the peer's tokens of every prompt of every split
  (``grpo_peer.py prompts``) against ours, prompt by prompt.
* :func:`held_out_reward`: the mean reward of greedy completions of the
  held-out prompts, for any adapter directory, ours or the peer's, by one
  evaluator in this process: mlx-lm loads the base with the adapters
  (``mlx_lm.load(model, adapter_path=...)``; every array of the file is checked
  to be the loaded model's own), and mlx-dp's GRPO scores it as ``mlx-dp eval``
  does (``GRPO.held_out_reward``: greedy, ``method.max_completion_tokens``, the
  recipe's rewards) on one process.
* :func:`distinct_prompts`: from the first updates of real 2-rank runs, which
  prompts each rank completed (ours: indices recorded by ``lab.rank
  --record-pairs``; the peer's: prompt and answer text recorded inside its
  batch iterator, mapped to the same indices).
* Pure figures: :func:`peer_update_times`, :func:`peer_completion_tokens` and
  :func:`our_figures` turn each tool's own reports into per-update times and
  counts (``tests/test_lab_grpo.py``).
"""

import json
from pathlib import Path

from trainer.bench.stats import median

from .preference_eval import _overlap

# ---------------------------------------------------------------------------- prompts


def our_splits(cfg, names=("train", "valid", "test")) -> dict:
    """Our prompt splits (``GRPO.load``, as ``mlx-dp train`` and ``eval`` load them)."""
    from trainer.model.load import load_base
    from trainer.objectives.registry import make_objective

    _, tokenizer, _ = load_base(cfg.model)
    return make_objective(cfg).load(cfg.data, tokenizer, names, show_progress=False)


def compare_prompts(splits: dict, peer: dict) -> dict:
    """Per split, how many prompts the peer tokenizes exactly as we do, with the same answer."""
    out = {"splits": {}}
    for name, split in splits.items():
        theirs = peer["splits"].get(name, [])
        same = sum(split.prompt(i) == p["tokens"] and split.row(i).get("answer") == p["answer"]
                   for i, p in enumerate(theirs[:len(split)]))
        out["splits"][name] = {"ours": len(split), "peer": len(theirs), "identical": same}
    out["identical"] = all(s["ours"] == s["peer"] == s["identical"] for s in out["splits"].values())
    return out


# ---------------------------------------------------------------------------- the one evaluator


def held_out_reward(cfg, adapters: Path | None, split) -> dict:
    """Mean reward of greedy completions of ``split`` by the base with ``adapters`` (``None``: the base)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from trainer.library import resolve
    from trainer.objectives.registry import make_objective
    from trainer.parallel.world import World

    model, tokenizer = load(str(resolve(cfg.model.path)), adapter_path=str(adapters) if adapters else None)
    if adapters:  # mlx-lm loads adapters with strict=False: a name that matched nothing must not pass
        params = dict(tree_flatten(model.parameters()))
        for name, value in mx.load(str(adapters / "adapters.safetensors")).items():
            if name not in params or not mx.array_equal(params[name], value).item():
                raise RuntimeError(f"{adapters}: {name} is not what the loaded model holds")
    objective = make_objective(cfg)
    objective.tokenizer = tokenizer
    alone = World(group=None, rank=0, size=1, host="bench")  # one process: all_sum returns its input
    reward, count = objective.held_out_reward(alone, model, split)
    return {"reward": reward, "prompts": count}


# ---------------------------------------------------------------------------- whose prompts


def distinct_prompts(train_split, ours_base: Path | None, peer_base: Path | None, world_size: int) -> dict:
    """Which prompts each rank completed in the first recorded updates of both tools' runs at N ranks."""
    out = {"world_size": world_size}
    if ours_base is not None:
        ranks = [json.loads(Path(f"{ours_base}.rank{r}.json").read_text()) for r in range(world_size)]
        updates = [[sorted(i for micro in ranks[r][u] for i in micro) for r in range(world_size)]
                   for u in range(min(len(x) for x in ranks))]
        out["mlx_dp"] = _overlap(updates, "prompt indices each rank's micro-batches held (lab.rank --record-pairs)")
    if peer_base is not None:
        index = {}
        for i in range(len(train_split)):
            row = train_split.row(i)
            index.setdefault((row.get("prompt"), row.get("answer")), []).append(i)
        ranks = [json.loads(Path(f"{peer_base}.batches.rank{r}.json").read_text()) for r in range(world_size)]
        updates = [[peer_indices(ranks[r][u], index) for r in range(world_size)]
                   for u in range(min(len(x) for x in ranks))]
        out["mlx_lm_lora"] = _overlap(updates, "prompt and answer text inside its iterate_grpo_batches, mapped "
                                               "to our prompt indices")
        weights = [Path(f"{peer_base}.weights.rank{r}.json") for r in range(world_size)]
        if all(w.is_file() for w in weights):
            digests = [json.loads(w.read_text()) for w in weights]
            out["mlx_lm_lora"]["trainable_weights_digest_per_rank"] = digests
            out["mlx_lm_lora"]["ranks_hold_the_same_adapters"] = {
                when: len({d[when] for d in digests}) == 1 for when in ("before", "after")}
    return out


def peer_indices(batch: dict, index: dict) -> list:
    """Our indices of the peer's recorded batch; a (prompt, answer) held by several rows maps to its first,
    one not in our split to ``None``."""
    found = [index.get((p, a), [None])[0] for p, a in zip(batch["prompts"], batch["answers"])]
    return sorted(found) if None not in found else found


# ---------------------------------------------------------------------------- figures from each tool's reports


def peer_update_times(rows: list[dict], vals: list[dict]) -> list[float]:
    """Each update's wall time from the peer's reports, as this bench's callback stamped them on arrival.

    Update u took ``time[u] - time[u-1]``, from the end of its first validation
    (inside iteration 1, before the first rollout); its last validation runs
    inside the last iteration, before that iteration's rollout, and is taken out.
    """
    stamps = [vals[0]["time"]] + [r["time"] for r in rows]
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    if len(vals) > 1 and times:
        times[-1] -= vals[-1]["val_time"]
    return times


def peer_completion_tokens(rows: list[dict]) -> list[int]:
    """Each update's completion tokens, all ranks: the growth of its ``trained_tokens`` (the summed
    completion masks, stop tokens included), one report per update."""
    totals = [0] + [int(round(r["trained_tokens"])) for r in rows]
    return [b - a for a, b in zip(totals, totals[1:])]


def our_figures(rows: list[dict]) -> dict:
    """Per update (one ``metrics.jsonl`` record each, ``logging.every=1``): wall time (rollout, update and
    the reduction: ``step_time_s``), prompts and completion tokens, all ranks."""
    return {"times": [r["step_time_s"] for r in rows], "prompts": [r["prompts"] for r in rows],
            "completion_tokens": [int(r["completion_tokens"]) for r in rows]}


def generation(ranks: list[list[dict]], times: list[float]) -> dict:
    """Where the updates' time went, from each rank's rollout records (``step``, ``generate_s``).

    Returns:
        dict: each rank's generation seconds; ``generation_share``: the slowest rank's generation per update,
        summed, over the updates' wall time ``times``; ``uneven_generation_s`` (and its share): per update,
        the slowest rank's generation minus the ranks' mean, summed: the time ranks sat waiting for a longer
        rollout elsewhere, the most that perfectly even generation could save. Empty without records.
    """
    by_step = [{r["step"]: r["generate_s"] for r in records} for records in ranks]
    steps = sorted(set.intersection(*(set(r) for r in by_step))) if by_step else []
    if not steps or not times:
        return {}
    per_update = [[rank[s] for rank in by_step] for s in steps]
    uneven = sum(max(g) - sum(g) / len(g) for g in per_update)
    return {"generate_s_per_rank": [round(sum(g[k] for g in per_update), 3) for k in range(len(by_step))],
            "generation_share": sum(max(g) for g in per_update) / sum(times),
            "uneven_generation_s": uneven, "uneven_generation_share": uneven / sum(times)}


def rates(times: list[float], prompts: list[int], tokens: list[int], warmup: int) -> dict:
    """Prompts and completion tokens per second over all updates, and a steady figure after ``warmup``."""
    later = list(zip(times, prompts))[warmup:]
    return {"prompts_per_s": sum(prompts) / sum(times), "completion_tokens_per_s": sum(tokens) / sum(times),
            "train_s": sum(times), "prompts": sum(prompts), "completion_tokens": sum(tokens),
            "steady_prompts_per_s": median([p / t for t, p in later]) if later else None,
            "completion_tokens_per_prompt": sum(tokens) / max(sum(prompts), 1)}
