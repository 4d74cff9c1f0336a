"""The optax optimiser described by a TrainConfig."""

import jax.numpy as jnp
import optax

from jaxicl.train.config import TrainConfig

# TrainConfig fields that may differ between the members of a vmapped sweep: they are passed to
# build_optimizer as (possibly traced) arrays and live in the optimiser state (inject_hyperparams).
SWEEPABLE_OPTIMIZER_FIELDS = ("lr", "weight_decay", "warmup_steps")


def unit_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning-rate schedule with peak 1; multiply by the peak lr (vmap-safe for sweeps)."""
    if cfg.schedule == "constant":
        return optax.constant_schedule(1.0)
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, cfg.warmup_steps, cfg.steps)


def traced_warmup_cosine(warmup_steps, total_steps: int) -> optax.Schedule:
    """optax.warmup_cosine_decay_schedule(0, 1, warmup_steps, total_steps) for a traced warmup_steps.

    The optax constructor branches in Python on warmup_steps, so it cannot take a per-member value.
    """

    def unit(count):
        count = jnp.asarray(count, jnp.float32)
        warmup = jnp.asarray(warmup_steps, jnp.float32)
        rise = count / jnp.maximum(warmup, 1.0)
        decay_steps = jnp.maximum(total_steps - warmup, 1.0)
        fall = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(count - warmup, decay_steps) / decay_steps))
        return jnp.where(count < warmup, rise, fall)

    return unit


def build_optimizer(cfg: TrainConfig, *, lr=None, weight_decay=None, warmup_steps=None) -> optax.GradientTransformation:
    """make_optimizer(cfg) with lr / weight_decay / warmup_steps replaced by (possibly traced) values."""
    lr = cfg.lr if lr is None else lr
    weight_decay = cfg.weight_decay if weight_decay is None else weight_decay
    unit = unit_schedule(cfg)
    if warmup_steps is not None and cfg.schedule == "warmup_cosine":
        unit = traced_warmup_cosine(warmup_steps, cfg.steps)
    schedule = lambda count: lr * unit(count)  # noqa: E731
    if cfg.optimizer == "adam":
        opt = optax.adam(schedule)
    elif cfg.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=weight_decay)
    else:
        opt = optax.sgd(schedule)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm else opt


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm (if clip_norm > 0) followed by adam / adamw / sgd on lr * unit_schedule."""
    return build_optimizer(cfg)


def sweep_optimizer(cfg: TrainConfig, swept: tuple[str, ...]) -> optax.GradientTransformation:
    """make_optimizer(cfg) with the `swept` hyperparameters held per member in the optimiser state.

    Uses optax.inject_hyperparams: the state's `hyperparams[name]` holds the member's value, so a
    stack of states vmapped through one `tx.update` trains members with different values, and the
    values are checkpointed with the state. Without swept fields this is make_optimizer(cfg).
    """
    if not swept:
        return make_optimizer(cfg)
    def factory(lr=None, weight_decay=None, warmup_steps=None):
        return build_optimizer(cfg, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)

    return optax.inject_hyperparams(factory)(**{name: float(getattr(cfg, name)) for name in swept})
