"""Programs lowered in jaxicl.prng.unrolled_threefry() draw the same random values as under JAX's rolled lowering."""

import contextlib

import jax
import numpy as np
import pytest

from jaxicl import prng
from jaxicl.train.chunks import ChunkPrograms
from jaxicl.train.step import loop_steps

pytestmark = [pytest.mark.skipif(jax.default_backend() != "cpu", reason="the lowering is CPU-only"),
              pytest.mark.skipif(not prng.available(), reason="this JAX lacks the rules jaxicl.prng switches")]


def _draw(lowering):
    """Bits, normals and the compiled program's text of a fresh jit lowered inside `lowering()`."""
    def draw(key):  # a new function each call, so nothing is reused from an earlier lowering
        return jax.random.bits(key, (256, 131)), jax.random.normal(jax.random.fold_in(key, 1), (64, 11, 10))

    with lowering():
        compiled = jax.jit(draw).lower(jax.random.key(3)).compile()
    bits, normals = compiled(jax.random.key(3))
    return np.asarray(bits), np.asarray(normals), compiled.as_text()


def test_unrolled_threefry_draws_the_same_values_without_a_loop():
    rolled_bits, rolled_normals, rolled_hlo = _draw(contextlib.nullcontext)
    bits, normals, hlo = _draw(prng.unrolled_threefry)
    assert " while(" in rolled_hlo and " while(" not in hlo  # the lowerings differ: a loop of rounds, or none
    np.testing.assert_array_equal(bits, rolled_bits)  # integers: the same hash
    # the same float transform of the same bits, in other fusions: equal up to float32 rounding
    np.testing.assert_allclose(normals, rolled_normals, rtol=1e-6, atol=1e-6)
    assert abs(normals.mean()) < 0.05 and abs(normals.std() - 1) < 0.05  # 7,040 N(0, 1) draws: SE of each ~0.012


def test_the_rolled_lowering_is_back_after_nested_blocks():
    with prng.unrolled_threefry():
        with prng.unrolled_threefry():
            pass
        assert " while(" not in _draw(contextlib.nullcontext)[2]  # still inside the outer block
    assert " while(" in _draw(contextlib.nullcontext)[2]


def test_the_engine_lowers_its_chunks_unrolled():
    def make_steps():  # a chunk of n steps that each draw: one while loop (the steps'), plus one per rolled hash
        return lambda key, n: loop_steps(lambda k: (jax.random.split(k)[0], jax.random.normal(k, (4,))), key, n, 3)

    # two functions: JAX caches the lowering of a traced function, whichever rule made it
    outside = jax.jit(make_steps()).lower(jax.random.key(0), np.int32(3)).compile()
    chunks = ChunkPrograms(jax.jit(make_steps()), "xla")
    chunks(jax.random.key(0), n=3)
    assert chunks.program.as_text().count(" while(") == 1
    assert outside.as_text().count(" while(") > 1  # JAX's own lowering outside the engine
