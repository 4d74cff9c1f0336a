"""Convergence and dimensionality of token representations (Ferry et al. 2023's analyses, generic in the site).

unit distance: || v / |v| - w / |w| ||_2, the official metric. cross_board_distance is the official
`analyze_across_boards`: for the same F focus cells of k boards (e.g. one object's 9 cells in other contexts,
at the same position), the mean over board pairs of each cell's unit distance. within_board_ratio is the
reconstructed within-board measure R = W / OB of the notes (Section 6.2). participation_ratio is
(sum lambda)^2 / sum lambda^2 of the covariance's eigenvalues.

Each takes rows split over a mesh's "data" axis (features of a batch drawn under jax.set_mesh), inside the
mesh and after it, replicated first: the pairs and the covariance run across that axis.
"""

import jax
import jax.numpy as jnp

from jaxicl.mesh_placement import replicated_inputs
from jaxicl.numeric import ratio_or_nan


def unit(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm (zero rows stay zero): x [..., D]."""
    n = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(n > 0, n, 1.0)


@replicated_inputs
def mean_pairwise_distance(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean Euclidean distance over distinct pairs of the rows of x [N, D] (pairs weighted by weights [N, N] if
    given: the mean over pairs i != j with weight w_ij). NaN where there is no pair (one row, or zero weights): 0
    would read as perfect convergence."""
    # the [N, N, D] differences themselves: the Gram identity |a|^2 + |b|^2 - 2 a.b cancels catastrophically for
    # near-equal rows (float32: ~sqrt(eps) = 3e-4 for identical unit vectors), the converged regime measured here
    d = jnp.linalg.norm(x[:, None] - x[None], axis=-1)
    off = 1.0 - jnp.eye(x.shape[0])
    w = off if weights is None else off * weights
    return ratio_or_nan(jnp.sum(w * d), jnp.sum(w))


@replicated_inputs
def cross_board_distance(features: jax.Array) -> jax.Array:
    """[F] for features [B, F, D] (the same F focus cells on B boards): the mean over board pairs b < b' of the unit
    distance between the boards' f-th cells. Low values: the cell is represented alike across contexts. NaN for
    one board (no pair)."""
    return jax.vmap(lambda f: mean_pairwise_distance(unit(f)), in_axes=1)(features)


@replicated_inputs
def within_board_ratio(features: jax.Array, objects: jax.Array) -> jax.Array:
    """R = W / OB for one board: features [T, D], objects [T] bool (the cells of one object). W is the mean unit
    distance among the object's cells, OB the mean unit distance between its cells and the other cells. NaN where
    undefined: an object of fewer than 2 cells (no pair for W) or of every cell (none for OB)."""
    u = unit(features)
    o = objects.astype(u.dtype)
    w = mean_pairwise_distance(u, o[:, None] * o[None])
    ob = mean_pairwise_distance(u, o[:, None] * (1 - o)[None] + (1 - o)[:, None] * o[None])
    defined = (o.sum() >= 2) & (o.sum() < o.shape[0])
    return jnp.where(defined, w / jnp.maximum(ob, 1e-12), jnp.nan)


@replicated_inputs
def participation_ratio(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """(sum lambda)^2 / sum lambda^2 of the covariance of the rows of x [N, D] (rows weighted by weights [N] if
    given, e.g. a mask selecting one root's cells): between 1 (one direction) and D (isotropic); NaN where the
    selected rows do not vary (none, one, or all equal: no direction at all)."""
    w = jnp.ones(x.shape[0], x.dtype) if weights is None else weights.astype(x.dtype)
    w = w / jnp.maximum(w.sum(), 1e-12)
    centred = x - w @ x
    cov = (centred * w[:, None]).T @ centred
    # trace and Frobenius norm of the covariance: sum lambda and sum lambda^2, no eigendecomposition needed
    return ratio_or_nan(jnp.trace(cov) ** 2, jnp.sum(cov**2))
