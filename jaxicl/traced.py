"""A user's function as a static argument of a compiled program, keyed by the program it traces to.

jax.jit caches a program by the hash of its static arguments, and a function hashes by identity: compiled once, a
metric or sampler that reads a global (an answer token, a pool of prompts) replayed the value the global had at the
first call. `trace` traces the function afresh at every call; the Traced it returns is equal (and hashes equal) to
another where both traced programs print the same, and takes the arrays the function closes over as an argument
(consts). So a compiled program is reused while the function traces to the same program, and it reads the arrays'
current values.
"""

import dataclasses
from collections.abc import Callable

import jax
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun


@dataclasses.dataclass(frozen=True)
class Traced:
    """fn traced for arguments of given shapes: `program` (input and output trees, then the jaxpr, printed) is what it
    is compared and hashed by; out: the output's shapes and dtypes (a pytree of jax.ShapeDtypeStruct)."""

    program: str
    jaxpr: object = dataclasses.field(compare=False)
    out: object = dataclasses.field(compare=False)

    def __call__(self, consts: list, *args):
        """fn(*args), with the arrays it closed over when traced replaced by consts (trace's second output)."""
        flat = jaxpr_as_fun(ClosedJaxpr(self.jaxpr, consts))(*jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(self.out), flat)


def _spec(x) -> jax.ShapeDtypeStruct:
    """The shape, dtype, weak type and sharding of an array, a tracer or a Python scalar."""
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type, sharding=aval.sharding)


def trace(fn: Callable, *args) -> tuple[Traced, list]:
    """(fn traced for arguments shaped like args (arrays, tracers or scalars: pytrees of them), the arrays fn closes
    over). Traced through a new function each call: JAX caches a trace by the traced function's identity too."""
    closed, out = jax.make_jaxpr(lambda *a: fn(*a), return_shape=True)(*jax.tree.map(_spec, args))
    program = f"{jax.tree.structure(args)} -> {jax.tree.structure(out)}\n{closed.jaxpr}"
    return Traced(program, closed.jaxpr, out), list(closed.consts)
