"""In-context autoregressive sequences s_{t+1} = W s_t (+ noise), one W per sequence (Sander et al. 2024).

Families of W ([dim, dim]):
  "unitary":    W = diag(lambda), lambda_i i.i.d. on the unit circle (angle uniform on [0, 2 pi / mu));
                complex states. Commuting (all W share the eigenbasis I).
  "orthogonal": W = Q blockdiag(R(theta_1), ..., R(theta_{dim/2})) Q^T, 2x2 rotations with theta_k
                uniform on [0, 2 pi / mu), Q a fixed orthogonal basis (identity, or Haar from basis_seed);
                real states, dim even. Commuting. Its complex eigenbasis has conjugate pairs
                (e^{i theta_k}, e^{-i theta_k}) on coordinates (2k, 2k + 1) (see `eigenvalues`); the closed
                form jaxicl.theory.autoregressive.population_loss("orthogonal", ...) is the loss on states in
                that eigenbasis, not on these real states. Only its optimum carries over, and only with
                random_basis=False (Q = I): the diagonal model is tied to the coordinate axes, and with a Haar Q
                the rotation planes are not coordinate pairs (at dim 4 the optimum then does worse than predicting 0).
  "haar":       W ~ Haar on O(dim), reflections (det = -1) included; real states. Not commuting.
  "complex_1d": dim = 1, lambda = exp(i theta / mu), theta ~ U[0, 2 pi); complex states (Fig. 6).

Initial state: "fixed" s_0 = init_scale * 1_dim (in the basis Q for "orthogonal"), or
"random_phase" (complex families) s_0,i = init_scale * e^{i phi_i}, phi_i i.i.d. uniform.

A prompt holds the states s_0..s_T (T = seq_len). Position t (0..T-1) sees tokens of s_0..s_t and
predicts s_{t+1}. Token formats:
  "augmented": e_t = (0_dim, s_t, s_{t-1}) in R^{3 dim}, s_{-1} := 0;
  "tiled":     e_t = (s_t, ..., s_t) (tile copies) in R^{tile dim}.

With n_sequences > 0 the prompts come from a fixed dataset of n_sequences sequences (sequence i is
generated from batching.pool_key(pool_seed, i)); each draw picks a uniform index, so a training run
indexes a device-resident (here: regenerated on device) fixed dataset instead of fresh samples.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.prng import seed_key
from jaxicl.prompt import Prompt
from jaxicl.tasks.batching import fixed_set_key
from jaxicl.validation import ConfigError, check_choice, check_integer, check_positive, check_seed

FAMILIES = ("unitary", "orthogonal", "haar", "complex_1d")
COMPLEX_FAMILIES = ("unitary", "complex_1d")
INITS = ("fixed", "random_phase")
FORMATS = ("augmented", "tiled")


@dataclasses.dataclass(frozen=True)
class Autoregressive:
    """s_{t+1} = W s_t + noise_std * eps_t for t = 0..seq_len - 1."""

    family: str = "haar"
    dim: int = 5
    seq_len: int = 50  # T: positions (predictions); the prompt holds T + 1 states
    mu: float = 1.0  # angles uniform on [0, 2 pi / mu) (unitary, orthogonal, complex_1d)
    init: str = "fixed"
    init_scale: float = 1.0
    noise_std: float = 0.0
    format: str = "augmented"
    tile: int = 2
    random_basis: bool = False  # orthogonal: Q ~ Haar O(dim) from basis_seed instead of I
    basis_seed: int = 0
    n_sequences: int = 0  # 0: a fresh sequence per prompt; > 0: a fixed dataset of this size
    pool_seed: int = 0

    def __post_init__(self):
        check_choice("family", self.family, FAMILIES)
        check_choice("init", self.init, INITS)
        check_choice("format", self.format, FORMATS)
        for name in ("dim", "seq_len", "tile", "n_sequences"):
            check_integer(name, getattr(self, name))
        for name in ("basis_seed", "pool_seed"):
            check_seed(name, getattr(self, name))
        for name in ("dim", "seq_len", "mu", "init_scale", "tile"):
            check_positive(name, getattr(self, name))
        check_positive("noise_std", self.noise_std, allow_zero=True)
        check_positive("n_sequences", self.n_sequences, allow_zero=True)
        if self.family == "orthogonal" and self.dim % 2:
            raise ConfigError(f"dim must be even for family='orthogonal', got {self.dim}")
        if self.family == "complex_1d" and self.dim != 1:
            raise ConfigError(f"dim must be 1 for family='complex_1d', got {self.dim}")
        if self.init == "random_phase" and not self.is_complex:
            raise ConfigError(f"init='random_phase' needs a complex family {COMPLEX_FAMILIES}, got {self.family!r}")

    @property
    def is_complex(self) -> bool:
        return self.family in COMPLEX_FAMILIES

    @property
    def token_dim(self) -> int:
        return 3 * self.dim if self.format == "augmented" else self.tile * self.dim


def _angles(cfg: Autoregressive, key: jax.Array, n: int) -> jax.Array:
    return jax.random.uniform(key, (n,), maxval=2 * math.pi / cfg.mu)


def haar_orthogonal(key: jax.Array, dim: int) -> jax.Array:
    """[dim, dim] Haar-distributed on O(dim) (det = +-1): Gram-Schmidt on the columns of a Gaussian matrix.

    This is the QR factor with a positive diagonal of R, i.e. QR with the sign fix. Written with
    plain arithmetic (twice-orthogonalised classical Gram-Schmidt, unrolled over the dim columns)
    because jnp.linalg.qr under vmap does not trace under an explicit-sharding mesh in jax 0.12.
    """
    g = jax.random.normal(key, (dim, dim))
    cols = []
    for j in range(dim):
        v = g[:, j]
        for _ in range(2):
            for q in cols:
                v = v - jnp.dot(q, v) * q
        cols.append(v / jnp.linalg.norm(v))
    return jnp.stack(cols, axis=1)


def basis(cfg: Autoregressive) -> jax.Array:
    """The fixed orthogonal basis Q [dim, dim] of the orthogonal family."""
    return jnp.asarray(_basis(cfg.random_basis, cfg.basis_seed, cfg.dim, jnp.result_type(float)))


@functools.cache
def _basis(random: bool, seed: int, dim: int, dtype: np.dtype) -> np.ndarray:
    """Q [dim, dim] on the host: I, or Haar from seed: numpy's QR (the positive diagonal of R, as haar_orthogonal)
    of a Gaussian drawn from seed_key(seed). A constant of the programs that sample with it: traced into each, Q was
    rounded as that program fused it (1 ulp apart under a 4-device mesh), so the batches depended on the mesh."""
    if not random:
        return np.eye(dim, dtype=dtype)
    with jax.ensure_compile_time_eval():  # called while tracing a sampler: drawn now, not staged into its program
        g = np.asarray(jax.random.normal(seed_key(seed), (dim, dim), dtype), np.float64)
    q, r = np.linalg.qr(g)
    return (q * np.sign(np.diag(r))).astype(dtype)


def rotation(cfg: Autoregressive, theta: jax.Array) -> jax.Array:
    """W = Q blockdiag(R(theta_1), ..., R(theta_k)) Q^T [dim, dim] from theta [k], R(t) = [[cos t, -sin t], [sin t,
    cos t]]: with u_k, v_k Q's columns 2k, 2k + 1, W = sum_k cos theta_k (u u^T + v v^T) + sin theta_k (v u^T - u v^T).
    Elementwise products with host constants and one sum over k, not matmuls: a vmapped batch of 4 x 4 products was
    rounded otherwise at another batch size per device (on another mesh). Exact with Q = I."""
    q = _basis(cfg.random_basis, cfg.basis_seed, cfg.dim, jnp.result_type(float)).astype(np.float64)
    u, v = q[:, 0::2].T, q[:, 1::2].T  # [k, dim]
    planes = np.einsum("ki,kj->kij", u, u) + np.einsum("ki,kj->kij", v, v)
    turns = np.einsum("ki,kj->kij", v, u) - np.einsum("ki,kj->kij", u, v)
    cos, sin = jnp.cos(theta)[:, None, None], jnp.sin(theta)[:, None, None]
    return jnp.sum(cos * planes.astype(theta.dtype) + sin * turns.astype(theta.dtype), 0)


def eigenvalues(cfg: Autoregressive, theta: jax.Array) -> jax.Array:
    """Complex eigenvalues [dim] of a commuting-family W from its angles (conjugate pairs if orthogonal)."""
    lam = jnp.exp(1j * theta)
    if cfg.family == "orthogonal":
        return jnp.stack([lam, jnp.conj(lam)], -1).reshape(-1)
    return lam


def transition(cfg: Autoregressive, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(W [dim, dim], angles): angles [dim] (unitary, complex_1d), [dim/2] (orthogonal), [0] (haar)."""
    if cfg.family == "haar":
        return haar_orthogonal(key, cfg.dim), jnp.zeros((0,))
    if cfg.family == "orthogonal":
        theta = _angles(cfg, key, cfg.dim // 2)
        return rotation(cfg, theta), theta
    theta = _angles(cfg, key, cfg.dim)
    return jnp.diag(jnp.exp(1j * theta)), theta


def initial_state(cfg: Autoregressive, key: jax.Array) -> jax.Array:
    """s_0: [dim] (complex for the complex families)."""
    if cfg.init == "random_phase":
        return cfg.init_scale * jnp.exp(1j * jax.random.uniform(key, (cfg.dim,), maxval=2 * math.pi))
    s0 = cfg.init_scale * jnp.ones((cfg.dim,))
    if cfg.family == "orthogonal":
        return basis(cfg) @ s0
    return s0.astype(jnp.result_type(1j)) if cfg.is_complex else s0


def _noise(cfg: Autoregressive, key: jax.Array, shape: tuple[int, ...], complex_: bool) -> jax.Array:
    """noise_std * N(0, I) (complex: circular) of `shape`, drawn flat; exact zeros without a draw when noise_std = 0."""
    dtype = jnp.result_type(1j) if complex_ else jnp.float32
    if cfg.noise_std == 0:
        return jnp.zeros(shape, dtype)
    if not complex_:
        return cfg.noise_std * jax.random.normal(key, (math.prod(shape),)).reshape(shape)
    re, im = jax.random.normal(key, (2 * math.prod(shape),)).reshape(2, *shape)
    return cfg.noise_std * (re + 1j * im) / math.sqrt(2)


def states(cfg: Autoregressive, key: jax.Array) -> tuple[jax.Array, dict]:
    """One sequence: states [seq_len + 1, dim] and info {"W", "angles", "s0"}."""
    k_w, k_0, k_n = jax.random.split(key, 3)
    w, theta = transition(cfg, k_w)
    s0 = initial_state(cfg, k_0)
    noise = _noise(cfg, k_n, (cfg.seq_len, cfg.dim), cfg.is_complex)
    w, theta, s0 = jax.lax.optimization_barrier((w, theta, s0))  # info holds the W and s0 that made the states
    _, rest = jax.lax.scan(_step, (s0, w), noise)
    return jnp.concatenate([s0[None], rest]), {"W": w, "angles": theta, "s0": s0}


def _step(carry: tuple, eps: jax.Array) -> tuple:
    """s_{t+1} = W s_t + eps_t, carrying (s_t, W): a scan body at module level, so an eager call's scan is compiled
    once (a closure over W, new at each call, would compile again at every call)."""
    s, w = carry
    nxt = w @ s + eps
    return (nxt, w), nxt


def encode(cfg: Autoregressive, s: jax.Array) -> jax.Array:
    """Tokens [T, token_dim] from the input states s_0..s_{T-1} [T, dim]."""
    if cfg.format == "tiled":
        return jnp.tile(s, (1, cfg.tile))
    prev = jnp.concatenate([jnp.zeros_like(s[:1]), s[:-1]])
    return jnp.concatenate([jnp.zeros_like(s), s, prev], axis=1)


def sample(cfg: Autoregressive, key: jax.Array) -> Prompt:
    """One prompt: inputs [T, token_dim], targets [T, dim] (= s_1..s_T), mask [T].

    info: states [T + 1, dim], W [dim, dim], angles, s0 [dim].
    """
    if cfg.n_sequences:
        key = fixed_set_key(key, cfg.n_sequences, cfg.pool_seed)
    s, info = states(cfg, key)
    return Prompt(inputs=encode(cfg, s[:-1]), targets=s[1:], mask=jnp.ones((cfg.seq_len,)),
                  info={"states": s, **info})
