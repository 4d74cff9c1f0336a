"""Tests run on CPU with 4 simulated devices (set before any JAX computation), compiled at LLVM optimisation level 0:
most of a test is XLA compiling small programs, which that makes about a third faster (the programs' own results
keep the tolerances every test states; subprocesses inherit the setting).

The session's processes (pytest-xdist's workers and the subprocesses tests start) share one persistent compilation
cache, a temporary directory removed at the end: tests that train the same smoke configuration in other processes,
or through new jitted closures in one, compile each program once. A cached executable is the one XLA compiled for
the same program and options, so results are those of a fresh compile; JAX's compile events (the backend_compiles
fixture) count a cache hit as a compilation too."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program, the eager ops' too

import jax  # noqa: E402
import pytest

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")


@pytest.fixture
def x64():
    """float64 inside the test (theory checks to tight tolerances)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def chunk_compiles(monkeypatch) -> list:
    """The engine's compilations of its chunk programs (ChunkPrograms), one entry (its cpu_matmuls) each, compiled with
    XLA's own products at XLA's default LLVM optimisation level, the one runs compile at: at the suite's level 0 a
    1-step lax.scan (whose loop XLA removes) rounded like a longer one, at the default level it did not."""
    from jaxicl.train import chunks

    compiles = []

    def compile_chunk(lowered, cpu_matmuls):
        compiles.append(cpu_matmuls)
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 3})

    monkeypatch.setattr(chunks, "compile_chunk", compile_chunk)
    return compiles


@pytest.fixture
def backend_compiles() -> list:
    """The XLA compilations the test runs, one entry each (JAX's compile-duration event): an eager call of a jitted
    function, or an eager primitive, found in JAX's caches compiles nothing."""
    compiles = []

    def listener(name, *_, **__):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield compiles
    jax.monitoring.unregister_event_duration_listener(listener)


def pytest_configure(config):
    import sys

    if "PYTEST_XDIST_WORKER" not in os.environ:  # the main process; xdist's workers inherit its environment
        config.xla_cache = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxicl-tests-xla-")
        jax.config.update("jax_compilation_cache_dir", config.xla_cache)
    # JAX warns where it compiles a program anew instead: one XLA cannot serialise (oneDNN fusions), or an entry read
    # while another process is still writing it
    config.addinivalue_line("filterwarnings", "ignore:Error (reading|writing) persistent compilation cache entry")
    sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny_run.py is importable as a helper


def pytest_unconfigure(config):
    if hasattr(config, "xla_cache"):
        shutil.rmtree(config.xla_cache, ignore_errors=True)
