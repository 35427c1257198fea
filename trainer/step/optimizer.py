"""Optimizer and learning-rate schedule from the recipe: small registries over mlx.optimizers."""

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
