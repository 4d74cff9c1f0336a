"""Which library runs the matrix products of the training chunks on CPU (TrainConfig.cpu_matmuls): "xla", the
default (XLA:CPU's own choice, YNNPACK or Eigen), or "onednn", an opt-in with trade-offs.

Compiled with ONEDNN_OPTIONS, a program hands its dots to oneDNN (the library PyTorch's CPU build multiplies with),
through an experimental path of XLA:CPU. On a 2-core Intel Xeon (Emerald Rapids) the engine's training chunks ran
1.6x faster with it for the 1-layer linear attention of gd_equivalence and 1.06-1.25x for the GPT decoders
(benchmarks/measurements.md; not measured on AMD). The price, and why it is not the default:
- the two libraries' losses agree to float32 rounding, not bit for bit, and oneDNN's are the same bits on every call
  of one program but not always in another process: a run killed and resumed in a new process may continue within
  rounding of the uninterrupted run instead of exactly (the test suite saw it; resumed in one process it is exact);
- XLA's oneDNN path aborts processes: the abstractions_lea model's training chunk when it first runs ("partition
  compile failed", then SIGILL), and once, in the test suite, a plain 256 x 256 matmul (SIGABRT), on JAX 0.12.
  The tests therefore only compile oneDNN programs.
Only the engine's training chunks take the choice (like jaxicl.prng's unrolled threefry); other platforms and every
other program keep XLA's defaults.
"""

import functools

import jax
import jax.numpy as jnp

from jaxicl.validation import ConfigError

CPU_MATMULS = ("xla", "onednn")
ONEDNN_OPTIONS = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def onednn_available() -> bool:
    """Whether this jaxlib's XLA compiles a dot with ONEDNN_OPTIONS into a oneDNN fusion (on the default backend:
    never off CPU)."""
    x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    try:
        compiled = jax.jit(lambda a: a @ a).lower(x).compile(compiler_options=ONEDNN_OPTIONS)
    except Exception:  # noqa: BLE001 - an XLA without the options refuses them (INVALID_ARGUMENT)
        return False
    return "__onednn_fusion" in compiled.as_text()


def uses_onednn(cpu_matmuls: str) -> bool:
    """Whether a training chunk compiled for the default backend with `cpu_matmuls` multiplies with oneDNN;
    ConfigError where "onednn" is asked for and this XLA cannot."""
    if jax.default_backend() != "cpu" or cpu_matmuls == "xla":
        return False
    if not onednn_available():
        raise ConfigError("cpu_matmuls='onednn': this jaxlib's XLA has no oneDNN dot fusion; use 'xla'")
    return True


def compile_chunk(lowered: jax.stages.Lowered, cpu_matmuls: str) -> jax.stages.Compiled:
    """lowered.compile() with the products `cpu_matmuls` chooses."""
    return lowered.compile(compiler_options=ONEDNN_OPTIONS if uses_onednn(cpu_matmuls) else None)
