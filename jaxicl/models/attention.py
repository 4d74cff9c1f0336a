"""Self-attention stacks (linear or softmax), written per prompt and batched with vmap.

Layer l maps tokens e [T, D] to e + sum_h attn_h(e) (or to sum_h attn_h(e) without the
residual), with per-head projections wq, wk, wv [H, D, K] and wo [H, K, D]:
  linear:  attn_h(e) = (mask * (e wq)(e wk)^T / (T - 1)) (e wv) wo   (von Oswald et al. 2023)
  softmax: attn_h(e) = softmax_masked((e wq)(e wk)^T / sqrt(K)) (e wv) wo
The linear form divides by T - 1, the number of context tokens of a prompt with one query. Zero
tokens (front padding of a shorter prompt) add nothing to its sums and stay zero through the
layers, so on a prompt padded from k + 1 to T tokens it equals the unpadded model with every wo
scaled by k / (T - 1) (jaxicl.tasks.linear_regression, context-length sweeps). Without a causal mask the
linear form is computed as (e wq wk^T) (e_S^T e_S) (wv wo) over the visible tokens S, without [T, T]
scores, unless a site reads or patches the scores or the per-head outputs.

Masks: "none" (every token sees every token), "causal" (token j sees tokens <= j), "context"
(every token sees tokens 0..T-2, i.e. all but the final query token; a one-token prompt, which has no context,
sees itself, so the softmax is defined).

Named sites, for l in 0..num_layers-1 (see jaxicl.sites):
  layer{l}.attn.scores   [H, T, T]  raw scores (linear: already masked and normalised)
  layer{l}.attn.weights  [H, T, T]  softmax weights (softmax kind only)
  layer{l}.attn.heads    [H, T, D]  per-head outputs, after wo
  layer{l}.attn.out      [T, D]     sum over heads
  layer{l}.resid_post    [T, D]     the layer's output tokens
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicl.models.base import Model, check_prompt
from jaxicl.models.softmax import softmax
from jaxicl.prng import seed_key
from jaxicl.sites import null_sites, wants
from jaxicl.validation import check_bool, check_choice, check_scale, check_size

KINDS = ("linear", "softmax")
MASKS = ("none", "causal", "context")
INIT_SCALE = 0.02  # the weights' default standard deviation


class AttentionLayer(nnx.Module):
    """Projections of one multi-head attention layer: wq, wk, wv [H, D, K], wo [H, K, D]."""

    def __init__(self, dim: int, num_heads: int, key_size: int, *, init_scale: float, rngs: nnx.Rngs):
        def init(shape):
            return nnx.Param(init_scale * jax.random.normal(rngs.params(), shape))

        self.wq = init((num_heads, dim, key_size))
        self.wk = init((num_heads, dim, key_size))
        self.wv = init((num_heads, dim, key_size))
        self.wo = init((num_heads, key_size, dim))


class HeadFirstModel(Model):
    """A model whose attention sites are head-first: [H, T, T] scores or weights (also the autoregressive models'
    token_scores and positional_weights) and [H, T, D] per-head outputs, named by the last part of the site name.
    Every other site is position-first."""

    def site_axes(self, name: str, ndim: int) -> tuple[str, ...]:
        kind = name.rsplit(".", 1)[-1]
        if kind in ("scores", "weights", "token_scores", "positional_weights"):
            return ("head", "pos", "key")
        if kind == "heads":
            return ("head", "pos", "dim")
        return super().site_axes(name, ndim)


class SelfAttention(HeadFirstModel):
    """A stack of num_layers multi-head self-attention layers; call on tokens [T, D] -> [T, D].

    Readout (von Oswald et al.'s convention): a layer writes -y_hat into the empty label slot, so the
    predictions [T] are minus the last channel of the outputs.
    """

    def __init__(self, dim: int, *, num_layers: int = 1, num_heads: int = 1, key_size: int | None = None,
                 kind: str = "linear", residual: bool = True, mask: str = "none",
                 init_scale: float = INIT_SCALE, rngs: nnx.Rngs):
        for name, value in (("dim", dim), ("num_layers", num_layers), ("num_heads", num_heads)):
            check_size(name, value)
        check_choice("kind", kind, KINDS)
        check_choice("mask", mask, MASKS)
        check_bool("residual", residual)
        check_scale("init_scale", init_scale)
        self.kind, self.residual, self.mask = kind, residual, mask
        key_size = dim if key_size is None else key_size
        check_size("key_size", key_size)
        self.layers = nnx.List([AttentionLayer(dim, num_heads, key_size, init_scale=init_scale, rngs=rngs)
                                for _ in range(num_layers)])

    def __call__(self, tokens: jax.Array, sites=null_sites) -> jax.Array:
        dim = self.layers[0].wq.shape[1]
        check_prompt(tokens, dim, f"vectors (dim={dim})")
        x = tokens
        for l, layer in enumerate(self.layers):
            out = self._attend(layer, x, sites, f"layer{l}.attn")
            x = sites(f"layer{l}.resid_post", x + out if self.residual else out)
        return x

    def readout(self, outputs: jax.Array) -> jax.Array:
        return -outputs[..., -1]

    def _attend(self, layer: AttentionLayer, x: jax.Array, sites, name: str) -> jax.Array:
        """Through the per-head products Wq Wk^T and Wv Wo [H, D, D]: the function of projecting to q, k, v first,
        with half the matmuls at key_size = D (on CPU the gd_equivalence model's training step is 1.7x faster:
        its matmuls are so small that each costs its call overhead more than its arithmetic)."""
        t = x.shape[0]
        qk = jnp.einsum("hdk,hek->hde", layer.wq[...], layer.wk[...])
        ov = jnp.einsum("hdk,hke->hde", layer.wv[...], layer.wo[...])
        xqk = jnp.einsum("qd,hde->hqe", x, qk)
        if self.kind == "linear" and self.mask != "causal" and not (wants(sites, f"{name}.scores")
                                                                   or wants(sites, f"{name}.heads")):
            # (x Wqk x_S^T) x_S Wov = x Wqk (x_S^T x_S) Wov over the visible keys S (the same for every query): no
            # [T, T] scores (1.1x faster on CPU; sites that read or patch scores or heads take the form below)
            keys = x if self.mask == "none" or t == 1 else x[:-1]
            gram = jnp.einsum("sd,se->de", keys, keys) / max(t - 1, 1)
            heads = jnp.einsum("hqe,hef->hqf", jnp.einsum("hqd,de->hqe", xqk, gram), ov)
            return sites(f"{name}.out", heads.sum(axis=0))
        scores = jnp.einsum("hqe,se->hqs", xqk, x)
        visible = attention_mask(self.mask, t)
        if self.kind == "linear":  # masked again after the site: an edit or patch of it cannot unmask a later key
            weights = jnp.where(visible, sites(f"{name}.scores", jnp.where(visible, scores, 0.0) / max(t - 1, 1)), 0.0)
        else:
            scores = sites(f"{name}.scores", scores / jnp.sqrt(layer.wq.shape[-1]))
            weights = sites(f"{name}.weights", softmax(jnp.where(visible, scores, -jnp.inf)))
        heads = sites(f"{name}.heads", jnp.einsum("hqs,hse->hqe", weights, jnp.einsum("sd,hde->hse", x, ov)))
        return sites(f"{name}.out", heads.sum(axis=0))


def attention_mask(mask: str, t: int) -> jax.Array:
    """[T, T] bool: entry (j, i) says whether token j may attend to token i."""
    if mask == "causal":
        return jnp.tril(jnp.ones((t, t), bool))
    if mask == "context":
        return jnp.ones((t, t), bool).at[:, t - 1].set(t == 1)
    return jnp.ones((t, t), bool)


def sweep_init(dim: int, num_layers: int = 1, **model_kw) -> tuple[Callable, nnx.GraphDef]:
    """(init(key, *, init_scale=INIT_SCALE) -> params, graphdef): the members' init of a sweep of
    SelfAttention(dim, ...) (linear with residual by default; model_kw as SelfAttention takes them), init_scale
    sweepable (SelfAttention's default where not swept)."""
    kw = {"kind": "linear", "residual": True, **model_kw}

    def init(key, *, init_scale=INIT_SCALE):
        return nnx.split(SelfAttention(dim, num_layers=num_layers, init_scale=init_scale, rngs=nnx.Rngs(key), **kw))[1]

    return init, nnx.graphdef(SelfAttention(dim, num_layers=num_layers, rngs=nnx.Rngs(seed_key(0)), **kw))
