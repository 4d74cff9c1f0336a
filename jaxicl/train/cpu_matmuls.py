"""Which library runs the matrix products of the training chunks on CPU (TrainConfig.cpu_matmuls).

By default XLA:CPU hands float32 dots to YNNPACK or to its own Eigen contractions; compiled with ONEDNN_OPTIONS, a
program hands them to oneDNN instead (the library PyTorch's CPU build multiplies with). On a 2-core Intel Xeon
(Emerald Rapids) the engine's training chunks ran 1.5-1.7x faster with oneDNN for the 1-layer linear attention of
gd_equivalence and 1.06-1.24x for the GPT decoders (benchmarks/measurements.md); on AMD EPYCs it has not been
measured, so "auto" takes oneDNN on Intel CPUs only. The two libraries' losses agree to float32 rounding, not bit
for bit; each program gives the same bits on every call, so a resumed run on the same machine continues exactly.
Only the engine's training chunks take the choice (like jaxicl.prng's unrolled threefry); other platforms and
every other program keep XLA's defaults.
"""

import functools

import jax
import jax.numpy as jnp

from jaxicl.validation import ConfigError

CPU_MATMULS = ("auto", "onednn", "xla")  # auto: oneDNN on Intel CPUs, XLA's default elsewhere
ONEDNN_OPTIONS = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def cpu_vendor() -> str:
    """The host CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...; "" where /proc/cpuinfo does not say)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def onednn_available() -> bool:
    """Whether this jaxlib's XLA compiles a dot with ONEDNN_OPTIONS into a oneDNN fusion."""
    x = jnp.ones((8, 8), jnp.float32, device=jax.devices("cpu")[0])
    try:
        compiled = jax.jit(lambda a: a @ a).lower(x).compile(compiler_options=ONEDNN_OPTIONS)
    except Exception:  # noqa: BLE001 - an XLA without the options refuses them (INVALID_ARGUMENT)
        return False
    return "__onednn_fusion" in compiled.as_text()


def uses_onednn(cpu_matmuls: str, vendor: str | None = None) -> bool:
    """Whether a training chunk compiled for the default backend with `cpu_matmuls` multiplies with oneDNN (vendor:
    the host CPU's, cpu_vendor() by default). ConfigError where "onednn" is asked for and this XLA cannot."""
    if jax.default_backend() != "cpu" or cpu_matmuls == "xla":
        return False
    if cpu_matmuls == "onednn" and not onednn_available():
        raise ConfigError("cpu_matmuls='onednn': this jaxlib's XLA has no oneDNN dot fusion; "
                          f"use one of {CPU_MATMULS[::2]}")
    return cpu_matmuls == "onednn" or ((vendor if vendor is not None else cpu_vendor()) == "GenuineIntel"
                                       and onednn_available())


def compile_chunk(lowered: jax.stages.Lowered, cpu_matmuls: str) -> jax.stages.Compiled:
    """lowered.compile() with the products `cpu_matmuls` chooses."""
    return lowered.compile(compiler_options=ONEDNN_OPTIONS if uses_onednn(cpu_matmuls) else None)
