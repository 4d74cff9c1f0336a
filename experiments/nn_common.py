"""Shared pieces of the nn_* experiments: vmapped-member training, 1-NN evaluation, log-axis helpers."""

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxicl.models.nearest_neighbor_attention import NearestNeighborAttention, query_loss
from jaxicl.tasks import nearest_neighbor as nn_task
from jaxicl.tasks import sample_batch
from jaxicl.train import NonFiniteLossError, data_key, eval_key
from jaxicl.train.metrics import MetricsWriter


def stack(trees: list) -> object:
    """Stacks a list of identical pytrees along a new leading member axis."""
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def member_keys(seeds: tuple[int, ...]) -> jax.Array:
    """[M] data keys, one per seed."""
    return jax.vmap(data_key)(jnp.asarray(seeds))


def train_members(graphdef: nnx.GraphDef, params, keys: jax.Array, task: nn_task.NearestNeighbor, *, steps: int,
                  batch_size: int, lr: float, steps_per_call: int, step_metrics: Callable[[object], dict],
                  evaluate: Callable[[object], dict], desc: str, writer: MetricsWriter | None = None,
                  tag: dict | None = None):
    """Plain SGD (batch sampled on device each step) on members stacked along axis 0 of params and keys [M].

    Every step runs `step_metrics(member params) -> {name: scalar}`; `evaluate` (same signature) runs at
    step 0 and after every chunk of steps_per_call steps. Returns (params, {name: [steps, M]} with "loss",
    eval_steps [E], {name: [E, M]}). With a writer, every chunk appends a train row (chunk means, one value per
    member) and an eval row to metrics.jsonl, each with the fields of `tag`.
    """
    tx = optax.sgd(lr)
    loss_fn = query_loss(graphdef)

    def member_step(p, opt_state, key, step):
        batch = sample_batch(nn_task.sample, task, jax.random.fold_in(key, step), batch_size, axis=None)
        metrics = step_metrics(p)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, {"loss": loss, **metrics}

    def step(carry, step_index):
        p, opt_state = carry
        p, opt_state, metrics = jax.vmap(member_step, in_axes=(0, 0, 0, None))(p, opt_state, keys, step_index)
        return (p, opt_state), metrics

    @partial(jax.jit, donate_argnums=0)
    def chunk(carry, first):
        return jax.lax.scan(step, carry, first + jnp.arange(steps_per_call))

    run_eval = jax.jit(jax.vmap(evaluate))
    carry = (jax.tree.map(jnp.copy, params), jax.vmap(tx.init)(params))
    writer = writer or MetricsWriter(None)
    per_step, eval_steps, evals = [], [0], [jax.device_get(run_eval(carry[0]))]
    writer.write([{"step": 0, "split": "eval", **(tag or {}), **evals[0]}])
    for first in tqdm(range(0, steps, steps_per_call), desc=desc, disable=jax.process_index() != 0):
        carry, metrics = chunk(carry, first)
        metrics = jax.device_get(metrics)
        if not np.all(np.isfinite(metrics["loss"])):
            raise NonFiniteLossError(f"{desc}: non-finite loss in steps [{first}, {first + steps_per_call})")
        per_step.append(metrics)
        eval_steps.append(first + steps_per_call)
        evals.append(jax.device_get(run_eval(carry[0])))
        writer.write([{"step": first, "split": "train", **(tag or {}), **{k: v.mean(0) for k, v in metrics.items()}},
                      {"step": eval_steps[-1], "split": "eval", **(tag or {}), **evals[-1]}])
    cat = {k: np.concatenate([m[k] for m in per_step]) for k in per_step[0]}
    return carry[0], cat, np.array(eval_steps), {k: np.stack([e[k] for e in evals]) for k in evals[0]}


def eval_batches(task: nn_task.NearestNeighbor, seed: int, num: int):
    """(uniform, shifted) evaluation batches of `num` prompts from the evaluation stream."""
    key = eval_key(seed)
    return tuple(sample_batch(nn_task.sample, dataclasses.replace(task, n_prompts=0, distribution=dist),
                              jax.random.fold_in(key, i), num, axis=None)
                 for i, dist in enumerate(("uniform", "shifted")))


def nn_metrics(graphdef: nnx.GraphDef, uniform, shifted) -> Callable[[object], dict]:
    """params -> {shifted_mse, uniform_mse, agree_1nn}: MSE at the query on both sets and the fraction of
    uniform prompts whose predicted class (sign for binary) is the 1-NN label's class."""

    def evaluate(params):
        model = nnx.merge(graphdef, params)
        pred_u = jax.vmap(model)(uniform.inputs)
        pred_s = jax.vmap(model)(shifted.inputs)
        agree = jnp.mean(_predicted_class(model, pred_u) == _predicted_class(model, uniform.targets[:, -1]))
        return {"shifted_mse": _mse(pred_s, shifted.targets[:, -1]),
                "uniform_mse": _mse(pred_u, uniform.targets[:, -1]),
                "agree_1nn": agree}

    return evaluate


def _mse(pred, target):
    err = (pred - target) ** 2
    return jnp.mean(err.reshape(err.shape[0], -1).sum(-1))


def _predicted_class(model: NearestNeighborAttention, values: jax.Array) -> jax.Array:
    if model.label_dim == 1:
        return (values < 0).astype(jnp.int32)  # class 0 is +1
    return nn_task.decode_class(values, model.label_dim + 1)


def smooth(values: np.ndarray, half_width: int = 12) -> np.ndarray:
    """Centred moving average along axis 0 of [T, ...]; the window at t spans t +- min(half_width, t // 4, T-1-t),
    so early fast changes are not blurred and the edges are not biased."""
    flat = values.reshape(values.shape[0], -1).astype(np.float64)
    n = flat.shape[0]
    cum = np.concatenate([np.zeros((1, flat.shape[1])), np.cumsum(flat, 0)])
    t = np.arange(n)
    h = np.minimum(np.minimum(half_width, t // 4), n - 1 - t)
    lo, hi = np.maximum(t - h, 0), np.minimum(t + h + 1, n)
    return ((cum[hi] - cum[lo]) / (hi - lo)[:, None]).reshape(values.shape)


def log_axes(*axes) -> None:
    """Log step axes without the cluttered minor tick labels."""
    from matplotlib.ticker import NullFormatter

    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())


def log_spaced(n: int, num: int = 200) -> np.ndarray:
    """About `num` distinct integer indices in [1, n], log-spaced (for plots on a log step axis)."""
    return np.unique(np.geomspace(1, n, num).astype(int))
