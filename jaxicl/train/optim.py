"""The optax optimiser a TrainConfig describes: one schedule, one builder, weight decay masked by path.

Schedules are lr * unit(step) with a peak-1 unit schedule ("constant", or "warmup_cosine": linear
warmup to 1 over warmup_steps, cosine decay to 0 at cfg.steps), written once with array arithmetic so
that warmup_steps may be a traced, per-member value. AdamW decays only the parameters whose path
matches none of cfg.no_decay (biases, LayerNorm scales, embeddings and position tables by default). Only the
nnx.Param variables (and plain arrays) of the parameters train: the optimiser leaves any other nnx.Variable (a frozen
projection, a fixed positional table, a mask) as it is (freeze_non_params).
"""

import fnmatch

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxicl.train.config import TrainConfig

# TrainConfig fields that may differ between the members of a vmapped sweep: make_optimizer(cfg, swept)
# holds them in the optimiser state (optax.inject_hyperparams), so they may be per-member arrays.
SWEEPABLE_OPTIMIZER_FIELDS = ("lr", "weight_decay", "warmup_steps")


def unit_schedule(cfg: TrainConfig, warmup_steps=None) -> optax.Schedule:
    """The peak-1 learning-rate schedule of cfg; warmup_steps (default cfg's) may be an array.

    Values are in the default float type (float64 under jax.enable_x64), so a float64 fit keeps its lr exact.
    """
    if cfg.schedule == "constant":
        return lambda count: 1.0
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps

    def unit(count):
        count = jnp.asarray(count, float)
        w = jnp.asarray(warmup, float)
        decay_steps = jnp.maximum(cfg.steps - w, 1.0)
        fall = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(count - w, 0.0, decay_steps) / decay_steps))
        return jnp.where(count < w, count / jnp.maximum(w, 1.0), fall)

    return unit


def path_names(path) -> tuple[str, ...]:
    """The components of a pytree key path as strings, e.g. ('layers', '0', 'norm', 'scale'); the trailing
    `.value` attribute of an nnx Variable is not a name and is left out."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def decay_mask(params, no_decay: tuple[str, ...]):
    """A pytree of bools like params: True where weight decay applies, i.e. no path component matches a
    glob pattern of no_decay (e.g. '*bias*', 'pos_table'): a pattern that matches a module's name exempts every
    parameter under it."""
    def decayed(path, _):
        return not any(fnmatch.fnmatchcase(name, pattern) for name in path_names(path) for pattern in no_decay)

    return jax.tree_util.tree_map_with_path(decayed, params)


def is_frozen(x) -> bool:
    """Whether x is an nnx.Variable other than an nnx.Param: state of the parameters the optimiser leaves as it is."""
    return isinstance(x, nnx.Variable) and not isinstance(x, nnx.Param)


def trained_part(tree):
    """tree (parameters, gradients or updates) without its frozen variables (is_frozen): the leaves that train."""
    return jax.tree.map(lambda x: None if is_frozen(x) else x, tree, is_leaf=is_frozen)


def freeze_non_params(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """tx on the leaves that train; the frozen variables (is_frozen) of the parameters get zero updates and no
    optimiser state (outside weight decay and clip_by_global_norm's norm too). On parameters without any (plain
    arrays, nnx.Param only) it is tx itself: the same optimiser state (its checkpoints) and updates."""
    def pick(tree) -> optax.GradientTransformation:
        if not any(is_frozen(x) for x in jax.tree.leaves(tree, is_leaf=is_frozen)):
            return tx
        labels = jax.tree.map(lambda x: "frozen" if is_frozen(x) else "trained", tree, is_leaf=is_frozen)
        return optax.partition({"trained": tx, "frozen": optax.set_to_zero()}, labels)

    def update(updates, state, params=None):
        return pick(updates).update(updates, state, params)

    return optax.GradientTransformation(lambda params: pick(params).init(params), update)


def make_optimizer(cfg: TrainConfig, swept: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """clip_by_global_norm (if clip_norm > 0), then adam / adamw / sgd on lr * unit_schedule, on the leaves that
    train (freeze_non_params).

    swept: names from SWEEPABLE_OPTIMIZER_FIELDS held per member in the optimiser state
    (`opt_state.hyperparams[name]`), so one `tx.update` vmapped over a stack of states trains
    members with different values, and the values are checkpointed with the state.
    """
    bad = set(swept) - set(SWEEPABLE_OPTIMIZER_FIELDS)
    if bad:
        raise ValueError(f"swept optimiser fields must be among {SWEEPABLE_OPTIMIZER_FIELDS}, got {sorted(bad)}")

    def build(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps):
        unit = unit_schedule(cfg, warmup_steps)
        schedule = lambda count: lr * unit(count)  # noqa: E731
        b1, b2 = cfg.betas
        if cfg.optimizer == "adam":
            opt = optax.adam(schedule, b1=b1, b2=b2)
        elif cfg.optimizer == "adamw":
            opt = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                              mask=lambda p: decay_mask(p, cfg.no_decay))
        else:
            opt = optax.sgd(schedule)
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm else opt
        return freeze_non_params(opt)

    if not swept:
        return build()
    return optax.inject_hyperparams(build)(**{name: float(getattr(cfg, name)) for name in swept})


def scheduled_lr(cfg: TrainConfig, opt_state, step) -> jax.Array:
    """The learning rate that make_optimizer(cfg, swept) applies at `step` (per member in a sweep)."""
    hp = getattr(opt_state, "hyperparams", {})
    return jnp.asarray(hp.get("lr", cfg.lr) * unit_schedule(cfg, hp.get("warmup_steps"))(step))
