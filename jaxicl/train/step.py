"""One training step and a looped chunk of them: pure functions the engine jits (and a sweep vmaps).

Every step returns its metrics: the loss and the loss function's aux values, the learning rate
(when the optimiser is the config's), the gradient norm and RMS, the parameter RMS after the update
and the update RMS with its ratio to the parameter RMS (the update-to-parameter ratio); the last four over the
leaves that train (a frozen nnx.Variable of the parameters left out: jaxicl.train.optim.freeze_non_params).
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxicl.prompt import Prompt
from jaxicl.tasks.batching import Sampler, sample_batch
from jaxicl.train.mesh import in_auto_sharding
from jaxicl.train.optim import trained_part
from jaxicl.train.state import TrainState
from jaxicl.validation import ConfigError

# (params, batch) -> (loss, aux metrics {name: scalar}, named other than ENGINE_METRICS and ROW_KEYS)
LossFn = Callable[[object, Prompt | None], tuple[jax.Array, dict]]
# A run with buffers (TrainState.buffers) calls loss_fn(params, batch, buffers) -> (loss, (aux metrics, new buffers)).
LearningRate = Callable[[object, jax.Array], jax.Array]  # (opt_state, step) -> lr

# The names of a step's own metrics (lr with the config's optimiser, stopped with stop_loss, ok in a sweep) and the
# keys of a metrics.jsonl row: an aux value or an evaluation of one of these names would replace it.
ENGINE_METRICS = ("loss", "grad_norm", "grad_rms", "param_rms", "update_rms", "update_ratio", "lr", "stopped", "ok")
ROW_KEYS = ("step", "split", "member")


def check_metrics(values: dict, reserved: tuple[str, ...], what: str) -> None:
    """ConfigError naming the first of values (what: a loss's aux values, an evaluation) whose name is among reserved
    or whose value is not a scalar: metrics.jsonl holds one number per name and step. Shapes are static, so under jit
    this runs once, at trace time, before any step."""
    for name, value in values.items():
        if name in reserved:
            raise ConfigError(f"{what}: {name!r} is a name the engine logs its own values under; rename it (reserved: "
                              f"{', '.join(reserved)})")
        if jnp.shape(value) != ():
            raise ConfigError(f"{what}: {name!r} has shape {jnp.shape(value)}, but each metric is a scalar (one number "
                              f"per step in metrics.jsonl): reduce it (e.g. its mean) or return each entry under a "
                              f"name of its own")


def tree_rms(tree) -> jax.Array:
    """Root mean square over every entry of every leaf (complex entries by modulus)."""
    leaves = jax.tree.leaves(tree)
    total = sum(jnp.sum(jnp.abs(x) ** 2) for x in leaves)
    return jnp.sqrt(total / max(sum(x.size for x in leaves), 1))


def train_step(state: TrainState, *, loss_fn: LossFn, sample: Sampler | None, task_cfg, batch_size: int,
               tx: optax.GradientTransformation, learning_rate: LearningRate | None = None,
               task_params: dict | None = None, stop_loss: float = 0.0) -> tuple[TrainState, dict]:
    """One step on the batch sampled from fold_in(state.key, state.step) (a sampler that takes `step` gets it: a
    curriculum); returns the new state and metrics. With state.buffers, the loss also returns the new buffers.

    sample=None: the loss takes no batch (a full-batch or closed-form objective; loss_fn(params, None)).
    task_params: (possibly traced) values of task fields passed to `sample` as keywords (sweeps).
    stop_loss > 0: a step whose loss is below it leaves the state as it is (step counter included) and
    reports stopped = True (its update_rms 0, its param_rms of the parameters kept), so every later step does the
    same: the run has ended at that step.
    """
    batch = None if sample is None else sample_batch(sample, task_cfg, jax.random.fold_in(state.key, state.step),
                                                     batch_size, task_params=task_params, step=state.step)
    buffers = state.buffers
    # the model in auto sharding (an nnx.Embed's gather by batch-sharded ids has no sharding of its own in explicit
    # mode); the loss, aux values and gradients come out replicated
    grad_fn = in_auto_sharding(jax.value_and_grad(loss_fn, has_aux=True), P())
    if buffers is None:
        (loss, aux), grads = grad_fn(state.params, batch)
    else:
        (loss, (aux, buffers)), grads = grad_fn(state.params, batch, buffers)
    check_metrics(aux, ENGINE_METRICS + ROW_KEYS, "loss_fn's aux values")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state, step=state.step + 1,
                        buffers=buffers)
    update_rms = tree_rms(trained_part(updates))
    if stop_loss:
        stopped = loss < stop_loss
        new = jax.tree.map(lambda old, updated: jnp.where(stopped, old, updated), state, new)
        update_rms = jnp.where(stopped, 0.0, update_rms)  # the stopping step's update is discarded
    param_rms = tree_rms(trained_part(new.params))  # of the parameters the step leaves
    grads = trained_part(grads)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "grad_rms": tree_rms(grads),
               "param_rms": param_rms, "update_rms": update_rms,
               "update_ratio": update_rms / jnp.maximum(param_rms, jnp.finfo(param_rms.dtype).tiny), **aux}
    if learning_rate is not None:
        metrics["lr"] = learning_rate(state.opt_state, state.step)
    if stop_loss:
        metrics["stopped"] = stopped
    return new, metrics


def loop_steps(step: Callable, state, n: jax.Array, rows: int) -> tuple[object, dict]:
    """n calls of step(state) -> (state, metrics) as one while loop whose trip count n (an int32 scalar, 1 <= n <= rows)
    is an argument of the program, not its shape: one compiled program runs every n the same way (a lax.scan of length
    n compiles per n, and at n = 1 XLA removes its loop, so that step rounds otherwise). Returns the new state and the
    metrics stacked into [rows, ...]: the first n rows are the steps', the rest zeros."""
    buffer = jax.tree.map(lambda m: jnp.zeros((rows, *m.shape), m.dtype), jax.eval_shape(step, state)[1])

    def body(i, carry):
        state, buffer = carry
        state, metrics = step(state)
        return state, jax.tree.map(lambda b, m: b.at[i].set(m), buffer, metrics)

    return jax.lax.fori_loop(0, n, body, (state, buffer))


def run_steps(state: TrainState, n: jax.Array, rows: int, **step_kw) -> tuple[TrainState, dict]:
    """n training steps (train_step's keywords) as one loop_steps; returns the new state and metrics [rows], the first
    n rows the steps'."""
    return loop_steps(partial(train_step, **step_kw), state, n, rows)
