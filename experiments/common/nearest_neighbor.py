"""Shared pieces of the nn_* experiments: the paper's loss logging the invariant family, 1-NN evaluation, log axes."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxicl.models import apply, predictor
from jaxicl.models.nearest_neighbor_attention import NearestNeighborAttention
from jaxicl.tasks import nearest_neighbor as nn_task
from jaxicl.tasks import sample_batch
from jaxicl.theory import nearest_neighbor as theory
from jaxicl.train import LossFn, SweepResult, eval_key, regression_loss


def paper_loss(graphdef: nnx.GraphDef) -> LossFn:
    """Li et al.'s loss (Eq. 2.5): 1/2 the squared error of the query's label prediction."""
    return regression_loss(graphdef, coords="sum", scale=0.5)


def family_loss(graphdef: nnx.GraphDef) -> LossFn:
    """paper_loss(graphdef) with aux {xi1, xi2, off_family} of the merged W [D, D] before the step:
    its family coordinates and |W - diag(xi1 I, 0, -xi2)|_F / |W|_F."""
    loss_fn = paper_loss(graphdef)

    def loss_with_family(params, batch):
        loss, aux = loss_fn(params, batch)
        model = nnx.merge(graphdef, params)
        w = model.merged()
        xi1, xi2 = theory.to_reduced(w, model.dim)
        return loss, {**aux, "xi1": xi1, "xi2": xi2,
                      "off_family": theory.off_family_norm(w, model.dim) / jnp.linalg.norm(w)}

    return loss_with_family


def member_tables(result: SweepResult, steps: int) -> tuple[dict, np.ndarray, dict]:
    """A sweep's rows as arrays: ({name: [steps, M]} train metrics, eval steps [E], {name: [E, M]} evaluations).

    Entries without a row are NaN: a diverged member's train metrics stop at the step that diverged.
    """
    eval_steps = np.unique([r["step"] for r in result.eval_rows])
    return (_table(result.train_rows, result.members, np.arange(steps)), eval_steps,
            _table(result.eval_rows, result.members, eval_steps))


def _table(rows: list[dict], members: list[dict], steps: np.ndarray) -> dict[str, np.ndarray]:
    names = [k for k in rows[0] if k not in {"step", "split", "member", *members[0]}]
    index = {int(s): i for i, s in enumerate(steps)}
    out = {n: np.full((len(steps), len(members)), np.nan) for n in names}
    for r in rows:
        for n in names:
            out[n][index[r["step"]], r["member"]] = r[n]
    return out


def eval_batches(task: nn_task.NearestNeighbor, seed: int, num: int):
    """(uniform, shifted) evaluation batches of `num` prompts from the evaluation stream."""
    key = eval_key(seed)
    return tuple(sample_batch(nn_task.sample, dataclasses.replace(task, n_prompts=0, distribution=dist),
                              jax.random.fold_in(key, i), num, axis=None)
                 for i, dist in enumerate(("uniform", "shifted")))


def nn_metrics(graphdef: nnx.GraphDef, uniform, shifted) -> Callable[[object], dict]:
    """params -> {shifted_mse, uniform_mse, agree_1nn, self_weight, self_weight_max, argmax_is_1nn}: MSE at the
    query on both sets; on the uniform prompts the fraction whose predicted class (sign for binary) is the 1-NN
    label's class, the mean and max softmax weight the query puts on itself (q_{N+1}), and the fraction whose
    largest attention weight, over all N + 1 tokens (the query's own included), is on the 1-NN point i*."""

    def evaluate(params):
        model, predict = nnx.merge(graphdef, params), predictor(graphdef, params)
        pred_u = jax.vmap(predict)(uniform.inputs)[:, -1]  # the query's prediction
        pred_s = jax.vmap(predict)(shifted.inputs)[:, -1]
        agree = jnp.mean(_predicted_class(model, pred_u) == _predicted_class(model, uniform.targets[:, -1]))
        weights = jax.vmap(lambda t: apply(graphdef, params, t, capture=["attn.weights"])[1]["attn.weights"])(
            uniform.inputs)  # [B, N + 1], the query last
        return {"shifted_mse": _mse(pred_s, shifted.targets[:, -1]),
                "uniform_mse": _mse(pred_u, uniform.targets[:, -1]),
                "agree_1nn": agree, "self_weight": jnp.mean(weights[:, -1]), "self_weight_max": jnp.max(weights[:, -1]),
                "argmax_is_1nn": jnp.mean(jnp.argmax(weights, -1) == uniform.info["nearest"])}

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
