"""The numbers of ``mlx-dp bench scaling``: step statistics, scaling ratios
and the printed table (the chart is in ``scaling_chart``).

Everything here is pure (files in, dicts and text out; nothing is launched),
so the maths is unit-tested on synthetic numbers. Definitions, for N ranks
with the per-rank batch fixed (N ranks do N times the work of one per step):

* tokens/s: loss tokens of the measured updates over their summed wall time
  (rank 0's, which includes waiting for peers);
* speedup: tokens/s(N) / tokens/s(1), both launched the same way;
* scaling efficiency: tokens/s(N) / (N x tokens/s(1));
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


# ---------------------------------------------------------------------------- the table


def fmt(value, spec: str, suffix: str = "") -> str:
    """``value`` formatted by ``spec`` plus ``suffix``, or a dash of the same width."""
    if value is None:
        width = spec.split(".")[0]
        return format("-", f">{int(width) + len(suffix)}") if width.isdigit() else "-"
    return format(value, spec) + suffix


def pct(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def fmt_range(values, spec: str = ".0f", scale: float = 1.0, suffix: str = "") -> str:
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
             f"{'speedup':>7s} {'effic.':>7s} {'(min-max)':11s} "
             f"{'rank spread':>11s} {'peak mem/rank':>13s} {'launcher CPU':>12s} {'others':>6s}"]
    for r in doc["results"]:
        mem = max((m for m in r["peak_memory_gb_per_rank"] if m is not None), default=None)
        valid = r.get("valid", True)
        speed = fmt(r["speedup"], "6.2f", "x") if valid else "invalid"
        eff = pct(r["scaling_efficiency"]) if valid else "invalid"
        eff_range = fmt_range(r.get("scaling_efficiency_range"), ".0f", 100, "%") if valid else ""
        lines.append(
            f"{r['launcher']:13s} {r['world_size']:5d} {fmt(r['tokens_per_s'], '7.0f')} "
            f"{fmt_range(r.get('tokens_per_s_range')):13s} {fmt(r['step_time_median_s'], '10.3f', 's')} "
            f"{speed:>7s} {eff:>7s} {eff_range:11s} "
            f"{fmt(None if r['rank_spread_s'] is None else r['rank_spread_s'] * 1e3, '8.1f', ' ms'):>11s} "
            f"{fmt(mem, '10.3f', ' GB'):>13s} {pct(r.get('launcher_cpu'), 1):>12s} "
            f"{pct(r.get('other_cpu')):>6s}")
    lines.append("tok/s: global loss tokens per second of wall time, median over rounds (min-max); effic.: "
                 "tok/s(N) / (N x tok/s(1)) within each round, same launcher; "
                 "rank spread: median over steps of slowest - fastest rank; "
                 "launcher CPU: the launcher process's own CPU time over wall time while its ranks ran "
                 "(100% = one core); others: CPU that other processes on this machine took meanwhile")
    cpu = doc.get("launcher_cpu") or {}
    if cpu:
        lines.append("launcher CPU while ranks trained (median over rounds): " + "; ".join(
            f"{launcher} " + ", ".join(f"{pct(v['median_cores'], 1)} of a core at {n} rank(s)"
                                       for n, v in sizes.items()) for launcher, sizes in cpu.items()))
    lines += doc.get("extra_tables", [])  # what the plan's extensions added
    for note in doc.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
