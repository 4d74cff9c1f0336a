"""A cache of requested sites for a batch of prompts (TransformerLens's run_with_cache, compiled).

Only the requested sites are kept (no whole-model cache unless asked for with names="all"); names are
checked against the model's sites before anything is compiled. The analyses take a batch drawn under jax.set_mesh
(split over "data") inside the mesh and after it, with params from anywhere (train()'s included), replicating both on
the batch's mesh first (jaxicl.mesh_placement.replicated_inputs).
"""

from collections.abc import Iterable
from functools import partial

import jax
from flax import nnx

from jaxicl.mesh_placement import replicated_inputs
from jaxicl.models.base import Model, site_axes_of
from jaxicl.models.functional import apply


_SITE_INFO: dict = {}  # site_info by (graphdef, parameter shapes, prompt shape): tracing the model costs ~40 ms


def site_info(graphdef: nnx.GraphDef, params, tokens: jax.Array) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """{site: (shape, axis names)} of the model on one prompt like tokens [T, ...] (no computation runs); the axis
    names are the model's site_axes (jaxicl.models.base.site_axes_of). TypeError unless the model is a Model.

    Shapes depend only on the graph and the shapes of params and tokens, so the answer is memoised on those.
    """
    leaves, treedef = jax.tree.flatten(params)
    key = (graphdef, treedef, tuple((x.shape, str(x.dtype)) for x in leaves), tokens.shape, str(tokens.dtype))
    if key not in _SITE_INFO:
        model = nnx.merge(graphdef, params)
        if not isinstance(model, Model):
            raise TypeError(f"{type(model).__name__} is not a jaxicl.models.base.Model: the analyses (caches, "
                            f"patching, ablation, ...) read the shapes and axes of its sites through Model.site_shapes "
                            f"and Model.site_axes; subclass jaxicl.models.base.Model instead of nnx.Module")
        shapes = model.site_shapes(jax.ShapeDtypeStruct(tokens.shape, tokens.dtype))
        if len(_SITE_INFO) >= 64:
            _SITE_INFO.clear()
        _SITE_INFO[key] = {name: (s.shape, site_axes_of(model, name, s.shape, tokens.shape[0]))
                           for name, s in shapes.items()}
    return _SITE_INFO[key]


def batch_site_info(graphdef: nnx.GraphDef, params, tokens: jax.Array) -> dict:
    """site_info of one prompt of the batch tokens [B, T, ...], from the batch's shape and dtype alone: taking a prompt
    out (tokens[0]) of a batch sharded over a mesh's Explicit axis (sample_batch under jax.set_mesh) is refused by JAX,
    inside the mesh and after it."""
    return site_info(graphdef, params, jax.ShapeDtypeStruct(tokens.shape[1:], tokens.dtype))


def check_sites(names: Iterable[str], info: dict, argument: str = "sites") -> tuple[str, ...]:
    """The names as a tuple, read once (a generator is spent by one pass: a caller reading it again saw none), after
    a ValueError naming the argument and the model's sites if a name is not one of them (or names is one string,
    which would be read as its characters)."""
    if isinstance(names, str):
        raise ValueError(f"{argument}: give a list of site names, got the string {names!r} (write [{names!r}])")
    names = tuple(names)
    unknown = sorted(set(names) - set(info))
    if unknown:
        raise ValueError(f"{argument}: unknown site name(s) {unknown}; this model's sites are {list(info)}")
    return names


def check_heads(heads: Iterable[tuple[int, int]], site: str, info: dict,
                argument: str = "heads") -> tuple[tuple[int, int], ...]:
    """The heads as a tuple, read once (as check_sites' names), after a ValueError naming the argument unless every
    (layer, head) names a head of site.format(layer=layer), a site with a "head" axis; a site without "{layer}" (a
    one-layer model's) has only layer 0."""
    heads = tuple(heads)
    for layer, h in heads:
        name = site.format(layer=layer)
        if layer != 0 and name == site.format(layer=0):
            raise ValueError(f"{argument}: site {site!r} has no '{{layer}}' field, so it names the heads of one layer: "
                             f"valid layers [0], got layer {layer}")
        check_sites([name], info, f"{argument} (through site {site!r})")
        shape, axes = info[name]
        if "head" not in axes:
            raise ValueError(f"{argument}: site {name!r} has no 'head' axis (its axes are {axes}); sites with one: "
                             f"{[n for n, (_, ax) in info.items() if 'head' in ax]}")
        n_heads = shape[axes.index("head")]
        if not 0 <= h < n_heads:
            raise ValueError(f"{argument}: head index {h} of layer {layer} is out of range; allowed 0..{n_heads - 1}")
    return heads


@replicated_inputs
def run_with_cache(graphdef: nnx.GraphDef, params, tokens: jax.Array, names: Iterable[str] | str,
                   info: dict | None = None):
    """(predictions [B, ...], {site: [B, ...]}) for a batch of prompts tokens [B, T, ...], jitted; the cache's sites
    in the order the forward pass visits them, as TransformerLens keeps its hooks (jit's output sorts them).

    names: the sites to keep, or "all". info: site_info of this model and prompt shape, where the caller has it.
    """
    info = info or batch_site_info(graphdef, params, tokens)
    if names != "all":
        names = check_sites(names, info, "names")
    predictions, cache = _cached(graphdef, params, tokens, names)
    return predictions, {name: cache[name] for name in info if name in cache}


@partial(jax.jit, static_argnums=(0, 3))
def _cached(graphdef, params, tokens, names):
    readout = nnx.merge(graphdef, params).readout

    def one(t):
        out, cache = apply(graphdef, params, t, capture=names)
        return readout(out), cache

    return jax.vmap(one)(tokens)
