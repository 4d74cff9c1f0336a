"""What every jaxicl model shares: a forward pass with named sites and a declared readout.

A model maps one prompt's tokens [T, D] to its outputs, calling `sites(name, value)` at every named
point (jaxicl.sites); `readout(outputs)` turns outputs into the per-position predictions that losses,
baselines and analyses compare ([T] or [T, K]). jaxicl.models.functional.apply and predictor run every
model through this one interface.
"""

import jax
from flax import nnx

from jaxicl.prompt import check_prompt_shape
from jaxicl.sites import run_with_sites


class Model(nnx.Module):
    """Base class: subclasses define __call__(tokens, sites=null_sites) and, where outputs are not
    already the predictions, readout."""

    def readout(self, outputs: jax.Array) -> jax.Array:
        """Per-position predictions from the outputs of __call__ (the outputs themselves by default)."""
        return outputs

    def site_shapes(self, tokens: jax.ShapeDtypeStruct) -> dict[str, jax.ShapeDtypeStruct]:
        """{site name: shape and dtype} of every site on one prompt like `tokens`, in the order the forward pass
        visits them (layer2 before layer10), without running the model."""
        order = []

        def recorded(t):
            cache = run_with_sites(self, t, capture="all")[1]
            order.extend(cache)  # insertion order; the pytree eval_shape returns sorts its keys
            return cache

        shapes = jax.eval_shape(recorded, tokens)
        return {name: shapes[name] for name in order}

    def site_axes(self, name: str, ndim: int) -> tuple[str, ...]:
        """Names of the axes of site `name` (ndim axes): "pos" (query position), "head", or other names.

        Patching tools select positions and heads by these names. Default: positions first, no head axis; where the
        first axis of a site is not as long as the prompt (a head-first [H, T, T] or a pooled [D] site), the analyses
        name it "dim0" instead (site_axes_of). Override this for head axes and position axes that are not first.
        """
        return ("pos", *(f"dim{i}" for i in range(1, ndim)))[:ndim]


def site_axes_of(model: Model, name: str, shape: tuple[int, ...], length: int) -> tuple[str, ...]:
    """The axes of site `name` of shape `shape` on a prompt of `length` positions: model.site_axes, where that is
    Model's default guess (positions first) and the first axis is not `length` long, with that axis named "dim0"
    (patching it "by position" would patch heads or features)."""
    axes = model.site_axes(name, len(shape))
    if axes[:1] == ("pos",) and axes == Model.site_axes(model, name, len(shape)) and shape[0] != length:
        return ("dim0", *axes[1:])
    return axes


def check_prompt(tokens: jax.Array, width: int | None, what: str) -> None:
    """ValueError unless tokens is one prompt the model takes: ids [T] (width None) or vectors [T, width] (what: their
    format, for the message). Shapes are static, so this runs once at trace time and is not in the compiled program."""
    check_prompt_shape("the model", tokens.shape, (None,) if width is None else (None, width), what,
                       "batched functions (run_with_cache, activation_patching, ...) take a batch [B, ...] of such "
                       "prompts")


def check_prompt_length(t: int, positions: int, field: str = "max_len", exact: bool = False) -> None:
    """ValueError naming the model's field when a prompt of t positions does not fit its `positions`-row table
    (exact: the model's parameters are for exactly that many positions)."""
    if t > positions or (exact and t != positions):
        raise ValueError(f"a prompt of {t} positions does not fit this model: its {field}={positions} "
                         f"({'exactly' if exact else 'at most'} that many positions)")
