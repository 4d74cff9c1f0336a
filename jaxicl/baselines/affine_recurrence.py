"""Predictors of affine recurrences x_{n+1} = A x_n + b (jaxicl.tasks.affine_recurrence), with the model
signature: tokens [T, dim] (x_0..x_{T-1}) -> predictions of x_1..x_T, [T] for dim 1 or [T, dim].

  copy                   x_hat_{n+1} = x_n (the paper's layer-0 estimate)
  linear_extrapolation   2 x_n - x_{n-1} (copy at n = 0)
  three_term             exact for noise-free scalar sequences from n = 2 on: a = (x_n - x_{n-1}) /
                         (x_{n-1} - x_{n-2}), b = x_n - a x_{n-1}; copy before (and at a fixed point)
  least_squares          [A b] by minimum-norm least squares on the prefix pairs (x_i, x_{i+1}), i < n
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Predictor = Callable[[jax.Array], jax.Array]


def _out(pred: jax.Array) -> jax.Array:
    return pred[:, 0] if pred.shape[1] == 1 else pred


def copy(tokens: jax.Array) -> jax.Array:
    return _out(tokens)


def linear_extrapolation(tokens: jax.Array) -> jax.Array:
    prev = jnp.concatenate([tokens[:1], tokens[:-1]])
    return _out(2 * tokens - prev)


def three_term(tokens: jax.Array) -> jax.Array:
    """The exact solver of a scalar affine recurrence from its last three terms (tokens [T, 1]).

    Where x_{n-1} = x_{n-2} the sequence sits at its fixed point and copying is exact. Near it the estimate
    of a loses precision, but its error is multiplied by the tiny x_n - x_{n-1}, so the prediction keeps it.
    """
    if tokens.shape[1] != 1:
        raise ValueError(f"three_term solves scalar recurrences (token dim 1), got token dim {tokens.shape[1]}")
    x = tokens[:, 0]
    x1 = jnp.concatenate([x[:1], x[:-1]])  # x_{n-1}
    x2 = jnp.concatenate([x[:2], x[:-2]])  # x_{n-2}
    den = x1 - x2
    ok = (jnp.arange(x.shape[0]) >= 2) & (den != 0)
    a = (x - x1) / jnp.where(ok, den, 1.0)
    return jnp.where(ok, a * x + (x - a * x1), x)


def least_squares(tokens: jax.Array) -> jax.Array:
    """[A b] = argmin sum_{i<n} |A x_i + b - x_{i+1}|^2 (minimum norm) at every position n; A x_n + b."""
    t, d = tokens.shape
    feats = jnp.concatenate([tokens, jnp.ones((t, 1), tokens.dtype)], axis=1)  # [T, d + 1]
    nxt = jnp.concatenate([tokens[1:], jnp.zeros_like(tokens[:1])])  # x_{i+1} for pair i (the last unused)

    def at(n):
        use = (jnp.arange(t) < n).astype(tokens.dtype)[:, None]  # pairs i < n have both terms in the prefix
        w = jnp.linalg.pinv(feats * use) @ (nxt * use)  # [d + 1, d]
        return feats[n] @ w

    return _out(jax.vmap(at)(jnp.arange(t)))
