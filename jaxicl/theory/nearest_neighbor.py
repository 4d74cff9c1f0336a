"""Closed forms for the 1-NN attention layer of Li et al. 2024 on its invariant family.

Gradient descent on the merged W from diag(0, ..., 0, -sigma) stays on
    W(xi1, xi2) = diag(xi1 I_d, 0_L, -xi2)
where a context point j scores xi1 s_j (s_j = <x_j, x_q>) and the query scores xi1 - xi2. With the
labels integrated out (E y_j y_k = delta_jk, binary labels) and q = softmax(xi1 s_1, .., xi1 s_N, xi1 - xi2):
    L(xi1, xi2) = 1/2 E_x[1 - 2 q_{i*} + sum_{j<=N} q_j^2]
    dL/dxi1     = E_x[sum_{j<=N} q_j^2 (s_j - s_bar) - q_{i*} (s_{i*} - s_bar)],  s_bar = sum_{k<=N+1} q_k s_k
    dL/dxi2     = -E_x[q_{N+1} (q_{i*} - sum_{j<=N} q_j^2)]  (<= 0 where xi1 >= 0: the nearest point then has
                  the largest weight, q_{i*} >= q_j, so q_{i*} >= sum_j q_j^2; not in general for xi1 < 0)
Full-matrix GD with step eta moves xi1 by -(eta / d) dL/dxi1 (the gradient spreads over d diagonal
entries) and xi2 by -eta dL/dxi2. The expectation over x is Monte Carlo over samples of s [M, N].
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate, special


def sample_inner_products(key: jax.Array, n_context: int, dim: int, num: int) -> jax.Array:
    """s [num, N]: <x_j, x_q> for x_j uniform on S^{dim-1}; by rotation invariance x_q = e_1."""
    z = jax.random.normal(key, (num, n_context, dim))
    return z[..., 0] / jnp.linalg.norm(z, axis=-1)


def _weights(xi1, xi2, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(q_context [M, N], q_query [M]): the softmax of (xi1 s_1, .., xi1 s_N, xi1 - xi2), max-subtracted, without
    concatenating the query's score (this is the inner loop of the long reduced runs)."""
    top = jnp.maximum(jnp.max(xi1 * s, axis=-1), xi1 - xi2)
    e, e_self = jnp.exp(xi1 * s - top[..., None]), jnp.exp(xi1 - xi2 - top)
    z = jnp.sum(e, axis=-1) + e_self
    return e / z[..., None], e_self / z


def log_query_weight(xi1, xi2, s: jax.Array) -> jax.Array:
    """log q_{N+1} [M], the query's softmax weight on itself, for s [M, N] (in logs: it reaches e^-50)."""
    scores = jnp.concatenate([xi1 * s, jnp.broadcast_to(xi1 - xi2, s.shape[:-1])[..., None]], axis=-1)
    return xi1 - xi2 - jax.nn.logsumexp(scores, axis=-1)


