"""Nearest-neighbour predictors with the model call signature: tokens [T, D] -> predictions [T] (or [T, L]).

Tokens are those of jaxicl.tasks.nearest_neighbor; only the query (last token) is predicted and the
other positions are 0. k-NN averages the label encodings of the k context points with the largest
<x_j, x_q> (the nearest on the sphere); for labels +-1 its sign is the majority vote, and for simplex
labels the nearest vertex of the average is the plurality class. k = 1 is the exact 1-NN rule the attention
layer learns.
One prompt each, tokens as wide as the config's token_dim (else nearest_neighbor.decode raises ValueError;
jax.vmap them over a batch).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxicl.mesh_placement import in_tokens_mesh
from jaxicl.tasks import nearest_neighbor as nn_task
from jaxicl.validation import check_integer, check_range

Predictor = Callable[[jax.Array], jax.Array]


def k_nearest_neighbors(cfg: nn_task.NearestNeighbor, k: int) -> Predictor:
    """Mean label of the k context points nearest to the query."""
    check_integer("k", k)
    check_range("k", k, 1, cfg.n_context)

    @in_tokens_mesh
    def predict(tokens: jax.Array) -> jax.Array:
        x, labels, x_query = nn_task.decode(cfg, tokens)
        nearest = jax.lax.top_k(x @ x_query, k)[1]
        pred = jnp.mean(labels[nearest], axis=0)
        pred = pred[0] if cfg.label_dim == 1 else pred
        return jnp.zeros((tokens.shape[0], *pred.shape), pred.dtype).at[-1].set(pred)

    return predict


def one_nearest_neighbor(cfg: nn_task.NearestNeighbor) -> Predictor:
    """The label of the context point nearest to the query (the task's target on any distribution)."""
    return k_nearest_neighbors(cfg, 1)
