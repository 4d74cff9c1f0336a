"""jaxicl.traced: what a traced function's program is compared by."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.traced import trace


def test_a_custom_jvp_whose_rule_fails_to_trace_still_traces_and_is_a_new_program_at_every_trace():
    """The JVP rule is traced to compare it; one that cannot be (a function never differentiated) leaves the function
    usable, compared by JAX's thunk for the rule, which is made afresh at every trace: compiled again, never stale."""

    @jax.custom_jvp
    def double(x):
        return 2 * x

    @double.defjvp
    def _(primals, tangents):
        raise NotImplementedError("no derivative")

    x = jnp.arange(3.0)
    first, consts = trace(double, x)
    np.testing.assert_array_equal(first(consts, x), [0.0, 2.0, 4.0])  # exact: doubled small integers
    assert trace(double, x)[0] != first


def test_functions_differing_only_in_the_array_a_nested_jit_closes_over_are_different_programs():
    """jax 0.12 made ClosedJaxpr and Jaxpr one class, so the branch collecting a nested closed jaxpr's constants never
    ran: a metric or sampler calling a jitted helper over another array traced to an equal Traced, and the second
    ran the first one's compiled program (its array baked in). The same helper over the same array still compares
    equal (its program is reused)."""

    def make(values):
        helper = jax.jit(lambda x: x * values)
        return lambda x: helper(x) + 1.0

    x = jnp.ones(3)
    one, seven = jnp.full(3, 1.0), jnp.full(3, 7.0)
    (first, c1), (second, c2) = trace(make(one), x), trace(make(seven), x)
    assert first != second
    np.testing.assert_array_equal(first(c1, x), [2.0, 2.0, 2.0])  # exact: small integers
    np.testing.assert_array_equal(second(c2, x), [8.0, 8.0, 8.0])
    assert trace(make(one), x)[0] == first


def test_a_number_or_0d_numpy_value_is_compiled_into_the_program_and_a_jax_or_nd_numpy_array_is_an_argument():
    """As the module docstring says: a Python number, NumPy scalar or 0-d NumPy array the function reads is a literal
    of its program, so each new value is another program (an answer token as np.asarray(3): the patching grid
    compiled again for every token); a JAX array, 0-d too, or a NumPy array of one or more dimensions is a const,
    one program for every value. Either way a call computes with the current value."""
    read = {}
    x = jnp.ones(2)

    def f(x):
        return x * read["value"]

    for wrap in (float, np.float32, np.asarray, jnp.asarray, lambda v: np.full(1, v)):
        programs = []
        for v in (2.0, 3.0):
            read["value"] = wrap(v)
            traced, consts = trace(f, x)
            np.testing.assert_array_equal(traced(consts, x), [v, v])  # exact: small integers
            programs.append((traced, len(consts)))
        literal = wrap in (float, np.float32, np.asarray)
        assert (programs[0][0] != programs[1][0]) == literal, wrap
        assert [n for _, n in programs] == ([0, 0] if literal else [1, 1]), wrap
