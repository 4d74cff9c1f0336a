"""Sweep axes: parsing `field=values` specs, resolving field names on a config, the member grid.

An axis names a config field and lists its values. Spec grammar (one axis per string):

    lr=1e-4,3e-4,1e-3        a list
    seed=0:8                 an integer range start:stop[:step] (stop excluded, as in Python)
    lr=log:1e-4:1e-2:5       5 log-spaced values from 1e-4 to 1e-2 (both included)
    noise_std=lin:0:1:5      5 evenly spaced values from 0 to 1 (both included)

The members of a sweep are the grid (Cartesian product) of its axes, the first axis slowest.
A field name is a dotted path on the config (`train.lr`) or, when unique, its last part (`lr`): the
same rule as command-line overrides (jaxicl.config_paths).
"""

import dataclasses
import itertools
import math
import re

import numpy as np

from jaxicl import config_paths
from jaxicl.validation import ConfigError, check_distinct

_INT = re.compile(r"^[+-]?\d+$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
GRAMMAR = "field=v1,v2,... | field=start:stop[:step] | field=log:lo:hi:n | field=lin:lo:hi:n"
MAX_VALUES = 1_000_000  # of one axis and of the grid: far above a trainable sweep, far below an out-of-memory list


@dataclasses.dataclass(frozen=True)
class Axis:
    """One swept field and its values (Python numbers)."""

    field: str
    values: tuple

    def __post_init__(self):
        if not self.values:
            raise ConfigError(f"sweep axis {self.field!r} has no values")
        check_distinct(f"sweep axis {self.field!r}", self.values)


def _number(text: str, spec: str):
    text = text.strip()
    if _INT.match(text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"sweep axis {spec!r}: {text!r} is not a number (grammar: {GRAMMAR})") from None
    if not math.isfinite(value):
        raise ConfigError(f"sweep axis {spec!r}: {text!r} is not a finite number")
    return value


def _spaced(kind: str, parts: list[str], spec: str) -> tuple:
    if len(parts) != 3:
        raise ConfigError(f"sweep axis {spec!r}: {kind}: needs lo:hi:n, got {':'.join(parts)!r}")
    lo, hi, n = (_number(p, spec) for p in parts)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"sweep axis {spec!r}: the number of values n must be an integer >= 1, got {n!r}")
    _check_count(n, f"sweep axis {spec!r}")
    if n == 1 and lo != hi:  # linspace's one value is lo: hi, "both included", would be dropped
        raise ConfigError(f"sweep axis {spec!r}: {kind}: one value cannot include both bounds {lo!r} and {hi!r}; use "
                          f"n >= 2, or lo = hi")
    if kind == "log":
        if lo <= 0 or hi <= 0:
            raise ConfigError(f"sweep axis {spec!r}: log: bounds must be > 0, got {lo!r} and {hi!r}")
        values = np.geomspace(lo, hi, n)
    else:
        values = np.linspace(lo, hi, n)
    return tuple(float(f"{v:.12g}") for v in values)


def _range(parts: list[str], spec: str) -> tuple:
    if len(parts) not in (2, 3):
        raise ConfigError(f"sweep axis {spec!r}: a range is start:stop[:step] (grammar: {GRAMMAR})")
    numbers = [_number(p, spec) for p in parts]
    if not all(isinstance(v, int) for v in numbers):
        raise ConfigError(f"sweep axis {spec!r}: start:stop[:step] needs integers; "
                          "for floats use log:lo:hi:n or lin:lo:hi:n")
    if len(numbers) == 3 and numbers[2] == 0:
        raise ConfigError(f"sweep axis {spec!r}: the range step must not be 0")
    start, stop, step = (numbers + [1])[:3]
    count = -((start - stop) // step)  # ceil((stop - start) / step) values, counted before a huge range is built
    if count <= 0:
        raise ConfigError(f"sweep axis {spec!r}: the range {':'.join(parts)} is empty")
    _check_count(count, f"sweep axis {spec!r}")
    return tuple(range(start, stop, step))


def _check_count(count: int, what: str, unit: str = "values") -> None:
    if count > MAX_VALUES:
        raise ConfigError(f"{what} has {count} {unit}, more than the {MAX_VALUES} allowed")


def parse_axis(spec: str) -> Axis:
    """Axis from one spec string (see the module docstring); errors quote the spec and the grammar."""
    name, sep, text = spec.partition("=")
    name, text = name.strip(), text.strip()
    if not sep or not _NAME.match(name) or not text:
        raise ConfigError(f"sweep axis {spec!r} must look like {GRAMMAR}")
    head, _, rest = text.partition(":")
    if head in ("log", "lin"):
        return Axis(name, _spaced(head, rest.split(":"), spec))
    if ":" in text:
        if "," in text:
            raise ConfigError(f"sweep axis {spec!r}: mix of ',' and ':'; use one form ({GRAMMAR})")
        return Axis(name, _range(text.split(":"), spec))
    items = text.split(",")
    if any(not t.strip() for t in items):
        raise ConfigError(f"sweep axis {spec!r}: empty value in the list")
    return Axis(name, tuple(_number(t, spec) for t in items))


def parse_axes(specs: list[str]) -> tuple[Axis, ...]:
    """The axes of specs; refused before any member is built where their grid exceeds MAX_VALUES members."""
    axes = tuple(parse_axis(s) for s in specs)
    names = [a.field for a in axes]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"sweep axis {n!r} is given twice")
    _check_grid(axes)
    return axes


def _check_grid(axes: tuple[Axis, ...]) -> None:
    sizes = [len(a.values) for a in axes]
    named = " x ".join(f"{a.field}({n})" for a, n in zip(axes, sizes))
    _check_count(math.prod(sizes), f"the sweep grid {named}", "members")


def grid(axes: tuple[Axis, ...]) -> list[dict]:
    """Members as {field: value}, the Cartesian product of the axes (first axis slowest), at most MAX_VALUES."""
    _check_grid(axes)
    return [dict(zip((a.field for a in axes), values)) for values in itertools.product(*(a.values for a in axes))]


def resolve_axes(cfg, axes: tuple[Axis, ...]) -> tuple[Axis, ...]:
    """The axes with their fields resolved to dotted paths of cfg (config_paths.resolve, the rule of
    command-line overrides), values cast to the fields' types."""
    resolved = []
    for axis in axes:
        path = config_paths.resolve(cfg, axis.field)
        kind = config_paths.field_type(cfg, path)
        resolved.append(Axis(path, tuple(config_paths.cast_number(v, kind, path) for v in axis.values)))
    paths = [a.field for a in resolved]
    for p in paths:
        if paths.count(p) > 1:
            raise ConfigError(f"sweep field {p!r} is given twice (under different names)")
    return tuple(resolved)


def member_config(cfg, member: dict):
    """The config of one member: cfg with every {path: value} of the member set (and validated together)."""
    return config_paths.replace(cfg, member)
