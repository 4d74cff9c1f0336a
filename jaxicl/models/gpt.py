"""A GPT-style decoder: pre-LN blocks, causal softmax attention, an optional MLP, learned absolute positions.

Inputs per prompt: token ids [T] (vocab_size > 0; an embedding table) or continuous vectors
[T, input_dim] (input_dim > 0; a linear embedding x W_E, as in the TransformerLens fork of Bhargav & Gu).
Outputs [T, out_dim]: logits over the vocabulary, or a regression output (out_dim = input_dim by default).
Attention has no biases, so a head's output is z W_O and attn.out is exactly the sum of the heads.
Unless a site reads or changes attn.scores or attn.weights, prompts of SPLIT_FROM or more positions do not form
the scores the causal mask hides for the first half of the queries (split_causal_attention; the same function).

  x = embed + pos_embed
  block l:  resid_mid = resid_pre + attn(LN1(resid_pre)),  resid_post = resid_mid + mlp(LN2(resid_mid))
  out = LN_final(x) W_U + b_U      (final_norm=False: x W_U + b_U)

Named sites (shapes per prompt; the TransformerLens hook of each is in README):
  embed              [T, D]           token or input embedding
  pos_embed          [T, D]           positional embedding
  layer{l}.resid_pre [T, D]
  layer{l}.attn.q, .k, .v   [T, H, dh]
  layer{l}.attn.scores      [H, T, T]  q k / sqrt(dh), entries after the query masked to masked_value(dtype); masked
                                       again after the site, so an edit of the scores cannot unmask a later key
  layer{l}.attn.weights     [H, T, T]  softmax over keys (the attention pattern)
  layer{l}.attn.z           [T, H, dh] weights v
  layer{l}.attn.heads       [T, H, D]  each head's output z W_O
  layer{l}.attn.out         [T, D]     the sum over heads
  layer{l}.resid_mid        [T, D]
  layer{l}.mlp.pre, .post   [T, d_mlp] before and after the activation (these three only with d_mlp > 0)
  layer{l}.mlp.out          [T, D]
  layer{l}.resid_post       [T, D]
  final_norm.scale          [T, 1]     sqrt(var + eps) of the final LayerNorm (only with final_norm)
  unembed.in                [T, D]     what the unembedding reads
"""

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxicl.models.base import Model, check_prompt, check_prompt_length
from jaxicl.models.softmax import softmax
from jaxicl.sites import null_sites, wants
from jaxicl.validation import (ConfigError, check_bool, check_choice, check_integer, check_positive, check_scale,
                               check_size)

# the MLP's activation by name; "gelu" is GPT-2's tanh approximation, "gelu_exact" the erf form (GPT's docstring)
ACTIVATIONS = {"gelu": jax.nn.gelu, "gelu_exact": partial(jax.nn.gelu, approximate=False), "relu": jax.nn.relu}
MASKED = -1e9  # the score of a key after the query (finite, so patched and subtracted caches stay finite; masked_value)
# Prompts of at least this many positions take split_causal_attention unless a site reads or changes the [H, T, T]
# scores or weights. By measurement on a 2-core CPU: at 81 positions the 2-layer GPT's training step 7% faster and
# the 12-layer one's 4%, at 31 even, at 15 slower (README, Performance).
SPLIT_FROM = 32


class NormalWeights:
    """Collects the N(0, std^2) weights a model asks for, then draws them all from one flat normal sample: XLA
    compiles each distinct random shape on its own (about 0.4 s apiece on CPU), one flat draw compiles once."""

    def __init__(self, std: float):
        check_scale("init_std", std)
        self.std, self.requests = std, []

    def request(self, module: nnx.Module, name: str, shape: tuple[int, ...]) -> None:
        self.requests.append((module, name, tuple(shape)))

    def fill(self, key: jax.Array) -> None:
        """Sets every requested attribute to an nnx.Param of its shape."""
        values = _draw_normals(key, tuple(shape for *_, shape in self.requests), self.std)
        for (module, name, _), value in zip(self.requests, values):
            setattr(module, name, nnx.Param(value))


