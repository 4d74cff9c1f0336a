"""The oneDNN opt-in is compiled here, never run: XLA's oneDNN path aborts processes at random
(jaxicl.train.cpu_matmuls), and one such abort takes a test worker down with it."""

from functools import partial

import jax
import pytest

from jaxicl.train import data_mesh, replicated
from jaxicl.train.chunks import lower_chunk
from jaxicl.train.cpu_matmuls import compile_chunk, onednn_available
from jaxicl.train.optim import make_optimizer
from jaxicl.train.state import init_state
from jaxicl.train.step import run_steps
from tiny_run import tiny_setup


@pytest.mark.skipif(not onednn_available(), reason="this jaxlib's XLA has no oneDNN dot fusion")
def test_a_onednn_chunk_compiles_its_products_into_onednn_and_an_xla_chunk_does_not():
    loss_fn, sample, task, cfg, params = tiny_setup(steps=4)
    tx = make_optimizer(cfg)
    mesh = data_mesh(1)
    with jax.set_mesh(mesh):
        state = jax.device_put(init_state(params, cfg.seed, tx), replicated(mesh))
        lowered = lower_chunk(jax.jit(partial(run_steps, rows=cfg.steps, loss_fn=loss_fn, sample=sample, task_cfg=task,
                                              batch_size=cfg.batch_size, tx=tx)), state)
        for choice in ("onednn", "xla"):
            assert ("__onednn_fusion" in compile_chunk(lowered, choice).as_text()) == (choice == "onednn")


def test_whether_onednn_is_available_does_not_depend_on_the_mesh_in_force():
    """The engine first asks inside its training mesh (a 4-device mesh refuses a program on one device)."""
    outside = onednn_available()
    onednn_available.cache_clear()
    try:
        with jax.set_mesh(data_mesh(4)):
            assert onednn_available() == outside
    finally:
        onednn_available.cache_clear()
