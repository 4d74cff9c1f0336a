"""Predictors of affine recurrences x_{n+1} = A x_n + b (jaxicl.tasks.affine_recurrence), with the model
signature: tokens [T, dim] (x_0..x_{T-1}) -> predictions of x_1..x_T, [T] for dim 1 or [T, dim]. One prompt each
(a batch [B, T, dim] raises ValueError; jax.vmap them over it).

  copy                   x_hat_{n+1} = x_n (the paper's layer-0 estimate)
  linear_extrapolation   2 x_n - x_{n-1} (copy at n = 0)
  three_term             exact for noise-free scalar sequences from n = 2 on: a = (x_n - x_{n-1}) /
                         (x_{n-1} - x_{n-2}), b = x_n - a x_{n-1}; copy before (and at a fixed point)
  least_squares          [A b] by minimum-norm least squares on the prefix pairs (x_i, x_{i+1}), i < n

fit_linear_filter returns a predictor with fixed weights fitted on training prompts: it infers nothing about
(a, b) from the prompt, so it is the control a model must beat to show in-context inference.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.mesh_placement import in_tokens_mesh
from jaxicl.prompt import check_one_prompt

Predictor = Callable[[jax.Array], jax.Array]


def _out(pred: jax.Array) -> jax.Array:
    return pred[:, 0] if pred.shape[1] == 1 else pred


@in_tokens_mesh
def copy(tokens: jax.Array) -> jax.Array:
    check_one_prompt("copy", tokens)
    return _out(tokens)


@in_tokens_mesh
def linear_extrapolation(tokens: jax.Array) -> jax.Array:
    check_one_prompt("linear_extrapolation", tokens)
    prev = jnp.concatenate([tokens[:1], tokens[:-1]])
    return _out(2 * tokens - prev)


@in_tokens_mesh
def three_term(tokens: jax.Array) -> jax.Array:
    """The exact solver of a scalar affine recurrence from its last three terms (tokens [T, 1]).

    Where x_{n-1} = x_{n-2} the sequence sits at its fixed point and copying is exact. Near it the estimate
    of a loses precision, but its error is multiplied by the tiny x_n - x_{n-1}, so the prediction keeps it.
    """
    check_one_prompt("three_term", tokens)
    if tokens.shape[1] != 1:
        raise ValueError(f"three_term solves scalar recurrences (token dim 1), got token dim {tokens.shape[1]}")
    x = tokens[:, 0]
    x1 = jnp.concatenate([x[:1], x[:-1]])  # x_{n-1}
    x2 = jnp.concatenate([x[:2], x[:-2]])  # x_{n-2}
    den = x1 - x2
    ok = (jnp.arange(x.shape[0]) >= 2) & (den != 0)
    a = (x - x1) / jnp.where(ok, den, 1.0)
    return jnp.where(ok, a * x + (x - a * x1), x)


@in_tokens_mesh
def least_squares(tokens: jax.Array) -> jax.Array:
    """[A b] = argmin sum_{i<n} |A x_i + b - x_{i+1}|^2 (minimum norm) at every position n; A x_n + b."""
    check_one_prompt("least_squares", tokens)
    t, d = tokens.shape
    feats = jnp.concatenate([tokens, jnp.ones((t, 1), tokens.dtype)], axis=1)  # [T, d + 1]
    nxt = jnp.concatenate([tokens[1:], jnp.zeros_like(tokens[:1])])  # x_{i+1} for pair i (the last unused)

    def at(n):
        use = (jnp.arange(t) < n).astype(tokens.dtype)[:, None]  # pairs i < n have both terms in the prefix
        w = jnp.linalg.pinv(feats * use) @ (nxt * use)  # [d + 1, d]
        return feats[n] @ w

    return _out(jax.vmap(at)(jnp.arange(t)))


def _windows(x: jax.Array, taps: int) -> jax.Array:
    """[..., T] -> [..., T, taps]: x_n, x_{n-1}, .., x_{n-taps+1} at position n, zero before x_0."""
    lag = jnp.arange(x.shape[-1])[:, None] - jnp.arange(taps)[None, :]  # [T, taps]: n - j
    return jnp.where(lag >= 0, jnp.take(x, jnp.maximum(lag, 0), axis=-1), 0.0)


def fit_linear_filter(inputs: jax.Array, targets: jax.Array, taps: int | None = None) -> Predictor:
    """The best fixed affine filter of a scalar recurrence, fitted by least squares separately at every position.

    inputs [B, T, 1], targets [B, T]: training prompts. At position n the prediction is w_n . (x_n, .., x_{n-taps+1})
    + c_n (taps None: all of x_0..x_n), with (w_n, c_n) minimising the squared error over the B prompts (minimum norm
    where terms before x_0 leave a column zero). Returns a predictor tokens [T, 1] -> [T].
    """
    if inputs.ndim != 3 or inputs.shape[-1] != 1:
        raise ValueError(f"inputs must be [B, T, 1] (scalar recurrences), got shape {inputs.shape}")
    t = inputs.shape[1]
    if taps is None:
        taps = t
    if taps < 1:
        raise ValueError(f"taps must be >= 1 or None (the whole prefix), got {taps}")
    # in float64 on the host: late terms of a contracting recurrence are nearly collinear, and a float32 pinv's
    # cutoff (10 B eps of the largest singular value) would discard the directions that separate them
    feats = np.asarray(_windows(inputs[..., 0], taps), np.float64)  # [B, T, taps]
    feats = np.concatenate([feats, np.ones_like(feats[..., :1])], axis=-1)  # [B, T, taps + 1]
    y = np.asarray(targets, np.float64)
    weights = jnp.asarray(np.stack([np.linalg.lstsq(feats[:, n], y[:, n], rcond=None)[0] for n in range(t)]))

    @in_tokens_mesh
    def predict(tokens: jax.Array) -> jax.Array:
        if tokens.shape != (t, 1):
            raise ValueError(f"tokens must be [{t}, 1] like the fitted prompts, got shape {tokens.shape}")
        return jnp.sum(_windows(tokens[:, 0], taps) * weights[:, :-1], axis=-1) + weights[:, -1]

    return predict