@partial(jax.jit, static_argnums=1)
def _draw_normals(key: jax.Array, shapes: tuple[tuple[int, ...], ...], std: float) -> list[jax.Array]:
    sizes = [math.prod(shape) for shape in shapes]
    parts = jnp.split(jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1])
    return [std * part.reshape(shape) for part, shape in zip(parts, shapes)]


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table [V, ...] at ids [...] (ndim >= 1) -> [..., ...], sharded like ids: under an explicit mesh (a batch sharded
    over "data") a gather from a replicated table has no unambiguous output sharding of its own. An id outside
    [0, V) (a token the table lacks, e.g. -1 or V) gives a NaN row (float tables), not the clamped or wrapped row of
    another token."""
    sharding = jax.typeof(ids).sharding
    spec = P(*sharding.spec, *[None] * (table.ndim - 1))
    return table.at[ids].get(mode="fill", wrap_negative_indices=False, out_sharding=sharding.update(spec=spec))


def masked_value(dtype) -> float:
    """The score of a hidden key in dtype: MASKED, or half dtype's most negative finite value where that is larger
    (float16: -32752; -1e9 would round to -inf, and a difference of two masked caches be NaN). Half: a masked score
    minus a score of smaller magnitude stays finite."""
    return max(MASKED, float(jnp.finfo(dtype).min) / 2)


def mask_hidden(scores: jax.Array, causal: jax.Array) -> jax.Array:
    """scores [H, Tq, Tk], causal [Tq, Tk] (True: the query sees the key) -> scores [H, Tq, Tk] with
    masked_value(their dtype) where the key is hidden."""
    return jnp.where(causal, scores, masked_value(scores.dtype))


def masked_scores(q: jax.Array, k: jax.Array, causal: jax.Array) -> jax.Array:
    """q [Tq, H, dh], k [Tk, H, dh], causal [Tq, Tk] (True: the query sees the key) -> scores [H, Tq, Tk]:
    q k / sqrt(dh), masked_value(their dtype) where the key is hidden."""
    return mask_hidden(jnp.einsum("qhe,khe->hqk", q, k) / jnp.sqrt(q.shape[-1]), causal)


def split_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: jax.Array) -> jax.Array:
    """q, k, v [T, H, dh], causal [T, T] lower-triangular -> z [T, H, dh] of softmax attention, in two halves of the
    queries: the first half sees only the first half's keys, so its scores against the second half are never formed
    (a quarter of the [H, T, T] products and softmax). The same function as the softmax over all of masked_scores, whose
    hidden keys get weight exactly 0 (exp(masked_value - max) underflows); sums run over fewer terms, so float results
    differ by rounding."""
    m = q.shape[0] // 2
    first = jnp.einsum("hqk,khe->qhe", softmax(masked_scores(q[:m], k[:m], causal[:m, :m])), v[:m])
    second = jnp.einsum("hqk,khe->qhe", softmax(masked_scores(q[m:], k, causal[m:])), v)
    return jnp.concatenate([first, second])


class LayerNorm(nnx.Module):
    """x [..., D] -> (x - mean) / sqrt(var + eps) * scale + bias over the last axis; std_site maps sqrt(var + eps)
    [..., 1] before the division (a named site, so capturing or editing it acts on the output)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((dim,)))
        self.bias = nnx.Param(jnp.zeros((dim,)))
        self.eps = eps

    def __call__(self, x: jax.Array, std_site: Callable[[jax.Array], jax.Array] = lambda std: std) -> jax.Array:
        centred = x - jnp.mean(x, -1, keepdims=True)
        std = std_site(jnp.sqrt(jnp.mean(centred**2, -1, keepdims=True) + self.eps))
        return centred / std * self.scale[...] + self.bias[...]


