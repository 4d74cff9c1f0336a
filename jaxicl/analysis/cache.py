"""A cache of requested sites for a batch of prompts (TransformerLens's run_with_cache, compiled).

Only the requested sites are kept (no whole-model cache unless asked for with names="all"); names are
checked against the model's sites before anything is compiled.
"""

from collections.abc import Iterable
from functools import partial

import jax
from flax import nnx

from jaxicl.models.functional import apply


def site_info(graphdef: nnx.GraphDef, params, tokens: jax.Array) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """{site: (shape, axis names)} of the model on one prompt like tokens [T, ...] (no computation runs)."""
    model = nnx.merge(graphdef, params)
    shapes = model.site_shapes(jax.ShapeDtypeStruct(tokens.shape, tokens.dtype))
    return {name: (s.shape, model.site_axes(name, len(s.shape))) for name, s in shapes.items()}


def check_sites(names: Iterable[str], info: dict, argument: str = "sites") -> None:
    """ValueError naming the argument and the model's sites if a name is not one of them."""
    unknown = sorted(set(names) - set(info))
    if unknown:
        raise ValueError(f"{argument}: unknown site name(s) {unknown}; this model's sites are {list(info)}")


def run_with_cache(graphdef: nnx.GraphDef, params, tokens: jax.Array, names: Iterable[str] | str):
    """(predictions [B, ...], {site: [B, ...]}) for a batch of prompts tokens [B, T, ...], jitted.

    names: the sites to keep, or "all".
    """
    if names != "all":
        names = tuple(names)
        check_sites(names, site_info(graphdef, params, tokens[0]), "names")
    return _cached(graphdef, params, tokens, names)


@partial(jax.jit, static_argnums=(0, 3))
def _cached(graphdef, params, tokens, names):
    readout = nnx.merge(graphdef, params).readout

    def one(t):
        out, cache = apply(graphdef, params, t, capture=names)
        return readout(out), cache

    return jax.vmap(one)(tokens)
