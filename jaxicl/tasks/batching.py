"""Generic batching of one-prompt samplers: vmap over keys, born sharded on the mesh."""

import inspect
import numbers
from collections.abc import Callable
from functools import partial

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxicl.prng import seed_key
from jaxicl.prompt import Prompt
from jaxicl.traced import Traced, trace
from jaxicl.validation import ConfigError

Sampler = Callable[[object, jax.Array], Prompt]

DATA_AXIS = "data"


def data_axis_size(axis: str = DATA_AXIS) -> int:
    """Size of `axis` in the current mesh (1 when no mesh is set or it lacks the axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        return 1
    return mesh.shape[axis]


def check_explicit(axis: str = DATA_AXIS) -> None:
    """Raises ConfigError unless the current mesh's `axis` has type Explicit (jax.reshard shards only over those)."""
    mesh = jax.sharding.get_abstract_mesh()
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if types[axis] != AxisType.Explicit:
        axes = ", ".join(f"{a!r}: {t.name}" for a, t in types.items())
        raise ConfigError(f"sampling a batch sharded over mesh axis {axis!r} needs it of type Explicit, got mesh axes "
                          f"{{{axes}}}; build the mesh with jaxicl.train.data_mesh or sweep_mesh, or jax.make_mesh("
                          f"..., axis_types=(jax.sharding.AxisType.Explicit, ...))")


def check_divisible(batch_size: int, axis: str = DATA_AXIS) -> None:
    """Raises ConfigError unless batch_size splits evenly over the mesh's `axis`."""
    n = data_axis_size(axis)
    if batch_size % n:
        raise ConfigError(
            f"batch_size={batch_size} does not divide over the {n} devices of mesh axis "
            f"'{axis}'; use a multiple of {n}")


POOL_STREAM = 0x9001  # folded into a fixed set's seed before the item index, so its keys are not nnx.Rngs(seed)'s


def pool_key(seed: int, index: jax.Array) -> jax.Array:
    """The key of item `index` of a fixed set (a task pool, a prompt set) made from `seed`:
    fold_in(fold_in(seed_key(seed), POOL_STREAM), index) (threefry2x32 whatever the run's prng_impl or JAX's
    default implementation). Without the stream, fold_in(key(seed), i) would be the key of the i-th parameter that
    nnx.Rngs(seed) initialises, so a pool would copy the initial weights of a model built with the same seed.
    """
    return jax.random.fold_in(jax.random.fold_in(seed_key(seed), POOL_STREAM), index)


def fixed_set_key(key: jax.Array, size: int, seed: int) -> jax.Array:
    """The key of a prompt drawn uniformly (by `key`) from a fixed set of `size` prompts.

    Prompt i of the set is always sampled from pool_key(seed, i), so a task trained on a finite dataset
    regenerates it on device instead of storing it.
    """
    return pool_key(seed, jax.random.randint(key, (), 0, size))


def takes_step(sample: Sampler) -> bool:
    """Whether the sampler takes the training step as a keyword (a curriculum: sample(cfg, key, step=...))."""
    return "step" in inspect.signature(sample).parameters


def sample_batch(sample: Sampler, cfg, key: jax.Array, batch_size: int, axis: str | None = DATA_AXIS,
                 task_params: dict | None = None, step: jax.Array | None = None) -> Prompt:
    """batch_size prompts from `sample(cfg, key, **task_params)`: every leaf gets a leading [batch_size] axis.

    task_params holds values of task fields that the sampler takes as keywords (the fields a sweep may vary per
    member, e.g. noise_std): arrays are traced (one program for every value), plain numbers are constants of the
    program, which the sampler checks as in a direct call; None means the values in cfg. step: the training step,
    passed on to a sampler that takes it (takes_step; then it is required).

    Under `jax.set_mesh(mesh)` with an `axis` in the mesh, the per-prompt keys are resharded over
    that axis before the vmap, so each device samples its own slice and no data crosses the host (an axis of type
    Explicit: ConfigError for one of type Auto, the type jax.sharding.Mesh gives by default).
    Values do not depend on the mesh (for keys of every implementation in jaxicl.prng.PRNG_IMPLS), nor on the mesh
    the key was made on (none, before jax.set_mesh, or another: it is replicated onto the current one first).

    Jitted: the sampler is traced at every call (jaxicl.traced), so one that reads a global (a pool of prompts)
    draws from its current value, and the compiled program is reused while it traces to the same program (a global
    Python number, NumPy scalar or 0-d NumPy array is part of the program: each new value compiles it again; hold one
    that changes as jnp.asarray(value)).
    A sampler that indexes a table it holds by a per-prompt index (a task pool) gathers with
    jaxicl.models.gpt.lookup(table, ids): under a mesh of several devices (explicit sharding) a plain table[i] has no
    output sharding of its own and raises ShardingTypeError. (The engine runs the model in auto sharding, so an
    nnx.Embed needs no such care.)
    """
    task_params = task_params or {}
    fixed = {k: v for k, v in task_params.items() if isinstance(v, numbers.Number)}
    kwargs = {k: v for k, v in task_params.items() if k not in fixed}
    if takes_step(sample):
        if step is None:
            raise ValueError("this sampler takes the training step (a curriculum): pass step=")
        kwargs["step"] = step
    key = _on_current_mesh(key)
    one, consts = trace(lambda k, kw: sample(cfg, k, **fixed, **kw), key, kwargs)
    return _sample_batch(one, consts, key, kwargs, batch_size, axis)


def _on_current_mesh(key: jax.Array) -> jax.Array:
    """key (shape []), replicated on the current mesh where it lives on another one (made before jax.set_mesh, or
    under another mesh); else key itself. Traced on the other mesh, a sampler that draws an array from its prompt key
    could not be vmapped over keys sharded on the current one (ValueError: Resource axis ... not found in mesh).
    Values are unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.typeof(key).sharding.mesh == mesh:
        return key
    return jax.reshard(key, P())


@partial(jax.jit, static_argnames=("one", "batch_size", "axis"))
def _sample_batch(one: Traced, consts: list, key: jax.Array, kwargs: dict, batch_size: int,
                  axis: str | None) -> Prompt:
    keys = jax.random.split(key, batch_size)
    if axis is not None and data_axis_size(axis) > 1:
        check_explicit(axis)
        check_divisible(batch_size, axis)
        keys = jax.reshard(keys, P(axis))
    return jax.vmap(lambda k: one(consts, k, kwargs))(keys)
