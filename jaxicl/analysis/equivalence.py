"""How alike two in-context predictors are (von Oswald et al. 2023, Sec. 3).

Compares predictions and input sensitivities (gradients of the prediction at one position with
respect to the query's and the context's tokens) of two predictors tokens [T, D] -> [T].
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxicl.mesh_placement import inside_inputs_mesh
from jaxicl.validation import check_range

Predictor = Callable[[jax.Array], jax.Array]


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Row-wise cosine of a, b: [B, n] -> [B]."""
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-30)


@inside_inputs_mesh
def equivalence_metrics(f: Predictor, g: Predictor, tokens: jax.Array, position: int = -1) -> dict[str, jax.Array]:
    """Averages over a batch of prompts tokens [B, T, D], at prediction `position`:

    pred_diff:  mean (f - g)^2 of the predictions
    query_cos, query_l2:     cosine and L2 distance of d pred / d x_query (the query token without its label slot)
    context_cos, context_l2: the same for d pred / d (context tokens) [T - 1, D], flattened

    A batch drawn under jax.set_mesh is taken inside the mesh and after leaving it (then in that mesh again).
    """
    check_range("position", position, -tokens.shape[1], tokens.shape[1] - 1)  # not wrapped onto another position
    pos = position % tokens.shape[1]

    def value_and_sensitivity(h: Predictor):
        pred, grad = jax.vmap(jax.value_and_grad(lambda t: h(t)[pos]))(tokens)
        return pred, grad[:, pos, :-1], jnp.delete(grad, pos, axis=1).reshape(tokens.shape[0], -1)

    pf, qf, cf = value_and_sensitivity(f)
    pg, qg, cg = value_and_sensitivity(g)
    return {
        "pred_diff": jnp.mean((pf - pg) ** 2),
        "query_cos": jnp.mean(_cosine(qf, qg)),
        "query_l2": jnp.mean(jnp.linalg.norm(qf - qg, axis=-1)),
        "context_cos": jnp.mean(_cosine(cf, cg)),
        "context_l2": jnp.mean(jnp.linalg.norm(cf - cg, axis=-1)),
    }
