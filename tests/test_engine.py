import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxicl.models import SelfAttention
from jaxicl.prng import PRNG_IMPLS, seed_key
from jaxicl.tasks import sample_batch
from jaxicl.tasks.batching import pool_key
from jaxicl.train import (CheckpointStore, NonFiniteLossError, TrainConfig, data_key, data_mesh, eval_key,
                          read_metrics, replicated, regression_loss, sweep_mesh, train, train_sweep)
from jaxicl.train.checkpoint import check_resumable
from jaxicl.train.state import init_state
from jaxicl.train.step import run_steps
from jaxicl.train.sweep_fields import member_arrays
from jaxicl.train.optim import make_optimizer
from jaxicl.validation import ConfigError
from frozen_features import FrozenFeatures
from tiny_run import tiny_setup

HERE = os.path.dirname(__file__)


def _losses(result):
    return np.array([r["loss"] for r in result.train_rows])


def _assert_params_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.mark.parametrize("prng_impl", PRNG_IMPLS)
def test_four_devices_give_the_same_losses_as_one(prng_impl):
    """8 steps, two chunks (5 and 3): on 4 simulated devices a threefry4x32 step costs 45-60 ms (jaxicl.prng)."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=8, prng_impl=prng_impl)
    one = train(loss_fn, sample, task, cfg, params, mesh=data_mesh(1), progress=False)
    four = train(loss_fn, sample, task, cfg, params, mesh=data_mesh(4), progress=False)
    assert len(one.train_rows) == 8
    np.testing.assert_allclose(_losses(four), _losses(one), rtol=2e-5)
    _assert_params_close(four.state.params, one.state.params, rtol=2e-4, atol=1e-6)
    for leaf in jax.tree.leaves(four.state.params):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4


def test_an_evaluate_that_samples_from_a_key_made_before_train_runs_under_the_training_mesh():
    """evaluate runs under train's mesh: its test batch, drawn from a key made before (at the top of a script), ran on
    one device and raised on several (ValueError: Resource axis: data of P('data',) is not found in mesh: ())."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=5)
    test_key = jax.random.key(1)
    want = float(loss_fn(params, sample_batch(sample, task, test_key, 16))[0])
    four = train(loss_fn, sample, task, cfg, params, mesh=data_mesh(4), progress=False, eval_every=5,
                 evaluate=lambda p: {"test_loss": loss_fn(p, sample_batch(sample, task, test_key, 16))[0]})
    assert [r["step"] for r in four.eval_rows] == [0, 5]
    # step 0: the initial parameters on the same prompts; float32 sums over 4 shards in another order than on one
    np.testing.assert_allclose(four.eval_rows[0]["test_loss"], want, rtol=1e-6)


def test_a_non_param_variable_of_the_params_stays_as_given_through_training_and_resume(tmp_path):
    """README's nnx.split(model) returns every variable: a frozen projection held as an nnx.Variable got AdamW
    updates (it moved by 0.2 in 50 steps). Now it is bit-identical after training, a resume and a run with a tx of
    one's own, and the Param trains (loss and step metrics) as it does with the projection outside the parameters."""
    _, sample, task, _, _ = tiny_setup(steps=10)
    cfg = TrainConfig(steps=10, batch_size=16, lr=1e-2, optimizer="adamw", weight_decay=0.1, clip_norm=0.5,
                      steps_per_call=5, log_every=1, checkpoint_every=5)
    graphdef, params = nnx.split(FrozenFeatures(nnx.Rngs(0)))
    loss_fn = regression_loss(graphdef)
    straight = train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "a"), progress=False)
    np.testing.assert_array_equal(straight.state.params["proj"][...], params["proj"][...])
    train(loss_fn, sample, task, dataclasses.replace(cfg, steps=5), params, out_dir=str(tmp_path / "b"),
          progress=False)
    resumed = train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "b"), progress=False)
    # exact: every chunk of both runs is the same compiled 5-step program applied to the same state
    np.testing.assert_array_equal(_losses(resumed), _losses(straight))
    _assert_params_close(resumed.state.params, straight.state.params, rtol=0, atol=0)
    own_tx = train(loss_fn, sample, task, cfg, params, tx=optax.sgd(0.1), progress=False)
    np.testing.assert_array_equal(own_tx.state.params["proj"][...], params["proj"][...])
    _, head, rest = nnx.split(FrozenFeatures(nnx.Rngs(0)), nnx.Param, ...)
    outside = train(lambda p, batch: loss_fn(nnx.merge_state(p, rest), batch), sample, task, cfg, head,
                    progress=False)
    # two compiled programs (the projection an input, or a constant): equal on CPU, float32 rounding apart elsewhere
    for name in ("loss", "grad_norm", "param_rms", "update_rms"):
        np.testing.assert_allclose([r[name] for r in straight.train_rows], [r[name] for r in outside.train_rows],
                                   rtol=1e-6)
    np.testing.assert_allclose(straight.state.params["head"][...], outside.state.params["head"][...], rtol=1e-6)


