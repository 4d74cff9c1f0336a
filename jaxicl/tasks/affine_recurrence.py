"""Affine recurrences in context (Bhargav & Gu 2024): x_{n+1} = a x_n + b, one (a, b, x_0) per sequence.

dim = 1 is the paper's scalar recurrence; dim > 1 the vector extension x_{n+1} = A x_n + b with
A [dim, dim] (entries drawn from `a` and divided by sqrt(dim), so dim = 1 is the scalar case), b, x_0 [dim].
A prompt holds x_0..x_T (T = seq_len): position n sees x_0..x_n and predicts x_{n+1}.

  inputs  [T, dim]   x_0 .. x_{T-1}
  targets [T] (dim 1) or [T, dim]   x_1 .. x_T
  mask    [T]        1 from position loss_from on (three terms identify (a, b); earlier positions cannot
                     be predicted exactly)

With rescale=True each sequence is divided by its largest |x| (x_0..x_T), so every term lies in
[-1, 1]; info["scale"] keeps the factor. The distributions of a, b and x_0 are configurable; the
defaults (U[-1, 1] each, seq_len 16) are jaxicl's, not the paper's (which are not public).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxicl.prompt import Prompt
from jaxicl.validation import ConfigError, check_choice, check_finite, check_integer, check_positive, check_range

KINDS = ("uniform", "normal", "fixed")


@dataclasses.dataclass(frozen=True)
class Distribution:
    """uniform: U[low, high]; normal: N(mean, std^2); fixed: the constant mean. Checked by the AffineRecurrence that
    holds it, whose errors name its field (a.std)."""

    kind: str = "uniform"
    low: float = -1.0
    high: float = 1.0
    mean: float = 0.0
    std: float = 1.0

    def check(self, name: str) -> None:
        """Raises ConfigError naming the field `name` that holds this distribution."""
        check_choice(f"{name}.kind", self.kind, KINDS)
        for field in ("low", "high", "mean", "std"):
            check_finite(f"{name}.{field}", getattr(self, field))
        if self.kind == "uniform" and not self.low < self.high:
            raise ConfigError(f"{name}.low must be < {name}.high for kind='uniform', got low={self.low}, "
                              f"high={self.high}")
        check_positive(f"{name}.std", self.std, allow_zero=True)

    def sample(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, minval=self.low, maxval=self.high)
        if self.kind == "normal":
            return self.mean + self.std * jax.random.normal(key, shape)
        return jnp.full(shape, self.mean)

    def describe(self) -> str:
        """The distribution in words: "U[low, high]", "N(mean, std^2)" or "fixed at mean"."""
        if self.kind == "uniform":
            return f"U[{self.low:g}, {self.high:g}]"
        if self.kind == "normal":
            return f"N({self.mean:g}, {self.std:g}^2)"
        return f"fixed at {self.mean:g}"


@dataclasses.dataclass(frozen=True)
class AffineRecurrence:
    """x_{n+1} = A x_n + b for n = 0..seq_len - 1, (A, b, x_0) drawn per sequence."""

    dim: int = 1
    seq_len: int = 16
    a: Distribution = Distribution()
    b: Distribution = Distribution()
    x0: Distribution = Distribution()
    rescale: bool = False
    loss_from: int = 0

    def __post_init__(self):
        for name in ("dim", "seq_len", "loss_from"):
            check_integer(name, getattr(self, name))
        check_positive("dim", self.dim)
        check_positive("seq_len", self.seq_len)
        check_range("loss_from", self.loss_from, 0, self.seq_len - 1)
        for name in ("a", "b", "x0"):
            value = getattr(self, name)
            if not isinstance(value, Distribution):  # a dict or "normal" failed only at sampling, with AttributeError
                raise ConfigError(f"{name} must be a Distribution (jaxicl.tasks.affine_recurrence), e.g. "
                                  f"Distribution('normal', std=0.5), got {value!r}")
            value.check(name)

    @property
    def token_dim(self) -> int:
        return self.dim


def states(cfg: AffineRecurrence, key: jax.Array) -> tuple[jax.Array, dict]:
    """One sequence: x_0..x_T [T + 1, dim] and info {"A" [dim, dim], "b" [dim], "x0" [dim], "scale" []}.

    With rescale the states are the recurrence divided by scale, so they follow (A, b / scale): info
    holds that b and the rescaled x_0.
    """
    k_a, k_b, k_x = jax.random.split(key, 3)
    a = cfg.a.sample(k_a, (cfg.dim, cfg.dim)) / math.sqrt(cfg.dim)
    b = cfg.b.sample(k_b, (cfg.dim,))
    x0 = cfg.x0.sample(k_x, (cfg.dim,))
    _, rest = jax.lax.scan(_step, (x0, a, b), length=cfg.seq_len)
    xs = jnp.concatenate([x0[None], rest])
    scale = jnp.max(jnp.abs(xs)) if cfg.rescale else jnp.ones(())
    scale = jnp.where(scale > 0, scale, 1.0)
    # one materialised copy: tokens, targets and info hold the same values bit for bit
    xs, a, b, scale = jax.lax.optimization_barrier((xs / scale, a, b / scale, scale))
    return xs, {"A": a, "b": b, "x0": xs[0], "scale": scale}


def _step(carry: tuple, _) -> tuple:
    """x_{n+1} = A x_n + b, carrying (x_n, A, b): a scan body at module level, so an eager call's scan is compiled
    once (a closure over A and b, new at each call, would compile again at every call)."""
    x, a, b = carry
    nxt = a @ x + b
    return (nxt, a, b), nxt


def sample(cfg: AffineRecurrence, key: jax.Array) -> Prompt:
    """One prompt: inputs [T, dim], targets [T] (dim 1) or [T, dim], mask [T]; info: states [T + 1, dim], A, b, x0,
    scale (states[n + 1] = A states[n] + b)."""
    xs, info = states(cfg, key)
    targets = xs[1:, 0] if cfg.dim == 1 else xs[1:]
    mask = (jnp.arange(cfg.seq_len) >= cfg.loss_from).astype(jnp.float32)
    return Prompt(inputs=xs[:-1], targets=targets, mask=mask, info={"states": xs, **info})
