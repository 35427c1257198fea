"""Small statistics shared by the benchmarks."""

import statistics


def median(xs):
    """The median, or NaN for no samples."""
    return statistics.median(xs) if xs else float("nan")


def p90(xs):
    """The 90th percentile (nearest rank), or NaN for no samples."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))] if xs else float("nan")
