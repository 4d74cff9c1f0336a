"""One linear self-attention layer = one step of gradient descent (von Oswald et al. 2023, Prop. 1).

For paired tokens e_i = [x_i; y_i] and query [x_q; 0], the layer with
  Q = [[I_d, 0], [0, 0]],   P = [[0, 0], [0, -lr]]   (D = d + 1)
and the 1 / N normalisation writes -lr/N sum_i y_i <x_i, x_q> into the query's label slot: minus
the prediction of one GD step of size lr from w = 0 on L(w) = 1/(2N) sum_i (<w, x_i> - y_i)^2.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.models.attention import SelfAttention
from jaxicl.models.pq_view import from_pq
from jaxicl.tasks.linear_regression import KURTOSIS, LinearRegression
from jaxicl.validation import ConfigError


def gd_step_pq(dim: int, lr: float, dtype=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """P, Q: [dim + 1, dim + 1] of the layer implementing one GD step of size lr, in dtype (None: the default float
    type, float64 under x64)."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    q = jnp.zeros((dim + 1, dim + 1), dtype).at[:dim, :dim].set(jnp.eye(dim, dtype=dtype))
    p = jnp.zeros((dim + 1, dim + 1), dtype).at[dim, dim].set(jnp.asarray(-lr, dtype))
    return p, q


def gd_step_model(dim: int, lr: float, dtype=None) -> SelfAttention:
    """A one-layer, one-head linear SelfAttention (with residual) equal to GD-1 at the query, its parameters in dtype
    (None: the default float type)."""
    p, q = gd_step_pq(dim, lr, dtype)
    return from_pq(p[None, None], q[None, None], residual=True)


def _gd_loss_coefficients(cfg: LinearRegression, n_context=None, noise_std=None):
    """(quadratic, linear, constant) coefficients of the expected query MSE of GD-1 as a polynomial in lr.

    With Sigma = Cov(x) (diagonal), s^2 = Var(w_k), sigma^2 the label noise and N context points, independent input
    coordinates of kurtosis k = E[x_j^4] / E[x_j^2]^2 give E[S Sigma S] = (N + k - 2)/N Sigma^3 + tr(Sigma^2) Sigma / N
    for S = (1/N) sum x_i x_i^T (Gaussian inputs: k = 3, Isserlis' theorem; uniform: k = 9/5).
    n_context, noise_std: values replacing cfg's (they may be traced, e.g. per sweep member); a concrete n_context
    (int or array) below 1 raises ConfigError.
    """
    if cfg.format != "paired" or cfg.n_tasks:
        raise ValueError("the GD-1 loss formula covers paired prompts with w ~ N(0, w_scale^2 I) (n_tasks=0)")
    sig = cfg.x_cov
    n = cfg.n_context if n_context is None else n_context
    if not isinstance(n, jax.core.Tracer) and np.any(np.asarray(n) < 1):
        raise ConfigError(f"n_context must be >= 1: GD-1 averages its gradient over the N context pairs (divides by "
                          f"N), got {n!r}")
    noise2 = (cfg.noise_std if noise_std is None else noise_std) ** 2
    s2 = cfg.w_scale**2
    tr1, tr2, tr3 = sig.sum(), (sig**2).sum(), (sig**3).sum()
    quad = s2 * ((n + KURTOSIS[cfg.x_dist] - 2) / n * tr3 + tr2 * tr1 / n) + noise2 * tr2 / n
    return quad, -2 * s2 * tr2, s2 * tr1 + noise2


def gd_one_step_loss(cfg: LinearRegression, lr, *, n_context=None, noise_std=None):
    """E[(y_hat_GD1 - y_q)^2] at the query for one GD step of size lr from w = 0 (n_context, noise_std: overrides)."""
    a, b, c = _gd_loss_coefficients(cfg, n_context, noise_std)
    return a * lr**2 + b * lr + c


def optimal_gd_lr(cfg: LinearRegression, *, n_context=None, noise_std=None):
    """The lr minimising gd_one_step_loss; N / (N + d + 1 + noise_std^2 / w_scale^2) for isotropic unit Gaussian
    inputs (von Oswald et al.'s U(-1, 1)^d at d = N = 10: 1.52).

    A float for a plain config; an array when n_context or noise_std is an array (traced or not).
    """
    a, b, _ = _gd_loss_coefficients(cfg, n_context, noise_std)
    return -b / (2 * a)
