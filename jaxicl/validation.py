"""Config validation helpers: every error names the field and the allowed values."""

import math
import numbers
from collections.abc import Iterable

import jax
import numpy as np


class ConfigError(ValueError):
    """A config field holds a value outside its allowed range."""


def check_number(name: str, value) -> None:
    """Rejects a bool (lr=True ran as 1.0), a string (lr="1e-3" failed with a TypeError naming no field) and None
    where a number belongs."""
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
        raise ConfigError(f"{name} must be a number, got {value!r}")


def check_finite(name: str, value) -> None:
    """Rejects inf and NaN (and, check_number, what is not a number)."""
    check_number(name, value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    """Checks that value is finite and > 0 (>= 0 with allow_zero)."""
    check_number(name, value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")
    check_finite(name, value)


def check_integer(name: str, value) -> None:
    """Rejects anything but an integer (Python or numpy; not a bool): a count or step given as 2.5 or True."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")


def check_size(name: str, value) -> None:
    """An integer >= 1 (a model's width, head count, layer count or length): 2.0 passed a positivity check and failed
    later inside JAX, naming no argument."""
    check_integer(name, value)
    check_positive(name, value)


def check_bool(name: str, value) -> None:
    """True or False (a switch: "no" or 0 were taken as their truth value)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def check_scale(name: str, value) -> None:
    """A finite init scale (NaN made every output NaN); a traced one (a sweep member's init keyword) passes."""
    if not isinstance(value, jax.core.Tracer):
        check_finite(name, value)


def check_range(name: str, value, low=None, high=None) -> None:
    """Checks low <= value <= high (either bound may be None) and that value is finite."""
    check_finite(name, value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def check_real(name: str, x) -> None:
    """ValueError naming `name` where the array x is complex (an autoregressive task's or model's sites) and the
    computation is real: casting to float would drop the imaginary part silently. Reads only x's dtype, so a traced x
    (inside jit) is checked too."""
    if np.iscomplexobj(x):
        raise ValueError(f"{name} must be real, got {getattr(x, 'dtype', 'complex numbers')}: this real-valued "
                         f"computation would drop the imaginary part; give the real and imaginary parts as real "
                         f"features (e.g. jnp.concatenate([z.real, z.imag], -1) for z [N, F])")


def check_seed(name: str, value) -> None:
    """Checks an integer seed of a JAX key in int32's range [-2**31, 2**31 - 1], the seeds a sweep takes: keys are made
    from a seed's int32 value (jaxicl.prng.seed_key; jax.random.key kept the low 32 bits without x64, so 2**32 + 7
    drew as 7)."""
    check_integer(name, value)
    check_range(name, value, -2**31, 2**31 - 1)


def check_choice(name: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")


def check_distinct(name: str, values) -> None:
    """Refuses a value given twice in values (seeds, learning rates, scales: each value its own member or curve, so a
    repeat would count one run twice as independent ones, or draw one curve over another)."""
    values, seen = tuple(values), set()  # a set: a sweep axis may hold a million values
    for value in values:
        if value in seen:
            raise ConfigError(f"{name} repeats the value {value!r}: give each value once, got {values}")
        seen.add(value)


def check_increasing(name: str, values, *, positive: bool = False) -> None:
    """Checks a non-empty, strictly increasing tuple of finite numbers (a grid of depths, mus or scales that checks
    read in order), and with positive=True that its first (smallest) value is > 0."""
    values = tuple(values)
    for i, value in enumerate(values):  # an inf last (or a NaN anywhere, unordered) passes the order check
        check_finite(f"{name}[{i}]", value)
    if not values or any(b <= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"{name} must be a non-empty, strictly increasing tuple, got {values}")
    if positive:
        check_positive(f"{name}[0]", values[0])


def check_set_by(path: str, value, default, by: str, by_value, values: tuple, per: str, does: str = "",
                 hint: str = "") -> None:
    """Refuses a value of a field that the run sets itself, per `per` ("run", "member"), to each of `values` [K]
    taken from its field `by` (holding by_value): anything but the field's default, or the one value every `per`
    takes, would be written to config.json and ignored (or only do `does`, what the field still does, e.g. "pick the
    test prompts"), so the error names `by` to override instead, and then `hint` where given."""
    allowed = {default: "its default"}
    if len(set(values)) == 1:
        allowed.setdefault(values[0], f"the value every {per} takes")
    if value not in allowed:
        raise ConfigError(f"{path} is set per {per} by {by}={by_value!r}: override {by} instead; {path} may only be "
                          f"{' or '.join(f'{v!r} ({why})' for v, why in allowed.items())}, got {value!r}, which "
                          f"would {f'only {does}' if does else 'be ignored'}{f'; {hint}' if hint else ''}")
