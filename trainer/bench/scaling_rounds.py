"""From rounds of runs to the figures ``mlx-dp bench scaling`` reports, and which of them to trust.

The benchmark runs every world size once per round, alternating (1, N, 1, N,
...), so slow drift of a shared machine hits both sides of a ratio alike. Each
ratio is taken within a round (N's run against the 1-rank run of the same
round and launcher), and each figure is reported as its median over rounds
with its minimum and maximum.

Three things are never reported as results:

* **a round that ran next to other load**: other processes took more than
  ``DISTURBED`` cores while one of its runs trained (the whole machine's busy
  time minus the job's own, ``scaling_runs.wait_measuring_cpu``). N ranks on N
  cores lose the most to a stranger, so such a round is left out and another
  measured; if every round was disturbed, the figures come from all of them
  and a note says so;
* **a baseline far below its own other rounds** (a 1-rank run under
  ``OUTLIER`` x the median of the other rounds, as when two OpenBLAS threads
  fought a busy relay and a 1-rank run collapsed: docs/RESULTS.md, "Tiny LoRA,
  N=1 and 2 on loopback"): the round is left out, named in the notes, and the
  benchmark measures another one;
* **an efficiency above 100% plus the measured noise** (the relative spread
  of tokens/s over rounds, at 1 and at N ranks): no real N-rank run beats N
  one-rank runs by more than their noise, so the row is re-measured, and if it
  stays so it is marked invalid with the reason.

Everything here is pure: measurements in, rows and notes out.
"""

from .scaling_plan import Plan, Run
from .stats import median

OUTLIER = 0.8  # a 1-rank round below this share of its other rounds' median is far below them
DISTURBED = 0.25  # cores other processes may take during a run before its round is not comparable


def spread(values: list[float]) -> dict:
    """Median, minimum, maximum and relative spread ((max - min) / median) of some rounds' values."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "relative": None}
    mid = median(values)
    return {"median": mid, "min": min(values), "max": max(values),
            "relative": (max(values) - min(values)) / mid if mid else None}


def baseline_outliers(rates: dict[int, float]) -> dict[int, str]:
    """Rounds whose 1-rank tokens/s is far below the median of the other rounds, with the reason."""
    found = {}
    for round_index, rate in rates.items():
        others = [r for i, r in rates.items() if i != round_index and r is not None]
        if rate is not None and others and rate < OUTLIER * median(others):
            found[round_index] = (f"round {round_index + 1}: {rate:.0f} tok/s at 1 rank, far below the other "
                                  f"rounds' {median(others):.0f}")
    return found


def round_kinds(plan: Plan) -> set:
    """Kinds of run whose figures a round's ratios use: ours, and those the extensions name."""
    return {"ours", *[kind for extension in plan.extensions for kind in getattr(extension, "round_kinds", ())]}


def disturbed_rounds(plan: Plan, launcher: str, rounds: list[int], measured: dict) -> dict[int, str]:
    """Rounds in which other processes took more than ``DISTURBED`` cores during one of our runs."""
    found, kinds = {}, round_kinds(plan)
    for i in rounds:
        loads = [measured[run]["other_cpu"] for run in measured
                 if run.round == i and run.launcher == launcher and run.kind in kinds
                 and measured[run].get("other_cpu") is not None]
        if loads and max(loads) > DISTURBED:
            found[i] = f"round {i + 1}: other processes took {max(loads):.1f} cores during it"
    return found


def _ratio(a, b):
    return a / b if a and b else None


def _per_round(plan: Plan, launcher: str, n: int, round_index: int, measured: dict) -> dict | None:
    """One round's figures for ``n`` ranks under ``launcher`` (None if the run is missing)."""
    ours = measured.get(Run("ours", n, launcher, round_index))
    base = measured.get(Run("ours", 1, launcher, round_index))
    if ours is None or base is None:
        return None
    speedup = _ratio(ours["tokens_per_s"], base["tokens_per_s"])
    row = {"round": round_index + 1, "tokens_per_s": ours["tokens_per_s"],
           "step_time_median_s": ours["step_time_median_s"], "speedup": speedup,
           "scaling_efficiency": None if speedup is None else speedup / n,
           "launcher_cpu": ours.get("launcher_cpu"), "other_cpu": _load(ours, base)}
    for extension in plan.extensions:  # e.g. the lab's figures against a run with communication skipped
        row.update(getattr(extension, "per_round", lambda *a: {})(plan, launcher, n, round_index, measured))
    return row


def _load(*runs) -> float | None:
    """The most CPU other processes took during any of these runs, in cores (None: not measured)."""
    loads = [run["other_cpu"] for run in runs if run and run.get("other_cpu") is not None]
    return max(loads) if loads else None


