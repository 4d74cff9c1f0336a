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

from jaxicl.analysis.cache import batch_site_info, check_sites
from jaxicl.mesh_placement import replicated_inputs
from jaxicl.models.functional import apply
from jaxicl.numeric import ratio_or_nan
from jaxicl.sites import Patch


@replicated_inputs
def perturbation_distances(graphdef: nnx.GraphDef, params, tokens: jax.Array, site: str, cells: jax.Array,
                           alpha: float, key: jax.Array, sites: Sequence[str]) -> jax.Array:
    """[len(sites)] mean over the selected cells of |z_perturbed - z_clean| / |z_clean| at each of `sites` when
    noise of norm alpha |x| is added to `site` at cells [B, T] (bool) of tokens [B, T, ...]. Sites are [T, D]. NaN
    where cells selects none (a mean over no cells: 0 would read as the noise having vanished). One compiled program
    of two forward passes: the clean run is the perturbed run's loop body at a zero delta (so alpha 0 gives 0
    exactly, in any dtype), and it also reads x; the distances are in float32 at least (a bfloat16 sum over the
    cells loses counts past 256)."""
    sites = check_sites(sites, batch_site_info(graphdef, params, tokens))  # read once: a generator is spent by a pass
    _check_cells_and_sites(graphdef, params, tokens, cells, [site, *sites], "site and sites")
    return _distances(graphdef, params, tokens, site, cells, alpha, key, sites)


@replicated_inputs
def perturbed_outputs(graphdef: nnx.GraphDef, params, tokens: jax.Array, site: str, cells: jax.Array, alpha: float,
                      key: jax.Array) -> jax.Array:
    """The model's outputs [B, T, ...] with perturbation_distances' noise (the same draw for the same key, so a
    sweep over alpha scales one direction) added to `site` at cells [B, T]: whether the model still reconstructs.
    One compiled program (a sweep over alpha compiles once)."""
    _check_cells_and_sites(graphdef, params, tokens, cells, [site], "site")
    return _perturbed_outputs(graphdef, params, tokens, site, cells, alpha, key)


def _check_cells_and_sites(graphdef: nnx.GraphDef, params, tokens: jax.Array, cells: jax.Array, names: Sequence[str],
                           argument: str) -> None:
    """A ValueError unless names (the argument named `argument`) are [T, D] sites of the model on tokens [B, T, ...]
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


def noise_at(x: jax.Array, cells: jax.Array, alpha: float, key: jax.Array) -> jax.Array:
    """[B, T, D] Gaussian noise of norm alpha |x| at each cell of cells [B, T] (bool), 0 elsewhere, for x [B, T, D]; in
    x's dtype (a float32 delta on a bfloat16 site would have carried the perturbed run on in float32)."""
    noise = jax.random.normal(key, x.shape, x.dtype)
    scale = alpha * jnp.linalg.norm(x, axis=-1, keepdims=True) / jnp.linalg.norm(noise, axis=-1, keepdims=True)
    return jnp.where(cells[..., None], noise * scale, 0.0).astype(x.dtype)  # a numpy alpha (a sweep's) promoted


def _run(graphdef, params, tokens, site, delta, sites):
    """(outputs [B, T, ...], {s: [B, ...]} for s in sites) of tokens [B, T, ...] with delta [B, T, D] added to site
    (none where delta is None)."""
    return jax.vmap(lambda t, d: apply(graphdef, params, t, capture=sites,
                                       patch=None if d is None else Patch(deltas={site: d})))(tokens, delta)


@partial(jax.jit, static_argnums=(0, 3, 7))
def _distances(graphdef, params, tokens, site, cells, alpha, key, sites):
    """perturbation_distances after its checks. A scan of two steps runs one compiled pass twice: at a zero delta
    (the clean run, which also reads x at site), then at the noise drawn from that x (a third draw, from the
    perturbed x, is left unused)."""
    read = tuple(dict.fromkeys((site, *sites)))
    x = jax.eval_shape(lambda: _run(graphdef, params, tokens, site, None, (site,))[1][site])

    def step(delta, _):
        cache = _run(graphdef, params, tokens, site, delta, read)[1]
        return noise_at(cache[site], cells, alpha, key), {s: cache[s] for s in sites}

    runs = jax.lax.scan(step, jnp.zeros(x.shape, x.dtype), length=2)[1]
    wide = jnp.promote_types(x.dtype, jnp.float32)
    w = cells.astype(jnp.finfo(wide).dtype)
    out = []
    for s in sites:
        z, moved = runs[s].astype(wide)
        d = jnp.linalg.norm(moved - z, axis=-1) / jnp.maximum(jnp.linalg.norm(z, axis=-1), 1e-30)
        out.append(jnp.sum(w * d))
    return ratio_or_nan(jnp.stack(out), jnp.sum(w))


@partial(jax.jit, static_argnums=(0, 3))
def _perturbed_outputs(graphdef, params, tokens, site, cells, alpha, key):
    """perturbed_outputs after its checks: the clean pass up to site (the rest of it is never used), then the
    perturbed one."""
    x = _run(graphdef, params, tokens, site, None, (site,))[1][site]
    return _run(graphdef, params, tokens, site, noise_at(x, cells, alpha, key), ())[0]
