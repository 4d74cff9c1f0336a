from functools import partial

import jax
import numpy as np
import pytest

from jaxicl.train import data_mesh, replicated
from jaxicl.train.chunks import ChunkPrograms
from jaxicl.train.cpu_matmuls import onednn_available
from jaxicl.train.optim import make_optimizer
from jaxicl.train.state import init_state
from jaxicl.train.step import run_steps
from tiny_run import tiny_setup

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this jaxlib's XLA has no oneDNN dot fusion")


@needs_onednn
def test_a_onednn_chunk_multiplies_with_onednn_and_agrees_with_xlas_products():
    loss_fn, sample, task, cfg, params = tiny_setup(steps=20)
    tx = make_optimizer(cfg)
    mesh = data_mesh(1)
    runs = {}
    with jax.set_mesh(mesh):
        state = jax.device_put(init_state(params, cfg.seed, tx), replicated(mesh))
        for choice in ("onednn", "xla"):
            chunks = ChunkPrograms(jax.jit(partial(run_steps, loss_fn=loss_fn, sample=sample, task_cfg=task,
                                                   batch_size=cfg.batch_size, tx=tx), static_argnums=1), choice)
            runs[choice] = [np.asarray(chunks(state, n=cfg.steps)[1]["loss"]) for _ in range(2)]
            assert ("__onednn_fusion" in chunks.programs[cfg.steps].as_text()) == (choice == "onednn")
    for first, second in runs.values():  # one compiled program: the same bits on every call
        np.testing.assert_array_equal(first, second)
    # the same float32 arithmetic summed in another order: 20 Adam steps (lr 1e-2) drift apart by a few ulps of
    # the loss per step (measured 2e-7 after 20 steps on an Intel Xeon)
    np.testing.assert_allclose(runs["onednn"][0], runs["xla"][0], rtol=2e-5)


def test_whether_onednn_is_available_does_not_depend_on_the_mesh_in_force():
    """The engine first asks inside its training mesh (a 4-device mesh refuses a program on one device)."""
    outside = onednn_available()
    onednn_available.cache_clear()
    try:
        with jax.set_mesh(data_mesh(4)):
            assert onednn_available() == outside
    finally:
        onednn_available.cache_clear()