def reduced_terms(xi1, xi2, s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sample (loss, dL/dxi1, dL/dxi2), each [M], for s [M, N]."""
    best = jnp.argmax(s, axis=-1)
    s_best = jnp.take_along_axis(s, best[..., None], -1)[..., 0]
    qc, q_self = _weights(xi1, xi2, s)
    q_best = jnp.take_along_axis(qc, best[..., None], -1)[..., 0]
    sum_sq = jnp.sum(qc**2, axis=-1)
    s_bar = jnp.sum(qc * s, axis=-1) + q_self
    loss = 0.5 * (1.0 - 2.0 * q_best + sum_sq)
    g1 = jnp.sum(qc**2 * (s - s_bar[..., None]), axis=-1) - q_best * (s_best - s_bar)
    g2 = -q_self * (q_best - sum_sq)
    return loss, g1, g2


def reduced_loss(xi1, xi2, s: jax.Array) -> jax.Array:
    """L(xi1, xi2), Monte Carlo over s [M, N]."""
    return jnp.mean(reduced_terms(xi1, xi2, s)[0])


@partial(jax.jit, static_argnames="batch_size")
def reduced_loss_grid(xi1: jax.Array, xi2: jax.Array, s: jax.Array, batch_size: int = 16) -> jax.Array:
    """L at every point of xi1, xi2 [...] (equal shapes, e.g. a meshgrid's [rows, cols]), evaluated batch_size points
    at a time: [...]."""
    xi1, xi2 = jnp.asarray(xi1), jnp.asarray(xi2)
    if xi1.shape != xi2.shape:
        raise ValueError(f"xi1 and xi2 must have equal shapes (one point per entry), got {xi1.shape} and {xi2.shape}")
    points = jnp.stack([xi1.ravel(), xi2.ravel()], -1)  # [P, 2]: lax.map runs over the first axis only
    return jax.lax.map(lambda xi: reduced_loss(xi[0], xi[1], s), points, batch_size=batch_size).reshape(xi1.shape)


def reduced_grad(xi1, xi2, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(dL/dxi1, dL/dxi2) in closed form, Monte Carlo over s [M, N]."""
    _, g1, g2 = reduced_terms(xi1, xi2, s)
    return jnp.mean(g1), jnp.mean(g2)


def loss_at_init(n_context: int, sigma: float) -> float:
    """L(0, sigma) = 1/2 (1 - 2 / (N + e^-sigma) + N / (N + e^-sigma)^2) (no Monte Carlo needed)."""
    z = n_context + np.exp(-sigma)
    return 0.5 * (1.0 - 2.0 / z + n_context / z**2)


def from_reduced(xi1, xi2, dim: int, label_dim: int = 1) -> jax.Array:
    """W(xi1, xi2) = diag(xi1 I_d, 0_L, -xi2): [d+L+1, d+L+1]."""
    diag = jnp.concatenate([jnp.full((dim,), xi1), jnp.zeros((label_dim,)), -jnp.reshape(xi2, (1,))])
    return jnp.diag(diag)


def to_reduced(w: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
    """The family coordinates of W [..., D, D]: xi1 = mean diag of the x block, xi2 = -W[-1, -1]."""
    xi1 = jnp.mean(jnp.diagonal(w[..., :dim, :dim], axis1=-2, axis2=-1), axis=-1)
    return xi1, -w[..., -1, -1]


def off_family_norm(w: jax.Array, dim: int) -> jax.Array:
    """|W - W(to_reduced(W))|_F for W [..., D, D]: the distance from W to the invariant family."""
    xi1, xi2 = to_reduced(w, dim)
    label_dim = w.shape[-1] - dim - 1
    proj = jnp.vectorize(lambda a, b: from_reduced(a, b, dim, label_dim), signature="(),()->(k,k)")(xi1, xi2)
    return jnp.sqrt(jnp.sum((w - proj) ** 2, axis=(-2, -1)))


@partial(jax.jit, static_argnames=("steps", "record_every"))
def reduced_gd(xi1: float, xi2: float, s: jax.Array, *, eta: float, dim: int, steps: int,
               record_every: int = 1) -> jax.Array:
    """The two-parameter dynamics of full-matrix GD: [steps // record_every + 1, 2] (xi1, xi2), start first;
    record_every > 0 divides steps.

    xi1 <- xi1 - (eta / d) dL/dxi1,  xi2 <- xi2 - eta dL/dxi2, with L Monte Carlo over the fixed s [M, N].
    The updates are summed with Kahan compensation: late increments are a few ulps of xi in float32, and
    plain summation over 1e6 steps would drift.
    """
    if record_every <= 0 or steps < 0 or steps % record_every:
        raise ValueError(f"steps must be a non-negative multiple of record_every > 0, got steps={steps}, "
                         f"record_every={record_every}")

    def step(carry, _):
        xi, lost = carry
        g1, g2 = reduced_grad(xi[0], xi[1], s)
        update = -jnp.stack([eta / dim * g1, eta * g2]) - lost
        new = xi + update
        return (new, (new - xi) - update), None

    def block(carry, _):
        carry = jax.lax.scan(step, carry, length=record_every)[0]
        return carry, carry[0]

    start = jnp.asarray([xi1, xi2], s.dtype)
    path = jax.lax.scan(block, (start, jnp.zeros_like(start)), length=steps // record_every)[1]
    return jnp.concatenate([start[None], path], axis=0)


def theorem2_bound(xi1, xi2, n_context: int, delta: float, label_bound=1.0, query_gap=0.0):
    """A constant-explicit form of Theorem 2 for W on the family, per prompt.

    If every competitor j != i* has |x_j - x_q|^2 >= |x_{i*} - x_q|^2 + delta and |y_j| <= label_bound,
        |y_hat - y_{i*}| <= 2 label_bound ((N - 1) exp(-xi1 delta / 2) + exp(xi1 query_gap - xi2)),
    with query_gap = 1 - <x_{i*}, x_q> (0 when the query copies a context point, as in the shifted set;
    at most 2, which gives the paper's exp(2 xi1 - xi2) term). Proof: q_j / q_{i*} <= exp(-xi1 delta / 2)
    for competitors, q_{N+1} / q_{i*} = exp(xi1 query_gap - xi2), and |y_hat - y_{i*}| <= 2 B (1 - q_{i*}).
    """
    return 2.0 * label_bound * ((n_context - 1) * jnp.exp(-xi1 * delta / 2) + jnp.exp(xi1 * query_gap - xi2))


def fit_log_growth(steps, values) -> tuple[float, float, float]:
    """Least-squares fit values ~ slope * log(steps) + intercept: (slope, intercept, r^2); steps > 0.

    Li et al. (Lemmas 4, 5, 13) predict xi1^t, xi2^t = Theta(poly(N, d) log t); r^2 near 1 over a long
    window is that prediction. (Heuristically, once L ~ C / xi1 the flow d xi1 / dt ~ (eta / d) C / xi1^2
    gives xi1 ~ t^(1/3); both are compatible with the paper's bounds, and finite runs can tell them apart.)
    """
    t = np.log(np.asarray(steps, np.float64))
    v = np.asarray(values, np.float64)
    slope, intercept = np.polyfit(t, v, 1)
    resid = v - (slope * t + intercept)
    r2 = 1.0 - np.sum(resid**2) / max(np.sum((v - v.mean()) ** 2), 1e-300)
    return float(slope), float(intercept), float(r2)


def log_slope_drift(steps, values, start: float, stop: float) -> float:
    """d values / d log t fitted on the later half of the log window [start, stop] over the earlier half.

    steps [K] > 0 and values [K]; the halves split at sqrt(start * stop). 1 for exact a log t + b; above 1
    means faster growth than log t in the window (e.g. t^p with p > 0).
    """
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    early, late = _log_window_halves(steps, start, stop)
    return fit_log_growth(steps[late], values[late])[0] / fit_log_growth(steps[early], values[early])[0]


def _log_window_halves(steps: np.ndarray, start: float, stop: float) -> tuple[np.ndarray, np.ndarray]:
    """Masks [K] of the earlier and the later half of the log window [start, stop] (split at sqrt(start * stop))."""
    middle = np.sqrt(start * stop)
    return (steps >= start) & (steps < middle), (steps >= middle) & (steps <= stop)


def window_mean_ratio(steps, values, start: float, stop: float) -> float:
    """Mean of values over the later half of the log window [start, stop] over the mean over the earlier half
    (split at sqrt(start * stop), as log_slope_drift): 1 for a constant, below 1 for a decreasing quantity."""
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    early, late = _log_window_halves(steps, start, stop)
    return float(values[late].mean() / values[early].mean())


def top_gap_laplace(s: jax.Array, xi) -> jax.Array:
    """E[exp(xi (s_(2) - s_(1)))] (Li et al. Lemma 20: Theta(1/xi)), Monte Carlo over s [M, N], with s_(1) >= s_(2)
    the two largest s_j; xi [K] -> [K]."""
    top = jax.lax.top_k(s, 2)[0]
    return jnp.mean(jnp.exp(-jnp.asarray(xi)[..., None] * (top[:, 0] - top[:, 1])), axis=-1)


def top_gap_density_at_zero(n_context: int, dim: int) -> float:
    """p(0), the density at 0 of the gap s_(1) - s_(2), so that xi E[exp(xi (s_(2) - s_(1)))] -> p(0) as xi -> inf:
    N (N - 1) int f(s)^2 F(s)^(N-2) ds (two of the N points at the top together), with
    f = (k_d / 2) (1 - s^2)^((d-3)/2) the density of one s_j and F its CDF ((1 + s) / 2 ~ Beta((d-1)/2, (d-1)/2));
    needs N >= 2 and d >= 3 (at d = 2, f^2 is not integrable at s = 1 and p(0) is infinite)."""
    if n_context < 2 or dim < 3:
        raise ValueError(f"the top gap's density at 0 needs n_context >= 2 (two points to have a gap) and dim >= 3 "
                         f"(it is infinite at dim 2), got n_context={n_context}, dim={dim}")
    a = (dim - 1) / 2
    half_k = special.gamma(dim / 2) / (np.sqrt(np.pi) * special.gamma(a))

    def integrand(s):
        return (half_k * (1 - s * s) ** ((dim - 3) / 2)) ** 2 * special.betainc(a, a, (1 + s) / 2) ** (n_context - 2)

    return float(n_context * (n_context - 1) * integrate.quad(integrand, -1, 1)[0])


def lemma12_sigma(n_context: int, dim: int) -> float:
    """The sigma Li et al.'s Lemma 12 (xi1 <= 7/15 xi2 for all t) assumes: 3 log(2 N^4 d / a_(N,d)) with
    a_(N,d) = (2 N sqrt(d))^(-2 / (d - 3)); defined for d > 3."""
    if dim <= 3:
        raise ValueError(f"Lemma 12's sigma needs dim > 3, got dim={dim}")
    a = (2 * n_context * np.sqrt(dim)) ** (-2 / (dim - 3))
    return float(3 * np.log(2 * n_context**4 * dim / a))
