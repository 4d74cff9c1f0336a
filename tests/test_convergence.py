"""Convergence and dimensionality metrics against numpy loops and planted structure."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxicl.analysis.convergence import cross_board_distance, participation_ratio, within_board_ratio


def _u(v):
    return v / np.linalg.norm(v)


def test_cross_board_distance_is_the_official_unit_distance_over_board_pairs():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(5, 9, 4))
    want = [np.mean([np.linalg.norm(_u(f[a, i]) - _u(f[b, i])) for a, b in itertools.combinations(range(5), 2)])
            for i in range(9)]
    np.testing.assert_allclose(cross_board_distance(jnp.asarray(f, jnp.float32)), want, rtol=1e-5)
    same = np.broadcast_to(f[:1], f.shape) * rng.uniform(0.5, 2, (5, 1, 1))  # rescaled copies: distance 0
    np.testing.assert_allclose(cross_board_distance(jnp.asarray(same, jnp.float32)), 0.0, atol=1e-3)


def test_within_board_ratio_against_a_loop_and_a_planted_object():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(12, 5))
    obj = np.zeros(12, bool)
    obj[[1, 4, 5, 9]] = True
    d = lambda i, j: np.linalg.norm(_u(f[i]) - _u(f[j]))  # noqa: E731
    w = np.mean([d(i, j) for i, j in itertools.permutations(np.flatnonzero(obj), 2)])
    ob = np.mean([d(i, j) for i in np.flatnonzero(obj) for j in np.flatnonzero(~obj)])
    assert float(within_board_ratio(jnp.asarray(f, jnp.float32), jnp.asarray(obj))) == pytest.approx(w / ob, rel=1e-5)
    planted = f.copy()
    planted[obj] = f[1] + 0.01 * rng.normal(size=(4, 5))  # the object's cells converged
    assert float(within_board_ratio(jnp.asarray(planted, jnp.float32), jnp.asarray(obj))) < 0.05


def test_participation_ratio_of_planted_low_rank_sets():
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.normal(size=(16, 3)))[0]  # an isotropic 3-dimensional set in 16 dimensions
    x = rng.normal(size=(20000, 3)) @ basis.T
    assert float(participation_ratio(jnp.asarray(x, jnp.float32))) == pytest.approx(3.0, rel=0.02)
    lam = np.array([4.0, 1.0, 1.0])  # anisotropic: (sum lambda)^2 / sum lambda^2 = 36 / 18
    y = (rng.normal(size=(20000, 3)) * np.sqrt(lam)) @ basis.T
    assert float(participation_ratio(jnp.asarray(y, jnp.float32))) == pytest.approx(2.0, rel=0.03)
    # weights select rows: the PR of a selected one-dimensional subset
    line = np.outer(rng.normal(size=500), basis[:, 0])
    both = np.concatenate([x[:500], line])
    sel = np.r_[np.zeros(500), np.ones(500)]
    assert float(participation_ratio(jnp.asarray(both, jnp.float32), jnp.asarray(sel))) == pytest.approx(1.0,
                                                                                                     abs=1e-4)
    cov = np.cov(x[:2000].T, bias=True)
    ev = np.linalg.eigvalsh(cov)
    assert float(participation_ratio(jnp.asarray(x[:2000], jnp.float32))) == pytest.approx(
        ev.sum() ** 2 / np.sum(ev**2), rel=1e-4)
