"""Baselines for in-context autoregressive sequences s_{t+1} = W s_t (Sander et al. 2024)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.prompt import Prompt


def best_gd_step(batch: Prompt) -> tuple[np.ndarray, np.ndarray]:
    """One GD step from W = 0 with the best real step eta_t per position, fitted by least squares on this batch
    (an oracle: the step is chosen on the prompts it is scored on).

    batch: autoregressive prompts (info["states"] [B, T + 1, d], real or complex). Returns (eta [T], loss [T]), loss
    the mean over coordinates of |eta_t (sum_{t'<=t} s_t' s_{t'-1}^H) s_t - s_{t+1}|^2 (^H: conjugate transpose;
    minus the Wirtinger gradient of sum |W s_{t'-1} - s_t'|^2 at W = 0).
    """
    return tuple(np.asarray(x) for x in _best_gd_step(batch.info["states"]))


@jax.jit
def _best_gd_step(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s: states [B, T + 1, d] -> (eta [T], loss [T]), both real."""
    moments = jnp.cumsum(s[:, 1:-1, :, None] * s[:, :-2, None, :].conj(), axis=1)  # sum_{t'=1}^{t} s_t' s_{t'-1}^H
    moments = jnp.concatenate([jnp.zeros_like(moments[:, :1]), moments], axis=1)  # [B, T, d, d]
    base = jnp.einsum("btij,btj->bti", moments, s[:, :-1])
    target = s[:, 1:]
    # argmin over real eta of sum |eta base - target|^2
    eta = jnp.sum((base.conj() * target).real, (0, 2)) / jnp.maximum(jnp.sum(jnp.abs(base) ** 2, (0, 2)), 1e-30)
    return eta, jnp.mean(jnp.abs(eta[None, :, None] * base - target) ** 2, axis=(0, 2))
