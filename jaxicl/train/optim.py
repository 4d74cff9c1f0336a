"""The optax optimiser described by a TrainConfig."""

import optax

from jaxicl.train.config import TrainConfig


def unit_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning-rate schedule with peak 1; multiply by the peak lr (vmap-safe for sweeps)."""
    if cfg.schedule == "constant":
        return optax.constant_schedule(1.0)
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, cfg.warmup_steps, cfg.steps)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm (if clip_norm > 0) followed by adam / adamw / sgd on lr * unit_schedule."""
    unit = unit_schedule(cfg)
    schedule = lambda count: cfg.lr * unit(count)  # noqa: E731
    if cfg.optimizer == "adam":
        opt = optax.adam(schedule)
    elif cfg.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    else:
        opt = optax.sgd(schedule)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm else opt
