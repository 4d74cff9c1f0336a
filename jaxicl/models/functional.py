"""Models used as pure functions of (graphdef, params, tokens), with captures and edits."""

from collections.abc import Callable, Iterable

import jax
from flax import nnx

from jaxicl.sites import run_with_sites


def apply(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, *,
          capture: Iterable[str] | str = (), edits: dict[str, Callable] | None = None):
    """Forward pass of one prompt: tokens [T, D] -> (outputs [T, D], {site: value}).

    Pure: safe under jit, vmap (over prompts, parameters or edits) and grad.
    """
    return run_with_sites(nnx.merge(graphdef, params), tokens, capture=capture, edits=edits)


def label_prediction(outputs: jax.Array) -> jax.Array:
    """Predictions [..., T] read from outputs [..., T, D]: minus the label channel.

    von Oswald et al.'s convention: a layer writes -y_hat into the empty label slot of the query.
    """
    return -outputs[..., -1]


def predictor(graphdef: nnx.GraphDef, params: nnx.State) -> Callable[[jax.Array], jax.Array]:
    """The model as an in-context predictor tokens [T, D] -> predictions [T] (the baselines' signature)."""
    return lambda tokens: label_prediction(apply(graphdef, params, tokens)[0])
