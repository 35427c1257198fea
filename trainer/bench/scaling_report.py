"""The numbers of ``mlx-dp bench scaling``: step statistics, scaling ratios,
the comparison with mlx-lm and the printed table (the chart is in ``scaling_chart``).

Everything here is pure (files in, dicts and text out; nothing is launched),
so the maths is unit-tested on synthetic numbers. Definitions, for N ranks
with the per-rank batch fixed (N ranks do N times the work of one per step):

* tokens/s: loss tokens of the measured updates over their summed wall time
  (rank 0's, which includes waiting for peers);
* speedup: tokens/s(N) / tokens/s(1), both launched the same way;
* scaling efficiency: tokens/s(N) / (N x tokens/s(1));
* exposed communication share: (t_N - t_N_skip) / t_N on median step times,
  where t_N_skip comes from a run whose reducer skips every all_sum;
* rank spread: the median over steps of (slowest - fastest rank's step time);
* launcher CPU: the launcher process's own CPU time over wall time while its
  ranks ran, in cores (its threads, not the ranks);
* others: the CPU other processes took during a run (the machine's busy time
  minus the job's own), in cores.

Each ratio is taken within one round and reported as the median over rounds
with its range (``scaling_rounds``).
"""

import json
import os
from pathlib import Path

from .stats import median, p90


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; [] when it does not exist. A torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a rank killed mid-write leaves half a line
    return records


# ---------------------------------------------------------------------------- the maths


def throughput(tokens: list[float], step_times: list[float]) -> float | None:
    """Tokens per second over a window: all tokens over all the time, not a mean of ratios."""
    total = sum(step_times)
    return sum(tokens) / total if step_times and total > 0 else None


def speedup(tokens_per_s: float | None, base_tokens_per_s: float | None) -> float | None:
    """tokens/s at N ranks over tokens/s at one rank."""
    if not tokens_per_s or not base_tokens_per_s:
        return None
    return tokens_per_s / base_tokens_per_s


def scaling_efficiency(tokens_per_s: float | None, base_tokens_per_s: float | None,
                       world_size: int) -> float | None:
    """tokens/s(N) / (N x tokens/s(1)): 1.0 is perfect scaling.

    Args:
        tokens_per_s (float | None): Throughput at ``world_size`` ranks.
        base_tokens_per_s (float | None): Throughput of one rank, launched the same way.
        world_size (int): N.
    """
    ratio = speedup(tokens_per_s, base_tokens_per_s)
    return None if ratio is None else ratio / world_size


def exposed_comm_share(step_median_s: float | None, skip_step_median_s: float | None) -> float | None:
    """(t_N - t_N_skip) / t_N: the share of a step spent on communication nothing hid.

    Noise can make it slightly negative when communication is almost free; it is
    reported as measured, not clamped.
    """
    if not step_median_s or skip_step_median_s is None:
        return None
    return (step_median_s - skip_step_median_s) / step_median_s


def rank_spread(step_times_by_rank: dict[int, dict[int, float]]) -> float | None:
    """Median over steps of (slowest rank - fastest rank), using steps every rank recorded.

    Args:
        step_times_by_rank (dict): ``{rank: {step: seconds}}``.

    Returns:
        float | None: Seconds; 0.0 for one rank; None without a common step.
    """
    if not step_times_by_rank:
        return None
    common = set.intersection(*(set(steps) for steps in step_times_by_rank.values()))
    gaps = [max(t[s] for t in step_times_by_rank.values()) - min(t[s] for t in step_times_by_rank.values())
            for s in sorted(common)]
    return median(gaps) if gaps else None


def step_stats(step_times: list[float], tokens: list[float]) -> dict:
    """Throughput and step-time statistics of one measured window."""
    return {
        "tokens_per_s": throughput(tokens, step_times),
        "step_time_median_s": median(step_times) if step_times else None,
        "step_time_p90_s": p90(step_times) if step_times else None,
        "tokens_per_step_mean": sum(tokens) / len(tokens) if tokens else None,
        "steps_measured": len(step_times),
    }


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
        "self_reported_tokens_per_s": throughput(own_tokens, own_time),
        "self_reported_updates_per_s": median([by_update[u]["iterations_per_second"] for u in window])
        if window else None,
        "final_train_loss": last.get("train_loss"),
        "peak_memory_gb": last.get("peak_memory"),
    }