def _row(plan: Plan, launcher: str, n: int, kept: list[int], measured: dict, excluded: dict) -> dict | None:
    rounds = [r for r in (_per_round(plan, launcher, n, i, measured) for i in kept) if r is not None]
    if not rounds:
        return None
    last = measured[Run("ours", n, launcher, kept[-1])]
    runs = [measured[Run("ours", n, launcher, i)] for i in kept if Run("ours", n, launcher, i) in measured]

    def mid(key, rows=rounds):
        return spread([r[key] for r in rows])["median"]

    tps, eff = spread([r["tokens_per_s"] for r in rounds]), spread([r["scaling_efficiency"] for r in rounds])
    speed = spread([r["speedup"] for r in rounds])
    peaks = [max((p for p in ranks if p is not None), default=None)
             for ranks in zip(*[r["peak_memory_gb_per_rank"] for r in runs])]
    row = {"world_size": n, "launcher": launcher, "rounds": len(rounds), "tokens_per_s": tps["median"],
           "tokens_per_s_range": [tps["min"], tps["max"]], "tokens_per_s_noise": tps["relative"],
           "step_time_median_s": mid("step_time_median_s"),
           "step_time_p90_s": spread([r["step_time_p90_s"] for r in runs])["median"],
           "speedup": speed["median"], "speedup_range": [speed["min"], speed["max"]],
           "scaling_efficiency": eff["median"], "scaling_efficiency_range": [eff["min"], eff["max"]],
           "rank_spread_s": spread([r["rank_spread_s"] for r in runs])["median"],
           "peak_memory_gb_per_rank": peaks, "launcher_cpu": mid("launcher_cpu"),
           "launcher_cpu_range": [spread([r["launcher_cpu"] for r in rounds])[k] for k in ("min", "max")],
           "other_cpu": mid("other_cpu"),
           "tokens_per_step_mean": last["tokens_per_step_mean"], "steps_measured": last["steps_measured"],
           "final_train_loss": last["final_train_loss"], "global_batch": last["global_batch"],
           "per_round": rounds, "excluded_rounds": list(excluded.values()), "valid": True, "invalid_reason": None}
    for extension in plan.extensions:  # medians of what the extensions added to each round
        row.update(getattr(extension, "row", lambda *a: {})(plan, n, rounds, mid))
    return row


def _check(row: dict, base_row: dict) -> str | None:
    """Why an N-rank row's efficiency cannot be a result, or None."""
    eff = row["scaling_efficiency"]
    if row["world_size"] == 1 or eff is None or eff <= 1.0:
        return None
    if row["rounds"] < 2:
        return (f"efficiency {eff:.0%} from one round, whose noise is unknown; above 100% it cannot be a "
                "result (use --rounds 2 or more)")
    noise = max(row["tokens_per_s_noise"] or 0.0, base_row["tokens_per_s_noise"] or 0.0)
    if eff > 1.0 + noise:
        return (f"efficiency {eff:.0%} is above 100% + the measured noise {noise:.0%} (tokens/s spread over "
                "rounds): the 1-rank and N-rank runs did not see the same machine; rerun on a quiet one")
    return None


def summarize(plan: Plan, measured: dict) -> tuple[list[dict], list[str]]:
    """Rows per launcher and world size from every round measured so far, and what still needs re-measuring.

    Args:
        plan (Plan): Launchers, world sizes, and the rounds wanted.
        measured (dict): Measurement (``scaling_report.measure_ours`` plus ``launcher_cpu``) by :class:`Run`.

    Returns:
        tuple: The rows (invalid ones marked, with the reason), and the problems another round
        could fix (a baseline round left out while fewer than ``plan.rounds`` rounds remain,
        or an invalid efficiency); empty when the figures can stand.
    """
    rows, problems = [], []
    for launcher in plan.launchers:
        rounds = sorted({run.round for run in measured if run.launcher == launcher and run.kind == "ours"})
        base = {i: measured[Run("ours", 1, launcher, i)]["tokens_per_s"] for i in rounds
                if Run("ours", 1, launcher, i) in measured}
        excluded = {**disturbed_rounds(plan, launcher, rounds, measured), **baseline_outliers(base)}
        kept = [i for i in rounds if i not in excluded]
        if excluded and len(kept) < plan.rounds:
            problems += [f"{launcher}, {reason}" for reason in excluded.values()]
        if not kept:  # every round disturbed: report them all, and say so
            kept, excluded = rounds, {-1: "every round ran next to other load or far below the others; "
                                          "these figures come from all of them"}
        launcher_rows = [row for row in (_row(plan, launcher, n, kept, measured, excluded) for n in plan.sizes)
                         if row is not None]
        base_row = next((row for row in launcher_rows if row["world_size"] == 1), None)
        for row in launcher_rows:
            reason = _check(row, base_row) if base_row else None
            if reason:
                row["valid"], row["invalid_reason"] = False, reason
                problems.append(f"{launcher}, {row['world_size']} ranks: {reason}")
        rows += launcher_rows
    return rows, problems


def notes(rows: list[dict]) -> list[str]:
    """Sentences for the report: rounds left out, rows marked invalid."""
    out = []
    for row in rows:
        if row["world_size"] == 1 and row["excluded_rounds"]:
            out.append(f"{row['launcher']}: rounds left out (and re-measured while --max-extra-rounds allowed): "
                       + "; ".join(row["excluded_rounds"]))
        if not row["valid"]:
            out.append(f"{row['launcher']}, {row['world_size']} ranks: not a result: {row['invalid_reason']}")
    return out
