"""Gradient checkpointing of one model's blocks (``training.grad_checkpoint``): recompute each in backward.

mlx-lm's ``grad_checkpoint(layer)`` rewrites ``__call__`` of the layer's
*class*, so every model of that class in the process recomputes its blocks
from then on, the user's own models included. Here each block of *this*
model gets a subclass of its own class whose ``__call__`` is checkpointed
(made once per class), as the attention and loss routes do
(``trainer.model.routing``): other models of the same class are untouched.
"""

import mlx.core as mx
import mlx.nn as nn

_classes: dict = {}


def _checkpointed(cls: type) -> type:
    """``cls`` with a ``__call__`` that keeps only its inputs and recomputes the rest in backward (mlx-lm's)."""
    if cls not in _classes:
        call = cls.__call__

        def __call__(self, *args, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return call(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        _classes[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                    "_checkpointed_from": cls})
    return _classes[cls]


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each of ``model``'s transformer blocks in backward; no other model changes."""
    for block in model.layers:
        if "_checkpointed_from" not in type(block).__dict__:  # twice is once
            block.__class__ = _checkpointed(type(block))


def uncheckpoint_blocks(model: nn.Module) -> None:
    """Give ``model``'s blocks their own classes back."""
    for block in model.layers:
        block.__class__ = type(block).__dict__.get("_checkpointed_from", type(block))
