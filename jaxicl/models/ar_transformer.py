"""The trained transformers of Sander et al. 2024's experiments (official Fig. 5 and Fig. 7 scripts).

Linear maps are x W + b with PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b.
Scores are scaled by 1/sqrt(D) with D the token width (not the head width). Written per sequence.

AugmentedTransformer (Fig. 5; tokens [T, D], D = 3d): L layers of
  x <- x + LayerNorm(Wo (causal_linear(q k^T / sqrt(D)) v) + bo),  q, k, v = x W_{q,k,v} + b_{q,k,v},
with "causal_linear" = non-causal entries set to 0 (no softmax); then out = x Wf + bf [T, D].
The prediction of s_{t+1} is out[t, :d] (readout with out_dim = d).
  Sites (l = 0..L-1): layer{l}.attn.scores [T, T], layer{l}.attn.out [T, D], layer{l}.resid_post [T, D], out.

PositionalTransformer (Fig. 7; tokens [T, D] = tiled raw states): H full-width heads (Q, K, V:
D -> H D with bias); head h weights = token score (q_h k_h^T / sqrt(D), causal zeros) times
softmax_k over causal keys of the positional score (Q, K applied, with biases, to a learned position
table E [max_len, D] ~ N(0, 1)). Values from tokens only. Heads are summed, then
Linear(D, D) -> LayerNorm -> Linear(D, d) gives the prediction [T, d]. No residual.
query="current" (the official non_augmented.py: ordinary causal self-attention) queries row t with token t and
position t; query="previous" (the theory of Section 5 and its closed forms) queries row t with token t - 1 and
position t - 1 (row 0 with a zero token and a zero position, s_(-1) := 0 as in the augmented tokens: its queries
are Q's bias, and its positional softmax has the one key 0), keys and values staying tokens 0..t.
  Sites: attn.token_scores [H, T, T], attn.positional_weights [H, T, T], attn.heads [H, T, D],
         attn.out [T, D], out [T, d].
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicl.models.attention import HeadFirstModel, attention_mask
from jaxicl.models.base import Model, check_prompt, check_prompt_length
from jaxicl.models.softmax import softmax
from jaxicl.sites import null_sites
from jaxicl.validation import check_choice, check_range, check_size


QUERIES = ("current", "previous")


class Linear(nnx.Module):
    """x [..., n_in] -> x w + bias [..., n_out]; PyTorch default init."""

    def __init__(self, n_in: int, n_out: int, *, rngs: nnx.Rngs):
        bound = 1.0 / jnp.sqrt(n_in)
        self.w = nnx.Param(jax.random.uniform(rngs.params(), (n_in, n_out), minval=-bound, maxval=bound))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (n_out,), minval=-bound, maxval=bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.w[...] + self.bias[...]


def layer_norm(dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """PyTorch's LayerNorm over the last axis of [..., dim] (eps 1e-5), its scale and bias [dim] in the default float
    type (nnx's param_dtype is float32, which kept them at float32 precision in a float64 run). The variance is
    two-pass, mean((x - mean)^2), as PyTorch's: nnx's default E[x^2] - E[x]^2 cancels catastrophically on a row whose
    mean is large against its spread."""
    return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, param_dtype=jnp.result_type(float), rngs=rngs)


class AugmentedLayer(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.q, self.k, self.v, self.o = (Linear(dim, dim, rngs=rngs) for _ in range(4))
        self.norm = layer_norm(dim, rngs=rngs)


class AugmentedTransformer(Model):
    """num_layers augmented layers on tokens [T, dim] -> outputs [T, dim]; predictions: the first out_dim
    channels (the state block of the augmented token, out_dim = d of tokens [T, 3d])."""

    def __init__(self, dim: int, num_layers: int = 1, *, out_dim: int | None = None, rngs: nnx.Rngs):
        check_size("dim", dim)
        check_size("num_layers", num_layers)
        self.out_dim = dim if out_dim is None else out_dim
        check_size("out_dim", self.out_dim)
        check_range("out_dim", self.out_dim, 1, dim)
        self.layers = nnx.List([AugmentedLayer(dim, rngs=rngs) for _ in range(num_layers)])
        self.final = Linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, sites=null_sites) -> jax.Array:
        dim = self.final.w.shape[0]
        check_prompt(x, dim, f"vectors (dim={dim})")
        visible = attention_mask("causal", x.shape[0])
        for l, layer in enumerate(self.layers):
            q, k, v = layer.q(x), layer.k(x), layer.v(x)
            # masked again after the site: an edit or patch of it cannot unmask a later key
            scores = sites(f"layer{l}.attn.scores", jnp.where(visible, q @ k.T, 0.0) / jnp.sqrt(dim))
            scores = jnp.where(visible, scores, 0.0)
            out = sites(f"layer{l}.attn.out", layer.o(scores @ v))
            x = sites(f"layer{l}.resid_post", x + layer.norm(out))
        return sites("out", self.final(x))

    def readout(self, outputs: jax.Array) -> jax.Array:
        return outputs[..., :self.out_dim]


class PositionalTransformer(HeadFirstModel):
    """num_heads full-width heads with a softmax positional score; tokens [T, dim] -> predictions [T, out_dim]."""

    def __init__(self, dim: int, out_dim: int, num_heads: int = 64, max_len: int = 100, query: str = "current", *,
                 rngs: nnx.Rngs):
        for name, v in (("dim", dim), ("out_dim", out_dim), ("num_heads", num_heads), ("max_len", max_len)):
            check_size(name, v)
        check_choice("query", query, QUERIES)
        self.num_heads, self.query = num_heads, query
        self.q, self.k, self.v = (Linear(dim, num_heads * dim, rngs=rngs) for _ in range(3))
        self.positions = nnx.Param(jax.random.normal(rngs.params(), (max_len, dim)))
        self.mix = Linear(dim, dim, rngs=rngs)
        self.norm = layer_norm(dim, rngs=rngs)
        self.head = Linear(dim, out_dim, rngs=rngs)

    def _queries(self, x: jax.Array) -> jax.Array:
        """The rows [T, D] that query: x itself, or x shifted down one row (row 0 zero) for query="previous"."""
        return x if self.query == "current" else jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]])

    def _heads(self, proj: Linear, x: jax.Array) -> jax.Array:
        return proj(x).reshape(x.shape[0], self.num_heads, x.shape[1]).transpose(1, 0, 2)  # [H, T, D]

    def __call__(self, x: jax.Array, sites=null_sites) -> jax.Array:
        dim = self.mix.w.shape[0]
        check_prompt(x, dim, f"vectors (dim={dim})")
        t = x.shape[0]
        check_prompt_length(t, self.positions.shape[0])
        mask, scale = attention_mask("causal", t), jnp.sqrt(dim)
        e = self.positions[:t]
        q, qp = self._heads(self.q, self._queries(x)), self._heads(self.q, self._queries(e))
        k, v, kp = self._heads(self.k, x), self._heads(self.v, x), self._heads(self.k, e)
        token = sites("attn.token_scores", jnp.where(mask, q @ k.transpose(0, 2, 1), 0.0) / scale)
        pos = softmax(jnp.where(mask, qp @ kp.transpose(0, 2, 1) / scale, -jnp.inf))
        pos = sites("attn.positional_weights", pos)
        heads = sites("attn.heads", (token * pos) @ v)
        out = sites("attn.out", heads.sum(0))
        return sites("out", self.head(self.norm(self.mix(out))))
