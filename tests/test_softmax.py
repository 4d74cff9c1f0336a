"""jaxicl.models.softmax: jax.nn.softmax's values, and a derivative that matches finite differences and autodiff
through jax.nn.softmax, with and without -inf (masked) scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxicl.models.softmax import softmax


def scores(masked: bool) -> jax.Array:
    x = jax.random.normal(jax.random.key(0), (3, 5, 5))
    return jnp.where(jnp.tril(jnp.ones((5, 5), bool)), x, -jnp.inf) if masked else x


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("axis", [-1, 1])
def test_values_are_jax_nn_softmax(masked, axis):
    x = scores(masked)
    # the same formula; XLA may fuse the two programs differently: float32 rounding, weights in [0, 1]
    np.testing.assert_allclose(softmax(x, axis), jax.nn.softmax(x, axis=axis), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(softmax(x, axis)).sum(axis), 1.0, rtol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_gradient_matches_autodiff_through_jax_nn_softmax(masked):
    x = scores(masked)
    w = jax.random.normal(jax.random.key(1), x.shape)  # a generic cotangent
    ours = jax.grad(lambda s: jnp.sum(w * softmax(s)))(x)
    reference = jax.grad(lambda s: jnp.sum(w * jax.nn.softmax(s, axis=-1)))(x)
    # two float32 formulas of one derivative; entries are O(1)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    if masked:
        assert np.all(np.asarray(ours)[:, np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0)


def test_first_and_second_derivatives_match_finite_differences(x64):
    x = jax.random.normal(jax.random.key(2), (4, 6), jnp.float64)
    # float64 central differences: truncation O(eps^2) and rounding O(1e-16 / eps) far below 1e-5
    check_grads(lambda s: softmax(s, 1), (x,), order=2, modes=("fwd", "rev"), eps=1e-4, atol=1e-5, rtol=1e-5)