def test_batch_and_per_example_gradients_are_sharded_and_the_gradient_is_all_reduced():
    loss_fn, sample, task, cfg, params = tiny_setup(steps=5)
    mesh = data_mesh(4)
    with jax.set_mesh(mesh):
        params = jax.device_put(params, replicated(mesh))
        batch = sample_batch(sample, task, jax.random.key(0), cfg.batch_size)
        assert batch.inputs.sharding.spec[0] == "data"
        assert {s.data.shape[0] for s in batch.inputs.addressable_shards} == {cfg.batch_size // 4}
        per_example = jax.jit(jax.vmap(jax.grad(lambda p, b: loss_fn(p, jax.tree.map(lambda a: a[None], b))[0]),
                                       in_axes=(None, 0)))(params, batch)
        for g in jax.tree.leaves(per_example):
            assert g.sharding.spec[0] == "data" and len(g.sharding.device_set) == 4
        tx = make_optimizer(cfg)
        state = jax.device_put(init_state(params, cfg.seed, tx), replicated(mesh))
        step = jax.jit(lambda s: run_steps(s, 1, rows=1, loss_fn=loss_fn, sample=sample, task_cfg=task,
                                           batch_size=cfg.batch_size, tx=tx))
        hlo = step.lower(state).compile().as_text()
    assert "all-reduce" in hlo  # the per-device gradients are summed across the data axis


@pytest.mark.parametrize("prng_impl", PRNG_IMPLS)
def test_resume_reproduces_an_uninterrupted_run(tmp_path, prng_impl):
    """On train's default mesh (the 4 simulated devices): 10 steps in chunks of 5, a checkpoint at 5."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=10, checkpoint_every=5, prng_impl=prng_impl)
    straight = train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "a"), progress=False)
    _, _, _, half_cfg, _ = tiny_setup(steps=5, checkpoint_every=5, prng_impl=prng_impl)
    train(loss_fn, sample, task, half_cfg, params, out_dir=str(tmp_path / "b"), progress=False)
    resumed = train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "b"), progress=False)
    # exact: every chunk of both runs is the same compiled 5-step program applied to the same state
    np.testing.assert_array_equal(_losses(resumed), _losses(straight))
    _assert_params_close(resumed.state.params, straight.state.params, rtol=0, atol=0)
    assert read_metrics(str(tmp_path / "a" / "metrics.jsonl")) == read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
    assert CheckpointStore(str(tmp_path / "b" / "checkpoints")).steps() == [5, 10]


def test_numpy_scalars_in_the_configs_are_stored_as_the_python_numbers_they_hold_and_resume(tmp_path):
    """steps=np.int64(10) (a grid computed with numpy), seed=np.int64, lr=np.float32 or a task field of a numpy type
    passed validation, then train(out_dir=...) crashed inside orbax ("Object of type int64 is not JSON
    serializable") and train_sweep before it (its stored config and sweep.json)."""
    from jaxicl.train.checkpoint import normalise_config
    from jaxicl.train.loop import stored_config

    loss_fn, sample, task, cfg, params = tiny_setup(steps=20, checkpoint_every=10)
    plain_cfg, plain_task = dataclasses.replace(cfg, seed=3, lr=0.02), dataclasses.replace(task, noise_std=0.5)
    numpy_cfg = dataclasses.replace(plain_cfg, steps=np.int64(10), seed=np.int64(3), lr=np.float32(0.02))
    numpy_task = dataclasses.replace(plain_task, noise_std=np.float32(0.5))
    train(loss_fn, sample, numpy_task, numpy_cfg, params, out_dir=str(tmp_path / "b"), progress=False)
    stored = CheckpointStore(str(tmp_path / "b" / "checkpoints")).config()
    assert stored == normalise_config(stored_config(plain_task, dataclasses.replace(plain_cfg, steps=10), None, None))
    # as written, not as float32's 0.0199999995...
    assert (stored["train"]["lr"], stored["task"]["noise_std"]) == (0.02, 0.5)
    # the run of Python numbers resumes it: exact, every chunk of both is the same compiled program on the same state
    resumed = train(loss_fn, sample, plain_task, plain_cfg, params, out_dir=str(tmp_path / "b"), progress=False)
    straight = train(loss_fn, sample, plain_task, plain_cfg, params, out_dir=str(tmp_path / "a"), progress=False)
    np.testing.assert_array_equal(_losses(resumed), _losses(straight))
    _assert_params_close(resumed.state.params, straight.state.params, rtol=0, atol=0)
    train_sweep(loss_fn, sample, numpy_task, numpy_cfg, lambda key: params, [{"train.lr": 0.01}, {"train.lr": 0.02}],
                out_dir=str(tmp_path / "s"), progress=False)
    with open(tmp_path / "s" / "sweep.json") as f:
        assert json.load(f)["steps"] == 10


def test_a_run_without_out_dir_takes_a_task_config_json_cannot_store():
    """The numpy-scalar fix serialised every run's config: a dict task config holding an array (which only a
    checkpoint would store) made train() without out_dir raise "Object of type ndarray is not JSON serializable"."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=4)
    with_pool = train(loss_fn, lambda c, key: sample(task, key), {"pool": np.arange(4.0)}, cfg, params,
                      progress=False)
    plain = train(loss_fn, sample, task, cfg, params, progress=False)
    np.testing.assert_array_equal(_losses(with_pool), _losses(plain))  # the same sampler's draws, the same program


@dataclasses.dataclass(frozen=True, eq=False)
class _ScaledTask:
    scales: object  # [2, 4] array: the targets are the inputs [4] times its column sums


def test_a_task_config_holding_an_array_is_stored_as_lists_and_resumes_only_with_the_same_values(tmp_path):
    """A task field holding a numpy array crashed train(out_dir=...), and train_sweep even without out_dir (its
    config is normalised), with "TypeError: Object of type ndarray is not JSON serializable", naming neither the
    field nor the config. Stored as nested lists, it is compared by its values on resume, like a tuple field."""
    from jaxicl.prompt import Prompt

    def sample(task, key):
        x = jax.random.normal(key, (4,))
        return Prompt(inputs=x, targets=jnp.sum(jnp.asarray(task.scales), 0) * x, mask=jnp.ones(4))

    def loss_fn(params, batch):
        return jnp.mean((params["w"] * batch.inputs - batch.targets) ** 2), {}

    scales = np.array([[0.1, 1.0, 2.0, 3.0], [0.0, -1.0, 0.5, 1.0]], np.float32)
    cfg, params = TrainConfig(steps=4, batch_size=8, log_every=1, checkpoint_every=2), {"w": jnp.zeros(4)}
    train(loss_fn, sample, _ScaledTask(scales), dataclasses.replace(cfg, steps=2), params, out_dir=str(tmp_path / "b"),
          progress=False)
    store = CheckpointStore(str(tmp_path / "b" / "checkpoints"))
    # float32 0.1 as written, as a numpy float32 scalar field is stored
    assert store.config()["task"] == {"scales": [[0.1, 1.0, 2.0, 3.0], [0.0, -1.0, 0.5, 1.0]]}
    store.close()
    resumed = train(loss_fn, sample, _ScaledTask(jnp.asarray(scales)), cfg, params, out_dir=str(tmp_path / "b"),
                    progress=False)  # the same values, as a JAX array
    straight = train(loss_fn, sample, _ScaledTask(scales), cfg, params, out_dir=str(tmp_path / "a"), progress=False)
    # exact: every chunk of both runs is the same compiled 2-step program applied to the same state
    np.testing.assert_array_equal(_losses(resumed), _losses(straight))
    other = scales.copy()
    other[1, 2] = 0.25
    with pytest.raises(ConfigError, match=re.escape("task.scales: checkpoint [[0.1, 1.0, 2.0, 3.0], [0.0, -1.0, 0.5, "
                                                    "1.0]] vs now [[0.1, 1.0, 2.0, 3.0], [0.0, -1.0, 0.25, 1.0]]")):
        train(loss_fn, sample, _ScaledTask(other), cfg, params, out_dir=str(tmp_path / "b"), progress=False)
    swept = train_sweep(loss_fn, sample, _ScaledTask(scales), cfg, lambda key: params,
                        [{"train.lr": 1e-3}, {"train.lr": 2e-3}], progress=False)
    assert swept.diverged == {}
    with pytest.raises(ConfigError, match=re.escape("task.scales: an array in the run's config is stored as nested "
                                                    "lists of its numbers (a resume compares them), so its dtype must "
                                                    "be bool, integer or floating, got <U1")):
        train(loss_fn, sample, _ScaledTask(np.array(["a", "b"])), cfg, params, out_dir=str(tmp_path / "c"),
              progress=False)
    with pytest.raises(ConfigError, match=re.escape("task.pools[1]: the run's config is stored as JSON with its "
                                                    "checkpoints (a resume compares it), which holds numbers, strings, "
                                                    "None, lists, dicts and numeric arrays, not a function")):
        train(loss_fn, lambda c, key: sample(_ScaledTask(scales), key), {"pools": [1.0, lambda: 0]}, cfg, params,
              out_dir=str(tmp_path / "c"), progress=False)


def test_a_float64_run_under_enable_x64_resumes_in_float64(tmp_path):
    """Experiments fit in float64 inside `with jax.enable_x64(True)`, a context of the calling thread: orbax reads a
    checkpoint in threads of its own, where arrays made from the float64 data came back float32, so the resumed run
    (or a finished one restored) went on rounded to float32. Restored, the state keeps its dtype and bits, and a
    resumed run ends where the uninterrupted one does."""
    def loss_fn(p, _):
        return jnp.sum((p["w"] - jnp.arange(3.0)) ** 2) / 3, {}

    with jax.enable_x64(True):
        params = {"w": jnp.full(3, 1 / 3, jnp.float64)}  # not representable in float32
        cfg = TrainConfig(steps=20, lr=0.1, steps_per_call=5, checkpoint_every=10)
        straight = train(loss_fn, None, None, cfg, params, out_dir=str(tmp_path / "a"), progress=False)
        half = train(loss_fn, None, None, dataclasses.replace(cfg, steps=10), params, out_dir=str(tmp_path / "b"),
                     progress=False)
        store = CheckpointStore(str(tmp_path / "b" / "checkpoints"))
        with jax.set_mesh(data_mesh()):
            restored = store.restore(half.state, replicated(data_mesh()))
        store.close()
        assert restored.params["w"].dtype == jnp.float64
        np.testing.assert_array_equal(restored.params["w"], half.state.params["w"])  # a copy: the same bits
        resumed = train(loss_fn, None, None, cfg, params, out_dir=str(tmp_path / "b"), progress=False)
    assert resumed.state.params["w"].dtype == jnp.float64
    # exact: every chunk of both runs is the same compiled 5-step program applied to the same state
    np.testing.assert_array_equal(resumed.state.params["w"], straight.state.params["w"])


def test_a_checkpoint_of_another_model_or_dtype_is_refused_naming_the_leaf(tmp_path):
    """An API run stores its train and task settings, not the model's: orbax loaded whatever was saved, so a rerun
    with other parameter shapes (another head count), another parameter tree or float64 parameters resumed the old
    run's state (a 1-head model came back from a 2-head run) with no error, in train and in train_sweep."""
    def loss_fn(p, _):
        return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p)), {}

    cfg = TrainConfig(steps=10, lr=0.1, steps_per_call=5, checkpoint_every=5)
    longer = dataclasses.replace(cfg, steps=20)
    train(loss_fn, None, None, cfg, {"w": jnp.ones(3)}, out_dir=str(tmp_path / "a"), progress=False)
    for params, message in [({"w": jnp.ones(4)}, r"holds float32 \[3\] at \['params'\]\['w'\], the state to "
                                                  r"restore into has float32 \[4\]"),
                            ({"w": jnp.ones(3), "b": jnp.ones(2)}, r"holds nothing at \['params'\]\['b'\]")]:
        with pytest.raises(ConfigError, match=message):
            train(loss_fn, None, None, longer, params, out_dir=str(tmp_path / "a"), progress=False)
    with jax.enable_x64(True), pytest.raises(ConfigError, match=r"has float64 \[3\]"):
        train(loss_fn, None, None, longer, {"w": jnp.ones(3, jnp.float64)}, out_dir=str(tmp_path / "a"),
              progress=False)
    # the same model still resumes (from the checkpoint, not from the other initial values given here): exact,
    # every chunk of both runs is the same compiled program
    resumed = train(loss_fn, None, None, longer, {"w": jnp.full(3, 5.0)}, out_dir=str(tmp_path / "a"), progress=False)
    straight = train(loss_fn, None, None, longer, {"w": jnp.ones(3)}, out_dir=str(tmp_path / "b"), progress=False)
    np.testing.assert_array_equal(resumed.state.params["w"], straight.state.params["w"])
    loss_fn, sample, task, cfg, params = tiny_setup(steps=10, checkpoint_every=5)
    members = [{"train.seed": 0}, {"train.seed": 1}]
    train_sweep(loss_fn, sample, task, cfg, lambda key: params, members, out_dir=str(tmp_path / "s"), progress=False)
    graphdef, one_head = nnx.split(SelfAttention(4, num_heads=1, init_scale=0.1, rngs=nnx.Rngs(0)))
    with pytest.raises(ConfigError, match=r"cannot restore: the checkpoint holds float32 .* at \['params'\]"):
        train_sweep(regression_loss(graphdef), sample, task, dataclasses.replace(cfg, steps=20), lambda key: one_head,
                    members, out_dir=str(tmp_path / "s"), progress=False)


def test_a_sampler_reading_a_global_draws_its_current_value_in_sample_batch_and_in_training():
    """sample_batch was jitted with the sampler as a static argument: compiled once, a sampler reading a global (a
    pool of prompts) drew its first call's pool ever after, there and inside the engine's training steps."""
    from jaxicl.prompt import Prompt
    from jaxicl.tasks import batching

    state = {}

    def draw(pool, key):  # a row of the pool, and one drawn scalar the loss does not see
        x = pool[0]
        return Prompt(inputs=x[:, None], targets=x, mask=jnp.ones(3), info={"u": jax.random.uniform(key)})

    def sample(cfg, key):  # reads the pool when traced, as a notebook sampler reads a global
        return draw(state["pool"], key)

    def loss_fn(p, batch):
        return jnp.mean((batch.targets - p["b"]) ** 2), {}

    one_step = TrainConfig(steps=1, batch_size=4, lr=0.1, steps_per_call=1)
    for value in (0.0, 2.0):
        state["pool"] = jnp.full((4, 3), value)
        np.testing.assert_array_equal(sample_batch(sample, None, jax.random.key(0), 8).targets, value)
        result = train(loss_fn, sample, None, one_step, {"b": jnp.zeros(())}, progress=False)
        assert result.train_rows[0]["loss"] == value ** 2  # exact: the mean of equal squares of a small integer
    # other function objects and pools, the same program as the sampler's above: not compiled again
    before = batching._sample_batch._cache_size()
    for value in (3.0, 4.0):
        pool = jnp.full((4, 3), value)
        batch = sample_batch(lambda cfg, key, pool=pool: draw(pool, key), None, jax.random.key(0), 8)
        np.testing.assert_array_equal(batch.targets, value)
    assert batching._sample_batch._cache_size() == before


