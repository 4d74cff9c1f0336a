"""Direct attribution of a GPT's prediction (jaxicl.models.gpt) to the components that write the residual stream,
and the per-head OV and QK circuit matrices.

The final residual stream is exactly embed + pos_embed + sum over layers of (sum over heads of attn.heads)
+ mlp.out (attention has no biases). With the final LayerNorm's scale frozen at its value on the prompt,
the prediction is linear in that sum, so each component's direct contribution is
  ((c - mean(c)) / scale * ln_final.scale) W_U,
and the contributions plus the `bias` term (ln_final.bias W_U + b_U) add up to the prediction.
"""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicl.mesh_placement import on_mesh_of
from jaxicl.models.functional import apply
from jaxicl.models.gpt import GPT
from jaxicl.validation import check_range


def direct_attribution(graphdef: nnx.GraphDef, params, tokens: jax.Array) -> dict[str, jax.Array]:
    """Contributions to the outputs [T, out] of one prompt: embed, pos_embed [T, out], heads [L, H, T, out],
    mlp [L, T, out] (zeros for an attention-only model), bias [T, out]; their sum is the output. Jitted: a call
    outside jit (vmapped over prompts or not) is one compiled program, not the forward pass op by op."""
    # the unembedding's products meet the cache, on the tokens' mesh
    return _contributions(graphdef, on_mesh_of(tokens, params), tokens)


@partial(jax.jit, static_argnums=0)
def _contributions(graphdef: nnx.GraphDef, params, tokens: jax.Array) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, params)
    if not isinstance(model, GPT):
        raise TypeError(f"direct_attribution needs a jaxicl.models.gpt.GPT, got {type(model).__name__}")
    n = len(model.blocks)
    names = ["embed", "pos_embed"] + [f"layer{l}.attn.heads" for l in range(n)] + \
        [f"layer{l}.mlp.out" for l in range(n) if model.blocks[l].mlp is not None]
    names += ["final_norm.scale"] if model.ln_final is not None else []
    out, cache = apply(graphdef, params, tokens, capture=names)
    w_u, b_u = model.unembed[...], model.unembed_bias[...]
    if model.ln_final is not None:
        scale, ln = cache["final_norm.scale"], model.ln_final

        def direct(c):  # c [..., T, D]
            return ((c - c.mean(-1, keepdims=True)) / scale * ln.scale[...]) @ w_u

        bias = jnp.broadcast_to(ln.bias[...] @ w_u + b_u, out.shape)
    else:
        direct = lambda c: c @ w_u  # noqa: E731
        bias = jnp.broadcast_to(b_u, out.shape)
    heads = jnp.stack([direct(jnp.moveaxis(cache[f"layer{l}.attn.heads"], 1, 0)) for l in range(n)])
    mlp = jnp.stack([direct(cache[f"layer{l}.mlp.out"]) if f"layer{l}.mlp.out" in cache else jnp.zeros_like(out)
                     for l in range(n)])
    return {"embed": direct(cache["embed"]), "pos_embed": direct(cache["pos_embed"]), "heads": heads, "mlp": mlp,
            "bias": bias}


def _attention(model: GPT, layer: int, head: int):
    """The attention of block `layer`, after a ValueError naming layer or head unless both are in range (indexing a
    JAX array past its end would clamp: head 7 of a 2-head layer read head 1)."""
    check_range("layer", layer, 0, len(model.blocks) - 1)
    a = model.blocks[layer].attn
    check_range("head", head, 0, a.wv.shape[0] - 1)
    return a


def ov_circuit(model: GPT, layer: int, head: int) -> jax.Array:
    """W_V W_O [D, D] of one head: what the head writes for a unit of (normalised) residual it attends to."""
    a = _attention(model, layer, head)
    return a.wv[head] @ a.wo[head]


def qk_circuit(model: GPT, layer: int, head: int) -> jax.Array:
    """W_Q W_K^T [D, D] of one head: the bilinear form of its attention score (before 1 / sqrt(dh))."""
    a = _attention(model, layer, head)
    return a.wq[head] @ a.wk[head].T


def ov_gain(model: GPT, layer: int, head: int) -> jax.Array:
    """W_E W_V W_O W_U [in, out] of one head (the LayerNorms left out): the direct path from the embedding through
    the head's values to the output. For a layer-0 head (whose values read the embedding alone) and scalar inputs
    and outputs, its sign says whether attending to a value pushes the prediction up (copying) or down (negative
    heads); a later head's values read a stream earlier layers have rewritten, so its sign need not match what the
    head does (measure that: the correlation of the attended value with the head's direct attribution)."""
    if model.vocab_size:
        raise ValueError("ov_gain is for vector-input models (input_dim > 0)")
    return model.embed[...] @ ov_circuit(model, layer, head) @ model.unembed[...]
