"""Activation patching as one compiled program: the whole grid of patches is vmapped (TransformerLens runs a
Python loop of forward passes, one per patch, `transformer_lens.patching.generic_activation_patch`).

A grid patches, one at a time, each site of `sites` from a clean run into a corrupted run of the same
shape, by whole site ("site"), by query position ("pos"), by head ("head") or by position and head
("pos_head"), using the axis names the model declares for its sites (Model.site_axes; a "pos" axis is as long as
the prompts). Each grid point is a jaxicl.sites.Patch whose masks select its slice; the patches are stacked and run
by one jitted program (`jax.lax.map` over chunks of `chunk_size` points: None runs the whole grid at once; the default
"auto" chunks on CPU so that a chunk holds about CPU_CHUNK_TOKENS prompt tokens, which measured fastest on
a 2-core CPU for small GPTs, and runs the whole grid at once on accelerators).
`metric(predictions [B, ...]) -> scalar` scores each patched batch. It is traced afresh at every call
(jaxicl.traced), so a metric that reads a global (an answer token, a target array) sees the value it has at that
call, and the compiled grid is reused while the metric traces to the same program. A Python number, NumPy scalar or
0-d NumPy array it reads is part of that program, so each new value compiles the grid again: hold an answer token
that changes as jnp.asarray(token).

Attribution patching approximates the same grid to first order: metric(corrupted) + the gradient at
the corrupted run (zero deltas at every site at once) times (clean - corrupted), summed over the patched
slice. It equals activation patching where the metric is linear in the patched activations.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxicl.analysis.cache import batch_site_info, check_heads, check_sites, run_with_cache
from jaxicl.mesh_placement import explicitly_sharded, replicated_inputs
from jaxicl.models.functional import apply
from jaxicl.sites import Patch
from jaxicl.traced import Traced, trace

BY = ("site", "pos", "head", "pos_head")
NAME_AXES = "a model names the axes of its sites in its site_axes method (override jaxicl.models.base.Model.site_axes)"
CPU_CHUNK_TOKENS = 2048
Metric = Callable[[jax.Array], jax.Array]
ChunkSize = int | None | str


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    """The patches of a grid: shape (len(sites), [T], [H]) and masks {site: bool [G, *broadcast shape]}."""

    sites: tuple[str, ...]
    by: str
    shape: tuple[int, ...]
    masks: dict


def build_grid(info: dict, sites: Sequence[str], by: str, length: int) -> PatchGrid:
    """The grid of one-at-a-time patches of `sites` (site_info's {site: (shape, axes)} for prompts of `length`
    positions) by `by`."""
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, got {by!r}")
    sites = check_sites(sites, info)
    if not sites:
        raise ValueError("sites: give at least one site name")
    repeated = sorted({s for s in sites if sites.count(s) > 1})
    if repeated:  # a grid row per entry: a repeated name would share (and lose) one row block
        raise ValueError(f"sites: {repeated} named more than once; name each site once")
    split = [a for a in ("pos", "head") if a in by]
    sizes = {}
    for s in sites:
        shape, axes = info[s]
        for a in split:
            if a not in axes:
                raise ValueError(f"by={by!r}: site {s!r} has no {a!r} axis (its axes are {axes}); sites with one: "
                                 f"{[n for n, (_, ax) in info.items() if a in ax]}; {NAME_AXES}")
            n = shape[axes.index(a)]
            if a == "pos" and n != length:
                raise ValueError(f"by={by!r}: site {s!r} of shape {shape} has a 'pos' axis of length {n} (its axes "
                                 f"are {axes}), but the prompts have {length} positions; {NAME_AXES}")
            sizes.setdefault(a, set()).add(n)
    for a, n in sizes.items():
        if len(n) > 1:
            raise ValueError(f"by={by!r}: the sites {list(sites)} differ in their {a!r} sizes {sorted(n)}")
    extent = tuple(next(iter(sizes[a])) for a in split)
    per_site = math.prod(extent)
    masks = {}
    for i, s in enumerate(sites):
        shape, axes = info[s]
        bshape = tuple(shape[k] if axes[k] in split else 1 for k in range(len(shape)))
        m = np.zeros((len(sites) * per_site, *bshape), bool)
        for j, point in enumerate(np.ndindex(*extent) if extent else [()]):
            index = tuple(point[split.index(axes[k])] if axes[k] in split else 0 for k in range(len(shape)))
            m[(i * per_site + j, *index)] = True
        masks[s] = m
    return PatchGrid(sites, by, (len(sites), *extent), masks)


def _check_batches(clean: jax.Array, corrupted: jax.Array) -> None:
    if clean.shape != corrupted.shape or clean.dtype != corrupted.dtype:
        raise ValueError(f"clean and corrupted must have the same shape and dtype, got clean {clean.shape} "
                         f"{clean.dtype} and corrupted {corrupted.shape} {corrupted.dtype}")


@partial(jax.jit, static_argnums=0)
def patched_predictions(graphdef: nnx.GraphDef, params, tokens: jax.Array, patch: Patch) -> jax.Array:
    """Predictions [B, ...] of the batch tokens [B, ...] under a patch whose values and deltas are per prompt
    ([B, ...] leaves) and whose masks are shared by every prompt."""
    readout = nnx.merge(graphdef, params).readout

    def one(t, values, deltas):
        return readout(apply(graphdef, params, t, patch=Patch(values, patch.masks, deltas))[0])

    return jax.vmap(one)(tokens, patch.values, patch.deltas)


def trace_metric(metric: Metric, predictions: jax.Array) -> tuple[Traced, list]:
    """jaxicl.traced.trace of the metric for predictions of that shape and dtype (the clean run's: the corrupted
    run's are alike), refused unless it returns a scalar: a per-prompt [B] metric would make activation_patching
    fail to reshape its grid and direct_effect_patching return [len(heads), B]."""
    traced, consts = trace(metric, jax.ShapeDtypeStruct(predictions.shape, predictions.dtype))
    shapes = [a.shape for a in jax.tree.leaves(traced.out)]
    if shapes != [()]:
        got = f"shape {shapes[0]}" if len(shapes) == 1 else f"{len(shapes)} arrays of shapes {shapes}"
        raise ValueError(f"metric must return a scalar (e.g. a mean over the batch's prompts), got {got} from "
                         f"predictions of shape {predictions.shape}")
    return traced, consts


def resolve_chunk_size(chunk_size: ChunkSize, corrupted: jax.Array) -> int | None:
    """The number of grid points run at once: chunk_size itself, or for "auto" (see the module docstring) a
    choice from the prompt batch corrupted [B, T, ...] and the backend."""
    if chunk_size == "auto":
        if jax.default_backend() != "cpu":
            return None
        return max(1, CPU_CHUNK_TOKENS // math.prod(corrupted.shape[:2]))
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, None (the whole grid) or 'auto', got {chunk_size!r}")
    return chunk_size


@replicated_inputs
def activation_patching(graphdef: nnx.GraphDef, params, clean: jax.Array, corrupted: jax.Array, metric: Metric,
                        sites: Sequence[str], by: str = "pos", chunk_size: ChunkSize = "auto") -> np.ndarray:
    """metric of the corrupted run with each grid slice patched from the clean run: [len(sites), [T], [H]].

    clean, corrupted: prompt batches [B, T, ...] of the same shape. All checks run before compiling.
    """
    _check_batches(clean, corrupted)
    chunk = resolve_chunk_size(chunk_size, corrupted)
    info = batch_site_info(graphdef, params, clean)
    grid = build_grid(info, sites, by, clean.shape[1])
    predictions, values = run_with_cache(graphdef, params, clean, grid.sites, info)
    traced, consts = trace_metric(metric, predictions)
    out = _grid_metric(graphdef, params, corrupted, values, grid.masks, traced, consts, chunk, grid.sites)
    return np.asarray(out).reshape(grid.shape)


@partial(jax.jit, static_argnums=(0, 5, 7, 8))
def _grid_metric(graphdef, params, corrupted, values, masks, metric, consts, chunk_size, sites):
    """[G] metric per grid point (build_grid's order: the points of sites[0], then of sites[1], ...). The points
    of each site are mapped over on their own, patching only that site, so what runs before the site does not
    depend on the mapped masks and is computed once, not per point."""
    out = []
    for i, site in enumerate(sites):
        per_site = masks[site].shape[0] // len(sites)
        m = masks[site][i * per_site:(i + 1) * per_site]

        def at(m_g, site=site):
            return metric(consts, patched_predictions(graphdef, params, corrupted,
                                                      Patch(values={site: values[site]}, masks={site: m_g})))

        out.append(jax.vmap(at)(m) if chunk_size is None else jax.lax.map(at, m, batch_size=chunk_size))
    return jnp.concatenate(out)


@replicated_inputs
def grid_memory(graphdef: nnx.GraphDef, params, clean: jax.Array, corrupted: jax.Array, metric: Metric,
                sites: Sequence[str], by: str, chunk_size: ChunkSize = "auto") -> int:
    """Bytes of the compiled grid program (XLA's memory analysis: arguments + outputs + temporaries)."""
    chunk = resolve_chunk_size(chunk_size, corrupted)
    info = batch_site_info(graphdef, params, clean)
    grid = build_grid(info, sites, by, clean.shape[1])
    predictions, values = run_with_cache(graphdef, params, clean, grid.sites, info)
    traced, consts = trace_metric(metric, predictions)
    m = _grid_metric.lower(graphdef, params, corrupted, values, grid.masks, traced, consts, chunk, grid.sites).compile()
    m = m.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


@replicated_inputs
def attribution_patching(graphdef: nnx.GraphDef, params, clean: jax.Array, corrupted: jax.Array, metric: Metric,
                         sites: Sequence[str], by: str = "pos") -> np.ndarray:
    """The first-order estimate of activation_patching's grid, from one forward and one backward pass."""
    _check_batches(clean, corrupted)
    info = batch_site_info(graphdef, params, clean)
    grid = build_grid(info, sites, by, clean.shape[1])
    predictions, clean_values = run_with_cache(graphdef, params, clean, grid.sites, info)
    traced, consts = trace_metric(metric, predictions)
    try:
        out = _attribution(graphdef, params, corrupted, clean_values, grid.masks, traced, consts)
    except ValueError as e:  # JAX's message names two types of one gradient, not the array that split it
        if sharded := [c.shape for c in consts if explicitly_sharded(c)]:
            raise ValueError(f"metric: it reads arrays of shapes {sharded} split over a mesh axis (e.g. targets drawn "
                             f"under jax.set_mesh), and its gradient at the predictions, which the analysis holds "
                             f"replicated, cannot be split alike; replicate them first, jax.reshard(x, "
                             f"jax.sharding.PartitionSpec()) inside the mesh") from e
        raise
    return np.asarray(out).reshape(grid.shape)


@partial(jax.jit, static_argnums=(0, 5))
def _attribution(graphdef, params, corrupted, clean_values, masks, metric, consts):
    names = tuple(clean_values)
    corrupted_values = jax.vmap(lambda t: apply(graphdef, params, t, capture=names)[1])(corrupted)

    def of_deltas(deltas):
        return metric(consts, patched_predictions(graphdef, params, corrupted, Patch(deltas=deltas)))

    zeros = jax.tree.map(jnp.zeros_like, corrupted_values)
    base, grads = jax.value_and_grad(of_deltas)(zeros)
    total = base
    for s in names:
        # the real part: for a complex site JAX's gradient of a real metric is df/dRe - i df/dIm, and the first-order
        # change is Re(grad * delta)
        effect = jnp.sum(jnp.real(grads[s] * (clean_values[s] - corrupted_values[s])), axis=0)  # [*site shape]
        m = masks[s]
        total = total + jnp.sum(m * effect[None], axis=tuple(range(1, m.ndim)))
    return total


def last_layer(info: dict) -> int:
    """The last layer l of the sites named layer{l}.<site> (site_info's names), after a ValueError naming the argument
    stream_site where there is none or a site's name begins with "layer" but is not of that form (e.g. a custom
    model's "layernorm.out"), so the last layer is unknown."""
    layers = set()
    for n in info:
        if n.startswith("layer"):
            if not (match := re.fullmatch(r"layer(\d+)\..*", n)):
                raise ValueError(f"stream_site: the model's site {n!r} begins with 'layer' but is not named "
                                 f"layer{{l}}.<site>, so its last layer is unknown; name the site the output reads "
                                 f"from, one of {list(info)}")
            layers.add(int(match[1]))
    if not layers:
        raise ValueError(f"stream_site: this model has no layer{{l}}.resid_post sites; name the site the output reads "
                         f"from, one of {list(info)}")
    return max(layers)


@replicated_inputs
def direct_effect_patching(graphdef: nnx.GraphDef, params, clean: jax.Array, corrupted: jax.Array, metric: Metric,
                           heads: Sequence[tuple[int, int]], head_site: str = "layer{layer}.attn.heads",
                           stream_site: str | None = None) -> np.ndarray:
    """Path patching of each head's direct effect: the metric of the corrupted run when only the path from
    head (layer, h) straight to the output carries its clean value: the difference of its clean and corrupted
    outputs (head_site, [T, H, D]) is added at stream_site (default: the last layer's resid_post), after
    every later layer. Returns [len(heads)]. A model without a residual stream (SelfAttention(residual=False))
    has no such path from a head below its last layer: asking for one is an error."""
    _check_batches(clean, corrupted)
    info = batch_site_info(graphdef, params, clean)
    heads = check_heads(heads, head_site, info, "heads / head_site")
    if not heads:
        raise ValueError("heads: give at least one (layer, head) pair")
    if stream_site is None:
        last = last_layer(info)
        if not getattr(nnx.merge(graphdef, params), "residual", True):
            if below := sorted({layer for layer, _ in heads} - {last}):
                raise ValueError(f"heads: this model has no residual stream (residual=False), so the heads of layer(s) "
                                 f"{below} reach the output only through the layers above them: no direct path; "
                                 f"direct effects exist for the last layer's heads (layer {last})")
        stream_site = f"layer{last}.resid_post"
    names = tuple(sorted({head_site.format(layer=layer) for layer, _ in heads}))
    check_sites([stream_site], info, "stream_site")
    order = list(info)  # the forward pass's order
    if early := sorted({n for n in names if order.index(n) >= order.index(stream_site)}):
        raise ValueError(f"stream_site: {stream_site!r} is not after {early} in the forward pass, so a head's output "
                         f"added there is not a path from the head; name a site after them (default: the last "
                         f"layer's resid_post)")
    for n in names:  # a head's output [T, D] must be what stream_site holds, not broadcast into another shape
        shape, axes = info[n]
        head_out = tuple(d for d, a in zip(shape, axes) if a != "head")
        if head_out != info[stream_site][0]:
            raise ValueError(f"stream_site: {stream_site!r} has shape {info[stream_site][0]}, but a head's output "
                             f"at {n!r} has {head_out}: name a residual-stream site (default: the last layer's "
                             f"resid_post)")
    predictions, clean_values = run_with_cache(graphdef, params, clean, names, info)
    corrupted_values = run_with_cache(graphdef, params, corrupted, names, info)[1]
    deltas = jnp.stack([jnp.take(clean_values[head_site.format(layer=layer)]
                                 - corrupted_values[head_site.format(layer=layer)], h,
                                 axis=1 + info[head_site.format(layer=layer)][1].index("head")) for layer, h in heads])
    traced, consts = trace_metric(metric, predictions)
    return np.asarray(_direct(graphdef, params, corrupted, deltas, stream_site, traced, consts))


@partial(jax.jit, static_argnums=(0, 4, 5))
def _direct(graphdef, params, corrupted, deltas, stream_site, metric, consts):
    return jax.lax.map(lambda d: metric(consts, patched_predictions(graphdef, params, corrupted,
                                                                    Patch(deltas={stream_site: d}))), deltas)
