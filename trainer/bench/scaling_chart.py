"""The PNG of ``mlx-dp bench scaling``: tokens/s and scaling efficiency against world size.

Drawn with ``trainer.bench.png`` (standard library only), so the chart works
after a plain install on any platform. One colour per launcher; a filled dot
is the median over rounds and a vertical bar its range; dashed lines are the
same runs with communication skipped; the grey dotted line is perfect
scaling; an invalid efficiency (``scaling_rounds``) is a hollow square; an
``x`` is mlx_lm.lora on the same work.
"""

import math
from pathlib import Path

from .png import GLYPH_H, Canvas

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
BLACK, GREY, LIGHT = (30, 30, 30), (150, 150, 150), (225, 225, 225)
WIDTH, HEIGHT = 1100, 520
TOP, BOTTOM, LEFT, GAP = 60, 150, 70, 90  # margins around the two panels


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``top``: steps of 1, 2 or 5 times a power of ten."""
    if not top or top <= 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(int(math.ceil(top / step)) + 1)]


def _label(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:g}"


class Panel:
    """One plot area: maps (world size, value) to pixels and draws axes, ticks and a title."""

    def __init__(self, canvas: Canvas, box: tuple, sizes: list[int], top: float, title: str, percent: bool):
        self.canvas, (self.x0, self.y0, self.x1, self.y1) = canvas, box
        self.sizes, self.ticks, self.percent = sizes, nice_ticks(top), percent
        self.top = self.ticks[-1]
        canvas.text((self.x0 + self.x1) / 2, self.y0 - 22, title, BLACK, scale=2, anchor="center")
        for tick in self.ticks:
            y = self.y(tick)
            canvas.line(self.x0, y, self.x1, y, LIGHT)
            text = f"{tick * 100:.0f}%" if percent else _label(tick)
            canvas.text(self.x0 - 6, y - GLYPH_H, text, BLACK, scale=2, anchor="right")
        for size in sizes:
            canvas.text(self.x(size), self.y1 + 8, str(size), BLACK, scale=2, anchor="center")
        canvas.text((self.x0 + self.x1) / 2, self.y1 + 30, "world size (ranks)", BLACK, scale=2, anchor="center")
        canvas.rect(self.x0, self.y0, self.x1, self.y1, BLACK, fill=False)

    def x(self, size: int) -> float:
        if len(self.sizes) == 1:
            return (self.x0 + self.x1) / 2
        span = self.sizes[-1] - self.sizes[0]
        return self.x0 + 40 + (size - self.sizes[0]) / span * (self.x1 - self.x0 - 80)

    def y(self, value: float) -> float:
        return self.y1 - min(max(value, 0.0), self.top) / self.top * (self.y1 - self.y0)

    def series(self, points: list[tuple], color: tuple, dash: tuple | None = None, shape: str | None = "o") -> None:
        """A line through (size, value) points, with a marker at each (none for ``shape=None``)."""
        points = [(n, v) for n, v in points if v is not None]
        for (n0, v0), (n1, v1) in zip(points, points[1:]):
            self.canvas.line(self.x(n0), self.y(v0), self.x(n1), self.y(v1), color, width=2, dash=dash)
        for n, v in points if shape else []:
            self.canvas.marker(self.x(n), self.y(v), color, shape=shape)

    def bar(self, size: int, low: float | None, high: float | None, color: tuple) -> None:
        """The min-max range of one point over rounds."""
        if low is None or high is None:
            return
        x = self.x(size)
        self.canvas.line(x, self.y(low), x, self.y(high), color, width=2)
        for v in (low, high):
            self.canvas.line(x - 5, self.y(v), x + 5, self.y(v), color, width=2)


def write_png(doc: dict, path: Path) -> None:
    """Draw the benchmark's document ``doc`` (as ``scaling.run_all`` returns it) into ``path``."""
    results = doc["results"]
    sizes = sorted({r["world_size"] for r in results})
    launchers = list(dict.fromkeys(r["launcher"] for r in results))
    canvas = Canvas(WIDTH, HEIGHT)
    canvas.text(WIDTH / 2, 10, f"mlx-dp bench scaling: {doc['recipe']} (BLAS {doc['blas']}, link {doc['link']}, "
                f"{doc.get('rounds', 1)} round(s))", BLACK, scale=2, anchor="center")
    width = (WIDTH - 2 * LEFT - GAP) / 2
    tps_top = max([(r.get("tokens_per_s_range") or [0, 0])[1] or 0 for r in results]
                  + [r["tokens_per_s"] or 0 for r in results]
                  + [(r["tokens_per_s"] or 0) * max(sizes) for r in results if r["world_size"] == 1]  # perfect
                  + [c["mlx_lm"].get("tokens_per_s_our_definition") or 0 for c in doc.get("vs_mlx_lm") or []])
    eff_top = max([1.1] + [(r.get("scaling_efficiency_range") or [0, 0])[1] or 0 for r in results])
    tps = Panel(canvas, (LEFT, TOP, LEFT + width, HEIGHT - BOTTOM), sizes, tps_top * 1.05, "global tokens/s",
                percent=False)
    eff = Panel(canvas, (LEFT + width + GAP, TOP, WIDTH - LEFT / 2, HEIGHT - BOTTOM), sizes, eff_top,
                "scaling efficiency", percent=True)
    legend = []
    for i, launcher in enumerate(launchers):
        color = COLORS[i % len(COLORS)]
        rows = sorted((r for r in results if r["launcher"] == launcher), key=lambda r: r["world_size"])
        tps.series([(r["world_size"], r["tokens_per_s"]) for r in rows], color)
        for r in rows:
            tps.bar(r["world_size"], *(r.get("tokens_per_s_range") or (None, None)), color)
        valid = [r for r in rows if r.get("valid", True)]
        eff.series([(r["world_size"], r["scaling_efficiency"]) for r in valid], color)
        for r in valid:
            eff.bar(r["world_size"], *(r.get("scaling_efficiency_range") or (None, None)), color)
        for r in rows:
            if not r.get("valid", True):
                eff.canvas.marker(eff.x(r["world_size"]), eff.y(min(r["scaling_efficiency"] or 0, eff.top)),
                                  color, shape="s", size=6)
        skipped = [r for r in rows if r.get("comm_skipped")]
        if skipped:
            tps.series([(1, rows[0]["tokens_per_s"])] + [(r["world_size"], r["comm_skipped"]["tokens_per_s"])
                                                        for r in skipped], color, dash=(8, 6))
            eff.series([(1, 1.0)] + [(r["world_size"], r["scaling_efficiency_comm_skipped"]) for r in skipped],
                       color, dash=(8, 6))
        legend.append((f"{launcher}", color, None, "o"))
        if skipped:
            legend.append((f"{launcher}, communication skipped", color, (8, 6), "o"))
        one = next((r["tokens_per_s"] for r in rows if r["world_size"] == 1), None)
        if one and i == 0:
            tps.series([(n, one * n) for n in sizes], GREY, dash=(2, 4), shape=None)
    for c in doc.get("vs_mlx_lm") or []:
        color = COLORS[launchers.index(c["launcher"]) % len(COLORS)] if c["launcher"] in launchers else BLACK
        value = c["mlx_lm"].get("tokens_per_s_our_definition")
        if value:
            canvas.marker(tps.x(c["world_size"]), tps.y(value), color, shape="x", size=6)
            legend.append((f"mlx_lm.lora under {c['launcher']}", color, None, "x"))
    legend.append((f"perfect scaling of {launchers[0]}", GREY, (2, 4), None))
    if any(not r.get("valid", True) for r in results):
        legend.append(("invalid efficiency (see the table's notes)", BLACK, None, "s"))
    _legend(canvas, legend, LEFT, HEIGHT - BOTTOM + 60)
    canvas.save(path)


def _legend(canvas: Canvas, entries: list[tuple], x0: float, y0: float) -> None:
    """Entries in two columns below the panels: a line or marker sample, then the label."""
    column = (WIDTH - 2 * x0) / 2
    for i, (label, color, dash, shape) in enumerate(entries):
        x, y = x0 + (i % 2) * column, y0 + (i // 2) * 20
        if shape not in ("x", "s"):  # a line sample; a lone marker stands for a single point
            canvas.line(x, y + 6, x + 30, y + 6, color, width=2, dash=dash)
        if shape is not None:
            canvas.marker(x + 15, y + 6, color, shape=shape)
        canvas.text(x + 40, y, label, BLACK, scale=2)
