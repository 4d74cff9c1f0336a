"""Named sites: one mechanism for capturing intermediates and intervening on them.

A model calls `sites(name, value)` at every named point of its forward pass. The call applies
the edit registered for that name (if any) and records the (edited) value when the name was
requested. A `Sites` object is plain Python built inside the traced function, so capture and
edits work under `jax.jit`, `jax.vmap` and `jax.grad`.
"""

from collections.abc import Callable, Iterable

import jax

Edit = Callable[[jax.Array], jax.Array]


class Sites:
    """capture: names to record (or "all"); edits: {name: fn(value) -> value}."""

    def __init__(self, capture: Iterable[str] | str = (), edits: dict[str, Edit] | None = None):
        self.capture_all = capture == "all"
        self.capture = frozenset() if self.capture_all else frozenset(capture)
        self.edits = dict(edits or {})
        self.recorded: dict[str, jax.Array] = {}
        self.seen: list[str] = []

    def __call__(self, name: str, value: jax.Array) -> jax.Array:
        self.seen.append(name)
        if name in self.edits:
            value = self.edits[name](value)
        if self.capture_all or name in self.capture:
            self.recorded[name] = value
        return value

    def check_names(self) -> None:
        """Raises KeyError if a requested capture or edit names a site the model never visited."""
        unknown = (self.capture | set(self.edits)) - set(self.seen)
        if unknown:
            raise KeyError(f"unknown site name(s) {sorted(unknown)}; this model has sites {self.seen}")


def run_with_sites(fn: Callable, *args, capture: Iterable[str] | str = (), edits=None, **kwargs):
    """Calls fn(*args, sites=Sites(...), **kwargs); returns (output, {site name: value})."""
    sites = Sites(capture, edits)
    out = fn(*args, sites=sites, **kwargs)
    sites.check_names()
    return out, sites.recorded


def null_sites(name: str, value: jax.Array) -> jax.Array:
    """The site hook used when nothing is captured or edited."""
    del name
    return value
