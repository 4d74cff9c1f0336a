"""Clustering of representations, in JAX: k-means (greedy k-means++ starts, restarts vmapped in one program), adjusted
Rand index, normalized mutual information, and Hungarian matching of clusters to labels (on the host).

Labels are integer arrays [N] with values in [0, n) for a static n; scores come from the contingency table, so
every function here is jittable and vmaps over layers, checkpoints or restarts. Labels and positions are checked
where they are concrete (on the host, outside jit); traced ones (inside jit) are the caller's to check. k-means and
cluster_scores replicate points split over a mesh's "data" axis (drawn under jax.set_mesh) first, inside the mesh and
after it; the scores take split labels as they are.
"""

import math
from collections.abc import Iterable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from jaxicl.mesh_placement import replicated_inputs
from jaxicl.validation import check_real


def _sq_distances(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """[N, k] squared Euclidean distances of x [N, D] to centroids [k, D] (clipped at 0)."""
    d = jnp.sum(x**2, -1)[:, None] - 2 * x @ centroids.T + jnp.sum(centroids**2, -1)[None]
    return jnp.maximum(d, 0.0)


@replicated_inputs
@partial(jax.jit, static_argnames="k")
def kmeans_plus_plus(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """[k, D] starting centroids by greedy k-means++ (Arthur & Vassilvitskii 2007; scikit-learn's default): the
    first uniform over the rows of x [N, D]; for each next, 2 + log k candidates drawn with probability
    proportional to the squared distance to the nearest centroid chosen so far, keeping the candidate that
    leaves the least total squared distance."""
    trials = 2 + int(math.log(k))
    keys = jax.random.split(key, k)
    first = x[jax.random.randint(keys[0], (), 0, x.shape[0])]
    nearest = jnp.sum((x - first) ** 2, -1)

    def add(nearest, key):
        logits = jnp.where(nearest > 0, jnp.log(jnp.maximum(nearest, 1e-30)), -jnp.inf)
        # all points on chosen centroids (fewer distinct points than k): pick uniformly
        logits = jnp.where(jnp.any(nearest > 0), logits, jnp.zeros_like(logits))
        candidates = x[jax.random.categorical(key, logits, shape=(trials,))]  # [trials, D]
        after = jnp.minimum(nearest[None], _sq_distances(x, candidates).T)  # [trials, N]
        best = jnp.argmin(after.sum(-1))
        return after[best], candidates[best]

    _, rest = jax.lax.scan(add, nearest, keys[1:])
    return jnp.concatenate([first[None], rest])


@replicated_inputs
@partial(jax.jit, static_argnames="iters")
def lloyd(x: jax.Array, centroids: jax.Array, iters: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """iters Lloyd steps from centroids [k, D]; (labels [N], centroids [k, D], inertia []) of the final centroids,
    the inertia summed directly as |x - centroid of its label|^2. A cluster left empty keeps its centroid."""
    k = centroids.shape[0]

    def step(c, _):
        onehot = jax.nn.one_hot(jnp.argmin(_sq_distances(x, c), -1), k, dtype=x.dtype)
        counts = onehot.sum(0)
        means = (onehot.T @ x) / jnp.maximum(counts, 1.0)[:, None]
        return jnp.where(counts[:, None] > 0, means, c), None

    centroids, _ = jax.lax.scan(step, centroids, length=iters)
    labels = jnp.argmin(_sq_distances(x, centroids), -1)
    return labels, centroids, jnp.sum((x - centroids[labels]) ** 2)


@replicated_inputs
@partial(jax.jit, static_argnames=("k", "restarts", "iters"))
def kmeans(x: jax.Array, k: int, key: jax.Array, restarts: int = 8, iters: int = 50) -> dict:
    """k-means of x [N, D]: `restarts` k-means++ starts refined by `iters` Lloyd steps, all in one vmapped program;
    the restart of least inertia is kept. Returns {"labels" [N], "centroids" [k, D], "inertia" []}, in float64 under
    jax x64, else float32. Runs on x minus its mean (k-means is shift invariant), so the expanded distances
    |x|^2 - 2 x.c + |c|^2 do not cancel where the points share a large offset. Complex x is refused (the distances
    are real): give its real and imaginary parts as real features."""
    check_real("x", x)
    x = jnp.asarray(x, float)
    mean = x.mean(0)
    x = x - mean
    starts = jax.vmap(lambda kk: kmeans_plus_plus(x, k, kk))(jax.random.split(key, restarts))
    labels, centroids, inertia = jax.vmap(lambda c: lloyd(x, c, iters))(starts)
    best = jnp.argmin(inertia)
    return {"labels": labels[best], "centroids": centroids[best] + mean, "inertia": inertia[best]}


def check_indices(name: str, values, low: int, high: int) -> None:
    """ValueError naming `name` unless low <= values < high; a traced value (inside jit) passes unchecked."""
    if isinstance(values, jax.core.Tracer):
        return
    v = np.asarray(values)
    if v.size and (v.min() < low or v.max() >= high):
        raise ValueError(f"{name} must lie in [{low}, {high}), got values from {v.min()} to {v.max()}")


def contingency(a: jax.Array, b: jax.Array, n_a: int, n_b: int) -> jax.Array:
    """[n_a, n_b] counts of the pairs (a_i, b_i) for labels a [N] in [0, n_a) and b [N] in [0, n_b), in the default
    float type (float64 under x64: ARI subtracts nearly equal sums of pair-count products, which float32 rounds to 1e-2
    relative error for 400 000 independent labels)."""
    check_indices("labels a", a, 0, n_a)
    check_indices("labels b", b, 0, n_b)
    dtype = jnp.result_type(float)
    return jax.nn.one_hot(a, n_a, dtype=dtype).T @ jax.nn.one_hot(b, n_b, dtype=dtype)


def _pairs(n: jax.Array) -> jax.Array:
    return n * (n - 1) / 2


def adjusted_rand_index(a: jax.Array, b: jax.Array, n_a: int, n_b: int) -> jax.Array:
    """ARI of two labelings [N] (Hubert & Arabie): (RI - E[RI]) / (max RI - E[RI]); 1 for partitions equal up to
    relabelling, about 0 for independent ones. 1 where both partitions are trivial (as scikit-learn)."""
    table = contingency(a, b, n_a, n_b)
    index = jnp.sum(_pairs(table))
    rows, cols = jnp.sum(_pairs(table.sum(1))), jnp.sum(_pairs(table.sum(0)))
    expected = rows * cols / jnp.maximum(_pairs(table.sum()), 1.0)
    top = (rows + cols) / 2
    return jnp.where(top == expected, 1.0, (index - expected) / jnp.where(top == expected, 1.0, top - expected))


def _entropy(p: jax.Array) -> jax.Array:
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


def normalized_mutual_info(a: jax.Array, b: jax.Array, n_a: int, n_b: int) -> jax.Array:
    """NMI of two labelings [N]: I(a; b) / ((H(a) + H(b)) / 2) (scikit-learn's default arithmetic normalisation);
    1 where both labelings have one class, 0 where only one does."""
    p = contingency(a, b, n_a, n_b) / a.shape[0]
    pa, pb = p.sum(1), p.sum(0)
    outer = pa[:, None] * pb[None]
    mi = jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0) / jnp.where(p > 0, outer, 1.0)), 0.0))
    ha, hb = _entropy(pa), _entropy(pb)
    both_trivial = (jnp.sum(pa > 0) == 1) & (jnp.sum(pb > 0) == 1)
    return jnp.where(both_trivial, 1.0, jnp.maximum(mi, 0.0) / jnp.maximum((ha + hb) / 2, 1e-12))


