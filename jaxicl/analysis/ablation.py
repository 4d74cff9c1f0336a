"""Head ablation as patches: zero, mean (over a reference batch) or resample (another prompt's activation).

A head is ablated at its per-head site (default "layer{layer}.attn.z", [T, H, dh], the TransformerLens
hook_z), every position at once; several heads at once form one patch.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxicl.analysis.cache import batch_site_info, check_heads, run_with_cache
from jaxicl.analysis.patching import patched_predictions
from jaxicl.mesh_placement import replicated_inputs
from jaxicl.sites import Patch

KINDS = ("zero", "mean", "resample")


@replicated_inputs
def ablate_heads(graphdef: nnx.GraphDef, params, tokens: jax.Array, heads: Sequence[tuple[int, int]], kind: str = "zero",
                 reference: jax.Array | None = None, key: jax.Array | None = None,
                 site: str = "layer{layer}.attn.z") -> jax.Array:
    """Predictions [B, ...] of tokens [B, T, ...] with every (layer, head) of `heads` ablated.

    mean: the head's activation averaged over the prompts of `reference` [N, T, ...] (default: tokens), per position;
    resample: each prompt gets the head's activation on a random prompt of `reference` (key); without a reference
    (or with tokens itself, or a copy of them) a random other prompt of the batch, never the prompt itself.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    info = batch_site_info(graphdef, params, tokens)
    heads = check_heads(heads, site, info)
    if not heads:  # an empty patch: the unablated predictions, as if some head had been ablated
        raise ValueError("heads: give at least one (layer, head) pair")
    names = sorted({site.format(layer=layer) for layer, _ in heads})
    masks = {}
    for layer, h in heads:
        name = site.format(layer=layer)
        shape, axes = info[name]
        m = masks.get(name, np.zeros(tuple(n if a == "head" else 1 for n, a in zip(shape, axes)), bool))
        m[tuple(h if a == "head" else 0 for a in axes)] = True
        masks[name] = m
    if reference is not None and (reference.shape[1:] != tokens.shape[1:] or reference.dtype != tokens.dtype):
        # a per-position activation of another prompt length would be broadcast (one position) or fail inside the trace
        raise ValueError(f"reference: prompts of the shape and dtype of tokens' are needed ([N, *{tokens.shape[1:]}] "
                         f"{tokens.dtype}: the value is per position), got {reference.shape} {reference.dtype}")
    # a copy of the batch is the batch: resampled from it, a prompt could draw itself and stay unablated
    own = reference is None or reference is tokens or (
        kind == "resample" and reference.shape == tokens.shape and bool(jnp.array_equal(reference, tokens)))
    reference = tokens if reference is None else reference
    if kind == "zero":
        values = {n: jnp.zeros((tokens.shape[0], *info[n][0])) for n in names}
    else:
        ref = run_with_cache(graphdef, params, reference, names)[1]
        if kind == "mean":
            values = {n: jnp.broadcast_to(v.mean(0), (tokens.shape[0], *v.shape[1:])) for n, v in ref.items()}
        else:
            if key is None:
                raise ValueError("kind='resample' needs a key")
            pick = resample_picks(key, tokens.shape[0], reference.shape[0], own)
            values = {n: v[pick] for n, v in ref.items()}
    return patched_predictions(graphdef, params, tokens, Patch(values=values, masks=masks))


def resample_picks(key: jax.Array, batch: int, n_reference: int, own: bool) -> jax.Array:
    """Indices [batch] into the reference, uniform; own (the reference is the batch): never a prompt's own index."""
    if not own:
        return jax.random.randint(key, (batch,), 0, n_reference)
    if batch < 2:
        raise ValueError(f"kind='resample' on the batch itself needs tokens of at least 2 prompts, got {batch}")
    return (jnp.arange(batch) + jax.random.randint(key, (batch,), 1, batch)) % batch
