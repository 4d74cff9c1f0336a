"""A model whose parameters hold a frozen nnx.Variable, for the tests of training such parameters."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicl.models.base import Model
from jaxicl.sites import null_sites


class FrozenFeatures(Model):
    """A Param readout [8] of cosine features of tokens [T, 4] (tiny_run.tiny_setup's task) whose projection [4, 8]
    is a plain nnx.Variable: random features meant to stay as drawn (nnx.split(model) returns it with the Param)."""

    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Variable(jax.random.normal(rngs.params(), (4, 8)))
        self.head = nnx.Param(0.1 * jax.random.normal(rngs.params(), (8,)))

    def __call__(self, tokens, sites=null_sites):
        return jnp.cos(tokens @ self.proj[...]) @ self.head[...]