def sequence_features(cache: dict, sites: Iterable[str], positions: jax.Array | None = None,
                      pool_mask: jax.Array | None = None) -> jax.Array:
    """[L, N, D] one vector per sequence and site from a cache {site: [N, T, D]}: the value at positions [N], or
    the mean over the positions of pool_mask [N, T] (e.g. the instruction's tokens). Give exactly one. A pool_mask row
    with no position has no mean: an error, or NaN features where the mask is traced (inside jit), not a zero vector
    that k-means would cluster as a representation."""
    if (positions is None) == (pool_mask is None):
        raise ValueError("give exactly one of positions (a position per sequence) and pool_mask (positions to average)")
    sites = tuple(sites)  # read twice below: a generator was spent by the first pass
    if positions is not None:
        t = min(cache[s].shape[1] for s in sites)
        check_indices("positions", positions, -t, t)
        return jnp.stack([jnp.take_along_axis(cache[s], positions[:, None, None], axis=1)[:, 0] for s in sites])
    count = pool_mask.sum(-1, keepdims=True)
    if not isinstance(count, jax.core.Tracer) and (empty := np.flatnonzero(np.asarray(count)[:, 0] == 0)).size:
        raise ValueError(f"pool_mask: rows {empty.tolist()} select no position to average; give each sequence at least "
                         f"one")
    w = pool_mask / count
    return jnp.stack([jnp.einsum("nt,ntd->nd", w, cache[s]) for s in sites])


@replicated_inputs
def cluster_scores(features: jax.Array, labels: jax.Array, n_labels: int, key: jax.Array, restarts: int = 8,
                   iters: int = 50) -> dict:
    """k-means with k = n_labels on each of features [L, N, D] (one per layer), scored against labels [N].

    Returns {"ari" [L], "nmi" [L], "inertia" [L], "clusters" [L, N], "centroids" [L, k, D]}. Jitted, its checks
    aside: one compiled program (4 layers of 512 vectors: 15 ms a call on CPU, 32 ms op by op).
    """
    if features.ndim != 3:  # [N, D] was mapped over its rows, each clustered as a 1-D dataset, and failed inside
        raise ValueError(f"features must be [L, N, D] (an [N, D] set of vectors per layer; for one set give "
                         f"features[None]), got shape {features.shape}")
    check_real("features", features)
    check_indices("labels", labels, 0, n_labels)
    return _cluster_scores(features, labels, n_labels, key, restarts, iters)


@partial(jax.jit, static_argnames=("n_labels", "restarts", "iters"))
def _cluster_scores(features: jax.Array, labels: jax.Array, n_labels: int, key: jax.Array, restarts: int,
                    iters: int) -> dict:
    def one(x):
        km = kmeans(x, n_labels, key, restarts, iters)
        return {"ari": adjusted_rand_index(labels, km["labels"], n_labels, n_labels),
                "nmi": normalized_mutual_info(labels, km["labels"], n_labels, n_labels),
                "inertia": km["inertia"], "clusters": km["labels"], "centroids": km["centroids"]}

    return jax.vmap(one)(features)


def match_clusters(labels: np.ndarray, clusters: np.ndarray, n: int) -> np.ndarray:
    """[n] the label matched to each cluster by the Hungarian algorithm on the contingency table (the matching
    that maximises the number of points whose cluster is matched to their label): labels, clusters [N] in [0, n)."""
    check_indices("labels", labels, 0, n)
    check_indices("clusters", clusters, 0, n)
    table = np.asarray(contingency(jnp.asarray(labels), jnp.asarray(clusters), n, n))
    rows, cols = linear_sum_assignment(-table)
    mapping = np.zeros(n, int)
    mapping[cols] = rows
    return mapping