class Attention(nnx.Module):
    """W_Q, W_K, W_V [H, D, dh], W_O [H, dh, D]; no biases."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, *, normal: NormalWeights):
        for name in ("wq", "wk", "wv"):
            normal.request(self, name, (n_heads, d_model, d_head))
        normal.request(self, "wo", (n_heads, d_head, d_model))


class MLP(nnx.Module):
    def __init__(self, d_model: int, d_mlp: int, *, normal: NormalWeights):
        normal.request(self, "w_in", (d_model, d_mlp))
        self.bias_in = nnx.Param(jnp.zeros((d_mlp,)))
        normal.request(self, "w_out", (d_mlp, d_model))
        self.bias_out = nnx.Param(jnp.zeros((d_model,)))


class Block(nnx.Module):
    def __init__(self, d_model: int, n_heads: int, d_head: int, d_mlp: int, *, normal: NormalWeights):
        self.ln1 = LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, d_head, normal=normal)
        self.ln2 = LayerNorm(d_model) if d_mlp else None
        self.mlp = MLP(d_model, d_mlp, normal=normal) if d_mlp else None


class GPT(Model):
    """Call on token ids [T] (vocab_size) or vectors [T, input_dim] -> outputs [T, out_dim].

    readout: outputs [T, out_dim], squeezed to [T] when out_dim = 1 (a scalar regression target).
    activation (the MLP's): "gelu" is GPT-2's tanh approximation 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))
    (TransformerLens act_fn="gelu_new"), "gelu_exact" the erf form 0.5 u (1 + erf(u / sqrt(2))) (TransformerLens and
    PyTorch "gelu"), or "relu".
    """

    def __init__(self, *, d_model: int = 64, n_layers: int = 3, n_heads: int = 4, d_head: int | None = None,
                 d_mlp: int | None = None, max_len: int = 64, vocab_size: int = 0, input_dim: int = 0,
                 out_dim: int | None = None, activation: str = "gelu", final_norm: bool = True,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        for name, v in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads), ("max_len", max_len)):
            check_size(name, v)
        check_bool("final_norm", final_norm)
        check_choice("activation", activation, tuple(ACTIVATIONS))
        if (vocab_size > 0) == (input_dim > 0):
            raise ConfigError(f"give exactly one of vocab_size (token inputs) and input_dim (vector inputs), got "
                              f"vocab_size={vocab_size}, input_dim={input_dim}")
        if d_head is None and d_model % n_heads:
            raise ConfigError(f"d_model={d_model} must be a multiple of n_heads={n_heads} when d_head is not given "
                              f"(d_head = d_model // n_heads by default), or pass d_head")
        d_head = d_model // n_heads if d_head is None else d_head
        d_mlp = 4 * d_model if d_mlp is None else d_mlp
        check_size("d_head", d_head)
        check_integer("d_mlp", d_mlp)
        check_positive("d_mlp", d_mlp, allow_zero=True)
        self.vocab_size, self.input_dim, self.max_len = vocab_size, input_dim, max_len
        self.out_dim = (vocab_size or input_dim) if out_dim is None else out_dim
        check_size("out_dim", self.out_dim)
        self.activation, self.n_heads = activation, n_heads
        width = vocab_size or input_dim
        normal = NormalWeights(init_std)
        normal.request(self, "embed", (width, d_model))  # token table [V, D] or linear W_E [input_dim, D]
        normal.request(self, "pos_embed", (max_len, d_model))
        self.blocks = nnx.List([Block(d_model, n_heads, d_head, d_mlp, normal=normal) for _ in range(n_layers)])
        self.ln_final = LayerNorm(d_model) if final_norm else None
        normal.request(self, "unembed", (d_model, self.out_dim))
        self.unembed_bias = nnx.Param(jnp.zeros((self.out_dim,)))
        normal.fill(rngs.params())

    def __call__(self, tokens: jax.Array, sites=null_sites) -> jax.Array:
        # a vector model would otherwise read one vector [input_dim] as input_dim positions sharing one embedding (a
        # single prompt given to a batched function, which maps over its positions)
        if self.vocab_size:
            check_prompt(tokens, None, "token ids")
        else:
            check_prompt(tokens, self.input_dim, f"vectors (input_dim={self.input_dim})")
        t = tokens.shape[0]
        check_prompt_length(t, self.max_len)
        if self.vocab_size:
            emb = lookup(self.embed[...], tokens)
        else:
            emb = tokens @ self.embed[...]
        x = sites("embed", emb) + sites("pos_embed", self.pos_embed[:t])
        causal = jnp.tril(jnp.ones((t, t), bool))
        for l, block in enumerate(self.blocks):
            x = sites(f"layer{l}.resid_pre", x)
            x = sites(f"layer{l}.resid_mid", x + self._attend(block, x, causal, sites, f"layer{l}.attn"))
            if block.mlp is not None:
                x = x + self._mlp(block, x, sites, f"layer{l}.mlp")
            x = sites(f"layer{l}.resid_post", x)
        if self.ln_final is not None:
            x = self.ln_final(x, partial(sites, "final_norm.scale"))
        return sites("unembed.in", x) @ self.unembed[...] + self.unembed_bias[...]

    def readout(self, outputs: jax.Array) -> jax.Array:
        return outputs[..., 0] if self.out_dim == 1 else outputs

    def hidden_state_sites(self) -> list[str]:
        """The n_layers + 1 sites of Hugging Face's hidden_states: index 0 the embeddings (layer0.resid_pre), index
        l the output of block l - 1 (layer{l-1}.resid_post), the last after the final LayerNorm (unembed.in) where the
        model has one."""
        n = len(self.blocks)
        last = "unembed.in" if self.ln_final is not None else f"layer{n - 1}.resid_post"
        return ["layer0.resid_pre", *(f"layer{l}.resid_post" for l in range(n - 1)), last]

    def site_axes(self, name: str, ndim: int) -> tuple[str, ...]:
        kind = name.rsplit(".", 1)[-1]
        if kind in ("scores", "weights"):
            return ("head", "pos", "key")
        if kind in ("q", "k", "v", "z"):
            return ("pos", "head", "d_head")
        if kind == "heads":
            return ("pos", "head", "d_model")
        return super().site_axes(name, ndim)

    def _attend(self, block: Block, x: jax.Array, causal: jax.Array, sites, name: str) -> jax.Array:
        h = block.ln1(x)
        a = block.attn
        q = sites(f"{name}.q", jnp.einsum("td,hde->the", h, a.wq[...]))
        k = sites(f"{name}.k", jnp.einsum("td,hde->the", h, a.wk[...]))
        v = sites(f"{name}.v", jnp.einsum("td,hde->the", h, a.wv[...]))
        # a list, not a generator: both sites must count as visited
        if x.shape[0] < SPLIT_FROM or any([wants(sites, f"{name}.scores"), wants(sites, f"{name}.weights")]):
            # masked again after the site: an edit of the scores (scores * 0, a uniform-attention ablation) cannot
            # unmask a hidden key, while the cached scores still hold masked_value there
            scores = mask_hidden(sites(f"{name}.scores", masked_scores(q, k, causal)), causal)
            z = jnp.einsum("hqk,khe->qhe", sites(f"{name}.weights", softmax(scores)), v)
        else:
            z = split_causal_attention(q, k, v, causal)
        z = sites(f"{name}.z", z)
        if wants(sites, f"{name}.heads"):
            out = sites(f"{name}.heads", jnp.einsum("the,hed->thd", z, a.wo[...])).sum(axis=1)
        else:  # one contraction over (head, d_head): 4x faster than per-head outputs summed (12-layer GPT, CPU)
            out = jnp.einsum("the,hed->td", z, a.wo[...])
        return sites(f"{name}.out", out)

    def _mlp(self, block: Block, x: jax.Array, sites, name: str) -> jax.Array:
        h = block.ln2(x)
        m = block.mlp
        pre = sites(f"{name}.pre", h @ m.w_in[...] + m.bias_in[...])
        post = sites(f"{name}.post", ACTIVATIONS[self.activation](pre))
        return sites(f"{name}.out", post @ m.w_out[...] + m.bias_out[...])
