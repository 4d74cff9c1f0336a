"""Every model used as a pure function of (graphdef, params, tokens), with captures and edits.

`apply` is the one forward pass of every jaxicl model (jaxicl.models.base.Model); `predictor` adds the
model's declared readout, giving the baselines' signature tokens [T, D] -> predictions [T] (or [T, K]).
"""

from collections.abc import Callable, Iterable
from functools import partial

import jax
from flax import nnx

from jaxicl.mesh_placement import on_mesh_of
from jaxicl.sites import Patch, run_with_sites


def apply(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, *,
          capture: Iterable[str] | str = (), edits: dict[str, Callable] | None = None, patch: Patch | None = None):
    """Forward pass of one prompt: tokens [T, D] (or [T] token ids) -> (outputs, {site: value}).

    edits: {site: callable}; patch: edits as data (jaxicl.sites.Patch). Pure: safe under jit, vmap (over
    prompts, parameters or patches) and grad. Params on a mesh other than the tokens' are replicated on theirs first
    (jaxicl.mesh_placement.on_mesh_of).
    """
    return run_with_sites(nnx.merge(graphdef, on_mesh_of(tokens, params)), tokens, capture=capture, edits=edits,
                          patch=patch)


def predictor(graphdef: nnx.GraphDef, params: nnx.State) -> Callable[[jax.Array], jax.Array]:
    """The model as an in-context predictor tokens [T, D] -> predictions (its readout of apply's outputs): jitted,
    as the baselines' predictors are, so a call outside jit (vmapped over prompts or not) is one compiled program,
    not the forward pass op by op (6x slower for 64 prompts of a 4-layer GPT on CPU). Params on another mesh than the
    tokens' are replicated on theirs first, as in apply."""
    return lambda tokens: _predictions(graphdef, on_mesh_of(tokens, params), tokens)


@partial(jax.jit, static_argnums=0)
def _predictions(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params).readout(apply(graphdef, params, tokens)[0])
