"""Tests run on CPU with 4 simulated devices (set before any JAX computation)."""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")


@pytest.fixture
def x64():
    """float64 inside the test (theory checks to tight tolerances)."""
    with jax.enable_x64(True):
        yield


def pytest_configure(config):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny_run.py is importable as a helper