# ---------------------------------------------------------------------------- reading runs


def measure_ours(run_dir: Path, world_size: int, warmup: int, steps: int) -> dict:
    """Statistics of updates warmup+1 .. warmup+steps from the files a run wrote.

    Args:
        run_dir (Path): The run's checkpoint.dir (metrics.jsonl, metrics.rank<r>.jsonl).
        world_size (int): Ranks of the run.
        warmup (int): Updates left out at the start.
        steps (int): Updates measured.
    """
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in r]
    window = [r for r in records if warmup < r["step"] <= warmup + steps]
    if len(window) < steps:
        raise ValueError(f"{run_dir}/metrics.jsonl has {len(window)} of the {steps} measured updates")
    by_rank, peaks = {}, []
    for rank in range(world_size):
        rows = read_jsonl(run_dir / f"metrics.rank{rank}.jsonl")
        times = {r["step"]: r["step_time_s"] for r in rows if warmup < r["step"] <= warmup + steps}
        if times:
            by_rank[rank] = times
        peaks.append(max((r["peak_memory_gb"] for r in rows), default=None))
    return {
        **step_stats([r["step_time_s"] for r in window], [r["tokens"] for r in window]),
        "rank_spread_s": rank_spread(by_rank) if len(by_rank) == world_size else None,
        "rank_step_time_median_s": [median(list(by_rank[r].values())) if r in by_rank else None
                                    for r in range(world_size)],
        "peak_memory_gb_per_rank": peaks,
        "final_train_loss": records[-1]["train_loss"],
        "global_batch": records[-1]["global_batch"],
        # parallel.balance's split and each rank's own forward+backward time (metrics of every update)
        "rows_per_rank": window[-1].get("rows_per_rank"),
        "compute_s_per_rank": _per_rank_medians([r.get("compute_s_per_rank") for r in window]),
    }


def _per_rank_medians(rows: list) -> list[float] | None:
    """Median per rank of per-update lists (``None`` where the metric was not logged)."""
    rows = [r for r in rows if r]
    return [median(list(col)) for col in zip(*rows)] if rows else None


def machine_info() -> dict:
    """Where the benchmark ran: host, CPU count, versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"hostname": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "mlx": installed("mlx"),
            "mlx_lm": installed("mlx-lm"), "mlx_dp": __version__}


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


# ---------------------------------------------------------------------------- the table


def _fmt(value, spec: str, suffix: str = "") -> str:
    """``value`` formatted by ``spec`` plus ``suffix``, or a dash of the same width."""
    if value is None:
        width = spec.split(".")[0]
        return format("-", f">{int(width) + len(suffix)}") if width.isdigit() else "-"
    return format(value, spec) + suffix


def _pct(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def _range(values, spec: str = ".0f", scale: float = 1.0, suffix: str = "") -> str:
    low, high = values if values else (None, None)
    if low is None or high is None:
        return ""
    return f"({low * scale:{spec}}-{high * scale:{spec}}{suffix})"


def launcher_cpu_summary(results: list[dict]) -> dict:
    """Each launcher's own CPU use by world size: median and maximum over rounds, in cores."""
    summary = {}
    for r in results:
        if r.get("launcher_cpu") is not None:
            summary.setdefault(r["launcher"], {})[str(r["world_size"])] = {
                "median_cores": r["launcher_cpu"], "max_cores": r["launcher_cpu_range"][1]}
    return summary


