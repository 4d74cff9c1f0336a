"""Small numeric helpers shared by the analyses and the task metrics (no jaxicl imports, so any module may use them)."""

import jax
import jax.numpy as jnp


def ratio_or_nan(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den (broadcast) where den > 0, NaN elsewhere: a mean over nothing (no cell, no pair, no board) is
    undefined, and 0 would read as a result. den's zeros are replaced before the division, so neither the value nor
    the gradient meets a 0 / 0."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.nan)
