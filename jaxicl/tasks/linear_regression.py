"""Linear regression in context: y = <w, x> + noise (von Oswald et al. 2023; Garg et al. 2022).

Token formats (D = dim + 1 channels, the last channel holds labels):
  "paired":      token j = [x_j; y_j] for the n_context context pairs, query token [x_q; 0];
                 T = n_context + 1 and pair j is predicted at position j.
  "interleaved": x_j and y_j as separate tokens [x_j; 0], [0; y_j], ending with the query
                 [x_q; 0]; T = 2 n_context + 1 and pair j is predicted at position 2j.
The prediction at pair j's position may use only pairs < j (a causal model or, for the query,
any model). `loss_on="query"` trains on the query only, `"all"` on every pair (interleaved only: a
paired token j carries y_j itself, so predicting it at position j would read the answer).

Shorter contexts in the same shape (sweeps over context length): `sample(..., n_context=k)` keeps
the last k context pairs and the query of a full prompt and zeroes the first n_context - k pairs
(front padding, loss mask 0). A zero token adds nothing to a linear-attention sum and stays zero
through linear-attention layers, so on a padded prompt a linear SelfAttention whose layers divide
by T - 1 = n_context gives, at every real position, the k-context model with every wo scaled by
k / n_context (see `SelfAttention`). Softmax attention does give padding weight.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.prompt import Prompt
from jaxicl.tasks.batching import pool_key
from jaxicl.validation import ConfigError, check_choice, check_integer, check_positive, check_seed

FORMATS = ("paired", "interleaved")
X_DISTS = ("normal", "uniform")
KURTOSIS = {"normal": 3.0, "uniform": 1.8}  # E[x_j^4] / E[x_j^2]^2 of each input coordinate


@dataclasses.dataclass(frozen=True)
class LinearRegression:
    """x ~ N(0, x_scale^2 diag(x_cov_diag)) or, x_dist="uniform", x ~ x_scale sqrt(x_cov_diag) U(-1, 1)^dim (von
    Oswald et al.'s inputs at x_scale 1; Cov(x) = x_scale^2 diag(x_cov_diag) / 3); w ~ N(0, w_scale^2 I) or a fixed
    pool of n_tasks."""

    dim: int = 10
    n_context: int = 10
    noise_std: float = 0.0
    x_scale: float = 1.0
    x_cov_diag: tuple[float, ...] = ()  # diagonal of Cov(x) before x_scale (and uniform's 1/3); () means identity
    x_dist: str = "normal"  # "normal" | "uniform": independent coordinates either way
    w_scale: float = 1.0
    n_tasks: int = 0  # 0: a fresh w per prompt; > 0: w uniform over a fixed pool of n_tasks vectors
    pool_seed: int = 0  # key of the finite pool
    format: str = "paired"
    loss_on: str = "query"

    def __post_init__(self):
        for name in ("dim", "n_context", "n_tasks"):
            check_integer(name, getattr(self, name))
        check_seed("pool_seed", self.pool_seed)
        check_positive("dim", self.dim)
        check_positive("n_context", self.n_context)
        check_positive("noise_std", self.noise_std, allow_zero=True)
        check_positive("x_scale", self.x_scale)
        check_positive("w_scale", self.w_scale)
        check_positive("n_tasks", self.n_tasks, allow_zero=True)
        check_choice("format", self.format, FORMATS)
        check_choice("x_dist", self.x_dist, X_DISTS)
        check_choice("loss_on", self.loss_on, ("query", "all"))
        if self.loss_on == "all" and self.format == "paired":
            raise ConfigError("loss_on='all' needs format='interleaved': a paired token j = [x_j; y_j] carries the "
                              "label it would be scored on; use loss_on='query' with format='paired'")
        try:  # a list or numpy array (whose truth value is ambiguous) as the hashable tuple it stands for
            diag = tuple(float(v) for v in self.x_cov_diag)
        except (TypeError, ValueError):
            raise ConfigError(f"x_cov_diag must be a sequence of dim={self.dim} numbers or empty, got "
                              f"{self.x_cov_diag!r}") from None
        object.__setattr__(self, "x_cov_diag", diag)
        if self.x_cov_diag and len(self.x_cov_diag) != self.dim:
            raise ConfigError(f"x_cov_diag must have dim={self.dim} entries or be empty, got {len(self.x_cov_diag)}")
        for i, v in enumerate(self.x_cov_diag):
            check_positive(f"x_cov_diag[{i}]", v)

    @property
    def x_cov(self) -> np.ndarray:
        """Cov(x): [dim]-diagonal as a [dim] vector."""
        diag = np.asarray(self.x_cov_diag or np.ones(self.dim), dtype=np.float64)
        return self.x_scale**2 * diag / (3.0 if self.x_dist == "uniform" else 1.0)

    @property
    def seq_len(self) -> int:
        return self.n_context + 1 if self.format == "paired" else 2 * self.n_context + 1

    @property
    def token_dim(self) -> int:
        return self.dim + 1


def prediction_positions(cfg: LinearRegression) -> np.ndarray:
    """[n_context + 1] token position at which pair j (the query last) is predicted."""
    step = 1 if cfg.format == "paired" else 2
    return np.arange(cfg.n_context + 1) * step


def pool_vector(cfg: LinearRegression, index: jax.Array) -> jax.Array:
    """Row `index` of the fixed pool: w_scale * N(0, I) from pool_key(pool_seed, index), [dim].

    Each row has its own key, so a prompt never materialises the pool (pools of 2^20 tasks cost
    nothing), a pool of n tasks is the first n rows of any larger pool up to float rounding (the
    same random bits; the normals' transform, compiled for another shape, may round a value
    differently: task_pool(cfg, 3) and task_pool(cfg, 64)[:3] differ by up to 1 ulp), and the index
    may be sharded over devices without a gather from a replicated table.
    """
    return cfg.w_scale * jax.random.normal(pool_key(cfg.pool_seed, index), (cfg.dim,))


def task_pool(cfg: LinearRegression, n_tasks: int | None = None) -> jax.Array:
    """The first n_tasks (default cfg.n_tasks) pool vectors, [n_tasks, dim]."""
    n = cfg.n_tasks if n_tasks is None else n_tasks
    return jax.vmap(lambda i: pool_vector(cfg, i))(jnp.arange(n))


def task_vector(cfg: LinearRegression, key: jax.Array, n_tasks=None, fresh: jax.Array | None = None) -> jax.Array:
    """w: [dim], fresh (n_tasks = 0) or uniform over the first n_tasks pool vectors (index drawn from key).

    n_tasks: a (possibly traced, e.g. per sweep member) value replacing cfg.n_tasks.
    fresh: [dim] N(0, I) values for a fresh w (default: drawn from key).
    """
    fresh = cfg.w_scale * (jax.random.normal(key, (cfg.dim,)) if fresh is None else fresh)
    if n_tasks is None:
        return fresh if cfg.n_tasks == 0 else pool_vector(cfg, jax.random.randint(key, (), 0, cfg.n_tasks))
    pooled = pool_vector(cfg, jax.random.randint(key, (), 0, jnp.maximum(n_tasks, 1)))
    return jnp.where(n_tasks == 0, fresh, pooled)


def sample(cfg: LinearRegression, key: jax.Array, *, noise_std=None, n_tasks=None, n_context=None) -> Prompt:
    """One prompt: inputs [seq_len, dim + 1], targets [seq_len], mask [seq_len].

    info: w [dim], x [n_context + 1, dim] (query last), y [n_context + 1] (noisy labels).
    The keywords are the sweepable fields: (possibly traced) values replacing cfg.noise_std,
    cfg.n_tasks and cfg.n_context; n_context in [1, cfg.n_context] real context pairs are kept at the
    end and the others zeroed (x, y, mask and info alike; see the module docstring). Every other
    field changes shapes or the sampling code and is fixed across a sweep. A concrete n_context or n_tasks (an int,
    a numpy or jax scalar) that is not an integer in range (n_context in [1, cfg.n_context], n_tasks >= 0) raises
    ConfigError (a float 2.5 was truncated, an array 9 clipped), as does a concrete noise_std < 0 or not finite;
    a traced one (a sweep member's, or an array in sample_batch's task_params) cannot be checked: n_context is
    clipped to the range, n_tasks < 0 draws from a pool of 1.
    """
    if (k := _concrete_scalar(n_context)) is not None:
        check_integer("n_context", k)
        if not 1 <= k <= cfg.n_context:
            raise ConfigError(f"n_context (the real context pairs kept) must be in [1, cfg.n_context="
                              f"{cfg.n_context}], got {k!r}")
    if (t := _concrete_scalar(n_tasks)) is not None:
        check_integer("n_tasks", t)
        check_positive("n_tasks", t, allow_zero=True)
    if (s := _concrete_scalar(noise_std)) is not None:
        check_positive("noise_std", s, allow_zero=True)
    noise_std = cfg.noise_std if noise_std is None else noise_std
    n, d = cfg.n_context + 1, cfg.dim
    # One flat N(0, 1) draw per prompt, cut into w, x and the noise: a vmapped multi-dimensional draw costs about
    # 4x a flat one on CPU (benchmarks/sampler_throughput.py), and one draw saves the key splits.
    z = jax.random.normal(key, (d + n * d + n,))
    pooled = cfg.n_tasks > 0 or n_tasks is not None
    w = task_vector(cfg, jax.random.fold_in(key, 1) if pooled else key, n_tasks, fresh=z[:d])
    unit = z[d:d + n * d] if cfg.x_dist == "normal" else \
        jnp.sqrt(3.0) * jax.random.uniform(jax.random.fold_in(key, 2), (n * d,), minval=-1.0, maxval=1.0)
    x = unit.reshape(n, d) * jnp.sqrt(jnp.asarray(cfg.x_cov, jnp.result_type(float)))  # unit: mean 0, variance 1
    y = x @ w + noise_std * z[d + n * d:]
    weights = _loss_weights(cfg)
    if n_context is not None:
        k = jnp.clip(n_context, 1, cfg.n_context)  # a traced value, unchecked (a concrete one was checked)
        real = jnp.arange(n) >= cfg.n_context - k  # [n]: the padding first, the query always real
        x, y, weights = x * real[:, None], y * real, weights * real
    # One materialised copy of each: targets, tokens and info hold the same label values bit for bit
    # (see jaxicl.tasks.nearest_neighbor.sample).
    w, x, y = jax.lax.optimization_barrier((w, x, y))
    return Prompt(inputs=encode(cfg, x, y), targets=at_positions(cfg, y),
                  mask=at_positions(cfg, weights), info={"w": w, "x": x, "y": y})


def _concrete_scalar(value):
    """What sample checks of a keyword's value: None for None or a jax tracer (unchecked), a concrete 0-d numpy or
    jax array as the Python number it holds, anything else as it is."""
    if value is None or isinstance(value, jax.core.Tracer):
        return None
    return value.item() if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () else value


def encode(cfg: LinearRegression, x: jax.Array, y: jax.Array) -> jax.Array:
    """Tokens [seq_len, dim + 1] from x [n_context + 1, dim] and y [n_context + 1]; the query label is hidden."""
    y = y.at[-1].set(0.0)
    if cfg.format == "paired":
        return jnp.concatenate([x, y[:, None]], axis=1)
    x_tokens = jnp.concatenate([x, jnp.zeros_like(y)[:, None]], axis=1)
    y_tokens = jnp.concatenate([jnp.zeros_like(x), y[:, None]], axis=1)
    pairs = jnp.stack([x_tokens, y_tokens], axis=1).reshape(2 * x.shape[0], cfg.dim + 1)
    return pairs[:-1]


def decode(cfg: LinearRegression, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of encode: x [n_context + 1, dim], y [n_context + 1] (query label 0)."""
    if cfg.format == "paired":
        return tokens[:, :-1], tokens[:, -1]
    x = tokens[0::2, :-1]
    y = jnp.concatenate([tokens[1::2, -1], jnp.zeros((1,), tokens.dtype)])
    return x, y


def _loss_weights(cfg: LinearRegression) -> jax.Array:
    n = cfg.n_context + 1
    if cfg.loss_on == "query":
        return jnp.zeros((n,)).at[-1].set(1.0)
    return jnp.ones((n,))


def at_positions(cfg: LinearRegression, per_pair: jax.Array) -> jax.Array:
    """Scatters a [n_context + 1] per-pair array to its [seq_len] token positions."""
    return jnp.zeros((cfg.seq_len,), per_pair.dtype).at[prediction_positions(cfg)].set(per_pair)
