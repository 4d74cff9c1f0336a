"""Closed forms of in-context autoregressive learning (Sander et al. 2024).

Diagonal positional attention (jaxicl.models.ar_linear_attention), C = B^T A [d, d], P [T, T].
Row r = 0..T-2 of P serves the prediction of s_{r+2} from query s_r and keys s_0..s_{r+1}; with
p = P[r, :r+2], p_prev = P[r, r], p_cur = P[r, r+1], S = sum(p), R_i = sum_j C_ij:
  unitary (s_0 = 1, lambda_i i.i.d. uniform on the circle), exact population loss of row r:
    L_r = p_prev^2 (||C 1||^2 - ||C||_F^2) + ||p||^2 ||C||_F^2 - 2 p_cur tr C + d
  orthogonal (complex eigenbasis, conjugate pairs on coordinates (2k, 2k+1), s_0 = 1), with
  partner i' = i xor 1 and c_i = C_{i i'}:
    L_r = sum_i [(S c_i + p_prev (R_i - c_i))^2 + (||p||^2 - p_prev^2)(||C_i||^2 - c_i^2)]
          - 2 p_cur tr C + d
  (derived by matching the exponents of the monomials in lambda; checked by Monte Carlo in the tests).
The training loss is the sum over rows; P's last row is never used.

Augmented one-step GD: Gamma(e_{0:t}) = eta sum_{t'} s_{t'} s_{t'-1}^* is one GD step of size eta from
W = 0 on L_t(W) = 1/2 sum_{t'=1}^t ||s_{t'} - W s_{t'-1}||^2. For the unitary family with random
phases |s_{0,i}| = r and t context pairs: eta* = 1 / (r^2 (t + d - 1)), minimal loss ||s_0||^2 (d-1)/(t+d-1).

Positional-only (d = 1, C = 1): each row of P is a real linear least-squares problem; GD from 0 tends
to the minimum-norm solution, computed here with a relative singular-value cutoff rcond.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.mesh_placement import replicated_inputs

FAMILIES = ("unitary", "orthogonal")


def row_statistics(p: jax.Array) -> dict[str, jax.Array]:
    """Per-row quantities [T - 1] of P [T, T]: p_prev, p_cur, total (S) and sq_norm (||p||^2) over keys <= r+1."""
    t = p.shape[0]
    r = jnp.arange(t - 1)
    visible = jnp.arange(t)[None, :] <= r[:, None] + 1
    rows = jnp.where(visible, p[:-1], 0.0)
    return {"p_prev": p[r, r], "p_cur": p[r, r + 1], "total": rows.sum(1), "sq_norm": (rows ** 2).sum(1)}


def _row_losses(c: jax.Array, p: jax.Array, family: str) -> jax.Array:
    """L_r [T - 1] for C [d, d] and P [T, T]; family in FAMILIES (orthogonal: d even, coordinates in pairs)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    d = c.shape[0]
    if family == "orthogonal" and d % 2:
        raise ValueError(f"family='orthogonal' pairs coordinates (2k, 2k+1): d must be even, got d={d}")
    st = row_statistics(p)
    prev2, rest = st["p_prev"] ** 2, st["sq_norm"] - st["p_prev"] ** 2
    rows_sq = (c ** 2).sum(1)  # ||C_i||^2 [d]
    if family == "unitary":
        quad = prev2 * (jnp.sum(c.sum(1) ** 2) - rows_sq.sum()) + st["sq_norm"] * rows_sq.sum()
    else:
        i = jnp.arange(d)
        pair = c[i, i ^ 1]  # [d]
        mixed = st["total"][:, None] * pair + st["p_prev"][:, None] * (c.sum(1) - pair)
        quad = jnp.sum(mixed ** 2, 1) + rest * jnp.sum(rows_sq - pair ** 2)
    return quad - 2 * st["p_cur"] * jnp.trace(c) + d


