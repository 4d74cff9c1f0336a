"""The attractor test (Ferry et al. 2023, notes Section 6.2): perturb a site at some cells, follow the distance.

Gaussian noise of norm alpha |x| is added to the site's value x at each selected cell; at every later site the
distance between the perturbed and the clean values at those cells, relative to the clean norm, says whether
the perturbation shrinks (an attractor) or grows through the layers.
"""

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicl.analysis.cache import batch_site_info, check_sites, run_with_cache
from jaxicl.mesh_placement import replicated_inputs
from jaxicl.models.functional import apply
from jaxicl.numeric import ratio_or_nan
from jaxicl.sites import Patch


@replicated_inputs
def perturbation_distances(graphdef: nnx.GraphDef, params, tokens: jax.Array, site: str, cells: jax.Array,
                           alpha: float, key: jax.Array, sites: Sequence[str]) -> jax.Array:
    """[len(sites)] mean over the selected cells of |z_perturbed - z_clean| / |z_clean| at each of `sites` when
    noise of norm alpha |x| is added to `site` at cells [B, T] (bool) of tokens [B, T, ...]. Sites are [T, D]. NaN
    where cells selects none (a mean over no cells: 0 would read as the noise having vanished). The clean run is the
    perturbed program at alpha 0 (one compiled program for both: alpha 0 gives 0 exactly, in any dtype); the distances
    are in float32 at least (a bfloat16 sum over the cells loses counts past 256)."""
    sites = check_sites(sites, batch_site_info(graphdef, params, tokens))  # read once: a generator is spent by a pass
    info = _cell_sites_info(graphdef, params, tokens, cells, [site, *sites], "site and sites")
    x = run_with_cache(graphdef, params, tokens, [site], info=info)[1][site]
    clean, perturbed = (_perturbed(graphdef, params, tokens, site, noise_at(x, cells, a, key), sites)[1]
                        for a in (0.0, alpha))
    wide = jnp.promote_types(x.dtype, jnp.float32)
    w = cells.astype(jnp.finfo(wide).dtype)
    n = jnp.sum(w)
    out = []
    for s in sites:
        z = clean[s].astype(wide)
        d = jnp.linalg.norm(perturbed[s].astype(wide) - z, axis=-1) / jnp.maximum(jnp.linalg.norm(z, axis=-1), 1e-30)
        out.append(jnp.sum(w * d))
    return ratio_or_nan(jnp.stack(out), n)


@replicated_inputs
def perturbed_outputs(graphdef: nnx.GraphDef, params, tokens: jax.Array, site: str, cells: jax.Array, alpha: float,
                      key: jax.Array) -> jax.Array:
    """The model's outputs [B, T, ...] with perturbation_distances' noise (the same draw for the same key, so a
    sweep over alpha scales one direction) added to `site` at cells [B, T]: whether the model still reconstructs."""
    info = _cell_sites_info(graphdef, params, tokens, cells, [site], "site")
    x = run_with_cache(graphdef, params, tokens, [site], info=info)[1][site]
    return _perturbed(graphdef, params, tokens, site, noise_at(x, cells, alpha, key), ())[0]


def _cell_sites_info(graphdef: nnx.GraphDef, params, tokens: jax.Array, cells: jax.Array, names: Sequence[str],
                     argument: str) -> dict:
    """batch_site_info of tokens [B, T, ...], once names (the argument named `argument`) are [T, D] sites of the model
    and cells is a [B, T] mask: noise_at perturbs the last axis at each cell, so any other site shape or a [T] mask
    would be broadcast onto the wrong axes."""
    info = batch_site_info(graphdef, params, tokens)
    check_sites(names, info, argument)
    t = tokens.shape[1]
    not_cells = {s: info[s][0] for s in names if len(info[s][0]) != 2 or info[s][0][0] != t}
    if not_cells:
        raise ValueError(f"{argument} must be [T, D] sites (a vector per cell, T = {t}), got {not_cells}")
    if cells.shape != tokens.shape[:2]:
        raise ValueError(f"cells must be a [B, T] = {list(tokens.shape[:2])} mask (one row per prompt), got "
                         f"{list(cells.shape)}")
    return info


def noise_at(x: jax.Array, cells: jax.Array, alpha: float, key: jax.Array) -> jax.Array:
    """[B, T, D] Gaussian noise of norm alpha |x| at each cell of cells [B, T] (bool), 0 elsewhere, for x [B, T, D]; in
    x's dtype (a float32 delta on a bfloat16 site would have carried the perturbed run on in float32)."""
    noise = jax.random.normal(key, x.shape, x.dtype)
    scale = alpha * jnp.linalg.norm(x, axis=-1, keepdims=True) / jnp.linalg.norm(noise, axis=-1, keepdims=True)
    return jnp.where(cells[..., None], noise * scale, 0.0).astype(x.dtype)  # a numpy alpha (a sweep's) promoted


@partial(jax.jit, static_argnums=(0, 3, 5))
def _perturbed(graphdef, params, tokens, site, delta, sites):
    return jax.vmap(lambda t, d: apply(graphdef, params, t, capture=sites, patch=Patch(deltas={site: d})))(
        tokens, delta)
