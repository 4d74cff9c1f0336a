"""What train() and train_sweep() return works in ordinary JAX code outside their meshes (the README tour)."""

import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxicl.analysis.equivalence import equivalence_metrics
from jaxicl.baselines import gradient_descent
from jaxicl.models import SelfAttention, predictor
from jaxicl.tasks import linear_regression as lr
from jaxicl.tasks import sample_batch
from jaxicl.theory.gd_equivalence import optimal_gd_lr
from jaxicl.train import TrainConfig, data_mesh, portable, regression_loss, replicated, sweep_mesh, train, train_sweep

TASK = lr.LinearRegression(dim=3, n_context=5)
CFG = TrainConfig(steps=10, batch_size=16, lr=1e-2, steps_per_call=5, log_every=1)


def _model():
    return nnx.split(SelfAttention(4, init_scale=0.1, rngs=nnx.Rngs(0)))


def _metrics_everywhere(graphdef, params, batch):
    """equivalence_metrics of the model vs GD-1: eager, jitted, and from a host copy of params (the reference)."""
    gd1 = gradient_descent(TASK, steps=1, lr=optimal_gd_lr(TASK))
    trained = predictor(graphdef, params)
    eager = equivalence_metrics(trained, gd1, batch.inputs)
    jitted = jax.jit(lambda tokens: equivalence_metrics(trained, gd1, tokens))(batch.inputs)
    host = equivalence_metrics(predictor(graphdef, jax.device_get(params)), gd1, batch.inputs)
    return eager, jitted, host


@pytest.mark.parametrize("devices", [1, 4])
def test_train_params_work_outside_the_training_mesh_and_train_on_another(devices):
    graphdef, params = _model()
    result = train(regression_loss(graphdef), lr.sample, TASK, CFG, params, mesh=data_mesh(devices), progress=False)
    batch = sample_batch(lr.sample, TASK, jax.random.key(1), 32)  # sampled outside any mesh
    eager, jitted, host = _metrics_everywhere(graphdef, result.state.params, batch)
    for name in host:  # three XLA programs: float32 agreement to a few ulp
        np.testing.assert_allclose(eager[name], host[name], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(jitted[name], host[name], rtol=1e-5, atol=1e-7)
    # the returned state is also a valid input to a run on a mesh of another size
    other = train(regression_loss(graphdef), lr.sample, TASK, CFG, result.state.params,
                  mesh=data_mesh(5 - devices), progress=False)
    assert [r["step"] for r in other.train_rows] == list(range(CFG.steps))
    assert all(np.isfinite(r["loss"]) for r in other.train_rows)


def test_sweep_params_work_outside_the_sweep_mesh():
    graphdef, params = _model()
    init = lambda key: nnx.split(SelfAttention(4, init_scale=0.1, rngs=nnx.Rngs(key)))[1]  # noqa: E731
    result = train_sweep(regression_loss(graphdef), lr.sample, TASK, CFG, init,
                         [{"train.seed": s} for s in range(4)], mesh=sweep_mesh(4), progress=False)
    batch = sample_batch(lr.sample, TASK, jax.random.key(1), 32)
    eager, jitted, host = _metrics_everywhere(graphdef, result.member_params(3), batch)
    for name in host:
        np.testing.assert_allclose(eager[name], host[name], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(jitted[name], host[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("devices", [1, 4])
def test_equivalence_metrics_take_a_batch_drawn_under_a_data_mesh_inside_the_mesh_and_after_it(devices):
    """sample_batch under jax.set_mesh gives a batch typed with the mesh's Explicit axes (split over "data" on 4
    devices): after leaving the mesh, JAX refused to differentiate the predictors on it eagerly (ValueError asking for
    jax.set_mesh). With params as train() returns them (its mesh, Auto axes), the metrics of the model vs GD-1 equal
    those of the same prompts with no mesh, inside the mesh and after it."""
    graphdef, params = _model()
    mesh = data_mesh(devices)
    params = portable(jax.device_put(params, replicated(mesh)))  # what train() does to its state (TrainResult)
    assert {x.sharding.mesh.axis_types for x in jax.tree.leaves(params)} == {(AxisType.Auto,)}
    gd1 = gradient_descent(TASK, steps=1, lr=optimal_gd_lr(TASK))
    metrics = lambda tokens: equivalence_metrics(predictor(graphdef, params), gd1, tokens)  # noqa: E731
    want = metrics(sample_batch(lr.sample, TASK, jax.random.key(1), 16).inputs)
    with jax.set_mesh(mesh):
        batch = sample_batch(lr.sample, TASK, jax.random.key(1), 16).inputs
        assert batch.sharding.spec == (P("data", None, None) if devices > 1 else P(None, None, None))
        inside = metrics(batch)
    after = metrics(batch)
    # closed over by the user's jit: JAX refused jax.set_mesh inside it ("can only be used outside of jax.jit", where
    # the user had called none); the error says what works, and both ways do
    with pytest.raises(ValueError, match=re.escape("equivalence_metrics: an array on a mesh with Explicit axes (a "
                                                   "batch drawn under jax.set_mesh) is closed over by a jitted")):
        jax.jit(lambda: metrics(batch))()
    with jax.set_mesh(mesh):
        closed = jax.jit(lambda: metrics(batch))()
    passed = jax.jit(metrics)(batch)
    for got in (inside, after, closed, passed):
        for name in want:  # split over "data", another program: float32 rounding of values of size ~1
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
