"""The objectives by name: the one place that reads ``method.objective``.

A new objective is a class keeping :class:`trainer.objectives.base.Objective`
and one line here (docs/INTERNALS.md, "Adding an objective"); the recipe
schema lists the names for validation (``tests/test_objectives.py`` keeps
the two lists equal).
"""

from .base import Objective, TokenLoss
from .grpo import GRPO
from .preference import DPO, ORPO
from .sft import SFT

OBJECTIVES: dict = {"sft": SFT, "dpo": DPO, "orpo": ORPO, "grpo": GRPO}


def objective_class(cfg) -> type:
    """The class of a recipe's objective (its unit, rows per item and other declarations, without building it)."""
    return OBJECTIVES[cfg.method.objective]


def make_objective(cfg, nll: TokenLoss | None = None) -> Objective:
    """The objective of a recipe, checked against the recipe's other keys.

    Args:
        cfg (trainer.config.load.Config): The recipe.
        nll (TokenLoss | None): How token losses are computed (the run's kernels).
            Default: MLX's own cross-entropy.

    Raises:
        ConfigError: A key that does not apply to this objective (e.g. ``data.packing`` for pairs).
    """
    objective = objective_class(cfg)(cfg.method, nll)
    objective.check(cfg)
    return objective
