"""One-nearest-neighbour in context (Li et al. 2024, "One-layer transformer provably learns 1-NN").

Tokens are the columns of the paper's embedding H in R^{(d+L+1) x (N+1)}, one per row:
  context j < N:  [x_j; y_j; 0]      query (last row):  [x_q; 0; 1]
with x on the unit sphere S^{d-1} and y_j the label encoding of width L = label_dim(cfg).
Labels are independent of x, so the only way to predict is to retrieve the label of the query's
nearest neighbour i* = argmax_j <x_j, x_q> (= argmin_j |x_j - x_q| on the sphere).

Label encodings:
  num_classes = 2:  y in {+1, -1} (class 0 is +1), L = 1, exactly the paper's embedding.
  num_classes = K:  class k -> vertex k of a regular simplex with unit vertices in R^{K-1}
                    (L = K - 1); for K = 2 the vertices are +1 and -1, so it reduces to binary.

Distributions:
  "uniform": x_1..x_N, x_q i.i.d. uniform on the sphere, labels uniform over the classes.
  "shifted": the test set of the paper's Appendix B: labels y_j ~ N(0, I_L), the query is a copy
             of a uniformly chosen context point i, and every other x_j with |x_j - x_q|^2 <= delta
             is replaced by -x_j (point i itself is never flipped), which moves it to squared distance
             4 - (its old one). Every j != i then sits at squared distance >= min(delta, 4 - delta) from the
             query (shifted_margin: delta for delta <= 2).
`n_prompts > 0` makes a fixed training set: prompt m is always drawn from batching.pool_key(pool_seed, m)
and `sample` picks m uniformly (SGD on a finite set of prompts, as in the paper's experiments).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.prompt import Prompt, check_one_prompt
from jaxicl.tasks.batching import fixed_set_key
from jaxicl.validation import check_choice, check_integer, check_positive, check_range, check_seed

DISTRIBUTIONS = ("uniform", "shifted")


@dataclasses.dataclass(frozen=True)
class NearestNeighbor:
    """N = n_context labelled points and a query on S^{dim-1}; target = label of the query's 1-NN."""

    dim: int = 8
    n_context: int = 16
    num_classes: int = 2
    distribution: str = "uniform"
    delta: float = 0.5  # squared-distance margin of the shifted distribution
    n_prompts: int = 0  # 0: a fresh prompt per key; > 0: a fixed set of n_prompts prompts
    pool_seed: int = 0

    def __post_init__(self):
        for name in ("dim", "n_context", "num_classes", "n_prompts"):
            check_integer(name, getattr(self, name))
        check_seed("pool_seed", self.pool_seed)
        check_positive("dim", self.dim)
        check_positive("n_context", self.n_context)
        check_range("num_classes", self.num_classes, 2, None)
        check_choice("distribution", self.distribution, DISTRIBUTIONS)
        check_range("delta", self.delta, 0.0, 4.0)
        check_positive("n_prompts", self.n_prompts, allow_zero=True)

    @property
    def shifted_margin(self) -> float:
        """The smallest squared distance of a point other than the copied one to the query in the shifted
        distribution: min(delta, 4 - delta) (a flipped point within delta of the query lands at 4 - its distance)."""
        return min(self.delta, 4.0 - self.delta)

    @property
    def label_dim(self) -> int:
        return self.num_classes - 1

    @property
    def token_dim(self) -> int:
        return self.dim + self.label_dim + 1

    @property
    def seq_len(self) -> int:
        return self.n_context + 1


def simplex_vertices(num_classes: int) -> np.ndarray:
    """[K, K-1] unit vertices of a regular simplex centred at 0; for K = 2 they are [[1], [-1]]."""
    k = num_classes
    centred = np.eye(k) - 1.0 / k  # rows sum to 0, span the (K-1)-dim sum-zero subspace
    basis = np.linalg.svd(centred)[2][: k - 1]  # [K-1, K] orthonormal basis of that subspace
    basis *= np.sign(basis[:, :1] + (basis[:, :1] == 0))  # fix signs: first class on the positive side
    v = centred @ basis.T
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def class_labels(classes: jax.Array, num_classes: int) -> jax.Array:
    """Simplex vertices of classes [...] int -> [..., K-1] in the default float type (float64 under x64).

    A one-hot sum (exact: one nonzero term) rather than vertices[classes]: indexing a constant
    table with member-sharded classes does not trace under a sweep's explicit-sharding mesh in jax 0.12.
    """
    dtype = jnp.result_type(float)
    vertices = jnp.asarray(simplex_vertices(num_classes), dtype)
    return jnp.sum(jax.nn.one_hot(classes, num_classes, dtype=dtype)[..., None] * vertices, axis=-2)


