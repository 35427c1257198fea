"""What ``bench preference`` checks after (and before) the runs: one evaluator, one tokenization, whose pairs.

* :func:`accuracy`: the held-out preference accuracy of any adapter directory,
  ours or the peer's, by one evaluator in this process: mlx-lm loads the base
  with the adapters (``mlx_lm.load(model, adapter_path=...)``), the test pairs
  are tokenized once, by mlx-dp's pair loader (as ``mlx-dp eval`` loads them),
  and a pair counts when the summed log-prob of its chosen answer exceeds the
  rejected one's (ties are counted apart, not as wins).
* :func:`compare_tokens`: the peer's tokenization of every split (its DPO
  dataset, from ``preference_peer.py tokens``) against ours, pair by pair.
* :func:`distinct_pairs`: from the first updates of real 2-rank runs, which
  pairs each rank trained on (ours: indices recorded by ``lab.rank
  --record-pairs``; the peer's: token rows recorded inside its
  ``iterate_dpo_batches``, mapped to the same indices by their tokens), and
  which pairs the peer's batching can reach at all.
* :func:`ratios`: per-round ratios ours / peer and their median and range.
"""

import json
from pathlib import Path

from trainer.bench.scaling_rounds import spread

# ---------------------------------------------------------------------------- tokens


def our_splits(cfg, names=("train", "valid", "test")) -> dict:
    """Our tokenization of the pair splits (``trainer.data.pairs``, as ``mlx-dp eval`` loads them)."""
    from trainer.model.load import load_base
    from trainer.data.pairs import load_pair_splits

    _, tokenizer, _ = load_base(cfg.model)
    return load_pair_splits(cfg.data, tokenizer, names, show_progress=False)


def _ours(split, i: int) -> tuple:
    return (tuple(int(t) for t in split.chosen.sample(i)), tuple(int(t) for t in split.rejected.sample(i)),
            int(split.chosen.prompt_lengths[i]), int(split.rejected.prompt_lengths[i]))


def compare_tokens(splits: dict, peer: dict) -> dict:
    """Per split, how many pairs the peer tokenizes exactly as we do (chosen, rejected, prompt length)."""
    out = {"peer_fallback_template": peer["fallback_template"], "splits": {}}
    for name, split in splits.items():
        theirs = peer["splits"].get(name, [])
        same = sum(_ours(split, i) == (tuple(p["chosen"]), tuple(p["rejected"]), p["prompt"], p["prompt"])
                   for i, p in enumerate(theirs[:len(split)]))
        out["splits"][name] = {"ours": len(split), "peer": len(theirs), "identical": same,
                               "our_notes": list(split.notes)}
    out["identical"] = all(s["ours"] == s["peer"] == s["identical"] for s in out["splits"].values())
    return out


# ---------------------------------------------------------------------------- the one evaluator


def adapter_signature(directory: Path) -> dict:
    """Names and shapes of the arrays in an adapter file (to show both tools trained the same adapters)."""
    import mlx.core as mx

    return {k: list(v.shape) for k, v in sorted(mx.load(str(directory / "adapters.safetensors")).items())}


