"""Bayes-optimal in-context predictors for linear regression with a finite task pool (Raventos et al. 2023).

dMMSE: the posterior mean of y_j when w is uniform over a pool {w_k} and y = <w, x> + N(0, sigma^2):
posterior weights softmax_k(-sum_{i<j} (y_i - <w_k, x_i>)^2 / (2 sigma^2)) over the pool, prediction
sum_k p_k <w_k, x_j>. With the pool replaced by w ~ N(0, tau^2 I) the posterior mean is ridge with
lam = sigma^2 / tau^2 (jaxicl.baselines.ridge).
"""

import jax
import jax.numpy as jnp

from jaxicl.baselines.regression import Predictor, _prefix_predictor, prefix_mask
from jaxicl.tasks import linear_regression as lr_task
from jaxicl.validation import check_positive


def dmmse(cfg: lr_task.LinearRegression, pool: jax.Array, noise_std: float | None = None) -> Predictor:
    """Discrete MMSE over `pool` [K, dim], K >= 1 (e.g. lr_task.task_pool(cfg) where cfg.n_tasks >= 1); noise_std
    defaults to cfg.noise_std. ValueError for a pool of another shape: an empty one (task_pool at n_tasks=0)
    predicted 0 everywhere. A prompt holds a few [K, n_context + 1] arrays: over a large pool, map a batch in chunks
    (jax.lax.map with batch_size, as sweep_lr_seeds.dmmse_query_mse does) rather than in one vmap."""
    sigma = cfg.noise_std if noise_std is None else noise_std
    check_positive("noise_std", sigma)
    shape = jnp.shape(pool)
    if len(shape) != 2 or shape[1] != cfg.dim or shape[0] < 1:
        hint = (f"; for a fresh w ~ N(0, w_scale^2 I) per prompt (n_tasks=0, where task_pool(cfg) is empty) the "
                f"Bayes-optimal predictor is ridge(cfg, noise_std**2 / w_scale**2) = "
                f"ridge(cfg, {sigma**2 / cfg.w_scale**2:g})" if shape == (0, cfg.dim) else "")
        raise ValueError(f"dmmse's pool must be [K, cfg.dim={cfg.dim}] task vectors with K >= 1, got shape "
                         f"{shape}{hint}")

    def fit_prefixes(x, y):
        terms = (y[None, :] - pool @ x.T) ** 2 / (2 * sigma**2)  # [K, n]: -log-likelihood of pair i under task k
        # prefix j's sum over pairs i < j, every j in one product: a prompt holds [K, n] (a masked sum per prefix
        # held [n, K, n]); HIGHEST: a GPU's default TF32 matmul would round the terms to 10 bits
        log_lik = -jnp.matmul(terms, prefix_mask(x.shape[0]).T.astype(x.dtype), precision="highest")  # [K, n]
        return jax.nn.softmax(log_lik, axis=0).T @ pool  # [n, d]

    return _prefix_predictor(cfg, fit_prefixes, "dmmse")
