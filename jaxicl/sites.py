"""Named sites: one mechanism for capturing intermediates and intervening on them, for every model.

A model calls `sites(name, value)` at every named point of its forward pass, each name once per pass (a block run
in a loop puts the loop index in its site names). At each site, in order:
  1. edits[name](value), a Python callable, when given (any function of the value);
  2. a Patch (edits as data): value -> where(mask, replacement, value), then + delta, where the patch
     names the site (replacement and delta cast to the value's dtype). A Patch is a pytree, so `jax.vmap`
     over a batch of patches is one compiled program (a whole patching grid), and `jax.grad` with respect
     to zero deltas is the gradient of any metric with respect to every patched site at once (attribution
     patching);
  3. the value is recorded when the name was requested.
A recorded value is materialised once (an optimization barrier), so it is exactly the value the rest of
the forward pass uses. A `Sites` object is plain Python built inside the traced function, so capture,
edits and patches work under `jax.jit`, `jax.vmap` and `jax.grad`.
"""

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

Edit = Callable[[jax.Array], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Patch:
    """Edits as data, keyed by site name.

    values, masks: the site becomes where(mask, values[name], site); a mask broadcasts against the site's
    shape (e.g. [T, 1, 1] selects positions of a [T, H, dh] site); a site in values without a mask is
    replaced entirely. deltas: added to the site (after any replacement). Values and deltas are cast to the site's
    dtype, so float32 edits keep a bfloat16 model's forward pass in bfloat16, as its clean run.
    """

    values: dict = dataclasses.field(default_factory=dict)
    masks: dict = dataclasses.field(default_factory=dict)
    deltas: dict = dataclasses.field(default_factory=dict)

    def names(self) -> set[str]:
        return set(self.values) | set(self.masks) | set(self.deltas)

    def apply(self, name: str, value: jax.Array) -> jax.Array:
        if name in self.values:
            new = jnp.broadcast_to(self.values[name], value.shape).astype(value.dtype)
            value = jnp.where(self.masks[name], new, value) if name in self.masks else new
        if name in self.deltas:
            value = value + jnp.asarray(self.deltas[name], value.dtype)
        return value


class Sites:
    """capture: names to record (or "all"); edits: {name: fn(value) -> value}; patch: a Patch."""

    def __init__(self, capture: Iterable[str] | str = (), edits: dict[str, Edit] | None = None,
                 patch: Patch | None = None):
        if isinstance(capture, str) and capture != "all":
            raise ValueError(f"capture: give a list of site names or 'all', got the string {capture!r} "
                             f"(write [{capture!r}])")
        self.capture_all = capture == "all"
        self.capture = frozenset() if self.capture_all else frozenset(capture)
        self.edits = dict(edits or {})
        self.patch = patch or Patch()
        if set(self.patch.masks) - set(self.patch.values):
            raise ValueError(f"patch masks {sorted(set(self.patch.masks) - set(self.patch.values))} have no values")
        self.recorded: dict[str, jax.Array] = {}
        self.seen: list[str] = []  # the visited sites, in order
        self.skipped: set[str] = set()  # visited through wants() without their value (yet)

    def __call__(self, name: str, value: jax.Array) -> jax.Array:
        if name in self.skipped:  # wants() found nothing reading it, and the model computes it after all
            self.skipped.remove(name)
        else:
            self._visit(name)
        if name in self.edits:
            value = self.edits[name](value)
        value = self.patch.apply(name, value)
        if self.capture_all or name in self.capture:
            value = jax.lax.optimization_barrier(value)
            self.recorded[name] = value
        return value

    def wants(self, name: str) -> bool:
        """Whether the site is captured, edited or patched. A model may skip computing a site nothing reads (e.g.
        per-head outputs whose sum it contracts directly); the site still counts as visited, and the model may still
        compute it once after all (sites(name, value) then visits it no second time)."""
        if self.capture_all or name in self.capture or name in self.edits or name in self.patch.names():
            return True
        self._visit(name)
        self.skipped.add(name)
        return False

    def _visit(self, name: str) -> None:
        """Records the visit of site `name`, after a ValueError if this forward pass visited it already: a cache kept
        only the last visit and an edit or patch changed every visit. Trace-time Python, not in the compiled program."""
        if name in self.seen:
            raise ValueError(f"site {name!r} visited twice in one forward pass: site names must be unique per forward "
                             f"pass; put the loop index in the name (e.g. f\"block{{i}}.out\")")
        self.seen.append(name)

    def check_names(self) -> None:
        """Raises KeyError if a requested capture, edit or patch names a site the model never visited."""
        unknown = (self.capture | set(self.edits) | self.patch.names()) - set(self.seen)
        if unknown:
            raise KeyError(f"unknown site name(s) {sorted(unknown)}; this model has sites {self.seen}")


def run_with_sites(fn: Callable, *args, capture: Iterable[str] | str = (), edits=None, patch: Patch | None = None,
                   **kwargs):
    """Calls fn(*args, sites=Sites(...), **kwargs); returns (output, {site name: value})."""
    sites = Sites(capture, edits, patch)
    out = fn(*args, sites=sites, **kwargs)
    sites.check_names()
    return out, sites.recorded


def null_sites(name: str, value: jax.Array) -> jax.Array:
    """The site hook used when nothing is captured or edited."""
    del name
    return value


def wants(sites, name: str) -> bool:
    """Whether the site hook `sites` reads or changes site `name` (null_sites: never; see Sites.wants)."""
    return isinstance(sites, Sites) and sites.wants(name)