def test_samplers_that_differ_only_in_their_host_callback_draw_their_own_batches_in_sample_batch_and_training():
    """A sampler's program was keyed by its printed jaxpr, in which JAX masks the address of a host callback's
    function: a second sampler differing only in its callback (a data set read on the host) drew the first one's
    batches, in sample_batch and in a second train() of the process."""
    from jaxicl.prompt import Prompt
    from jaxicl.tasks import batching

    def make_sampler(value):
        def host(x):  # [..., 3] -> the same shape, all `value`: a sampler reading its data on the host
            return np.full(x.shape, value, np.float32)

        def sample(cfg, key):
            x = jax.pure_callback(host, jax.ShapeDtypeStruct((3,), jnp.float32), jax.random.normal(key, (3,)),
                                  vmap_method="broadcast_all")
            return Prompt(inputs=x[:, None], targets=x, mask=jnp.ones(3), info={})

        return sample

    def loss_fn(p, batch):
        return jnp.mean((batch.targets - p["b"]) ** 2), {}

    one_step = TrainConfig(steps=1, batch_size=4, lr=0.1, steps_per_call=1)
    for value in (1.0, 3.0):
        sample = make_sampler(value)
        np.testing.assert_array_equal(sample_batch(sample, None, jax.random.key(0), 8).targets, value)
        result = train(loss_fn, sample, None, one_step, {"b": jnp.zeros(())}, progress=False)
        assert result.train_rows[0]["loss"] == value ** 2  # exact: the mean of equal squares of a small integer
    # the same sampler again (the same callback): its program is reused
    before = batching._sample_batch._cache_size()
    np.testing.assert_array_equal(sample_batch(sample, None, jax.random.key(1), 8).targets, 3.0)
    assert batching._sample_batch._cache_size() == before

def test_a_run_into_an_out_dir_another_running_process_writes_is_refused(tmp_path):
    """Two processes training into one out_dir (a rerun while a forgotten run still went on) interleaved their
    metrics.jsonl rows with no error. The lock of a running process refuses the second run (train and train_sweep),
    one left by a process that ended is taken over, and a run leaves none behind, finished or failed."""
    import socket

    from jaxicl.train.run_lock import LOCK_FILE

    loss_fn, sample, task, cfg, params = tiny_setup(steps=10)
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_FILE
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
        with pytest.raises(ConfigError, match=rf"out_dir: .* is being written by another run \(process {other.pid}"):
            train(loss_fn, sample, task, cfg, params, out_dir=str(out), progress=False)
        with pytest.raises(ConfigError, match="is being written by another run"):
            train_sweep(loss_fn, sample, task, cfg, lambda key: params, [{"train.seed": 0}], out_dir=str(out),
                        progress=False)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        other.kill()
        other.wait()
    # the holder has ended (a killed run): taken over
    train(loss_fn, sample, task, cfg, params, out_dir=str(out), progress=False)
    assert not lock.exists()
    lock.write_text(json.dumps({"host": "another-host", "pid": os.getpid()}))  # cannot be checked from here
    with pytest.raises(ConfigError, match=r"on another-host\); .*if that run is no longer running, delete"):
        train(loss_fn, sample, task, cfg, params, out_dir=str(out), progress=False)
    lock.unlink()

    def diverging(p, batch):
        return loss_fn(p, batch)[0] * jnp.inf, {}

    with pytest.raises(NonFiniteLossError):
        train(diverging, sample, task, cfg, params, out_dir=str(tmp_path / "bad"), progress=False)
    assert not (tmp_path / "bad" / LOCK_FILE).exists()


def test_of_two_processes_that_found_the_lock_stale_only_one_takes_it(tmp_path, monkeypatch):
    """Both read a killed run's lock; the first took it over, and the second, going on from its earlier read, removed
    the new lock and linked its own: two runs wrote one out_dir. The takeover now reads the lock again under an
    flock."""
    import socket

    from jaxicl.train import run_lock

    lock = tmp_path / run_lock.LOCK_FILE
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    ready = tmp_path / "taken"
    holder = (f"import sys, time, pathlib; sys.path.insert(0, {os.getcwd()!r}); from jaxicl.train.run_lock import "
              f"exclusive\nwith exclusive({str(tmp_path)!r}):\n    pathlib.Path({str(ready)!r}).touch()\n"
              f"    time.sleep(60)")
    other = []
    first_read = run_lock._holder

    def read_then_let_another_process_take_it(path):
        seen = first_read(path)
        if not other:  # between this process's read (stale) and its takeover, another process takes the lock over
            other.append(subprocess.Popen([sys.executable, "-c", holder]))
            while not ready.exists():
                assert other[0].poll() is None, "the other process ended before taking the lock"
                time.sleep(0.05)
        return seen

    monkeypatch.setattr(run_lock, "_holder", read_then_let_another_process_take_it)
    try:
        with pytest.raises(ConfigError, match=r"is being written by another run \(process (\d+)") as refused:
            with run_lock.exclusive(str(tmp_path)):
                pass
        assert int(refused.value.args[0].split("(process ")[1].split()[0]) == other[0].pid
        assert json.loads(lock.read_text())["pid"] == other[0].pid  # the other process's lock stays
    finally:
        for p in other:
            p.kill()
            p.wait()


def test_a_lock_naming_this_process_is_stale_unless_this_process_holds_it(tmp_path):
    """A container restarted with the same hostname after a SIGKILL gives the rerun the killed run's pid: its lock,
    naming this very process, was refused as another run's, so every automatic restart failed. It is taken over; a
    nested exclusive on the out_dir this process does hold is still refused."""
    import socket

    from jaxicl.train import run_lock

    lock = tmp_path / run_lock.LOCK_FILE
    mine = {"host": socket.gethostname(), "pid": os.getpid()}
    lock.write_text(json.dumps(mine))  # what the killed run left
    with run_lock.exclusive(str(tmp_path)):
        with pytest.raises(ConfigError) as refused:
            with run_lock.exclusive(str(tmp_path)):
                pass
        assert str(refused.value) == (f"out_dir: {tmp_path} is being written by another run (process {os.getpid()} "
                                      f"on {mine['host']}); wait for it, stop it, or use another out_dir (if that run "
                                      f"is no longer running, delete {lock})")
        assert json.loads(lock.read_text()) == {**mine, "started": run_lock._start_time(os.getpid())}  # the outer's
    assert not lock.exists()


def test_a_lock_whose_pid_now_belongs_to_a_process_started_later_is_stale(tmp_path):
    """A killed run's pid given to an unrelated process (a long-lived host) kept its lock looking held, and every
    rerun was refused until someone deleted it by hand. The lock records when its process started; a live pid with
    another start time is taken over, one with the recorded start time is still refused."""
    import socket

    from jaxicl.train import run_lock

    lock = tmp_path / run_lock.LOCK_FILE
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = run_lock._start_time(other.pid)
        assert isinstance(started, int) and started == run_lock._start_time(other.pid)  # an integer tick count
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "started": started}))
        with pytest.raises(ConfigError, match=rf"another run \(process {other.pid} "):
            with run_lock.exclusive(str(tmp_path)):
                pass
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "started": started - 1}))
        with run_lock.exclusive(str(tmp_path)):
            assert json.loads(lock.read_text()) == {"host": socket.gethostname(), "pid": os.getpid(),
                                                    "started": run_lock._start_time(os.getpid())}
        assert not lock.exists()
    finally:
        other.kill()
        other.wait()


def test_a_model_with_an_embedding_table_trains_on_several_devices_and_a_pool_sampler_draws_through_lookup():
    """Under the engine's explicit-sharding mesh a gather from a replicated table by batch-sharded token ids (an
    nnx.Embed in a user's model) has no output sharding of its own: training raised ShardingTypeError on 2 or more
    devices. The model runs in auto sharding now; a sampler indexing a pool gathers with gpt.lookup."""
    from jaxicl.models.base import Model
    from jaxicl.models.gpt import lookup
    from jaxicl.prompt import Prompt
    from jaxicl.sites import null_sites
    from jaxicl.train import cross_entropy_loss, sweep_mesh

    vocab, t = 7, 10
    pool = jnp.arange(vocab)[::-1]

    @dataclasses.dataclass(frozen=True)
    class Task:  # train_sweep replaces fields of a dataclass config
        length: int = t

    class Embedded(Model):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, 16, rngs=rngs)
            self.out = nnx.Linear(16, vocab, rngs=rngs)

        def __call__(self, tokens, sites=null_sites):
            return self.out(sites("embed", self.embed(tokens)))

    def sample(cfg, key):  # the answer: the pool's entry at each token
        x = jax.random.randint(key, (t,), 0, vocab)
        return Prompt(x, lookup(pool, x), jnp.ones(t))

    assert jax.device_count() == 4
    graphdef, params = nnx.split(Embedded(nnx.Rngs(0)), nnx.Param)
    cfg = TrainConfig(steps=20, batch_size=16, lr=1e-2, log_every=5)
    with jax.set_mesh(data_mesh(4)):  # the pool sampler draws the same prompts as on one device: a gather is exact
        four = sample_batch(sample, None, jax.random.key(0), 16)
    np.testing.assert_array_equal(four.targets, sample_batch(sample, None, jax.random.key(0), 16, axis=None).targets)
    np.testing.assert_array_equal(four.targets, vocab - 1 - four.inputs)
    losses = {n: _losses(train(cross_entropy_loss(graphdef), sample, None, cfg, params, mesh=data_mesh(n),
                               progress=False)) for n in (1, 4)}
    # float32, gradients summed over 4 devices in another order than on 1: within a few float32 ulps per step
    np.testing.assert_allclose(losses[4], losses[1], rtol=2e-6)
    assert losses[1][-1] < 0.5 * losses[1][0]  # it learns the pool
    sweep = train_sweep(cross_entropy_loss(graphdef), sample, Task(), cfg, lambda key: params,
                        [{"train.seed": 0}, {"train.seed": 1}], mesh=sweep_mesh(2, 2), progress=False)
    np.testing.assert_allclose([r["loss"] for r in sweep.train_rows if r["member"] == 0], losses[1], rtol=2e-6)