def accuracy(model_path: str, adapters: Path | None, split, batch: int = 16, pad_multiple: int = 16) -> dict:
    """Held-out preference accuracy of the base with ``adapters`` (``None``: the base alone).

    The adapter file's arrays are checked to be the loaded model's own (mlx-lm loads
    them with ``strict=False``), so a name that matched nothing cannot pass as trained.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from trainer.data.pair_batches import make_pair_batch

    model, _ = load(model_path, adapter_path=str(adapters) if adapters else None)
    model.eval()
    if adapters:
        params = dict(tree_flatten(model.parameters()))
        for name, value in mx.load(str(adapters / "adapters.safetensors")).items():
            if name not in params or not mx.array_equal(params[name], value).item():
                raise RuntimeError(f"{adapters}: {name} is not what the loaded model holds")
    wins = ties = 0
    for start in range(0, len(split), batch):
        indices = np.arange(start, min(start + batch, len(split)))
        b = make_pair_batch(split, indices, 0, 1, len(indices), pad_multiple)
        logits = model(mx.array(b.inputs))
        logp = -(nn.losses.cross_entropy(logits, mx.array(b.targets)) * mx.array(b.mask)).astype(mx.float32).sum(-1)
        chosen, rejected = logp[:len(indices)], logp[len(indices):]
        wins += int((chosen > rejected).sum().item())
        ties += int((chosen == rejected).sum().item())
    return {"accuracy": wins / len(split), "wins": wins, "ties": ties, "pairs": len(split)}


# ---------------------------------------------------------------------------- whose pairs


def _by_tokens(split) -> dict:
    """(chosen tokens, rejected tokens) -> our pair indices with them."""
    index = {}
    for i in range(len(split)):
        c, r, _, _ = _ours(split, i)
        index.setdefault((c, r), []).append(i)
    return index


def peer_reachable(peer_train: list[dict], global_batch: int, world_size: int) -> int:
    """Pairs the peer's ``iterate_dpo_batches`` can ever deal at ``world_size`` ranks.

    Its batches are ``idx[i : i + batch : world_size]`` of the length-sorted pairs,
    one per chunk of ``batch``, the same slice on every rank: a rank's share is
    every ``world_size``-th pair of a chunk, and the others are never drawn.
    """
    idx = sorted(range(len(peer_train)), key=lambda i: len(peer_train[i]["chosen"]))
    return len({j for i in range(0, len(idx) - global_batch + 1, global_batch)
                for j in idx[i:i + global_batch:world_size]})


def distinct_pairs(train_split, ours_base: Path | None, peer_base: Path | None, world_size: int,
                   global_batch: int, peer_train: list[dict]) -> dict:
    """Which pairs each rank trained on in the first recorded updates of both tools' runs at N ranks."""
    out = {"world_size": world_size, "global_batch": global_batch}
    if ours_base is not None:
        ranks = [json.loads(Path(f"{ours_base}.rank{r}.json").read_text()) for r in range(world_size)]
        updates = [[sorted(i for micro in ranks[r][u] for i in micro) for r in range(world_size)]
                   for u in range(min(len(x) for x in ranks))]
        out["mlx_dp"] = _overlap(updates, "indices each rank's micro-batches held (lab.rank --record-pairs)")
    if peer_base is not None:
        index, rows = _by_tokens(train_split), []
        ranks = [json.loads(Path(f"{peer_base}.batches.rank{r}.json").read_text()) for r in range(world_size)]
        for u in range(min(len(x) for x in ranks)):
            rows.append([])
            for r in range(world_size):
                batch = ranks[r][u]
                found = [index.get((tuple(c), tuple(x)), [None])[0] for c, x in zip(batch["chosen"], batch["rejected"])]
                rows[-1].append(sorted(i for i in found if i is not None) if None not in found else found)
        out["mlx_lm_lora"] = _overlap(rows, "token rows inside its iterate_dpo_batches, mapped to our pair "
                                            "indices by their tokens")
        out["mlx_lm_lora"]["identical_token_rows_across_ranks"] = all(
            ranks[r][u] == ranks[0][u] for u in range(len(rows)) for r in range(world_size))
        weights = [Path(f"{peer_base}.weights.rank{r}.json") for r in range(world_size)]
        if all(w.is_file() for w in weights):
            digests = [json.loads(w.read_text()) for w in weights]
            out["mlx_lm_lora"]["trainable_weights_digest_per_rank"] = digests
            out["mlx_lm_lora"]["ranks_hold_the_same_adapters"] = {
                when: len({d[when] for d in digests}) == 1 for when in ("before", "after")}
        out["mlx_lm_lora"]["pairs_reachable"] = {str(n): peer_reachable(peer_train, global_batch, n)
                                                 for n in sorted({1, world_size})}
        out["mlx_lm_lora"]["train_pairs"] = len(peer_train)
    return out


def _overlap(updates: list[list[list[int]]], how: str) -> dict:
    """Per update, each rank's pairs; whether ranks shared any, and the distinct pairs per update."""
    shared = [len(set.intersection(*(set(r) for r in u))) for u in updates] if updates else []
    return {"recorded_from": how, "updates_recorded": len(updates), "pairs_per_rank": updates,
            "pairs_shared_by_ranks_per_update": shared,
            "distinct_pairs_per_update": [len(set().union(*(set(r) for r in u))) for u in updates],
            "ranks_disjoint": all(s == 0 for s in shared)}


# ---------------------------------------------------------------------------- figures


def ratios(runs: list[dict], key: str, world_size: int) -> dict:
    """Per round, ours' ``key`` over the peer's at ``world_size`` ranks; median, range and each round's."""
    per_round = []
    for r in sorted({x["round"] for x in runs}):
        pick = {x["tool"]: x.get(key) for x in runs if x["round"] == r and x["world_size"] == world_size}
        if pick.get("mlx-dp") and pick.get("mlx-lm-lora"):
            per_round.append(pick["mlx-dp"] / pick["mlx-lm-lora"])
    return {**spread(per_round), "per_round": per_round}
