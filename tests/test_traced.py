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