def test_a_rerun_that_finds_no_checkpoint_rewrites_the_metrics_without_duplicates(tmp_path):
    """A run killed before its first checkpoint leaves rows (the step-0 evaluation among them) but no
    state: the rerun starts at step 0 and must leave the file of one uninterrupted run."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=10)
    evaluate = jax.jit(lambda p: {"w_norm": optax.tree.norm(p)})
    kw = dict(evaluate=evaluate, eval_every=5, progress=False)
    train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "a"), **kw)
    train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "b"), **kw)
    for path in (tmp_path / "b" / "checkpoints").iterdir():  # as if killed before the first save
        shutil.rmtree(path)
    rerun = train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "b"), **kw)  # the same programs again
    assert [r["step"] for r in rerun.eval_rows] == [0, 5, 10]
    assert read_metrics(str(tmp_path / "b" / "metrics.jsonl")) == read_metrics(str(tmp_path / "a" / "metrics.jsonl"))


@pytest.mark.parametrize("prng_impl", PRNG_IMPLS)
def test_checkpoint_saved_on_four_devices_restores_onto_one(tmp_path, prng_impl):
    loss_fn, sample, task, cfg, params = tiny_setup(steps=5, prng_impl=prng_impl)
    four = train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path), mesh=data_mesh(4), progress=False)
    assert str(jax.random.key_impl(four.state.key)) == prng_impl
    mesh1 = data_mesh(1)
    with jax.set_mesh(mesh1):
        store = CheckpointStore(str(tmp_path / "checkpoints"))
        other = next(i for i in PRNG_IMPLS if i != prng_impl)
        with pytest.raises(ConfigError, match=f"train.prng_impl='{prng_impl}'"):  # named, not a shape mismatch
            store.restore(init_state(params, cfg.seed, make_optimizer(cfg), prng_impl=other), replicated(mesh1))
        like = init_state(params, cfg.seed, make_optimizer(cfg), prng_impl=prng_impl)
        restored = store.restore(like, replicated(mesh1))
        store.close()
    assert int(restored.step) == 5
    for leaf in jax.tree.leaves(restored.params):
        assert leaf.sharding.device_set == {jax.devices()[0]}
    _assert_params_close(restored.params, four.state.params, rtol=0, atol=0)  # orbax stores the bytes
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(four.state.key))
    # and training continues on one device from there
    _, _, _, longer, _ = tiny_setup(steps=10, prng_impl=prng_impl)
    cont = train(loss_fn, sample, task, longer, params, out_dir=str(tmp_path), mesh=mesh1, progress=False)
    assert [r["step"] for r in cont.train_rows] == list(range(10))


def _nan_at_update(k: int) -> optax.GradientTransformation:
    """SGD whose k-th update (0-based) writes NaN into the parameters."""

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(grads, count, params=None):
        poison = jnp.where(count == k, jnp.nan, 1.0)
        return jax.tree.map(lambda g: -0.01 * g * poison, grads), count + 1

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("k,last", [(12, 10), (9, 5)])
def test_non_finite_parameters_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, k, last):
    """The k-th update (step k) writes NaN into the parameters; its loss is finite. k = 9: the checkpoint after step 9
    would hold NaN parameters, so the run stops at step 9 and step 5's checkpoint is the last good one."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=30, checkpoint_every=5)
    match = rf"non-finite parameters after the update at step {k}\b.*Last good checkpoint: step {last}"
    with pytest.raises(NonFiniteLossError, match=match):
        train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path), tx=_nan_at_update(k), progress=False)
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    assert store.steps() == list(range(5, last + 1, 5))
    with jax.set_mesh(data_mesh()):
        restored = store.restore(init_state(params, cfg.seed, _nan_at_update(k)), replicated(data_mesh()))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    # the rows of the steps before the bad update, all finite
    assert [r["step"] for r in rows] == list(range(k)) and all(np.isfinite(r["param_rms"]) for r in rows)


def test_batch_size_that_does_not_divide_over_devices_is_a_clear_error():
    loss_fn, sample, task, _, params = tiny_setup(steps=2)
    cfg = TrainConfig(steps=2, batch_size=6)
    with pytest.raises(ConfigError, match="batch_size=6 does not divide over the 4 devices"):
        train(loss_fn, sample, task, cfg, params, mesh=data_mesh(4), progress=False)


@pytest.mark.parametrize("make_mesh,axes", [
    # jax.sharding.Mesh gives Auto axes, which the batch cannot be resharded over (JAX raised inside sample_batch)
    (lambda: jax.sharding.Mesh(np.array(jax.devices()), ("data",)), "'data': 4 Auto"),
    # no "data" axis, or one of size 1 beside a larger one: every device computed the whole batch, while run.info
    # reported 4 devices
    (lambda: jax.make_mesh((4,), ("batch",)), "'batch': 4 Explicit"),
    (lambda: sweep_mesh(4, 1), "'members': 4 Explicit, 'data': 1 Explicit"),
], ids=["auto_axes", "no_data_axis", "sweep_mesh"])
def test_a_mesh_train_cannot_shard_the_batch_over_is_refused_naming_its_axes(make_mesh, axes):
    loss_fn, sample, task, cfg, params = tiny_setup(steps=2)
    message = (f"mesh: train needs an Explicit 'data' axis (the batch is sharded over it) and no other axis of size "
               f"> 1 (everything else is replicated), got axes {{{axes}}}; "
               f"jaxicl.train.data_mesh(num_devices) builds one")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        train(loss_fn, sample, task, cfg, params, mesh=make_mesh(), progress=False)


@pytest.mark.parametrize("kwargs,field", [
    ({"steps": 0}, "steps"), ({"optimizer": "rmsprop"}, "optimizer"), ({"schedule": "step"}, "schedule"),
    ({"lr": -1.0}, "lr"), ({"warmup_steps": 5, "steps": 2}, "warmup_steps"), ({"clip_norm": -1.0}, "clip_norm"),
    ({"weight_decay": 0.1}, "weight_decay"), ({"prng_impl": "rbg"}, "prng_impl"),
    ({"cpu_matmuls": "mkl"}, r"cpu_matmuls must be one of \('xla', 'onednn'\)"),
    ({"lr": float("inf")}, "lr must be a finite number"), ({"stop_loss": float("nan")}, "stop_loss"),
    ({"warmup_steps": 5}, "warmup_steps=5 needs schedule='warmup_cosine'.*schedule='constant'"),
    ({"betas": (0.9, 1.0)}, "betas"), ({"weight_decay": 0.1, "optimizer": "adam"}, "weight_decay=0.1 needs"),
    ({"log_every": 2.5}, "log_every must be an integer, got 2.5"), ({"seed": 1.0}, "seed must be an integer"),
    ({"steps": True}, "steps must be an integer, got True"), ({"keep_checkpoints": 1.5}, "keep_checkpoints"),
    # accepted and ignored by the optimiser, as weight_decay would be: refused
    ({"optimizer": "sgd", "betas": (0.5, 0.5)}, r"betas=\(0.5, 0.5\) are Adam's: they need optimizer='adam' or"),
    ({"no_decay": ("bias",)}, r"no_decay=\('bias',\) names what adamw does not decay: it needs optimizer='adamw'"),
    # lr=True trained at 1.0; the others failed with a TypeError naming no field
    ({"lr": True}, "lr must be a number, got True"), ({"stop_loss": True}, "stop_loss must be a number"),
    ({"lr": "1e-3"}, "lr must be a number, got '1e-3'"), ({"betas": 0.9}, r"betas must be two values in \[0, 1\)"),
    ({"betas": (0.9, "x")}, r"betas\[1\] must be a number")])
def test_bad_train_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**kwargs)


def test_a_lone_run_takes_the_seeds_a_sweep_takes():
    """int32 seeds: without x64 jax.random.key keeps a seed's low 32 bits (2**32 trained exactly like 0)."""
    for seed in (-2**31, 2**31 - 1):
        assert TrainConfig(seed=seed).seed == seed
        assert member_arrays([{"train.seed": seed}], "train.", ["seed"])["seed"].tolist() == [seed]
    for seed in (-2**31 - 1, 2**31, 2**32):
        with pytest.raises(ConfigError, match=rf"seed must be in \[-2147483648, 2147483647\], got {seed}"):
            TrainConfig(seed=seed)
        with pytest.raises(ConfigError, match=rf"train\.seed: a swept integer must fit in int32.*\[{seed}\]"):
            member_arrays([{"train.seed": seed}], "train.", ["seed"])
    # a float axis written with an integer among its values (lr=0,1e-3) stays float; only all-integer axes are int32
    mixed = member_arrays([{"train.lr": 0}, {"train.lr": 1e-3}, {"train.lr": 2}], "train.", ["lr"])["lr"]
    assert mixed.dtype == jnp.result_type(float)
    np.testing.assert_allclose(mixed, [0.0, 1e-3, 2.0], rtol=1e-7)


def test_keys_from_a_seed_are_the_same_with_and_without_x64():
    """Keys come from a seed's int32 value: under x64 jax.random.key took a Python int as int64, so a negative seed's
    data and evaluation keys (and task pools) differed from its keys without x64 and from a sweep member's (int32
    seeds): the member trained otherwise than its lone run. Key data are integers: compared exactly."""
    def keys(seed):
        return [np.asarray(jax.random.key_data(k)) for k in
                (data_key(seed), data_key(seed, "threefry4x32"), eval_key(seed), pool_key(seed, 3), seed_key(seed))]

    for seed in (-5, -2**31, 0, 2**31 - 1):
        plain = keys(seed)
        assert all(np.array_equal(a, b) for a, b in zip(plain, keys(jnp.int32(seed)), strict=True))
        with jax.enable_x64(True):
            wide = keys(seed)
        assert all(np.array_equal(a, b) for a, b in zip(plain, wide, strict=True)), seed
    assert np.array_equal(jax.random.key_data(seed_key(-5)), jax.random.key_data(jax.random.key(-5)))  # without x64