def population_loss(family: str, a: jax.Array, b: jax.Array, p: jax.Array) -> jax.Array:
    """Sum over rows of the exact population loss; a, b [H, d], p [T, T]; family in FAMILIES. "orthogonal" is the
    loss on states in the complex eigenbasis (the module docstring), not on the real states that
    jaxicl.tasks.autoregressive's "orthogonal" family draws: the diagonal model depends on the basis, so only the
    optimum (zero loss) carries over to those, and only with random_basis=False (Q = I; see orthogonal_optimum)."""
    return _row_losses(b.T @ a, p, family).sum()


def row_losses(family: str, a: jax.Array, b: jax.Array, p: jax.Array) -> jax.Array:
    """The per-row population losses [T - 1] (population_loss's, with its caveat for "orthogonal")."""
    return _row_losses(b.T @ a, p, family)


def _superdiagonal(seq_len: int, value: float) -> np.ndarray:
    return value * np.eye(seq_len, k=1)


def unitary_optimum(dim: int, num_heads: int, seq_len: int, c: float = 1.0):
    """(A, B [H, d], P [T, T]) with C = B^T A = c I, c p_cur = 1, every other p = 0. Needs H >= d."""
    if num_heads < dim:
        raise ValueError(f"the unitary optimum needs num_heads >= dim={dim}, got {num_heads}")
    a = np.zeros((num_heads, dim))
    a[:dim] = c * np.eye(dim)
    b = np.zeros((num_heads, dim))
    b[:dim] = np.eye(dim)
    return a, b, _superdiagonal(seq_len, 1.0 / c)


