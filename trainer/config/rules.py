"""The recipe's value rules: bounds nothing can take, and the one wording of an impossible value.

The sections of ``trainer.config.schema`` and ``trainer.config.running`` check their
keys with these in ``__post_init__``; ``_doc`` declares a key with its one-line
description (``mlx-dp recipes keys``). It imports nothing from MLX.
"""

import dataclasses
from dataclasses import field
from typing import Optional

from ..errors import ConfigError, short


def _suggest(name: str, options) -> str:
    """`; did you mean X?` for the closest option, or an empty string."""
    import difflib

    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


# Bounds of values that MLX, numpy or Python cannot take, whatever the recipe means.
MAX_COUNT = 2**31 - 1  # counts and lengths: MLX's shapes and the schedule's step counter are 32-bit integers
MAX_BYTES = 2**63 - 1  # a byte count compared with MLX's (64-bit) memory counters
SEED_LIMIT = 2**64  # mx.random.seed takes an unsigned 64-bit seed (numpy's default_rng any integer >= 0)
MAX_WAIT_S = 1e9  # Python's thread and socket waits overflow past about 9.2e9 s (threading.TIMEOUT_MAX)


def _refuse(key: str, rule: str, value) -> ConfigError:
    """``ConfigError("{key} must be {rule}, got {value}")``: the one wording of an impossible value."""
    return ConfigError(f"{key} must be {rule}, got {short(value)}")


def _count(key: str, value: Optional[int], low: int = 1, rule: Optional[str] = None) -> None:
    """Refuse an integer below ``low`` or above ``MAX_COUNT``; ``None`` ("not set") passes.

    ``rule`` words the lower bound (default ``at least 1`` / ``>= 0``).
    """
    if value is None:
        return
    if value < low:
        raise _refuse(key, rule or ("at least 1" if low == 1 else f">= {low}"), value)
    if value > MAX_COUNT:
        raise _refuse(key, f"at most {MAX_COUNT} (MLX's counts and shapes are 32-bit)", value)


def _named(key: str, value: Optional[str], what: str = "a name") -> None:
    """Refuse an empty (or blank) string; ``None`` ("not set") passes."""
    if value is not None and not value.strip():
        raise _refuse(key, f"{what}, not an empty string", value)


def _seconds(key: str, value: Optional[float]) -> None:
    """Refuse a duration that is not positive or that Python's waits cannot take; ``None`` passes."""
    if value is not None and not 0 < value <= MAX_WAIT_S:
        raise _refuse(key, f"positive and at most {MAX_WAIT_S:g} s", value)


def _doc(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    """A dataclass field with a one-line description (shown by `mlx-dp recipes keys`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})
