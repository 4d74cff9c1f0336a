"""Loss functions (params, batch) -> (loss, aux) for the training engine."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicl.models.functional import apply, label_prediction
from jaxicl.prompt import Prompt


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over prompts of the mask-weighted squared error; pred, target, mask: [B, T]."""
    per_prompt = jnp.sum(mask * (pred - target) ** 2, -1) / jnp.maximum(jnp.sum(mask, -1), 1e-12)
    return jnp.mean(per_prompt)


def query_mse(pred: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error at the final (query) position: pred, targets [..., B, T] -> [...]."""
    return jnp.mean((pred[..., -1] - targets[..., -1]) ** 2, axis=-1)


def regression_loss(graphdef: nnx.GraphDef):
    """Squared error of the model's label_prediction on the masked positions of a Prompt batch."""

    def loss_fn(params, batch: Prompt):
        outputs = jax.vmap(lambda t: apply(graphdef, params, t)[0])(batch.inputs)
        return masked_mse(label_prediction(outputs), batch.targets, batch.mask), {}

    return loss_fn