def test_a_key_at_an_offset_from_a_seed_wraps_around_int32():
    """seed_key(seed, offset=o) (an experiment's evaluation set at its run's seed + 10) is the key
    jax.random.key(seed + o) made without x64 for every int32 seed, whose sum wrapped around int32: seed 2**31 - 1
    neither overflows nor draws another set, with or without x64, eager or traced (a sweep's int32 seeds).
    threefry2x32's key of a 32-bit seed is [0, the seed's bits]; key data are integers: compared exactly."""
    seeds = [0, -5, 2**31 - 1, -2**31, 2**31 - 8]
    for offset in (0, 1, 10, 30):
        expected = np.array([[0, (s + offset) % 2**32] for s in seeds], np.uint32)
        eager = np.stack([np.asarray(jax.random.key_data(seed_key(s, offset=offset))) for s in seeds])
        np.testing.assert_array_equal(eager, expected)
        np.testing.assert_array_equal(eager, [jax.random.key_data(jax.random.key(s + offset)) for s in seeds])
        traced = jax.jit(jax.vmap(lambda s, o=offset: jax.random.key_data(seed_key(s, offset=o))))
        np.testing.assert_array_equal(traced(jnp.asarray(seeds, jnp.int32)), expected)
        with jax.enable_x64(True):
            np.testing.assert_array_equal([jax.random.key_data(seed_key(s, offset=offset)) for s in seeds], expected)


def test_resuming_with_another_config_is_refused(tmp_path):
    loss_fn, sample, task, cfg, params = tiny_setup(steps=5)
    train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path), progress=False)
    other = dataclasses.replace(cfg, steps=10, lr=3e-2)
    with pytest.raises(ConfigError) as refused:
        train(loss_fn, sample, task, other, params, out_dir=str(tmp_path), progress=False)
    assert str(refused.value) == (f"cannot resume from {tmp_path / 'checkpoints'}: the checkpoint was made with "
                                  f"another config: train.lr: checkpoint 0.01 vs now 0.03; train into a new output "
                                  f"directory, or keep the checkpoint's config")
    shorter = dataclasses.replace(cfg, steps=4)
    with pytest.raises(ConfigError, match=r"step 5, past train.steps=4; use train.steps=5 .* or more than 5"):
        train(loss_fn, sample, task, shorter, params, out_dir=str(tmp_path), progress=False)


def test_resuming_refuses_another_run_config_entry_and_a_run_that_would_end_at_the_checkpoint(tmp_path):
    """Top-level run_config entries (an experiment's name, its own scalars) are compared like the sections; a run
    cut to end exactly at the checkpoint of a longer run is refused (its last step's rows were never logged)."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=10, checkpoint_every=5)
    out = str(tmp_path / "a")
    train(loss_fn, sample, task, cfg, params, out_dir=out, run_config={"experiment": "x", "n": 1}, progress=False)
    for other, match in (({"experiment": "x", "n": 2}, r"n: checkpoint 1 vs now 2"),
                         ({"experiment": "y", "n": 1}, r"experiment: checkpoint 'x' vs now 'y'"),
                         ({"experiment": {"name": "x"}, "n": 1}, r"experiment: checkpoint 'x' vs now \{'name': 'x'\}"),
                         ({"experiment": "x"}, r"n: checkpoint 1 vs now None")):
        with pytest.raises(ConfigError, match=match):
            train(loss_fn, sample, task, cfg, params, out_dir=out, run_config=other, progress=False)
    bf16 = jax.default_matmul_precision("bfloat16")  # another precision: on a GPU or TPU, other results
    with bf16, pytest.raises(ConfigError, match="matmul_precision: checkpoint None vs now 'bfloat16'"):
        train(loss_fn, sample, task, cfg, params, out_dir=out, run_config={"experiment": "x", "n": 1}, progress=False)
    again = train(loss_fn, sample, task, cfg, params, out_dir=out, run_config={"experiment": "x", "n": 1},
                  progress=False)  # the same config resumes (here: from its final checkpoint)
    assert again.state.step == 10
    run = {"train": {"steps": 20, "schedule": "constant"}}
    cut = {"train": {"steps": 10, "schedule": "constant"}}
    with pytest.raises(ConfigError, match=r"step 10 of a run of train.steps=20; a run of train.steps=10 would end"):
        check_resumable(run, cut, 10, "/ckpt")
    check_resumable(run, cut, 5, "/ckpt")  # a checkpoint before the shorter run's end continues into it
    check_resumable(cut, cut, 10, "/ckpt")  # a finished run, rerun as it was: nothing left to train


def test_a_refusal_names_the_checkpoint_directory_and_every_differing_field_by_its_whole_path():
    """The recursion passed only the parent's key down: config.model.d_model came out as model.d_model, and no
    message said which directory refused (sweep_lr_seeds trains two runs, abstractions_geometry another's)."""
    stored = {"train": {"steps": 10, "schedule": "constant", "lr": {"swept": [1e-3, 3e-3]}},
              "config": {"model": {"d_model": 8}, "eval": {"split": {"n": 1}}}}
    current = {"train": {"steps": 10, "schedule": "constant", "lr": {"swept": [1e-3, 5e-3]}},
               "config": {"model": {"d_model": 16}, "eval": {"split": {"n": 2}}}}
    with pytest.raises(ConfigError) as refused:
        check_resumable(stored, current, 10, "/out/run/checkpoints")
    assert str(refused.value) == (
        "cannot resume from /out/run/checkpoints: the checkpoint was made with another config: config.eval.split.n: "
        "checkpoint 1 vs now 2; config.model.d_model: checkpoint 8 vs now 16; train.lr.swept: checkpoint "
        "[0.001, 0.003] vs now [0.001, 0.005]; train into a new output directory, or keep the checkpoint's config")


def test_a_run_with_resume_false_replaces_the_old_checkpoints_and_config(tmp_path):
    """lr 1e-2, then lr 3e-2 with resume=False into the same directory: a later resume sees only the second run (it
    refuses lr 1e-2 and restores the second run's final state for lr 3e-2)."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=10, checkpoint_every=5)
    out = str(tmp_path)
    train(loss_fn, sample, task, cfg, params, out_dir=out, progress=False)
    other = dataclasses.replace(cfg, lr=3e-2, steps=5)
    second = train(loss_fn, sample, task, other, params, out_dir=out, resume=False, progress=False)
    assert CheckpointStore(str(tmp_path / "checkpoints")).steps() == [5]  # the first run's step 10 is gone
    with pytest.raises(ConfigError, match=r"train\.lr: checkpoint 0.03 vs now 0.01"):
        train(loss_fn, sample, task, cfg, params, out_dir=out, progress=False)
    again = train(loss_fn, sample, task, other, params, out_dir=out, progress=False)  # restores, trains nothing
    _assert_params_close(again.state.params, second.state.params, rtol=0, atol=0)
    assert [r["step"] for r in again.train_rows] == list(range(5))


class _Stopped(Exception):
    """Stands for Ctrl-C or a lost machine."""


def _stop(params):
    raise _Stopped


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_config_for_the_next_run(tmp_path):
    """Orbax writes a store's config when it first opens the directory: a run stopped before any checkpoint left its
    config there, and the next run's checkpoints were stored under it (its rerun refused, the first config's rerun
    resumed from them)."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=10)  # a checkpoint only at the end
    out = str(tmp_path)
    with pytest.raises(_Stopped):  # stopped in the step-0 evaluation, before any checkpoint
        train(loss_fn, sample, task, cfg, params, out_dir=out, evaluate=_stop, progress=False)
    other = dataclasses.replace(cfg, lr=3e-2)
    second = train(loss_fn, sample, task, other, params, out_dir=out, progress=False)
    assert CheckpointStore(str(tmp_path / "checkpoints")).config()["train"]["lr"] == 3e-2
    with pytest.raises(ConfigError, match=r"train\.lr: checkpoint 0.03 vs now 0.01"):
        train(loss_fn, sample, task, cfg, params, out_dir=out, progress=False)
    again = train(loss_fn, sample, task, other, params, out_dir=out, progress=False)  # restores, trains nothing
    _assert_params_close(again.state.params, second.state.params, rtol=0, atol=0)


def test_resuming_with_another_evaluation_schedule_is_refused(tmp_path):
    """A resume with another eval_every would keep the old schedule's rows before the checkpoint and write the new
    one's after it: a file matching neither run."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=10, checkpoint_every=5)
    out = str(tmp_path)

    def evaluate(p):
        return {"norm": optax.tree.norm(p)}

    train(loss_fn, sample, task, cfg, params, out_dir=out, evaluate=evaluate, eval_every=2, progress=False)
    with pytest.raises(ConfigError, match=r"eval_every: checkpoint 2 vs now 5"):
        train(loss_fn, sample, task, cfg, params, out_dir=out, evaluate=evaluate, eval_every=5, progress=False)
    with pytest.raises(ConfigError, match=r"eval_every: checkpoint 2 vs now \[4, 8\]"):
        train(loss_fn, sample, task, cfg, params, out_dir=out, evaluate=evaluate, eval_every=(4, 8), progress=False)
    again = train(loss_fn, sample, task, cfg, params, out_dir=out, evaluate=evaluate, eval_every=2, progress=False)
    assert [r["step"] for r in again.eval_rows] == [0, 2, 4, 6, 8, 10]


def test_a_schedule_that_depends_on_steps_refuses_to_resume_with_other_steps(tmp_path):
    loss_fn, sample, task, cfg, params = tiny_setup(steps=10)
    cosine = dataclasses.replace(cfg, schedule="warmup_cosine", warmup_steps=2)
    train(loss_fn, sample, task, cosine, params, out_dir=str(tmp_path), progress=False)
    with pytest.raises(ConfigError, match=r"train.steps: checkpoint 10 vs now 20.*'warmup_cosine' depends on"):
        train(loss_fn, sample, task, dataclasses.replace(cosine, steps=20), params, out_dir=str(tmp_path),
              progress=False)


def test_warmup_cosine_schedule_and_clipping_shape_the_updates():
    cfg = TrainConfig(steps=100, lr=2.0, schedule="warmup_cosine", warmup_steps=10, optimizer="sgd", clip_norm=1.0)
    tx = make_optimizer(cfg)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    grads = {"w": jnp.array([30.0, 40.0, 0.0])}  # norm 50, clipped to 1
    sizes = []
    for _ in range(100):
        updates, state = tx.update(grads, state, params)
        sizes.append(float(jnp.linalg.norm(updates["w"])))
    expected = [2.0 * (s / 10 if s < 10 else 0.5 * (1 + np.cos(np.pi * (s - 10) / 90))) for s in range(100)]
    np.testing.assert_allclose(sizes, expected, rtol=1e-5, atol=1e-6)


def test_a_killed_run_resumes_with_nothing_lost(tmp_path):
    """SIGKILL a training process after its first checkpoint; the resumed run equals an uninterrupted one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "killed"
    args = [sys.executable, os.path.join(HERE, "tiny_run.py"), str(out), "--steps", "400",
            "--checkpoint-every", "40", "--steps-per-call", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert 40 <= killed_at < 400, "the run must be killed mid-way"
    loss_fn, sample, task, cfg, params = tiny_setup(steps=400, checkpoint_every=40, steps_per_call=1)
    resumed = train(loss_fn, sample, task, cfg, params, out_dir=str(out), progress=False)
    straight = train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "straight"), progress=False)
    # exact: both runs execute the same compiled one-step program (steps_per_call=1) on the same inputs
    np.testing.assert_array_equal(_losses(resumed), _losses(straight))
    _assert_params_close(resumed.state.params, straight.state.params, rtol=0, atol=0)
    assert [r["step"] for r in resumed.train_rows] == list(range(400))


