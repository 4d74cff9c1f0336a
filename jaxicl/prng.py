"""Training chunks lower JAX's threefry hash unrolled on CPU: the same random values, a faster step.

On CPU, JAX lowers threefry2x32 (the bits behind every jax.random draw) as a fori_loop over its five
key-schedule rounds, which keeps compile times short but runs each round as separate kernels. Unrolled,
the hash fuses into one elementwise kernel: the gd_equivalence training step (batch 256) runs about 10%
faster, and the sampler programs of benchmarks/sampler_throughput up to 1.25x faster, but a program that
draws random numbers compiles 0.2-1 s slower. Both lowerings compute the same hash, so every random
value is bit for bit the same (tests/test_prng.py). So the engine lowers its training chunks, which run
thousands of steps, inside `unrolled_threefry()`, and everything else keeps JAX's lowering. Other
platforms are untouched.

PRNG_IMPLS: the JAX key implementations a run may draw its batches with (TrainConfig.prng_impl; threefry2x32, JAX's
default, unless a measurement says otherwise). Both keep the engine's promises: a batch is the same vmapped over
per-prompt keys as drawn prompt by prompt, on 1 or 4 devices, and on every platform. threefry4x32 is slow on a batch
split over devices where its draws meet a sum across them (a loss): on 4 simulated CPU devices the tests' tiny
training step took 45-60 ms with it against under 1 ms with threefry2x32, and a jitted loop of batch draws each
summed across the devices about 1 ms a draw against 0.1 ms (0.02 ms with either on one device; the draws alone, not
summed, under 0.02 ms with either). JAX's inline lowering of its hash and an optimization barrier between the draws
and the sum, tried, changed nothing.
Not offered: "rbg" and "unsafe_rbg", which under vmap draw the whole batch from its first key (JAX's documentation),
so a sweep member's batches would depend on another member's seed (on CPU they were also 3-4x slower than
threefry); and "philox2x32" / "philox4x32", which do not compile under a device mesh in JAX 0.11.2 and 0.12
("Unable to convert MHLO to StableHLO" at their mulhi), and the engine always trains under one.

seed_key: every key jaxicl and the experiments make from an integer seed (data, evaluation, init, task pools,
blueprints, an experiment's test sets), of an explicit implementation (threefry2x32 unless a run's prng_impl says
otherwise) and from the seed's int32 value, so neither JAX's global jax_default_prng_impl (e.g. "rbg", a TPU setting,
under which evaluation on several devices and every sweep failed with ShardingTypeErrors) nor jax_enable_x64 (under
which a negative seed made other keys) changes them.
"""

import contextlib

import jax
import jax.numpy as jnp

try:  # JAX internals: where they are missing (another JAX version), JAX's own lowering stays
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32 as _threefry
    _RULES = {True: _threefry._threefry2x32_lowering_rule, False: _threefry._threefry2x32_cpu_lowering_rule}
except (ImportError, AttributeError):
    _RULES = None
_depth = 0  # nested unrolled_threefry() blocks open now

PRNG_IMPLS = ("threefry2x32", "threefry4x32")


def seed_key(seed, impl: str = PRNG_IMPLS[0], *, offset: int = 0) -> jax.Array:
    """jax.random.key(seed + offset, impl=impl) of the sum's int32 value: seed is a Python, numpy or (possibly traced)
    jax integer in int32's range (validation.check_seed), offset a Python int. Under x64 jax.random.key took a Python
    int as int64, whose high word made a negative seed's key differ from the key of the same seed as a sweep's int32
    array. The sum wraps around int32, as jax.random.key(seed + offset) keeps its low 32 bits without x64: an
    experiment's key at an offset from its run's seed (a test set at seed + 10) is that key for every seed,
    2**31 - 1 included."""
    return jax.random.key(jnp.asarray(seed, jnp.int32) + jnp.int32(offset), impl=impl)


def available() -> bool:
    """Whether this JAX has the lowering rules unrolled_threefry() switches between."""
    return _RULES is not None


@contextlib.contextmanager
def unrolled_threefry():
    """Programs lowered inside this block (jax.jit(f).lower(...), or a first call) draw through the unrolled
    threefry on CPU; JAX's rolled lowering is back when the outermost block exits. JAX caches the lowering of a
    traced function, so a function lowered before keeps the form it had. Not thread-safe: a program lowered by
    another thread meanwhile gets the unrolled form too (the same values)."""
    global _depth
    if _RULES is None:
        yield
        return
    if _depth == 0:
        mlir.register_lowering(_threefry.threefry2x32_p, _RULES[True], platform="cpu")
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            mlir.register_lowering(_threefry.threefry2x32_p, _RULES[False], platform="cpu")
