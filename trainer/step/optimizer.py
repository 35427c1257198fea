"""The optimizer from the recipe (small registries over mlx.optimizers), and how it is applied.

**Applied one gradient bucket at a time.**

``optimizer.update(model, grads)`` in one compiled call builds every new
weight and every new moment while the old ones are still alive: on a full
fine-tune with AdamW that is a second copy of the weights and of both
moments at the top of each step. Applied bucket by bucket, with each bucket
evaluated before the next, the extra memory is one bucket's worth (the peak it
saved: docs/RESULTS.md, "Bigger models"). Two pieces make that exact:

* the decision to apply the update at all (a non-finite loss or gradient
  norm skips it, the same on every rank) is taken once, before any bucket,
  so no bucket needs ``where(finite, new, old)``, which would keep old and
  new alive together;
* the optimizer's bookkeeping (the step count and scheduled learning rate)
  advances once per update through ``apply_gradients`` of an empty tree,
  mlx.optimizers' own code; each bucket then uses the optimizer's own
  ``apply_single``, compiled per bucket.

Used by both update kinds (``trainer.step.updates``): weights by name, or flat
weight shards by bucket.
"""

import mlx.core as mx
import mlx.optimizers as optim

from ..config.load import TrainingConfig

# Each optimizer of mlx.optimizers with the recipe keys it takes.
OPTIMIZERS = {
    "adamw": lambda lr, t: optim.AdamW(lr, betas=list(t.betas), eps=t.eps, weight_decay=t.weight_decay),
    "adam": lambda lr, t: optim.Adam(lr, betas=list(t.betas), eps=t.eps),
    "sgd": lambda lr, t: optim.SGD(lr, momentum=t.momentum, weight_decay=t.weight_decay),
    # a fixed learning rate, as every other optimizer here: no relative steps or parameter scaling
    "adafactor": lambda lr, t: optim.Adafactor(lr, relative_step=False, scale_parameter=False),
}


def build_schedule(cfg: TrainingConfig, total_steps: int):
    """Warmup then constant, cosine or linear decay, as an mlx.optimizers schedule.

    Args:
        cfg (TrainingConfig): learning_rate, lr_schedule, warmup_steps,
            warmup_init and min_learning_rate are used.
        total_steps (int): Optimizer updates in the whole run; decay ends there.

    Returns:
        A float (constant, no warmup) or a callable ``step -> lr``.
    """
    peak = cfg.learning_rate
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(peak, decay_steps, cfg.min_learning_rate)
    elif cfg.lr_schedule == "linear":
        main = optim.linear_schedule(peak, cfg.min_learning_rate, decay_steps)
    else:
        main = None
    if cfg.warmup_steps == 0:
        return peak if main is None else main
    ramp = optim.linear_schedule(cfg.warmup_init, peak, cfg.warmup_steps)
    # Shift by one so the first update already moves (mlx calls the schedule
    # with the update count, starting at 0) and update warmup_steps-1 is at peak.
    warmup = lambda step: ramp(step + 1)  # noqa: E731
    return optim.join_schedules([warmup, main or (lambda step: peak)], [cfg.warmup_steps])


def build_optimizer(cfg: TrainingConfig, total_steps: int) -> optim.Optimizer:
    """The recipe's optimizer with its schedule.

    Args:
        cfg (TrainingConfig): The training section.
        total_steps (int): Optimizer updates in the whole run.
    """
    return OPTIMIZERS[cfg.optimizer](build_schedule(cfg, total_steps), cfg)


def state_node(tree, name: str):
    """The optimizer state of parameter ``name`` (``a.b.0.c``) in a state tree mirroring the parameters."""
    node = tree
    for part in name.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def global_norm(grads) -> mx.array:
    """The gradient norm as ``mlx.optimizers.clip_grad_norm`` computes it, in float32."""
    return mx.sqrt(sum(mx.square(g.astype(mx.float32)).sum() for g in grads))


def clip_scale(norm: mx.array, max_grad_norm: float | None):
    """``clip_grad_norm``'s factor (1 without clipping)."""
    return 1.0 if max_grad_norm is None else mx.minimum(max_grad_norm / (norm + 1e-6), 1.0)


class BucketedOptimizer:
    """The optimizer applied to groups of parameters, one compiled function per group.

    Args:
        optimizer: An mlx.optimizers optimizer, initialised with the parameters.
        groups (list[list[str]]): Parameter names (dotted paths into the state
            tree) per group, e.g. the gradient buckets.
    """

    def __init__(self, optimizer, groups: list[list[str]]):
        self.optimizer = optimizer
        self.groups = groups
        self._fns = [self._compile(group) for group in groups]

    def _compile(self, group: list[str]):
        optimizer = self.optimizer

        @mx.compile
        def apply(grads: dict, params: dict, states: dict, lr, step, scale):
            # apply_single reads the learning rate and step count from optimizer.state: give it this
            # call's (traced) values, so they are inputs of the compiled function, not constants.
            saved = optimizer.state["learning_rate"], optimizer.state["step"]
            optimizer.state["learning_rate"], optimizer.state["step"] = lr, step
            try:
                new = {name: optimizer.apply_single(grads[name] * scale, params[name], states[name])
                       for name in group}
            finally:
                optimizer.state["learning_rate"], optimizer.state["step"] = saved
            return new, states

        return apply

    def advance(self) -> None:
        """Advance the step count and the scheduled learning rate once for this update."""
        self.optimizer.apply_gradients({}, {})

    def apply(self, index: int, grads: dict, params: dict, scale) -> dict:
        """New values of group ``index``'s parameters (lazy); its optimizer state is updated in place.

        The compiled function sees this group's state only: its outputs are
        siblings in MLX's graph (alive as long as one of them is), so a wider
        function would keep every group's old moments alive with each group's
        new weights.
        """
        state = self.optimizer.state
        nodes = {name: state_node(state, name) for name in self.groups[index]}
        new, states = self._fns[index](grads, params, {n: dict(s) for n, s in nodes.items()},
                                       state["learning_rate"], state["step"], scale)
        for name, node in nodes.items():
            node.update(states[name])
        return new
