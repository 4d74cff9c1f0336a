"""The factorised-position bidirectional transformer of Ferry et al. 2023 (the official GPTFactor).

Positions never enter the residual stream: a learned table Pos [T, P] (zero-initialised) is concatenated to
the input of every attention and MLP sub-layer. Attention is bidirectional (no causal mask). Per block (pre-LN):

  z = LN1(x);  x = x + Attn([z ; Pos])        q, k, v: Linear(D + P -> D) with biases; out: Linear(D -> D)
  m = LN2(x);  x = x + W2 gelu(W1 [m ; Pos] + b1) + b2      W1: D + P -> 4D, exact (erf) GELU
  logits = LN_f(x) W_head                                   no bias

Named sites per board (the official hook names in brackets):
  embed [T, D] (emb: the token embedding, the residual's start)
  layer{l}.z [T, D] (b{l}_z: LN1's output)            layer{l}.attn.q, .k, .v [T, H, dh]
  layer{l}.attn.weights [H, T, T]                     layer{l}.attn.out [T, D] (attn_update)
  layer{l}.resid_mid [T, D] (z_attn: the residual after attention)
  layer{l}.mlp_in [T, D] (mlp_in: LN2's output)       layer{l}.mlp.out [T, D] (mlp_update)
  layer{l}.resid_post [T, D] (z_attn_mlp: the block's output)
  unembed.in [T, D] (z_out: LN_f's output)
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicl.models.base import Model, check_prompt, check_prompt_length
from jaxicl.models.gpt import LayerNorm, NormalWeights, lookup
from jaxicl.models.softmax import softmax
from jaxicl.sites import null_sites
from jaxicl.validation import check_size


class Linear(nnx.Module):
    """x w + bias; w [n_in, n_out] drawn by NormalWeights, bias zero (or absent)."""

    def __init__(self, n_in: int, n_out: int, *, normal: NormalWeights, bias: bool = True):
        normal.request(self, "w", (n_in, n_out))
        self.bias = nnx.Param(jnp.zeros((n_out,))) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.w[...]
        return y if self.bias is None else y + self.bias[...]


class FactorBlock(nnx.Module):
    def __init__(self, d_model: int, d_pos: int, n_heads: int, *, normal: NormalWeights):
        self.n_heads = n_heads
        self.ln1, self.ln2 = LayerNorm(d_model), LayerNorm(d_model)
        self.q, self.k, self.v = (Linear(d_model + d_pos, d_model, normal=normal) for _ in range(3))
        self.proj = Linear(d_model, d_model, normal=normal)
        self.mlp_in = Linear(d_model + d_pos, 4 * d_model, normal=normal)
        self.mlp_out = Linear(4 * d_model, d_model, normal=normal)


class FactorTransformer(Model):
    """Token ids [T] -> logits [T, vocab_size]."""

    def __init__(self, *, vocab_size: int = 21, d_model: int = 64, d_pos: int = 32, n_layers: int = 3,
                 n_heads: int = 2, max_len: int = 64, init_std: float = 0.02, rngs: nnx.Rngs):
        for name, v in (("vocab_size", vocab_size), ("d_model", d_model), ("d_pos", d_pos), ("n_layers", n_layers),
                        ("n_heads", n_heads), ("max_len", max_len)):
            check_size(name, v)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        normal = NormalWeights(init_std)
        normal.request(self, "embed", (vocab_size, d_model))
        self.pos_table = nnx.Param(jnp.zeros((max_len, d_pos)))  # zero-initialised, as the official code
        self.blocks = nnx.List([FactorBlock(d_model, d_pos, n_heads, normal=normal) for _ in range(n_layers)])
        self.ln_final = LayerNorm(d_model)
        self.head = Linear(d_model, vocab_size, normal=normal, bias=False)
        normal.fill(rngs.params())

    def __call__(self, tokens: jax.Array, sites=null_sites) -> jax.Array:
        check_prompt(tokens, None, "token ids")
        t = tokens.shape[0]
        check_prompt_length(t, self.pos_table.shape[0])
        pos = self.pos_table[:t]
        x = sites("embed", lookup(self.embed[...], tokens))
        for l, b in enumerate(self.blocks):
            z = sites(f"layer{l}.z", b.ln1(x))
            x = sites(f"layer{l}.resid_mid", x + self._attend(b, jnp.concatenate([z, pos], -1), sites, l))
            m = sites(f"layer{l}.mlp_in", b.ln2(x))
            h = jax.nn.gelu(b.mlp_in(jnp.concatenate([m, pos], -1)), approximate=False)
            x = sites(f"layer{l}.resid_post", x + sites(f"layer{l}.mlp.out", b.mlp_out(h)))
        return self.head(sites("unembed.in", self.ln_final(x)))

    def site_axes(self, name: str, ndim: int) -> tuple[str, ...]:
        return attention_site_axes(name) or super().site_axes(name, ndim)

    def _attend(self, b: FactorBlock, h: jax.Array, sites, l: int) -> jax.Array:
        name = f"layer{l}.attn"
        return sites(f"{name}.out", b.proj(attend(b.q(h), b.k(h), b.v(h), b.n_heads, sites, name)))


def attention_site_axes(name: str) -> tuple[str, ...] | None:
    """The axes of attend's sites (weights [H, Tq, Tk], q/k/v [T, H, dh]); None for any other site."""
    kind = name.rsplit(".", 1)[-1]
    return {"weights": ("head", "pos", "key"), "q": ("pos", "head", "d_head"), "k": ("pos", "head", "d_head"),
            "v": ("pos", "head", "d_head")}.get(kind)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, n_heads: int, sites, name: str) -> jax.Array:
    """Bidirectional softmax attention of queries q [Tq, D] over keys k and values v [Tk, D] in n_heads heads ->
    [Tq, D] (the heads side by side, before the output projection); sites name.q, .k, .v [T, H, dh] and
    name.weights [H, Tq, Tk]."""
    q, k, v = (sites(f"{name}.{n}", x.reshape(x.shape[0], n_heads, -1)) for n, x in (("q", q), ("k", k), ("v", v)))
    weights = sites(f"{name}.weights", softmax(jnp.einsum("qhe,khe->hqk", q, k) / jnp.sqrt(q.shape[-1])))
    return jnp.einsum("hqk,khe->qhe", weights, v).reshape(q.shape[0], -1)
