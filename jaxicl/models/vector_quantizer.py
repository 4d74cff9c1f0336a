"""A vector quantiser with an exponential-moving-average codebook (the EMA variant of Ferry et al.'s LEA).

Pure functions of explicit arrays: the codebook [K, D], its EMA numerator ema_w [K, D] and the EMA cluster
sizes [K] go in and come out, so a training step carries them as state (TrainState.buffers) and nothing is
mutated behind the caller's back. Per step (shared/papers/abstractions_ferry2023.md, Section 5):

  code(x)       = argmin_k ||x - c_k||                      (Euclidean; ties: the lowest k)
  quantised     = x + stop_gradient(c_code - x)             (straight-through: the gradient is the identity)
  cluster_size <- decay * cluster_size + (1 - decay) * counts,   then Laplace smoothing:
                  (cluster_size + eps) / (n + K eps) * n    with n = sum(cluster_size)
  ema_w        <- decay * ema_w + (1 - decay) * sum of the x assigned to each code
  codebook     <- ema_w / cluster_size
  loss          = commitment * mean (x - sg(c_code))^2 + usage_cost * mean_k (usage_k - 1/K)^2

Optionally (ours, not in the notes' recipe; off by default), codes whose EMA cluster size falls below a threshold
are restarted on this batch's worst-quantised vectors (restart_dead_codes), so a code that lost every vector
early in training is not left unreachable far from the data.
Also ours: kmeans fits a codebook to a batch of vectors (the LEA's words, fitted to its speech when they take over
from continuous speech; jaxicl.train.losses.lea_loss).

The usage term comes from an argmin and carries no gradient; the codebook gets none either (only the EMA moves it).
"""

import jax
import jax.numpy as jnp

from jaxicl.validation import check_range


def nearest_codes(codebook: jax.Array, x: jax.Array) -> jax.Array:
    """int32 [...] the index of the nearest code [K, D] to each vector x [..., D]."""
    d2 = jnp.sum(x**2, -1, keepdims=True) - 2 * x @ codebook.T + jnp.sum(codebook**2, -1)
    return jnp.argmin(d2, -1).astype(jnp.int32)


def straight_through(x: jax.Array, quantised: jax.Array) -> jax.Array:
    """quantised in the forward pass, the identity on x in the backward pass."""
    return x + jax.lax.stop_gradient(quantised - x)


def usage(codes: jax.Array, n_codes: int) -> jax.Array:
    """[K] the fraction of the vectors assigned to each code (sums to 1), in the default float type."""
    return jnp.mean(jax.nn.one_hot(codes.reshape(-1), n_codes, dtype=jnp.result_type(float)), 0)


def ema_update(ema_w: jax.Array, cluster_size: jax.Array, x: jax.Array, codes: jax.Array, *, decay: float,
               epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(codebook [K, D], ema_w [K, D], cluster_size [K]) after one EMA step on vectors x [..., D] with codes [...]."""
    counts, sums = _per_code(x.reshape(-1, x.shape[-1]), codes.reshape(-1), cluster_size.shape[0])
    size = decay * cluster_size + (1 - decay) * counts
    n = jnp.sum(size)
    size = (size + epsilon) / (n + size.shape[0] * epsilon) * n
    ema_w = decay * ema_w + (1 - decay) * sums
    return ema_w / size[:, None], ema_w, size


def _per_code(flat: jax.Array, codes: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(counts [k], sums [k, D]) of the vectors flat [N, D] assigned to each code by codes [N]."""
    onehot = jax.nn.one_hot(codes, k, dtype=flat.dtype)  # [N, k]
    # the sums as a reduction over the vectors (not onehot.T @ flat: a contraction over a batch axis sharded over
    # "data" has no unambiguous output sharding)
    return jnp.sum(onehot, 0), jnp.sum(onehot[:, :, None] * flat[:, None, :], 0)


def kmeans(x: jax.Array, k: int, iters: int = 10) -> tuple[jax.Array, jax.Array]:
    """(centroids [k, D], counts [k]) of vectors x [..., D] (at least k of them) after `iters` Lloyd steps from k
    vectors evenly spaced through x; a centroid that loses every vector stays where it was."""
    check_range("k", k, 1)  # k = 0 divided by zero placing the starts
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] < k:
        raise ValueError(f"kmeans needs at least k={k} vectors, got {flat.shape[0]}")

    def lloyd(c, _):
        n, sums = _per_code(flat, nearest_codes(c, flat), k)
        return jnp.where(n[:, None] > 0, sums / jnp.maximum(n, 1)[:, None], c), None

    start = _on_every_device(flat)[jnp.arange(k) * (flat.shape[0] // k)]  # a gather: not over a sharded axis
    c = jax.lax.scan(lloyd, start, None, iters)[0]
    return c, _per_code(flat, nearest_codes(c, flat), k)[0]


def _on_every_device(x: jax.Array) -> jax.Array:
    """x replicated over the current mesh, if one is set (a sort or gather cannot run over a sharded axis)."""
    return x if jax.sharding.get_abstract_mesh().empty else jax.reshard(x, jax.P())


def restart_dead_codes(codebook: jax.Array, ema_w: jax.Array, cluster_size: jax.Array, x: jax.Array,
                       quantised: jax.Array, *, below: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(codebook [K, D], ema_w [K, D], cluster_size [K]) with every code whose cluster size is < below moved onto
    one of the vectors x [..., D] (quantised [..., D]: the code vectors x was assigned to).

    Deterministic (no key): the dead codes, in index order, take the vectors of x farthest from their codes (the
    worst-quantised first; cycling when there are more dead codes than vectors), with cluster size `below` and
    ema_w = below * vector, so the codebook entry is the vector itself. below <= 0 restarts nothing.
    """
    flat, quantised = (_on_every_device(v.reshape(-1, x.shape[-1])) for v in (x, quantised))  # for the sort
    error = jnp.sum((flat - quantised) ** 2, -1)  # [N]
    worst_first = jnp.argsort(-error)
    dead = cluster_size < below
    rank = jnp.cumsum(dead) - 1  # the i-th dead code takes the i-th worst vector
    fresh = flat[worst_first[rank % flat.shape[0]]]  # [K, D]
    size = jnp.where(dead, below, cluster_size)
    ema_w = jnp.where(dead[:, None], below * fresh, ema_w)
    return jnp.where(dead[:, None], fresh, codebook), ema_w, size


def vq_loss(x: jax.Array, quantised: jax.Array, codes: jax.Array, n_codes: int, *, commitment: float = 0.25,
            usage_cost: float = 0.25) -> jax.Array:
    """The commitment loss (x pulled to its code, the code held fixed) plus the usage penalty (no gradient)."""
    mse = jnp.mean((x - jax.lax.stop_gradient(quantised)) ** 2)
    return commitment * mse + usage_cost * jnp.mean((usage(codes, n_codes) - 1 / n_codes) ** 2)
