"""Edits at each of several sites, one site at a time, as one compiled program (steering and transplants).

For a batch of prompts and a list of sites of one shape [T, D], `edit_each_site` runs the batch once per
site with only that site edited: value -> where(mask, replacement, value) + delta, the replacement and
delta given per site and prompt. The site is selected by a traced index (every site's patch is built and
multiplied by `index == site`), so one forward program is vmapped over sites and prompts instead of
compiling one program per site. Centroid transplants (add mu_B - mu_A at an object's cells), activation
transplants (a B board's values at the same cells), mean ablation (the grand mean) and random-direction
controls are all such edits.
"""

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicl.analysis.cache import batch_site_info, check_sites
from jaxicl.mesh_placement import replicated_inputs
from jaxicl.models.functional import apply
from jaxicl.sites import Patch


@replicated_inputs
def edit_each_site(graphdef: nnx.GraphDef, params, tokens: jax.Array, sites: Sequence[str], masks: jax.Array, *,
                   values: jax.Array | None = None, deltas: jax.Array | None = None) -> jax.Array:
    """Readout outputs [S, B, ...] of tokens [B, T] with site s of `sites` (S sites, each [T, D]) edited at the
    cells masks [B, T] (bool): replaced by values [S, B, T, D] there (when given), then deltas [S, B, T, D] added
    there (when given)."""
    info = batch_site_info(graphdef, params, tokens)
    sites = check_sites(sites, info)
    shapes = {info[s][0] for s in sites}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"sites must all have one [T, D] shape, got {({s: info[s][0] for s in sites})}")
    if values is None and deltas is None:
        raise ValueError("edit_each_site needs values, deltas or both")
    want = (len(sites), tokens.shape[0], *next(iter(shapes)))
    for name, x in (("values", values), ("deltas", deltas)):
        if x is not None and x.shape != want:
            raise ValueError(f"{name} must have shape [sites, batch, T, D] = {want}, got {x.shape}")
    if masks.shape != tokens.shape[:2]:
        raise ValueError(f"masks must have shape [batch, T] = {tokens.shape[:2]}, got {masks.shape}")
    return _edited(graphdef, params, tokens, sites, jnp.asarray(masks, bool), values, deltas)


@partial(jax.jit, static_argnums=(0, 3))
def _edited(graphdef, params, tokens, sites, masks, values, deltas):
    readout = nnx.merge(graphdef, params).readout

    def one(t, m, v, d, index):  # one prompt, one selected site: v, d [S, T, D] (only v[index], d[index] used)
        on = [m[:, None] & (index == i) for i in range(len(sites))]
        patch = Patch(values={} if v is None else {s: v[i] for i, s in enumerate(sites)},
                      masks={} if v is None else {s: on[i] for i, s in enumerate(sites)},
                      deltas={} if d is None else {s: jnp.where(on[i], d[i], 0.0) for i, s in enumerate(sites)})
        return readout(apply(graphdef, params, t, patch=patch)[0])

    def per_site(index):
        v = None if values is None else jnp.swapaxes(values, 0, 1)  # [B, S, T, D]
        d = None if deltas is None else jnp.swapaxes(deltas, 0, 1)
        return jax.vmap(one, in_axes=(0, 0, 0 if v is not None else None, 0 if d is not None else None, None))(
            tokens, masks, v, d, index)

    return jax.lax.map(per_site, jnp.arange(len(sites)))
