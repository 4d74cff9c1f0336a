"""The computations behind the checks of the ar_* experiments, each against an independent value.

Planted optima and perturbations with closed-form metrics, numpy loops and Monte Carlo against the
theory's closed forms (float64 where the tolerance is tight).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.ar_common import fig3_metrics, gd_fit
from jaxicl.theory import autoregressive as th


def test_gd_fit_is_plain_gd_across_chunk_boundaries(x64):
    """On 0.5 |x - x*|^2 with lr 0.1, x_k - x* = 0.9^k (x_0 - x*); 25 steps in chunks of 10, 10 and 5."""
    target = (jnp.array([1.0, -2.0, 0.5]), jnp.array([[3.0, 0.25]]))
    p0 = (jnp.array([0.0, 1.0, -1.0]), jnp.array([[-1.0, 2.0]]))
    loss = lambda p: 0.5 * sum(jnp.sum((x - t) ** 2) for x, t in zip(p, target))  # noqa: E731
    params, losses = gd_fit(loss, p0, lr=0.1, steps=25, chunk=10)
    for x, x0, t in zip(params, p0, target):
        np.testing.assert_allclose(x, t + 0.9 ** 25 * (x0 - t), rtol=1e-12)  # float64 rounding over 25 steps
    sq = sum(float(jnp.sum((x0 - t) ** 2)) for x0, t in zip(p0, target))
    assert losses.shape == (25,)  # losses[i]: the loss before step i
    np.testing.assert_allclose(losses, 0.5 * 0.81 ** np.arange(25) * sq, rtol=1e-12)


@pytest.mark.parametrize("family", th.FAMILIES)
def test_fig3_metrics_vanish_at_the_planted_optimum(family):
    c = 1.7
    optimum = th.unitary_optimum if family == "unitary" else th.orthogonal_optimum
    m = fig3_metrics(family, *optimum(4, 5, 6, c))
    np.testing.assert_allclose(m["scale"], c, rtol=1e-15)  # the mean of four or eight copies of c
    errors = ["offdiag", "cur_err", "other"] + (["prev_err", "eig_err"] if family == "orthogonal" else [])
    np.testing.assert_allclose([m[k] for k in errors], 0.0, atol=1e-12)  # float64 rounding of c * (1 / c) etc.
    if family == "orthogonal":
        np.testing.assert_allclose(m["eigs"], [2 * c, 2 * c, 0, 0, 0], atol=1e-12)


def test_fig3_metrics_of_a_perturbed_unitary_optimum():
    c, eps = 1.7, 0.3
    a, b, p = th.unitary_optimum(4, 4, 6, c)
    a[0, 1] = eps  # C = B^T A = A: one entry off the diagonal
    p[2, 3] = 1.2 / c  # row 2's p_cur: c p_cur - 1 = 0.2
    p[3, 1], p[3, 3] = 0.5, 0.25  # visible keys of row 3 other than p_cur (p_prev = P[3, 3] counts here)
    p[1, 4], p[-1, 0] = 9.0, 9.0  # a key row 1 cannot see, and P's unused last row: neither counts
    m = fig3_metrics("unitary", a, b, p)
    p_cur_norm = np.sqrt(4 + 1.2 ** 2) / c
    # float64 rounding of a handful of operations
    np.testing.assert_allclose(m["offdiag"], eps / np.sqrt(4 * c ** 2 + eps ** 2), rtol=1e-12)
    np.testing.assert_allclose(m["scale"], c, rtol=1e-15)
    np.testing.assert_allclose(m["cur_err"], 0.2, rtol=1e-12)
    np.testing.assert_allclose(m["other"], np.hypot(0.5, 0.25) / p_cur_norm, rtol=1e-12)
    assert "prev_err" not in m and "eig_err" not in m


def test_fig3_metrics_of_a_perturbed_orthogonal_optimum():
    c, e, eps = 1.7, 0.1, 0.2
    a, b, p = th.orthogonal_optimum(4, 2, 6, c)
    a[0] *= 1 + e  # block 0 of C is c (1 + e) J: the mean on the structure is c (1 + e / 2)
    a[1, 0] = eps  # C[2, 0] = C[3, 0] = eps, off the block structure; A B^T = [[2c(1+e), 0], [eps, 2c]]
    p[3, 1] = 0.5  # a visible key before p_prev
    p[1, 4], p[-1, 0] = 9.0, 9.0  # invisible / unused entries
    m = fig3_metrics("orthogonal", a, b, p)
    scale = c * (1 + e / 2)
    np.testing.assert_allclose(m["scale"], scale, rtol=1e-14)  # float64 rounding
    np.testing.assert_allclose(m["offdiag"], np.sqrt(2) * eps / np.sqrt(4 * c ** 2 * ((1 + e) ** 2 + 1) + 2 * eps ** 2),
                               rtol=1e-12)
    np.testing.assert_allclose(m["cur_err"], e / 2, rtol=1e-12)  # c_hat p_cur - 1 with p_cur = 1 / c
    np.testing.assert_allclose(m["prev_err"], e / 4, rtol=1e-12)  # c_hat p_prev + 1/2 with p_prev = -1 / (2c)
    np.testing.assert_allclose(m["eigs"], [2 * c * (1 + e), 2 * c], rtol=1e-12)
    np.testing.assert_allclose(m["eig_err"], (e / 2) / (1 + e / 2), rtol=1e-12)  # both eigenvalues are this far off
    np.testing.assert_allclose(m["other"], 0.5 / (np.sqrt(5) / c), rtol=1e-12)

