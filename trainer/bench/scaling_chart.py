"""The chart of ``mlx-dp bench scaling``: tokens/s and scaling efficiency against world size.

Drawn with matplotlib when it is installed (``pip install 'mlx-dp[plot]'``);
without it the benchmark says so before it measures anything and writes the
table and the JSON only. One colour per launcher; a dot is the median over
rounds and a bar its range; the grey dotted line is perfect scaling; an
invalid efficiency (``scaling_rounds``) is a hollow square. Extensions of the
plan may draw more (``chart(doc, panels)``, see ``trainer/bench/scaling.py``).
"""

from pathlib import Path


def chart_backend():
    """matplotlib's ``pyplot`` with a file-only backend, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no window, no display needed
    import matplotlib.pyplot as plt

    return plt


def _errors(values: list[float], ranges: list) -> list[list[float]] | None:
    """matplotlib's asymmetric error bars from medians and [min, max] ranges."""
    if not all(r and None not in r for r in ranges):
        return None
    return [[v - r[0] for v, r in zip(values, ranges)], [r[1] - v for v, r in zip(values, ranges)]]


def write_chart(doc: dict, path: Path, extensions=()) -> None:
    """Draw the benchmark's document ``doc`` (as ``scaling.run_all`` returns it) into ``path`` (PNG, SVG, PDF)."""
    plt = chart_backend()
    results = doc["results"]
    sizes = sorted({r["world_size"] for r in results})
    launchers = list(dict.fromkeys(r["launcher"] for r in results))
    fig, (tps, eff) = plt.subplots(1, 2, figsize=(11, 4.8))
    fig.suptitle(f"mlx-dp bench scaling: {doc['recipe']} (BLAS {doc['blas']}, link {doc['link']}, "
                 f"{doc.get('rounds', 1)} round(s))")
    colors = {launcher: f"C{i}" for i, launcher in enumerate(launchers)}
    for launcher in launchers:
        rows = sorted((r for r in results if r["launcher"] == launcher), key=lambda r: r["world_size"])
        color = colors[launcher]
        x, y = [r["world_size"] for r in rows], [r["tokens_per_s"] for r in rows]
        tps.errorbar(x, y, yerr=_errors(y, [r.get("tokens_per_s_range") for r in rows]), color=color,
                     marker="o", capsize=4, label=launcher)
        valid = [r for r in rows if r.get("valid", True) and r["scaling_efficiency"] is not None]
        ye = [r["scaling_efficiency"] for r in valid]
        eff.errorbar([r["world_size"] for r in valid], ye, color=color, marker="o", capsize=4, label=launcher,
                     yerr=_errors(ye, [r.get("scaling_efficiency_range") for r in valid]))
        for r in rows:
            if not r.get("valid", True):
                eff.plot([r["world_size"]], [r["scaling_efficiency"] or 0], marker="s", markerfacecolor="none",
                         color=color, linestyle="none", label="invalid (see the table's notes)")
    one = next((r["tokens_per_s"] for r in results if r["world_size"] == 1 and r["launcher"] == launchers[0]), None)
    if one:
        tps.plot(sizes, [one * n for n in sizes], color="grey", linestyle=":", label="perfect scaling")
    eff.axhline(1.0, color="grey", linestyle=":")
    for extension in extensions:
        if hasattr(extension, "chart"):
            extension.chart(doc, {"tokens_per_s": tps, "efficiency": eff, "colors": colors})
    tps.set(title="global tokens/s", xlabel="world size (ranks)", xticks=sizes)
    eff.set(title="scaling efficiency", xlabel="world size (ranks)", xticks=sizes)
    eff.yaxis.set_major_formatter(lambda value, _pos: f"{value:.0%}")
    tps.set_ylim(bottom=0)
    eff.set_ylim(bottom=0)
    for ax in (tps, eff):
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
