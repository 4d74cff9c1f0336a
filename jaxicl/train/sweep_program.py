"""The compiled program of a sweep: members stacked on a leading axis, the engine's train_step vmapped over them.

The member axis is vmapped with spmd_axis_name "members", so it shards over that axis of the mesh.
Inside that vmap (explicit sharding, jax 0.12) indexing a constant table with a per-member index, or
jnp.searchsorted, fails to trace ("Resource axis: members ... not found"): samplers and evaluate
functions use one-hot sums or closed forms instead. A stack of one member is neither sharded over
"members" nor vmapped with it (member_sharding): there JAX drops the member sharding in reshapes.

A member whose loss or updated parameters become non-finite is frozen at its last finite state: its
update and step counter are held, so its step records where it diverged (and a resumed run finds it
frozen again); the others continue unchanged.
"""

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxicl.prng import seed_key
from jaxicl.tasks.batching import Sampler
from jaxicl.train.config import TrainConfig
from jaxicl.train.mesh import MEMBER_AXIS
from jaxicl.train.optim import make_optimizer, scheduled_lr
from jaxicl.train.state import TrainState, init_state
from jaxicl.train.step import ROW_KEYS, LossFn, check_metrics, loop_steps, train_step
from jaxicl.train.sweep_fields import (check_init_fields, check_members, check_takes_task_fields, member_arrays,
                                      sampling_config, split_fields, sweep_members)


def member_sharding(mesh: jax.sharding.Mesh, stack: int) -> NamedSharding:
    """The sharding of a stack of `stack` members: its leading axis over the mesh's "members" axis; a stack of 1 (on
    one member device, where that axis shards nothing) unsharded, and vmapped without spmd_axis_name (_vmap_members).
    In a stack of 1 sharded over "members", JAX (0.12) drops that sharding where it reshapes an array to or from a
    size-1 axis (a token of one feature: linear_regression with dim=1), then refuses to combine the result with the
    arrays that keep it (ShardingTypeError)."""
    return NamedSharding(mesh, P(MEMBER_AXIS) if stack > 1 else P())


def _vmap_members(fn: Callable, in_axes=0) -> Callable:
    """fn vmapped over the leading member axis of its first argument's leaves, sharded over "members" (spmd_axis_name),
    except in a stack of 1 member (member_sharding)."""
    def vmapped(*args):
        stack = jax.tree.leaves(args[0])[0].shape[0]
        return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=MEMBER_AXIS if stack > 1 else None)(*args)

    return vmapped


@dataclasses.dataclass(frozen=True)
class SweepProgram:
    """The compiled pieces of a sweep, its members and their input arrays (host numpy, [M])."""

    make_states: Callable  # (seed [C], opt hyperparams, init fields) -> stacked TrainState [C]
    run_chunk: Callable  # (states, task params, n: int32) -> (states, metrics [C, steps_per_call], the first n rows
    # the n steps'): one program for every n (loop_steps); donates states
    eval_chunk: Callable | None  # (params, task params) -> {name: [C]}
    arrays: dict
    members: list[dict]  # {path: value} per member, every field by its full name (sweep_members)

    def inputs(self, idx: np.ndarray, sharding: NamedSharding) -> dict:
        return jax.device_put(jax.tree.map(lambda a: a[idx], self.arrays), sharding)

    def states(self, a: dict, sharding: NamedSharding) -> TrainState:
        """Fresh stacked states, every leaf sharded over the member axis (unbatched leaves included)."""
        return jax.device_put(self.make_states(a["seed"], a["opt"], a["init"]), sharding)


def build_program(loss_fn: LossFn, sample: Sampler | None, task_cfg, cfg: TrainConfig, init: Callable,
                  members: list[dict], evaluate: Callable | None) -> SweepProgram:
    """The sweep's program; raises ConfigError (naming the field) for a member it cannot train."""
    members = sweep_members(members, sample, cfg, task_cfg, init)
    check_members(members, cfg, task_cfg)
    groups = split_fields(list(members[0]), sample, init)
    if evaluate:
        check_takes_task_fields(evaluate, groups["task"])
    opt_fields = [n for n in groups["train"] if n != "seed"]
    tx = make_optimizer(cfg, tuple(opt_fields))
    seeds = member_arrays(members, "train.", ["seed"])["seed"] if "seed" in groups["train"] else \
        np.full(len(members), cfg.seed, np.int32)
    arrays = {"seed": seeds, "opt": member_arrays(members, "train.", opt_fields),
              "task": member_arrays(members, "task.", groups["task"]), "init": member_arrays(members, "", groups["init"])}
    check_init_fields(init, arrays["init"])
    # each member's own values reach the sampler as arrays; the config it runs with holds the largest swept value of a
    # field that sets the sampler's program (pool size, context length) and the first member's of the others
    shape_task = sampling_config(sample, task_cfg, members, arrays["task"]) if groups["task"] else task_cfg

    def new_state(seed, hp, init_kw):
        state = init_state(init(seed_key(seed), **init_kw), seed, tx, prng_impl=cfg.prng_impl)
        for name, value in hp.items():
            state.opt_state.hyperparams[name] = jnp.asarray(value, state.opt_state.hyperparams[name].dtype)
        return state

    def member_step(s, task_params):
        new, metrics = train_step(s, loss_fn=loss_fn, sample=sample, task_cfg=shape_task, batch_size=cfg.batch_size,
                                  tx=tx, learning_rate=partial(scheduled_lr, cfg), task_params=task_params or None)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.tree.norm(new.params))
        keep = partial(jax.tree.map, lambda a, b: jnp.where(ok, a, b))
        new = new.replace(params=keep(new.params, s.params), opt_state=keep(new.opt_state, s.opt_state),
                          step=jnp.where(ok, new.step, s.step))
        return new, {**metrics, "ok": ok}

    def member_steps(state, task_params, n):
        return loop_steps(lambda s: member_step(s, task_params), state, n, cfg.steps_per_call)

    def member_eval(params, task_params):
        values = evaluate(params, **task_params)
        check_metrics(values, ROW_KEYS, "evaluate")
        return values

    return SweepProgram(_vmap_members(new_state),  # eager: compiling it costs more than running it once
                        jax.jit(_vmap_members(member_steps, in_axes=(0, 0, None)), donate_argnums=0),
                        jax.jit(_vmap_members(member_eval)) if evaluate else None, arrays, members)