def format_table(doc: dict) -> str:
    """The results as a text table, one row per launcher and world size."""
    s = doc["setup"]
    threads = f" ({doc['blas_threads_per_rank']} thread(s) per rank)" if doc.get("blas_threads_per_rank") else ""
    lines = [f"\nmlx-dp bench scaling: {doc['recipe']}, {s['per_rank_batch']} sequences per rank x "
             f"{s['grad_accumulation']} accumulation, {doc['steps']} measured updates (+{doc['warmup']} warm-up) "
             f"per run, {doc['rounds']} round(s), BLAS {doc['blas']}{threads}, link {doc['link']}",
             f"{'launcher':13s} {'ranks':>5s} {'tok/s':>7s} {'(min-max)':13s} {'median step':>11s} "
             f"{'speedup':>7s} {'effic.':>7s} {'(min-max)':11s} {'exposed comm':>12s} {'effic. no comm':>14s} "
             f"{'rank spread':>11s} {'peak mem/rank':>13s} {'launcher CPU':>12s} {'others':>6s}"]
    for r in doc["results"]:
        mem = max((m for m in r["peak_memory_gb_per_rank"] if m is not None), default=None)
        valid = r.get("valid", True)
        speed = _fmt(r["speedup"], "6.2f", "x") if valid else "invalid"
        eff = _pct(r["scaling_efficiency"]) if valid else "invalid"
        eff_range = _range(r.get("scaling_efficiency_range"), ".0f", 100, "%") if valid else ""
        lines.append(
            f"{r['launcher']:13s} {r['world_size']:5d} {_fmt(r['tokens_per_s'], '7.0f')} "
            f"{_range(r.get('tokens_per_s_range')):13s} {_fmt(r['step_time_median_s'], '10.3f', 's')} "
            f"{speed:>7s} {eff:>7s} {eff_range:11s} {_pct(r['exposed_comm_share']):>12s} "
            f"{_pct(r['scaling_efficiency_comm_skipped']):>14s} "
            f"{_fmt(None if r['rank_spread_s'] is None else r['rank_spread_s'] * 1e3, '8.1f', ' ms'):>11s} "
            f"{_fmt(mem, '10.3f', ' GB'):>13s} {_pct(r.get('launcher_cpu'), 1):>12s} "
            f"{_pct(r.get('other_cpu')):>6s}")
    lines.append("tok/s: global loss tokens per second of wall time, median over rounds (min-max); effic.: "
                 "tok/s(N) / (N x tok/s(1)) within each round, same launcher; exposed comm: (t_N - t_N with no "
                 "all_sum) / t_N on median steps; rank spread: median over steps of slowest - fastest rank; "
                 "launcher CPU: the launcher process's own CPU time over wall time while its ranks ran "
                 "(100% = one core); others: CPU that other processes on this machine took meanwhile")
    cpu = doc.get("launcher_cpu") or {}
    if cpu:
        lines.append("launcher CPU while ranks trained (median over rounds): " + "; ".join(
            f"{launcher} " + ", ".join(f"{_pct(v['median_cores'], 1)} of a core at {n} rank(s)"
                                       for n, v in sizes.items()) for launcher, sizes in cpu.items()))
    if doc.get("vs_mlx_lm"):
        lines.append(format_vs_mlx_lm(doc["vs_mlx_lm"]))
    for note in doc.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


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
            lines.append(f"{name:12s} {_fmt(side['updates_per_s'], '9.2f')} "
                         f"{_fmt(side['step_time_median_s'], '12.3f', 's')} "
                         f"{_fmt(side['self_reported_tokens_per_s'], '9.0f')} "
                         f"{_fmt(side['final_train_loss'], '22.4f')} {_fmt(side.get('valid_loss'), '24.4f')}")
        lines.append(f"speed ratio (mlx-dp / mlx_lm.lora updates per second = tokens/s under one token "
                     f"definition): {_fmt(c['tokens_per_s_ratio'], '.2f', 'x')} "
                     f"{_range(c.get('tokens_per_s_ratio_range'), '.2f', 1, 'x')} of wall time "
                     f"({_fmt(c['tokens_per_s_ratio_vs_its_own_timer'], '.2f', 'x')} against mlx-lm's own "
                     "step timer, which leaves out batch building and lazy tokenization)")
    lines.append("own tok/s is each tool's self-report: mlx-lm also scores the pad after each sample's EOS (one "
                 "extra target per sample) and times only the step; its train loss includes that target too, "
                 "so compare losses in the valid column")
    return "\n".join(lines)