RESERVED = "loss, grad_norm, grad_rms, param_rms, update_rms, update_ratio, lr, stopped, ok, step, split, member"


@pytest.mark.parametrize("name", ["loss", "stopped", "step"])
def test_an_aux_value_named_like_an_engine_metric_is_refused_before_the_first_step(tmp_path, name):
    """A regularised loss returning (mse + reg, {"loss": mse}) logged the mse as the loss, and the non-finite check
    read it; an aux "stopped" was popped as the stop flag, an aux "step" replaced the row's step."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=5)
    with pytest.raises(ConfigError, match=re.escape(f"loss_fn's aux values: {name!r} is a name the engine logs its own "
                                                    f"values under; rename it (reserved: {RESERVED})")):
        train(lambda p, batch: (loss_fn(p, batch)[0], {name: 1.0}), sample, task, cfg, params,
              out_dir=str(tmp_path), progress=False)
    assert CheckpointStore(str(tmp_path / "checkpoints")).steps() == []  # refused when the step was traced


def test_an_aux_value_or_evaluation_that_is_not_a_scalar_is_refused_naming_it_and_its_shape(tmp_path):
    """A per-position error [6] as an aux value or an evaluation raised "TypeError: only 0-dimensional arrays can be
    converted to Python scalars", naming no metric; an evaluation named "step" replaced the row's step."""
    loss_fn, sample, task, cfg, params = tiny_setup(steps=5)
    shape = "'per_position' has shape (6,), but each metric is a scalar (one number per step in metrics.jsonl)"
    with pytest.raises(ConfigError, match=re.escape(f"loss_fn's aux values: {shape}")):
        train(lambda p, batch: (loss_fn(p, batch)[0], {"per_position": jnp.mean(batch.targets ** 2, axis=0)}),
              sample, task, cfg, params, progress=False)
    with pytest.raises(ConfigError, match=re.escape(f"evaluate: {shape}")):
        train(loss_fn, sample, task, cfg, params, evaluate=lambda p: {"per_position": jnp.zeros(6)},
              out_dir=str(tmp_path), progress=False)
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == []  # refused at step 0, before any step ran
    with pytest.raises(ConfigError, match=re.escape("evaluate: 'step' is a name the engine logs its own values under; "
                                                    "rename it (reserved: step, split, member)")):
        train(loss_fn, sample, task, cfg, params, evaluate=lambda p: {"step": 1.0}, progress=False)


def test_a_batchless_objective_trains_through_the_engine_and_logs_the_step_metrics(tmp_path):
    """SGD on 1/2 |A w - c|^2 with no sampled batch: lr, gradient / parameter / update RMS against numpy."""
    a = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32) / 8
    c = np.ones(32, np.float32)

    def loss_fn(params, batch):
        assert batch is None
        return 0.5 * jnp.sum((a @ params["w"] - c) ** 2), {}

    cfg = TrainConfig(steps=6, optimizer="sgd", lr=0.1, schedule="warmup_cosine", warmup_steps=2, steps_per_call=3,
                      log_every=1, checkpoint_every=3)
    result = train(loss_fn, None, None, cfg, {"w": jnp.zeros(32)}, out_dir=str(tmp_path), progress=False)
    w = np.zeros(32)
    for row in result.train_rows:
        s = row["step"]
        lr = 0.1 * (s / 2 if s < 2 else 0.5 * (1 + np.cos(np.pi * (s - 2) / 4)))
        g = a.T @ (a @ w - c)
        new = w - lr * g
        rms = lambda v: np.sqrt(np.mean(v**2))  # noqa: E731
        # float32 arithmetic in the engine vs float64 here
        np.testing.assert_allclose([row["loss"], row["lr"], row["grad_rms"], row["param_rms"], row["update_rms"]],
                                   [0.5 * np.sum((a @ w - c) ** 2), lr, rms(g), rms(new), rms(new - w)],
                                   rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(row["update_ratio"], rms(new - w) / max(rms(new), 1e-30), rtol=2e-5)
        w = new
    assert [r["step"] for r in result.train_rows] == list(range(6))
    # the cost of one step from XLA: at least the forward and backward matrix-vector products
    assert result.info["flops_per_step"] >= 2 * 2 * 32 * 32
    assert json.loads((tmp_path / "run.json").read_text()) == result.info
    assert CheckpointStore(str(tmp_path / "checkpoints")).config()["task"] == {}


def _halving_loss(params, batch):
    """1/2 |w - 1|^2: GD with lr 0.5 from w = 0 in 8 dimensions halves the error each step, so the loss at step k is
    4 * 0.25^k, first below 1e-3 at k = 6 (0.00098; k = 5 gives 0.0039)."""
    return 0.5 * jnp.sum((params["w"] - 1.0) ** 2), {}


def test_stop_loss_ends_the_run_at_the_first_step_below_it_and_a_rerun_changes_nothing(tmp_path):
    """The loss first falls below 1e-3 at step 6 (_halving_loss)."""
    cfg = TrainConfig(steps=50, optimizer="sgd", lr=0.5, stop_loss=1e-3, steps_per_call=4, log_every=10,
                      checkpoint_every=8)
    evaluate = jax.jit(lambda p: {"w0": p["w"][0]})
    kw = dict(evaluate=evaluate, eval_every=8, progress=False)
    result = train(_halving_loss, None, None, cfg, {"w": jnp.zeros(8)}, out_dir=str(tmp_path), **kw)
    expected = [4 * 0.25**k for k in range(7)]
    assert int(result.state.step) == 6
    assert [r["step"] for r in result.train_rows] == [0, 6]  # logged every 10 steps, and the stopping step
    np.testing.assert_allclose(result.train_rows[-1]["loss"], expected[6], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(result.state.params["w"]), 1 - 0.5**6, rtol=1e-6)  # w_6: not updated again
    stopping = result.train_rows[-1]  # describes the step as it ended: no update, w_6 kept
    assert stopping["update_rms"] == 0 and stopping["update_ratio"] == 0
    np.testing.assert_allclose(stopping["param_rms"], 1 - 0.5**6, rtol=1e-6)
    np.testing.assert_allclose(stopping["grad_norm"], np.sqrt(8) * 0.5**6, rtol=1e-5)  # |w_6 - 1| in 8 dimensions
    assert [r["step"] for r in result.eval_rows] == [0, 6]
    assert CheckpointStore(str(tmp_path / "checkpoints")).steps() == [6]
    rows = lambda: sorted(read_metrics(str(tmp_path / "metrics.jsonl")), key=lambda r: (r["step"], r["split"]))  # noqa: E731
    before = rows()
    again = train(_halving_loss, None, None, cfg, {"w": jnp.zeros(8)}, out_dir=str(tmp_path), **kw)
    # the same rows; the stopping step's train row is re-logged by another program (a 2-step chunk from step 6, not
    # the 4-step one): equal only as every value is exact in float32 (w_6 = 63/64, loss 2^-10) or the sqrt of one
    assert int(again.state.step) == 6 and rows() == before


def test_a_stop_on_an_evaluation_step_evaluates_and_saves_once_and_a_resumed_run_writes_the_same_file(
        tmp_path, monkeypatch):
    """The run stops at step 6 (_halving_loss), where it evaluates and checkpoints anyway: one eval row and one save
    there. A run trained for 3 steps and then resumed for 50 leaves the same metrics.jsonl (its forced train row
    at step 2 goes). Every chunk is the same one-step program, so the rows are equal exactly."""
    saved, save = [], CheckpointStore.save
    monkeypatch.setattr(CheckpointStore, "save", lambda self, state, step=None: (
        saved.append(int(state.step)), save(self, state, step))[1])
    cfg = TrainConfig(steps=50, optimizer="sgd", lr=0.5, stop_loss=1e-3, steps_per_call=1, log_every=10,
                      checkpoint_every=3)
    kw = dict(evaluate=jax.jit(lambda p: {"w0": p["w"][0]}), eval_every=3, progress=False)
    result = train(_halving_loss, None, None, cfg, {"w": jnp.zeros(8)}, out_dir=str(tmp_path / "a"), **kw)
    assert int(result.state.step) == 6 and saved == [3, 6]
    assert [r["step"] for r in result.eval_rows] == [0, 3, 6] and [r["step"] for r in result.train_rows] == [0, 6]
    short = dataclasses.replace(cfg, steps=3)
    train(_halving_loss, None, None, short, {"w": jnp.zeros(8)}, out_dir=str(tmp_path / "b"), **kw)
    train(_halving_loss, None, None, cfg, {"w": jnp.zeros(8)}, out_dir=str(tmp_path / "b"), **kw)
    assert read_metrics(str(tmp_path / "b" / "metrics.jsonl")) == read_metrics(str(tmp_path / "a" / "metrics.jsonl"))


def test_resuming_with_more_steps_writes_the_metrics_of_a_straight_run_of_the_new_length(tmp_path, monkeypatch):
    """7 steps, then resumed to 12: the 7-step run's forced rows (train at step 6, its final eval at 7) are not rows
    of a 12-step run (log_every=5, eval_every=5) and go; exact, as every chunk is the same one-step program. They go
    once the longer run saves a checkpoint: stopped (Ctrl-C) as it saved its first, having written every row of its
    own, it had already deleted them, and the 7-step command, which still finds its run finished, left them out."""
    cfg = TrainConfig(steps=12, optimizer="sgd", lr=0.1, steps_per_call=1, log_every=5)
    kw = dict(evaluate=jax.jit(lambda p: {"w0": p["w"][0]}), eval_every=5, progress=False)
    straight = train(_halving_loss, None, None, cfg, {"w": jnp.zeros(8)}, out_dir=str(tmp_path / "a"), **kw)
    assert [r["step"] for r in straight.train_rows] == [0, 5, 10, 11]
    assert [r["step"] for r in straight.eval_rows] == [0, 5, 10, 12]
    short = train(_halving_loss, None, None, dataclasses.replace(cfg, steps=7), {"w": jnp.zeros(8)},
                  out_dir=str(tmp_path / "b"), **kw)
    assert [r["step"] for r in short.train_rows] == [0, 5, 6] and [r["step"] for r in short.eval_rows] == [0, 5, 7]
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(CheckpointStore, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        train(_halving_loss, None, None, cfg, {"w": jnp.zeros(8)}, out_dir=str(tmp_path / "b"), **kw)
    assert [r["step"] for r in read_metrics(str(tmp_path / "b" / "metrics.jsonl"), "eval")] == [0, 5, 7, 10, 12]
    again = train(_halving_loss, None, None, dataclasses.replace(cfg, steps=7), {"w": jnp.zeros(8)},
                  out_dir=str(tmp_path / "b"), **kw)
    assert (again.train_rows, again.eval_rows) == (short.train_rows, short.eval_rows)
    train(_halving_loss, None, None, cfg, {"w": jnp.zeros(8)}, out_dir=str(tmp_path / "b"), **kw)
    assert read_metrics(str(tmp_path / "b" / "metrics.jsonl")) == read_metrics(str(tmp_path / "a" / "metrics.jsonl"))


def test_an_extended_run_reruns_as_the_extended_command_and_is_refused_as_the_first(tmp_path):
    """7 steps, then extended to 12: the extension's checkpoints are stored under train.steps=12, so its command
    reruns (restores step 12, trains nothing, leaves the file as it was) and the 7-step command is refused."""
    cfg = TrainConfig(steps=12, optimizer="sgd", lr=0.1, steps_per_call=5, checkpoint_every=5, log_every=1)
    out, w = str(tmp_path), {"w": jnp.zeros(8)}
    train(_halving_loss, None, None, dataclasses.replace(cfg, steps=7), w, out_dir=out, progress=False)
    extended = train(_halving_loss, None, None, cfg, w, out_dir=out, progress=False)
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    assert store.steps() == [7, 10, 12] and store.config()["train"]["steps"] == 12
    store.close()
    again = train(_halving_loss, None, None, cfg, w, out_dir=out, progress=False)
    assert int(again.state.step) == 12 and [r["step"] for r in again.train_rows] == list(range(12))
    np.testing.assert_array_equal(again.state.params["w"], extended.state.params["w"])
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == rows
    with pytest.raises(ConfigError, match=r"step 12, past train.steps=7; use train.steps=12 \(the checkpoint's run\)"):
        train(_halving_loss, None, None, dataclasses.replace(cfg, steps=7), w, out_dir=out, progress=False)


def _gpt_setup(steps: int, **kw):
    """A 2-layer GPT on affine recurrences, trained with Adam: its steps round otherwise in another compiled program
    (a lax.scan of one step, whose loop XLA removes, changed the losses of the steps after it by 2e-7 relative)."""
    from jaxicl.models.gpt import GPT
    from jaxicl.tasks import affine_recurrence as ar

    graphdef, params = nnx.split(GPT(d_model=16, n_layers=2, n_heads=2, max_len=8, input_dim=1, rngs=nnx.Rngs(0)))
    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-2, optimizer="adam", steps_per_call=4, log_every=1, **kw)
    return regression_loss(graphdef), ar.sample, ar.AffineRecurrence(seq_len=8), cfg, params


def test_an_extended_run_equals_a_straight_one_bit_for_bit_through_one_compiled_chunk_program(tmp_path,
                                                                                              chunk_compiles):
    """10 steps in chunks of 4, 4, 2 against 5 steps (4, 1) extended to 10 (3, 2): each run compiles one chunk
    program, whose trip count is an argument, so every step of the three runs is the same compiled step. Chunks
    compiled per length (a lax.scan) compiled 2 per run, and the 1-step one rounded otherwise."""
    loss_fn, sample, task, cfg, params = _gpt_setup(steps=10)
    straight = train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "a"), progress=False)
    train(loss_fn, sample, task, dataclasses.replace(cfg, steps=5), params, out_dir=str(tmp_path / "b"),
          progress=False)
    extended = train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "b"), progress=False)
    np.testing.assert_array_equal(_losses(extended), _losses(straight))
    _assert_params_close(extended.state.params, straight.state.params, rtol=0, atol=0)
    assert read_metrics(str(tmp_path / "a" / "metrics.jsonl")) == read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
    assert len(chunk_compiles) == 3  # one per run