def orthogonal_optimum(dim: int, num_heads: int, seq_len: int, c: float = 1.0):
    """(A, B [H, d], P [T, T]) with C = c blockdiag(J, ..., J), J = ones(2, 2), c p_cur = 1, c p_prev = -1/2.
    Needs H >= d/2.

    Exact (zero loss) in the complex eigenbasis and on the task's real states with random_basis=False (Q = I),
    whose rotation planes are the coordinate pairs (2k, 2k + 1). Not an optimum with random_basis=True: a Haar Q
    mixes the coordinates, and the diagonal model does not rotate with it (at dim 4 it then does worse than
    predicting 0)."""
    if dim % 2 or num_heads < dim // 2:
        raise ValueError(f"the orthogonal optimum needs even dim and num_heads >= dim/2, got {dim}, {num_heads}")
    a = np.zeros((num_heads, dim))
    b = np.zeros((num_heads, dim))
    for k in range(dim // 2):
        a[k, 2 * k:2 * k + 2] = c
        b[k, 2 * k:2 * k + 2] = 1.0
    p = _superdiagonal(seq_len, 1.0 / c) - 0.5 / c * np.eye(seq_len)
    return a, b, p


def block_structure(c: np.ndarray) -> np.ndarray:
    """The orthogonal optimum's mask blockdiag(ones(2, 2)) [d, d]."""
    d = c.shape[0]
    i = np.arange(d)
    return (i[:, None] // 2 == i[None, :] // 2).astype(float)


def inner_objective(w: jax.Array, s: jax.Array) -> jax.Array:
    """L(W) = 1/2 sum_{t'=1}^{t} ||s_{t'} - W s_{t'-1}||^2 for states s [t + 1, d] (real)."""
    return 0.5 * jnp.sum((s[1:] - s[:-1] @ w.T) ** 2)


def gd_step_gamma(s: jax.Array, eta: float) -> jax.Array:
    """One GD step from W = 0 on the inner objective: eta sum_{t'} s_{t'} s_{t'-1}^* [d, d]."""
    return eta * s[1:].T @ jnp.conj(s[:-1])


def optimal_gd_step(dim: int, t, r: float = 1.0):
    """eta* = 1 / (r^2 (t + d - 1)) at a position with t context pairs (unitary, random phases)."""
    return 1.0 / (r ** 2 * (np.asarray(t) + dim - 1))


def gd_step_loss(dim: int, t, eta, r: float = 1.0):
    """E ||eta M s_t - s_{t+1}||^2 with M = sum_{t'<=t} s_{t'} s_{t'-1}^* (unitary, random phases)."""
    t = np.asarray(t)
    return dim * r ** 2 * ((eta * r ** 2 * t - 1) ** 2 + eta ** 2 * r ** 4 * t * (dim - 1))


def gd_step_min_loss(dim: int, t, r: float = 1.0):
    """||s_0||^2 (d - 1) / (t + d - 1), the loss at eta*."""
    return dim * r ** 2 * (dim - 1) / (np.asarray(t) + dim - 1)


def optimal_shared_gd_step(dim: int, positions, r: float = 1.0) -> float:
    """The eta minimising the summed loss over positions (t context pairs each) with one shared eta."""
    t = np.asarray(positions, float)
    return float(t.sum() / (r ** 2 * np.sum(t ** 2 + t * (dim - 1))))


def positional_features(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Least-squares data of the positional-only model from states s [n, T + 1] (d = 1).

    Returns features F [T - 1, n, T] (row r: conj(s_r) s_k^2 for k <= r + 1, else 0) and targets
    y [T - 1, n] (s_{r+2}); row r's prediction is F[r] @ P[r].
    """
    t = s.shape[1] - 1
    r = jnp.arange(t - 1)
    visible = jnp.arange(t)[None, :] <= r[:, None] + 1  # [T - 1, T]
    f = jnp.conj(s[:, :t - 1]).T[:, :, None] * (s[:, :t] ** 2)[None]
    return jnp.where(visible[:, None, :], f, 0.0), s[:, 2:].T


@replicated_inputs
def positional_quadratic(s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The positional-only loss mean_{n, r} |F[r, n] P[r] - y[r, n]|^2 as sum_r (p G p - 2 h p + c) / (n (T - 1)).

    Returns G [T - 1, T, T] = Re F^H F, h [T - 1, T] = Re F^H y, c [T - 1] = ||y||^2 (unnormalised). States split
    over a mesh's "data" axis (drawn under jax.set_mesh) are replicated first: the sums over n are over that axis,
    and JAX refuses a contraction over a split axis without an output sharding, inside the mesh and after it.
    """
    f, y = positional_features(s)
    g = jnp.real(jnp.einsum("rnk,rnl->rkl", jnp.conj(f), f))
    h = jnp.real(jnp.einsum("rnk,rn->rk", jnp.conj(f), y))
    return g, h, jnp.sum(jnp.abs(y) ** 2, 1)


def min_norm_positional(s: jax.Array, rcond: float) -> jax.Array:
    """Min-norm least-squares P [T, T] (last row 0) from states s [n, T + 1]: the pseudo-inverse of the
    real-stacked features with singular values below rcond * (the row's largest) discarded.

    Computed from the eigendecomposition of the Gram matrices G = Re F^H F (singular values^2);
    use float64 and rcond >~ 1e-4 (smaller cutoffs are below the Gram matrix's precision).
    """
    g, h, _ = positional_quadratic(s)
    ev, v = jnp.linalg.eigh(g)  # ascending; ev = singular values^2
    keep = ev > rcond ** 2 * ev[:, -1:]
    inv = jnp.where(keep, 1.0 / jnp.where(keep, ev, 1.0), 0.0)
    rows = jnp.einsum("rkl,rl,rml,rm->rk", v, inv, v, h)
    return jnp.concatenate([rows, jnp.zeros_like(rows[:1])])


def ridge_positional(s: jax.Array, lam: float) -> jax.Array:
    """Tikhonov-regularised least squares P [T, T] (last row 0): row r = argmin ||F_r p - y_r||^2 + lam ||p||^2.

    Early-stopped GD from 0 is a spectral filter close to this with lam = 1 / (alpha k) after k steps
    of size alpha on the unnormalised objective (see `gd_ridge_penalty`); lam -> 0 gives min-norm LS.
    """
    g, h, _ = positional_quadratic(s)
    rows = jnp.linalg.solve(g + lam * jnp.eye(g.shape[-1]), h[..., None])[..., 0]
    return jnp.concatenate([rows, jnp.zeros_like(rows[:1])])


def gd_ridge_penalty(lr: float, steps: int, normaliser: float) -> float:
    """lam = 1 / (alpha k) for k GD steps of size lr on sum_r |F_r p - y_r|^2 / normaliser.

    alpha = 2 lr / normaliser is the step on the unnormalised objective."""
    return normaliser / (2 * lr * max(steps, 1))
