"""Summaries of attention patterns: the mass each head puts on the query itself, the previous token, k back."""

import jax
import jax.numpy as jnp


def mass_at_offset(weights: jax.Array, offset: int) -> jax.Array:
    """Mean over query positions q >= offset of weights[..., q, q - offset]: [..., H, T, T] -> [..., H].

    offset 0: attention to the query's own position; 1: to the previous token.
    """
    if weights.ndim < 3 or weights.shape[-2] != weights.shape[-1]:
        # [B, T] with B == T (a batch of NearestNeighborAttention's weights: one query, no query axis) is square too
        raise ValueError(f"weights must be self-attention weights [..., H, T, T] (a head axis; queries and keys the "
                         f"same positions), got shape {weights.shape}")
    t = weights.shape[-1]
    if not 0 <= offset < t:
        raise ValueError(f"offset must be in [0, {t - 1}], got {offset}")
    q = jnp.arange(offset, t)
    return weights[..., q, q - offset].mean(-1)


def mass_profile(weights: jax.Array, max_offset: int) -> jax.Array:
    """[..., H, max_offset + 1]: mass_at_offset for offsets 0..max_offset."""
    if not 0 <= max_offset < weights.shape[-1]:
        raise ValueError(f"max_offset must be in [0, {weights.shape[-1] - 1}], got {max_offset}")
    return jnp.stack([mass_at_offset(weights, k) for k in range(max_offset + 1)], -1)