def test_evaluations_and_checkpoints_leave_the_training_steps_bit_for_bit_as_they_were(tmp_path, chunk_compiles):
    """Evaluations after steps 1 and 5 cut the 8 steps into chunks of 1, 3, 1, 3 and checkpoints every 5 steps into 4,
    1, 3, where a run without them takes 4, 4: the same losses and parameters, exactly (one compiled program runs
    chunks of every length)."""
    loss_fn, sample, task, cfg, params = _gpt_setup(steps=8)
    plain = train(loss_fn, sample, task, cfg, params, progress=False)
    evaluated = train(loss_fn, sample, task, cfg, params, evaluate=lambda p: {"zero": 0.0}, eval_every=(1, 5),
                      progress=False)
    saved = train(loss_fn, sample, task, dataclasses.replace(cfg, checkpoint_every=5), params, out_dir=str(tmp_path),
                  progress=False)
    assert [r["step"] for r in evaluated.eval_rows] == [0, 1, 5, 8]
    assert CheckpointStore(str(tmp_path / "checkpoints")).steps() == [5, 8]
    for run in (evaluated, saved):
        np.testing.assert_array_equal(_losses(run), _losses(plain))
        _assert_params_close(run.state.params, plain.state.params, rtol=0, atol=0)
    assert len(chunk_compiles) == 3  # one per run


def test_a_rerun_of_a_finished_run_keeps_the_flops_per_step_of_run_json(tmp_path):
    """The rerun restores the final state and compiles no chunk (XLA's count needs one): run.json keeps the count."""
    cfg = TrainConfig(steps=4, optimizer="sgd", lr=0.1, steps_per_call=2)
    first = train(_halving_loss, None, None, cfg, {"w": jnp.zeros(8)}, out_dir=str(tmp_path), progress=False)
    again = train(_halving_loss, None, None, cfg, {"w": jnp.zeros(8)}, out_dir=str(tmp_path), progress=False)
    assert first.info["flops_per_step"] > 0 and again.info == first.info
    assert json.loads((tmp_path / "run.json").read_text()) == first.info


def test_a_rerun_of_a_run_stopped_before_its_run_json_writes_the_flops_per_step_of_an_uninterrupted_run(
        tmp_path, monkeypatch, chunk_compiles):
    """A run stopped between its final checkpoint and run.json (here: Ctrl-C in that write) left no FLOP count, and
    its rerun, which finds the run finished and compiles no chunk, wrote flops_per_step None. It lowers the chunk (no
    compile) and writes an uninterrupted run's count: the same program, so the same number."""
    from jaxicl import outputs

    loss_fn, sample, task, cfg, params = tiny_setup(steps=4, steps_per_call=2)
    whole = train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "whole"), progress=False)
    write_json = outputs.write_json

    def stopped_at_run_json(path, *args, **kw):
        if os.path.basename(path) == "run.json":
            raise KeyboardInterrupt
        write_json(path, *args, **kw)

    monkeypatch.setattr(outputs, "write_json", stopped_at_run_json)
    with pytest.raises(KeyboardInterrupt):
        train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "stopped"), progress=False)
    monkeypatch.setattr(outputs, "write_json", write_json)
    assert CheckpointStore(str(tmp_path / "stopped" / "checkpoints")).steps() == [4]
    assert not (tmp_path / "stopped" / "run.json").exists()
    again = train(loss_fn, sample, task, cfg, params, out_dir=str(tmp_path / "stopped"), progress=False)
    assert len(chunk_compiles) == 2  # the first two runs': the rerun trained nothing
    assert whole.info["flops_per_step"] > 0 and again.info == whole.info
    assert json.loads((tmp_path / "stopped" / "run.json").read_text()) == whole.info


