"""The linear-attention models of the in-context autoregressive theory (Sander et al. 2024).

Written per sequence, batched with vmap; complex states are allowed (parameters are real).

AugmentedLinearAttention (tokens e_t = (0, s_t, s_{t-1}) [T, 3d]): position t predicts
  s_hat_{t+1} = psi(Gamma(e_{0:t}), e_t),  Gamma(e_{0:t}) = B (sum_{t'<=t} s_{t'} s_{t'-1}^*) A,
  psi(G, e_t) = G s_t;  A, B: [d, d].
  Sites: attn.gamma [T, d, d] (Gamma at every position), out [T, d].

DiagonalPositionalAttention (raw states s_0..s_{T-1} [T, d]): H heads with query-key diagonal
a_h and value diagonal b_h (rows of A, B [H, d]) and positional weights P [T, T]. The query is
the PREVIOUS token s_{t-1}; keys and values are s_{t'} for t' <= t; position t uses row t - 1:
  s_hat_{t+1, i} = sum_{t'<=t} P[t-1, t'] sum_h b_{h,i} (sum_j a_{h,j} conj(s_{t-1,j}) s_{t',j}) s_{t',i}
so C = B^T A [d, d]. Position 0 has no previous token and predicts 0; P's last row is never used.
  Sites: attn.scores [H, T, T] (the weight of key t' at position q in head h, P included:
         P[q-1, t'] sum_j a_{h,j} conj(s_{q-1,j}) s_{t',j}, zero for t' > q and in row 0),
         attn.heads [H, T, d], out [T, d].

PositionalOnlyAttention: the same with d = 1, H = 1 and a = b = 1 fixed; only P is learned (Fig. 6).
  Sites: as DiagonalPositionalAttention.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicl.models.attention import HeadFirstModel
from jaxicl.models.base import Model, check_prompt, check_prompt_length
from jaxicl.sites import null_sites
from jaxicl.validation import check_scale, check_size


def gamma(a: jax.Array, b: jax.Array, ctx: jax.Array) -> jax.Array:
    """The in-context map: Gamma [d, d] from augmented tokens ctx [t, 3d] (A, B: [d, d])."""
    d = a.shape[0]
    s, prev = ctx[:, d:2 * d], ctx[:, 2 * d:]
    return b @ (s.T @ jnp.conj(prev)) @ a


def psi(g: jax.Array, token: jax.Array) -> jax.Array:
    """The prediction map: s_hat [d] = G s_t from G [d, d] and the current token e_t [3d]."""
    d = g.shape[0]
    return g @ token[d:2 * d]


class AugmentedLinearAttention(Model):
    """Parameters a, b: [d, d]; call on augmented tokens [T, 3d] -> predictions [T, d]."""

    def __init__(self, dim: int, *, init_scale: float = 0.1, rngs: nnx.Rngs):
        check_size("dim", dim)
        check_scale("init_scale", init_scale)
        self.a = nnx.Param(init_scale * jax.random.normal(rngs.params(), (dim, dim)))
        self.b = nnx.Param(init_scale * jax.random.normal(rngs.params(), (dim, dim)))

    def __call__(self, tokens: jax.Array, sites=null_sites) -> jax.Array:
        d = self.a.shape[0]
        check_prompt(tokens, 3 * d, f"augmented tokens (0, s_t, s_(t-1)) of states of dim {d}")
        s, prev = tokens[:, d:2 * d], tokens[:, 2 * d:]
        moments = jnp.cumsum(s[:, :, None] * jnp.conj(prev)[:, None, :], axis=0)  # [T, d, d]
        g = sites("attn.gamma", jnp.einsum("ij,tjk,kl->til", self.b[...], moments, self.a[...]))
        return sites("out", jnp.einsum("tij,tj->ti", g, s))


def positional_mask(t: int) -> jax.Array:
    """[T, T] bool: position q (query row q - 1) sees keys t' <= q; row 0 sees nothing."""
    q = jnp.arange(t)[:, None]
    return (jnp.arange(t)[None, :] <= q) & (q >= 1)


def positional_attention(a: jax.Array, b: jax.Array, p: jax.Array, s: jax.Array, sites) -> jax.Array:
    """Predictions [T, d] of the diagonal positional attention; a, b [H, d], p [T, T], states s [T, d]."""
    check_prompt(s, a.shape[1], f"the states themselves (format='tiled' with tile=1) of dim {a.shape[1]}")
    t = s.shape[0]
    check_prompt_length(t, p.shape[0], "seq_len", exact=True)
    prev = jnp.concatenate([jnp.zeros_like(s[:1]), s[:-1]])  # query token s_{t-1} at position t
    scores = jnp.einsum("hj,qj,kj->hqk", a, jnp.conj(prev), s)
    rows = jnp.concatenate([jnp.zeros_like(p[:1]), p[:-1]])  # position q uses P[q - 1]
    visible = positional_mask(t)  # applied again after the site: an edit or patch of it cannot unmask a key
    weights = jnp.where(visible, sites("attn.scores", jnp.where(visible, scores * rows[None], 0.0)), 0.0)
    heads = sites("attn.heads", jnp.einsum("hqk,hi,ki->hqi", weights, b, s))
    return sites("out", heads.sum(0))


class DiagonalPositionalAttention(HeadFirstModel):
    """Parameters a, b: [H, d], p: [T, T]; call on states [T, d] -> predictions [T, d]."""

    def __init__(self, dim: int, num_heads: int, seq_len: int, *, init_scale: float = 0.1, rngs: nnx.Rngs):
        for name, v in (("dim", dim), ("num_heads", num_heads), ("seq_len", seq_len)):
            check_size(name, v)
        check_scale("init_scale", init_scale)
        self.a = nnx.Param(init_scale * jax.random.normal(rngs.params(), (num_heads, dim)))
        self.b = nnx.Param(init_scale * jax.random.normal(rngs.params(), (num_heads, dim)))
        self.p = nnx.Param(init_scale * jax.random.normal(rngs.params(), (seq_len, seq_len)))

    def __call__(self, s: jax.Array, sites=null_sites) -> jax.Array:
        return positional_attention(self.a[...], self.b[...], self.p[...], s, sites)


class PositionalOnlyAttention(HeadFirstModel):
    """Parameter p: [T, T] (initialised to 0); call on 1-D states [T, 1] -> predictions [T, 1]."""

    def __init__(self, seq_len: int):
        check_size("seq_len", seq_len)
        self.p = nnx.Param(jnp.zeros((seq_len, seq_len)))

    def __call__(self, s: jax.Array, sites=null_sites) -> jax.Array:
        one = jnp.ones((1, 1), self.p.dtype)
        return positional_attention(one, one, self.p[...], s, sites)
