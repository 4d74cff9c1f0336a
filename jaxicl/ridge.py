"""Ridge regression through a QR factorisation, stable in float32 where the normal equations are not."""

import jax
import jax.numpy as jnp


def ridge_solve(x: jax.Array, y: jax.Array, lam: float) -> jax.Array:
    """argmin_w |x w - y|^2 + lam |w|^2 for x [N, F], y [N] or [N, K] -> w [F] or [F, K]: the least-squares
    solution of [x; sqrt(lam) I] w = [y; 0], from its QR factorisation. Solving (x^T x + lam I) w = x^T y squares
    x's condition number: with F near N, or correlated features, float32 then gave weights far from the minimiser
    (held-out R^2 -87 where the minimiser's is 0.77) or NaN (a prefix shorter than F at lam 1e-6). QR costs about
    3x the normal equations (an SVD, 60x), and its gradients stay finite where an SVD's are not (repeated zero
    singular values)."""
    n, f = x.shape
    q, r = jnp.linalg.qr(jnp.concatenate([x, jnp.sqrt(jnp.asarray(lam, x.dtype)) * jnp.eye(f, dtype=x.dtype)]))
    return jax.scipy.linalg.solve_triangular(r, q[:n].T @ y)