def test_run_json_records_the_backend_and_device_kind_and_a_resume_on_another_device_goes_on(tmp_path, monkeypatch):
    """The stored config alone could not tell a run on a GPU (TF32 products under JAX's default precision) from one
    on a CPU; run.json now says where it trained, and the resume check (the stored config) still ignores it."""
    cfg = TrainConfig(steps=4, optimizer="sgd", lr=0.1, steps_per_call=2, log_every=1)
    first = train(_halving_loss, None, None, cfg, {"w": jnp.zeros(8)}, out_dir=str(tmp_path), progress=False)
    assert (first.info["devices"], first.info["backend"], first.info["device_kind"]) == (4, "cpu", "cpu")
    monkeypatch.setattr(type(jax.devices()[0]), "device_kind", property(lambda d: "NVIDIA H100 80GB HBM3"))
    longer = train(_halving_loss, None, None, dataclasses.replace(cfg, steps=6), {"w": jnp.zeros(8)},
                   out_dir=str(tmp_path), progress=False)
    assert [r["step"] for r in longer.train_rows] == list(range(6))  # resumed at step 4, not refused
    assert json.loads((tmp_path / "run.json").read_text())["device_kind"] == "NVIDIA H100 80GB HBM3"
    stored = CheckpointStore(str(tmp_path / "checkpoints")).config()
    assert stored.keys() == {"train", "task", "matmul_precision", "eval_every"}


def test_evaluations_at_listed_steps_run_there_and_at_the_ends():
    loss_fn, sample, task, cfg, params = tiny_setup(steps=12, steps_per_call=5)
    seen = []

    def evaluate(p):
        seen.append(p)
        return {"n": len(seen)}

    result = train(loss_fn, sample, task, cfg, params, evaluate=evaluate, eval_every=(3, 7, 10), progress=False)
    assert [r["step"] for r in result.eval_rows] == [0, 3, 7, 10, 12]
    assert [r["n"] for r in result.eval_rows] == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match=r"evaluation steps must be integers in \[1, 12\], got \[0, 13\]"):
        train(loss_fn, sample, task, cfg, params, evaluate=evaluate, eval_every=(0, 5, 13), progress=False)


def test_cross_entropy_loss_against_a_numpy_log_softmax():
    from flax import nnx

    from jaxicl.models.gpt import GPT
    from jaxicl.prompt import Prompt
    from jaxicl.train import cross_entropy_loss

    model = GPT(d_model=8, n_layers=1, n_heads=2, vocab_size=7, max_len=5, init_std=0.5, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    batch = Prompt(inputs=jnp.asarray(rng.integers(0, 7, (3, 5))), targets=jnp.asarray(rng.integers(0, 7, (3, 5))),
                   mask=jnp.asarray(rng.random((3, 5)) < 0.6, jnp.float32))
    loss, aux = cross_entropy_loss(graphdef)(params, batch)
    logits = np.asarray(jax.vmap(model)(batch.inputs), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    t, m = np.asarray(batch.targets), np.asarray(batch.mask)
    nll = -np.take_along_axis(logp, t[..., None], -1)[..., 0]
    per_prompt = lambda v: np.mean((m * v).sum(-1) / np.maximum(m.sum(-1), 1e-12))  # noqa: E731
    np.testing.assert_allclose(float(loss), per_prompt(nll), rtol=1e-5)
    np.testing.assert_allclose(float(aux["accuracy"]), per_prompt(logits.argmax(-1) == t), rtol=1e-6)


def test_regression_losses_refuse_predictions_and_targets_of_different_shapes():
    """A one-coordinate readout gives [B, T]; against targets [B, T, 1] with B == T it broadcast to [B, T, T] and
    reported 8x the true MSE. Both losses now refuse it, naming both shapes; targets [B, T] give the numpy MSE. The
    hint covers both directions: it told a model with K outputs against targets [B, T] to sample targets [T]."""
    from flax import nnx

    from jaxicl.models import predictor
    from jaxicl.models.gpt import GPT
    from jaxicl.prompt import Prompt
    from jaxicl.train import per_position_loss

    graphdef, params = nnx.split(GPT(d_model=8, n_layers=1, n_heads=2, max_len=4, input_dim=1, rngs=nnx.Rngs(0)),
                                 nnx.Param)
    rng = np.random.default_rng(0)
    inputs, targets = (jnp.asarray(rng.normal(size=(4, 4, 1)), jnp.float32) for _ in range(2))
    wrong = Prompt(inputs=inputs, targets=targets, mask=jnp.ones((4, 4)))
    hint = ("must have the same shape, [B, T] or [B, T, K] (predictions [B, T, K] against targets [B, T]: give the "
            "model one output coordinate, e.g. GPT(out_dim=1), whose readout is [B, T]; predictions [B, T] against "
            "targets [B, T, 1]: sample targets [T])")
    message = re.escape(f"the model's predictions (4, 4) and the batch's targets (4, 4, 1) {hint}")
    with pytest.raises(ValueError, match=message):
        regression_loss(graphdef)(params, wrong)
    with pytest.raises(ValueError, match=message):
        per_position_loss(graphdef, params, wrong)
    three, three_params = nnx.split(GPT(d_model=8, n_layers=1, n_heads=2, max_len=4, input_dim=1, out_dim=3,
                                        rngs=nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match=re.escape(f"the model's predictions (4, 4, 3) and the batch's targets (4, 4) "
                                                   f"{hint}")):
        regression_loss(three)(three_params, dataclasses.replace(wrong, targets=targets[..., 0]))
    right = dataclasses.replace(wrong, targets=targets[..., 0])
    err = (np.asarray(jax.vmap(predictor(graphdef, params))(inputs), np.float64) - np.asarray(targets[..., 0])) ** 2
    # float32 model outputs and sums of 16 terms: a relative error of a few float32 ulps
    np.testing.assert_allclose(float(regression_loss(graphdef)(params, right)[0]), err.mean(), rtol=1e-6)
    np.testing.assert_allclose(per_position_loss(graphdef, params, right), err.mean(0), rtol=1e-6)


def test_a_dict_task_config_is_stored_as_given_and_other_non_dataclasses_are_refused(tmp_path):
    """A sampler may take any config: a dict one trained (it failed in dataclasses.asdict) and is stored as given, so a
    resume with another value is refused naming the field; what the stored config cannot hold is refused up front."""
    from jaxicl.prompt import Prompt

    def sample(cfg, key):
        x = jax.random.normal(key, (4,))
        return Prompt(inputs=x, targets=cfg["scale"] * x, mask=jnp.ones(4))

    def loss_fn(params, batch):
        return jnp.mean((params["w"] * batch.inputs - batch.targets) ** 2), {}

    cfg, params = TrainConfig(steps=2, batch_size=8, log_every=1), {"w": jnp.zeros(())}
    train(loss_fn, sample, {"scale": 2.0}, cfg, params, out_dir=str(tmp_path), progress=False)
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    assert store.config()["task"] == {"scale": 2.0}
    store.close()
    with pytest.raises(ConfigError, match=r"task\.scale: checkpoint 2\.0 vs now 3\.0"):
        train(loss_fn, sample, {"scale": 3.0}, cfg, params, out_dir=str(tmp_path), progress=False)
    refused = "task_cfg must be a dataclass instance, a dict or None (the sampler's first argument, stored with the "
    with pytest.raises(ConfigError, match=re.escape(refused + "run's config), got list")):
        train(loss_fn, lambda c, key: sample({"scale": c[0]}, key), [2.0], cfg, params, progress=False)


def test_the_engine_passes_the_step_to_a_sampler_that_takes_it():
    """A curriculum's sampler gets the step of the batch it draws: here its target is the step, so each logged loss
    (the mean target, through a parameter that is not updated: lr 0) is that step, across chunks and on 4 devices."""
    from jaxicl.prompt import Prompt

    def sample(cfg, key, step):
        del cfg
        return Prompt(inputs=jax.random.normal(key, (1,)), targets=jnp.full((1,), step, jnp.float32),
                      mask=jnp.ones(1))

    def loss_fn(params, batch):
        return jnp.mean(batch.targets) + 0.0 * params["w"], {}

    cfg = TrainConfig(steps=7, batch_size=8, optimizer="sgd", lr=1e-9, steps_per_call=3, log_every=1)
    result = train(loss_fn, sample, None, cfg, {"w": jnp.zeros(())}, progress=False)
    np.testing.assert_array_equal(_losses(result), np.arange(7))


def test_a_run_keeps_what_its_checkpoint_directory_holds_without_a_stored_config(tmp_path):
    """A store that finds no checkpoint and another config takes the directory for a stopped run's and clears it; a
    directory with no stored config (here a sweep's chunk directory) is not such a run's and stays."""
    held = tmp_path / "checkpoints" / "chunk0"
    held.mkdir(parents=True)
    (held / "note").write_text("a sweep's")
    cfg = TrainConfig(steps=2, optimizer="sgd", lr=0.1, steps_per_call=1)
    train(_halving_loss, None, None, cfg, {"w": jnp.zeros(8)}, out_dir=str(tmp_path), progress=False)
    assert (held / "note").read_text() == "a sweep's"
    assert CheckpointStore(str(tmp_path / "checkpoints")).steps() == [2]


def test_kept_on_resume_keeps_the_rows_an_uninterrupted_run_writes_before_the_resume_step():
    """steps 10, log_every 4: a straight run logs steps 0, 4, 8 and its last, 9; evaluations every 3 steps (or at
    step 5) and at the end. A resume keeps the rows before its step and the evaluation at it if the schedule or
    the end has one there (an earlier shorter run's final evaluation goes); a start from 0 keeps nothing."""
    from jaxicl.train.metrics import kept_on_resume

    cfg = TrainConfig(steps=10, log_every=4)

    def kept(split, resume, schedule):
        return [s for s in range(11) if kept_on_resume({"step": s, "split": split}, resume, cfg, schedule)]

    assert [kept("train", r, 3) for r in (0, 6, 10)] == [[], [0, 4], [0, 4, 8, 9]]
    assert [kept("eval", r, 3) for r in (0, 5, 6)] == [[], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
    assert kept("eval", 6, (5,)) == [0, 1, 2, 3, 4, 5] and kept("eval", 10, (5,)) == list(range(11))


def test_an_evaluation_schedule_may_list_any_step_from_1_to_the_last():
    from jaxicl.train.chunks import check_eval_schedule

    check_eval_schedule((1, 5, 10), 10)
    check_eval_schedule(0, 10)
    for bad in ((0, 5), (5, 11), -1, 2.5):
        with pytest.raises(ConfigError, match="eval_every"):
            check_eval_schedule(bad, 10)
