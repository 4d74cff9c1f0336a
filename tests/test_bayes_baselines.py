"""dMMSE (finite-pool Bayes) against an independent numpy posterior; its limits (one task; many tasks -> ridge)."""

import math
import re

import jax
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr

from jaxicl.baselines import dmmse, ridge
from jaxicl.tasks import linear_regression as lr
from jaxicl.tasks import sample_batch


@pytest.mark.parametrize("fmt", ["paired", "interleaved"])
def test_dmmse_is_the_numpy_posterior_mean_over_the_pool(x64, fmt):
    cfg = lr.LinearRegression(dim=3, n_context=6, noise_std=0.5, n_tasks=5, pool_seed=3, format=fmt)
    pool = np.asarray(lr.task_pool(cfg))
    b = sample_batch(lr.sample, cfg, jax.random.key(0), 4)
    preds = np.asarray(jax.vmap(dmmse(cfg, lr.task_pool(cfg)))(b.inputs))
    pos = lr.prediction_positions(cfg)
    for i in range(4):
        x, y = np.asarray(b.info["x"][i]), np.asarray(b.info["y"][i])
        for j in range(cfg.n_context + 1):
            lik = np.array([np.prod(np.exp(-(y[:j] - x[:j] @ w) ** 2 / (2 * 0.25))) for w in pool])
            np.testing.assert_allclose(preds[i, pos[j]], (lik / lik.sum()) @ pool @ x[j], rtol=1e-7, atol=1e-9)
    assert np.all(np.delete(preds, pos, axis=1) == 0.0)


def _largest_value(jaxpr: Jaxpr) -> int:
    """Elements of the largest value that jaxpr, or a jaxpr inside one of its equations, computes."""
    inner = [p.jaxpr if isinstance(p, ClosedJaxpr) else p for eqn in jaxpr.eqns for v in eqn.params.values()
             for p in (v if isinstance(v, tuple) else (v,)) if isinstance(p, (Jaxpr, ClosedJaxpr))]
    return max([math.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
               + [_largest_value(j) for j in inner])


def test_dmmse_holds_one_log_likelihood_per_task_and_pair_not_one_per_prefix():
    """One prompt over a pool of K = 65,536 (sweep_lr_seeds' full preset: d = 8, n = 17 pairs) computes nothing
    larger than [K, n]: a masked sum over the pairs of each prefix formed [n, K, n] (75 MB a prompt, 289 GiB over
    that preset's 4096 prompts, run eagerly)."""
    cfg = lr.LinearRegression(dim=8, n_context=16, noise_std=0.5)
    k, n = 65536, cfg.n_context + 1
    jaxpr = jax.make_jaxpr(lambda pool, tokens: dmmse(cfg, pool)(tokens))(
        jax.ShapeDtypeStruct((k, cfg.dim), np.float32), jax.ShapeDtypeStruct((cfg.seq_len, cfg.token_dim), np.float32))
    assert _largest_value(jaxpr.jaxpr) == k * n


def test_dmmse_limits_one_task_is_known_and_a_large_pool_approaches_ridge():
    one = lr.LinearRegression(dim=3, n_context=6, noise_std=0.5, n_tasks=1)
    b = sample_batch(lr.sample, one, jax.random.key(1), 8)
    np.testing.assert_allclose(jax.vmap(dmmse(one, lr.task_pool(one)))(b.inputs)[:, -1],
                               b.info["x"][:, -1] @ lr.task_pool(one)[0], rtol=1e-5)
    fresh = lr.LinearRegression(dim=2, n_context=6, noise_std=0.5)
    b = sample_batch(lr.sample, fresh, jax.random.key(2), 256)
    big = jax.vmap(dmmse(fresh, lr.task_pool(fresh, 20000)))(b.inputs)[:, -1]
    exact = jax.vmap(ridge(fresh, 0.25))(b.inputs)[:, -1]
    # the pool is a Monte Carlo sample of the Gaussian prior: squared error ~ c / pool relative, c about 2-6 here
    # (measured over 3 pool seeds: 1.2e-4 to 2.9e-4 at 20000, this pool 1.8e-4; 1.6e-3 to 2.3e-3 at 1000,
    # 4e-3 to 6e-3 at 500), so 1e-3 has margin at 20000 and fails for a pool of a few hundred to a thousand
    assert float(np.mean((big - exact) ** 2)) < 1e-3 * float(np.mean(exact**2))


def test_dmmse_refuses_a_pool_that_is_not_k_task_vectors_of_dim():
    """task_pool(cfg) at the default n_tasks=0 is [0, dim]: dmmse's softmax over no tasks predicted 0 everywhere.
    A 1-D pool or one of another width failed on the first prompt inside a dot_general."""
    cfg = lr.LinearRegression(dim=3, n_context=4, noise_std=0.5, w_scale=2.0)
    for pool, noise_std, hint in [
            (lr.task_pool(cfg), None, "; for a fresh w ~ N(0, w_scale^2 I) per prompt (n_tasks=0, where task_pool(cfg) "
             "is empty) the Bayes-optimal predictor is ridge(cfg, noise_std**2 / w_scale**2) = ridge(cfg, 0.0625)"),
            (np.zeros((0, 3)), 0.2, "; for a fresh w ~ N(0, w_scale^2 I) per prompt (n_tasks=0, where task_pool(cfg) "
             "is empty) the Bayes-optimal predictor is ridge(cfg, noise_std**2 / w_scale**2) = ridge(cfg, 0.01)"),
            (lr.task_pool(cfg, 4)[0], None, ""), (lr.task_pool(cfg, 4)[:, :2], None, ""), (np.zeros((0, 2)), None, "")]:
        msg = f"dmmse's pool must be [K, cfg.dim=3] task vectors with K >= 1, got shape {np.shape(pool)}{hint}"
        with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
            dmmse(cfg, pool, noise_std)
    assert dmmse(cfg, lr.task_pool(cfg, 1))(lr.sample(cfg, jax.random.key(0)).inputs).shape == (cfg.seq_len,)