def decode_class(labels: jax.Array, num_classes: int) -> jax.Array:
    """Class of the nearest simplex vertex: labels [..., K-1] -> [...] int (argmax of the inner product)."""
    return jnp.argmax(labels @ jnp.asarray(simplex_vertices(num_classes), labels.dtype).T, axis=-1)


def uniform_sphere(key: jax.Array, shape: tuple[int, ...], dim: int) -> jax.Array:
    """[*shape, dim] i.i.d. uniform on S^{dim-1} (normalised Gaussians, drawn flat: a vmapped multi-dimensional draw
    costs several times a flat one on CPU)."""
    z = jax.random.normal(key, (math.prod(shape) * dim,)).reshape(*shape, dim)
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def encode(x: jax.Array, labels: jax.Array) -> jax.Array:
    """Tokens [N+1, d+L+1] from x [N+1, d] (query last) and context labels [N, L]."""
    n, label_dim = labels.shape
    y = jnp.concatenate([labels, jnp.zeros((1, label_dim), labels.dtype)], axis=0)
    flag = jnp.zeros((n + 1, 1), x.dtype).at[-1, 0].set(1.0)
    return jnp.concatenate([x, y.astype(x.dtype), flag], axis=1)


def decode(cfg: NearestNeighbor, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inverse of encode: tokens [N+1, d+L+1] -> context x [N, d], context labels [N, L], query x_q [d].

    ValueError for a batch, or tokens of another width (a config whose dim or num_classes is not the prompts').
    """
    d = cfg.dim
    check_one_prompt("nearest_neighbor.decode", tokens, cfg.token_dim,
                     f"x {d} + labels {cfg.label_dim} + flag 1 for dim={d}, num_classes={cfg.num_classes}")
    return tokens[:-1, :d], tokens[:-1, d:d + cfg.label_dim], tokens[-1, :d]


def nearest_index(x: jax.Array, x_query: jax.Array) -> jax.Array:
    """i* = argmax_j <x_j, x_q> for x [N, d], x_query [d] (the 1-NN on the sphere)."""
    return jnp.argmax(x @ x_query)


def sample(cfg: NearestNeighbor, key: jax.Array) -> Prompt:
    """One prompt: inputs [N+1, d+L+1], targets [N+1] (L = 1) or [N+1, L], mask [N+1] (query only).

    info: x [N+1, d] (query last), labels [N, L], classes [N] int (-1 for Gaussian labels),
    nearest [] int (i*), copied [] int (the copied point for "shifted", else -1).
    """
    if cfg.n_prompts:
        key = fixed_set_key(key, cfg.n_prompts, cfg.pool_seed)
    n, d = cfg.n_context, cfg.dim
    k_x, k_y, k_i = jax.random.split(key, 3)
    x = uniform_sphere(k_x, (n + 1,), d)
    if cfg.distribution == "uniform":
        classes = jax.random.randint(k_y, (n,), 0, cfg.num_classes)
        labels = class_labels(classes, cfg.num_classes)
        copied = jnp.asarray(-1)
    else:
        classes = jnp.full((n,), -1)
        labels = jax.random.normal(k_y, (n, cfg.label_dim))
        copied = jax.random.randint(k_i, (), 0, n)
        x = _shift(x, copied, cfg.delta)
    # Materialise x and the labels once: the target must be a copy of the nearest point's label, bit for
    # bit. Without the barrier XLA recomputes the labels' sampling arithmetic inside each consumer fusion
    # (targets, tokens, info), and vectorised and scalar float code need not agree across CPU vector widths.
    x, labels = jax.lax.optimization_barrier((x, labels))
    nearest = nearest_index(x[:-1], x[-1])
    target = labels[nearest]
    targets = jnp.zeros((n + 1, cfg.label_dim)).at[-1].set(target)
    return Prompt(inputs=encode(x, labels), targets=targets[:, 0] if cfg.label_dim == 1 else targets,
                  mask=jnp.zeros((n + 1,)).at[-1].set(1.0),
                  info={"x": x, "labels": labels, "classes": classes, "nearest": nearest, "copied": copied})


def _shift(x: jax.Array, copied: jax.Array, delta: float) -> jax.Array:
    """Appendix B: query := x_copied; flip every other context point within squared distance delta."""
    query = x[copied]
    context = x[:-1]
    sq_dist = jnp.sum((context - query) ** 2, axis=-1)
    flip = (sq_dist <= delta) & (jnp.arange(context.shape[0]) != copied)
    context = jnp.where(flip[:, None], -context, context)
    return jnp.concatenate([context, query[None]], axis=0)
