"""The one home of training losses (params, batch) -> (loss, aux), and their per-position form.

Every model's predictions come from its readout (jaxicl.models.functional.predictor): [B, T] or
[B, T, K] for K coordinates (complex allowed: errors are squared moduli).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxicl.models.functional import predictor
from jaxicl.prompt import Prompt

COORDS = ("sum", "mean")


def masked_mean(errors: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over prompts of the mask-weighted mean of per-position errors: errors, mask [B, T] -> []."""
    return jnp.mean(jnp.sum(mask * errors, -1) / jnp.maximum(jnp.sum(mask, -1), 1e-12))


def query_mse(pred: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error at the final (query) position: pred, targets [..., B, T] -> [...]."""
    return jnp.mean((pred[..., -1] - targets[..., -1]) ** 2, axis=-1)


def position_errors(pred: jax.Array, targets: jax.Array, coords: str = "sum") -> jax.Array:
    """|pred - targets|^2 per position [B, T]; over K coordinates ([B, T, K]) summed or averaged."""
    err = jnp.abs(pred - targets) ** 2
    if err.ndim == 3:
        err = jnp.sum(err, -1) if coords == "sum" else jnp.mean(err, -1)
    return err


def regression_loss(graphdef: nnx.GraphDef, *, coords: str = "sum", scale: float = 1.0):
    """scale * the mask-weighted squared error of the model's predictions on a Prompt batch.

    coords: over a multi-coordinate target, "sum" |error|^2 (the theory's loss) or "mean" (MSELoss).
    E.g. Li et al.'s 1/2 squared error at the query is coords="sum", scale=0.5 (the task's mask).
    """
    if coords not in COORDS:
        raise ValueError(f"coords must be one of {COORDS}, got {coords!r}")

    def loss_fn(params, batch: Prompt):
        pred = jax.vmap(predictor(graphdef, params))(batch.inputs)
        return scale * masked_mean(position_errors(pred, batch.targets, coords), batch.mask), {}

    return loss_fn


def cross_entropy_loss(graphdef: nnx.GraphDef):
    """The mask-weighted next-token cross-entropy of a model whose predictions are logits [B, T, V] over integer
    targets [B, T]; aux {"accuracy"}: the mask-weighted fraction of positions whose argmax is the target."""

    def loss_fn(params, batch: Prompt):
        logits = jax.vmap(predictor(graphdef, params))(batch.inputs)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch.targets[..., None], axis=-1)[..., 0]
        hits = (jnp.argmax(logits, -1) == batch.targets).astype(logits.dtype)
        return masked_mean(nll, batch.mask), {"accuracy": masked_mean(hits, batch.mask)}

    return loss_fn


def per_position_loss(graphdef: nnx.GraphDef, params, batch: Prompt, coords: str = "sum") -> np.ndarray:
    """[T] mean over the batch of each position's squared error (regression_loss's conventions)."""
    return np.asarray(_per_position(graphdef, params, batch.inputs, batch.targets, coords))


@partial(jax.jit, static_argnums=(0, 4))
def _per_position(graphdef, params, inputs, targets, coords):
    return jnp.mean(position_errors(jax.vmap(predictor(graphdef, params))(inputs), targets, coords), axis=0)
