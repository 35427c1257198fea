"""``mlx-dp bench scaling --balance off,auto``: the N-rank throughput of each ``parallel.balance`` setting.

A mixed desk cluster (the lab emulates one with ``--slow 1=0.5``: rank 1
capped at half a core) is where ``parallel.balance: auto`` earns its keep:
with an even split every update waits for the slow rank. Each setting trains
the same recipe at N ranks once per round, in turn, so drift hits them alike;
each ratio against the first setting is taken within a round and reported as
the median over rounds with its range, and disturbed rounds are left out as
``scaling_rounds`` says. Next to the throughput: the split (rows per rank of
the last measured update) and each rank's own forward+backward time per
update, from the run's metrics.

Pure: measurements in, a summary and its table out.
"""

from .scaling_plan import Plan
from .scaling_rounds import DISTURBED, spread


def summarize_balance(plan: Plan, measured: dict) -> list[dict]:
    """One block per launcher: every setting's figures, and its tokens/s against the first setting's."""
    blocks = []
    for launcher in plan.launchers:
        runs = {(run.balance, run.round): m for run, m in measured.items()
                if run.kind == "balance" and run.launcher == launcher}
        if not runs:
            continue
        rounds = sorted({r for _, r in runs})
        complete = [r for r in rounds if all((s, r) in runs for s in plan.balances)]
        kept = [r for r in complete
                if max((runs[(s, r)].get("other_cpu") or 0.0) for s in plan.balances) <= DISTURBED]
        note = None
        if not kept:
            kept, note = complete, "every round ran next to other load; these figures come from all of them"
        first = plan.balances[0]
        settings = []
        for setting in plan.balances:
            mine = [runs[(setting, r)] for r in kept]
            tps = spread([m["tokens_per_s"] for m in mine])
            ratios = spread([_ratio(runs[(setting, r)]["tokens_per_s"], runs[(first, r)]["tokens_per_s"])
                             for r in kept])
            compute = [m.get("compute_s_per_rank") for m in mine if m.get("compute_s_per_rank")]
            settings.append({
                "balance": setting, "rounds": len(mine), "tokens_per_s": tps["median"],
                "tokens_per_s_range": [tps["min"], tps["max"]],
                "step_time_median_s": spread([m["step_time_median_s"] for m in mine])["median"],
                "rows_per_rank": mine[-1].get("rows_per_rank") if mine else None,
                "compute_s_per_rank": [spread(list(col))["median"] for col in zip(*compute)] if compute else None,
                "rank_step_time_median_s": mine[-1].get("rank_step_time_median_s") if mine else None,
                f"vs_{first}": ratios["median"], f"vs_{first}_range": [ratios["min"], ratios["max"]],
                f"vs_{first}_per_round": [_ratio(runs[(setting, r)]["tokens_per_s"],
                                                 runs[(first, r)]["tokens_per_s"]) for r in kept]})
        blocks.append({"launcher": launcher, "world_size": plan.world_size, "slow": plan.hook("slow") or {},
                       "rounds_used": [r + 1 for r in kept], "rounds_left_out": [r + 1 for r in complete
                                                                                 if r not in kept],
                       "note": note, "settings": settings})
    return blocks


def _ratio(a, b):
    return a / b if a and b else None


def format_balance(blocks: list[dict]) -> str:
    """The comparison as text: one line per setting."""
    lines = []
    for b in blocks:
        first = b["settings"][0]["balance"]
        slow = ", ".join(f"rank {r} at {s:g} of a core" for r, s in sorted(b["slow"].items())) or "as they are"
        lines += [f"\nparallel.balance at {b['world_size']} ranks under {b['launcher']} ({slow}), "
                  f"median of {len(b['rounds_used'])} round(s)"
                  + (f", round(s) {b['rounds_left_out']} left out (other load)" if b["rounds_left_out"] else "")
                  + ":",
                  f"{'balance':12s} {'tok/s':>7s} {'(min-max)':13s} {'vs ' + first:>8s} {'(min-max)':13s} "
                  f"{'rows/rank':>10s} {'compute s/update per rank':>26s}"]
        for s in b["settings"]:
            lo, hi = s[f"vs_{first}_range"]
            rng = f"{lo:.2f}-{hi:.2f}" if lo is not None else "-"
            tlo, thi = s["tokens_per_s_range"]
            compute = " ".join(f"{c:.3f}" for c in s["compute_s_per_rank"] or []) or "-"
            rows = "/".join(map(str, s["rows_per_rank"] or [])) or "-"
            lines.append(f"{s['balance']:12s} {s['tokens_per_s'] or 0:7.0f} {f'{tlo:.0f}-{thi:.0f}':13s} "
                         f"{(s[f'vs_{first}'] or 0):7.2f}x {rng:13s} {rows:>10s} {compute:>26s}")
        if b["note"]:
            lines.append(f"note: {b['note']}")
    return "\n".join(lines)
