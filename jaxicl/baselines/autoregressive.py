"""Baselines for in-context autoregressive sequences s_{t+1} = W s_t (Sander et al. 2024)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.prompt import Prompt


def best_gd_step(batch: Prompt) -> tuple[np.ndarray, np.ndarray]:
    """One GD step from W = 0 with the best step eta_t per position, fitted by least squares on this batch
    (an oracle: the step is chosen on the prompts it is scored on).

    batch: autoregressive prompts (info["states"] [B, T + 1, d], real states). Returns (eta [T], loss [T]),
    loss the mean over coordinates of the squared error of eta_t * (sum_{t'<=t} s_t' s_{t'-1}^T) s_t.
    """
    return tuple(np.asarray(x) for x in _best_gd_step(batch.info["states"]))


@jax.jit
def _best_gd_step(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s: states [B, T + 1, d] -> (eta [T], loss [T])."""
    moments = jnp.cumsum(s[:, 1:-1, :, None] * s[:, :-2, None, :], axis=1)  # sum_{t'=1}^{t} s_t' s_{t'-1}^T
    moments = jnp.concatenate([jnp.zeros_like(moments[:, :1]), moments], axis=1)  # [B, T, d, d]
    base = jnp.einsum("btij,btj->bti", moments, s[:, :-1])
    target = s[:, 1:]
    eta = jnp.sum(base * target, (0, 2)) / jnp.maximum(jnp.sum(base * base, (0, 2)), 1e-30)
    return eta, jnp.mean((eta[None, :, None] * base - target) ** 2, axis=(0, 2))
