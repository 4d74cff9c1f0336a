"""A user's function as a static argument of a compiled program, keyed by the program it traces to.

jax.jit caches a program by the hash of its static arguments, and a function hashes by identity: compiled once, a
metric or sampler that reads a global (an answer token, a pool of prompts) replayed the value the global had at the
first call. `trace` traces the function afresh at every call; the Traced it returns is equal (and hashes equal) to
another where both traced programs print the same and hold the same Python objects that the printing does not show,
and takes the arrays the function closes over as an argument (consts). So a compiled program is reused while the
function traces to the same program, and it reads the arrays' current values. Arrays means JAX arrays, of any shape,
and NumPy arrays of at least one dimension: a Python number, a NumPy scalar (np.float32(2.0)) or a 0-d NumPy array
(np.asarray(3)) the function reads is written into the program as a literal, so it too has its current value, but
each new value is another program, compiled again. Hold a value that changes between calls, such as an answer
token, as a JAX array (jnp.asarray(3)).

The printing masks the address of a Python object an equation holds (`<function f at 0xXXXXXXXXXXXX>`): a host
callback's function, a remat policy, a custom_vjp's rules. Those objects are compared by identity (held by the
Traced, so their ids are not reused): two functions that differ only in a callback or a custom derivative rule are
different programs, and one whose callback is made afresh at every trace (a lambda defined inside it) is compiled
again at every call, as is any custom_vjp (JAX wraps its rules anew at every trace). A custom_jvp's JVP rule is
traced (JAX's own thunk) and its printed program compared, so jax.nn.relu and the like keep a program reused.
jax.debug.callback wraps its function anew at every trace, so a function that calls it is compiled at every call too.
The arrays a nested jax.jit closes over are compared by identity (its printing shows only their shapes): a new array
is a new program, while a numpy array changed in place there is not seen (the top-level ones are arguments).
"""

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, jaxpr_as_fun


@dataclasses.dataclass(frozen=True)
class Traced:
    """fn traced for arguments of given shapes: `program` (input and output trees, then the jaxpr, printed, then the
    programs of its custom_jvp rules) and `ids` (those of `unprinted`, the objects the printing does not show) are
    what it is compared and hashed by; out: the output's shapes and dtypes (a pytree of jax.ShapeDtypeStruct)."""

    program: str
    ids: tuple[int, ...]
    unprinted: tuple = dataclasses.field(compare=False)
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
    unprinted = _Unprinted(closed.jaxpr)
    program = "\n".join([f"{jax.tree.structure(args)} -> {jax.tree.structure(out)}", str(closed.jaxpr),
                         *unprinted.rules])
    objects = tuple(unprinted.objects)
    return Traced(program, tuple(map(id, objects)), objects, closed.jaxpr, out), list(closed.consts)


class _Unprinted:
    """What a traced program's printing does not show: `rules`, the printed programs of its custom_jvps' JVP rules,
    and `objects`, the Python objects its equations hold (nested jaxprs and rules included) that the printing hides."""

    def __init__(self, jaxpr: Jaxpr):
        self.rules, self.objects, self._path = [], [], []
        self.jaxpr(jaxpr)

    def jaxpr(self, jaxpr: Jaxpr) -> None:
        for eqn in jaxpr.eqns:
            for name, value in eqn.params.items():
                if eqn.primitive.name == "custom_jvp_call" and name == "jvp_jaxpr_fun":
                    self.jvp_rule(value, len(eqn.invars) - eqn.params["num_consts"])
                else:
                    self.param(value)

    def jvp_rule(self, thunk, n_inputs: int) -> None:
        """The JVP rule of a custom_jvp of n_inputs (non-constant) inputs, traced by its thunk for tangents of every
        input; one that fails to trace (never differentiated) is the thunk itself, made afresh at every trace. A rule
        met again inside itself (jax.nn.relu's calls relu) is not looked into again."""
        try:
            rule, consts, _ = thunk.call_wrapped(*[False] * n_inputs)
        except Exception:
            self.objects.append(thunk)
            return
        text = f"custom_jvp rule:\n{rule}"
        self.rules.append(text)
        self.objects.extend(consts)
        if text not in self._path:
            self._path.append(text)
            self.jaxpr(rule)
            self._path.pop()

    def param(self, value) -> None:
        """What an equation parameter holds that its printing hides: the constants of a nested closed jaxpr, arrays,
        callables and objects printed with a (masked) address. A dataclass whose fields all print (a host callback's
        _FlatCallback: its function and argument tree) is looked into field by field."""
        if isinstance(value, (Jaxpr, ClosedJaxpr)):  # one class since jax 0.11: a nested jit's body and its consts
            self.jaxpr(value)
            self.objects.extend(getattr(value, "consts", ()))
        elif isinstance(value, (tuple, list, set, frozenset)):
            for v in value:
                self.param(v)
        elif isinstance(value, dict):
            self.param(tuple(value.items()))
        elif (dataclasses.is_dataclass(value) and not isinstance(value, type)
              and all(f.repr for f in dataclasses.fields(value))):
            for f in dataclasses.fields(value):
                self.param(getattr(value, f.name))
        elif callable(value) or isinstance(value, (jax.Array, np.ndarray)) or " at 0x" in str(value):
            self.objects.append(value)
