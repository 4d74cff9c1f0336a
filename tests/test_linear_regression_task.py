import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxicl.models import SelfAttention
from jaxicl.prng import PRNG_IMPLS
from jaxicl.tasks import linear_regression as lr
from jaxicl.tasks import sample_batch
from jaxicl.tasks.batching import POOL_STREAM
from jaxicl.train import data_mesh, sweep_mesh
from jaxicl.validation import ConfigError


@pytest.mark.parametrize("prng_impl", PRNG_IMPLS)
@pytest.mark.parametrize("fmt,seq_len", [("paired", 9), ("interleaved", 17)])
def test_shapes_dtypes_and_determinism(fmt, seq_len, prng_impl):
    cfg = lr.LinearRegression(dim=5, n_context=8, format=fmt)
    b1 = sample_batch(lr.sample, cfg, jax.random.key(0, impl=prng_impl), 32)
    b2 = sample_batch(lr.sample, cfg, jax.random.key(0, impl=prng_impl), 32)
    b3 = sample_batch(lr.sample, cfg, jax.random.key(1, impl=prng_impl), 32)
    assert b1.inputs.shape == (32, seq_len, 6) and b1.inputs.dtype == jnp.float32
    assert b1.targets.shape == (32, seq_len) and b1.mask.shape == (32, seq_len)
    assert b1.info["w"].shape == (32, 5) and b1.info["x"].shape == (32, 9, 5)
    np.testing.assert_array_equal(b1.inputs, b2.inputs)  # the same compiled program on the same key
    assert not np.allclose(b1.inputs, b3.inputs)


@pytest.mark.parametrize("prng_impl", PRNG_IMPLS)
def test_x_statistics_match_covariance(prng_impl):
    cov_diag = (1.0, 4.0, 0.25)
    cfg = lr.LinearRegression(dim=3, n_context=4, x_scale=2.0, x_cov_diag=cov_diag)
    x = np.asarray(sample_batch(lr.sample, cfg, jax.random.key(3, impl=prng_impl), 40000).info["x"]).reshape(-1, 3)
    expected = 4.0 * np.diag(cov_diag)
    n = x.shape[0]
    assert np.all(np.abs(x.mean(0)) < 5 * np.sqrt(np.diag(expected) / n))
    np.testing.assert_allclose(np.cov(x.T), expected, atol=0.05 * expected.max())


def test_inputs_scale_by_the_float64_square_root_of_their_covariance_under_x64(x64):
    # sqrt(x_cov) was taken in float32 in every mode: x 4e-8 relative off in a float64 run
    key = jax.random.key(0)
    x = lr.sample(lr.LinearRegression(dim=2, n_context=4, x_cov_diag=(0.1, 0.3)), key).info["x"]
    unit = lr.sample(lr.LinearRegression(dim=2, n_context=4), key).info["x"]  # the same draw, covariance I
    assert x.dtype == jnp.float64
    # each side rounds the square root and the product once (correctly rounded in IEEE): within 2 ulp
    np.testing.assert_allclose(x, np.asarray(unit) * np.sqrt([0.1, 0.3]), rtol=5e-16)


def test_x_cov_diag_given_as_a_list_or_numpy_array_is_the_config_of_the_tuple():
    """A numpy array raised "truth value of an array ... is ambiguous" in the config check; a list left the config
    unhashable (jit static arguments, sweep keys)."""
    configs = [lr.LinearRegression(dim=3, n_context=4, x_cov_diag=v)
               for v in ((1.0, 2.0, 3.0), [1.0, 2.0, 3.0], np.array([1.0, 2.0, 3.0]), np.array([1, 2, 3]))]
    want = sample_batch(lr.sample, configs[0], jax.random.key(0), 8)
    for cfg in configs:
        assert cfg == configs[0] and hash(cfg) == hash(configs[0])
        assert type(cfg.x_cov_diag) is tuple and all(type(v) is float for v in cfg.x_cov_diag)
        for a, b in zip(jax.tree.leaves(sample_batch(lr.sample, cfg, jax.random.key(0), 8)), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)  # one config, one program
    with pytest.raises(ConfigError, match=r"^x_cov_diag must be a sequence of dim=3 numbers or empty, got 2\.0$"):
        lr.LinearRegression(dim=3, x_cov_diag=2.0)


@pytest.mark.parametrize("prng_impl", PRNG_IMPLS)
def test_uniform_inputs_fill_their_box_with_a_third_of_its_squared_half_width_as_variance(prng_impl):
    cfg = lr.LinearRegression(dim=3, n_context=4, x_scale=2.0, x_cov_diag=(1.0, 4.0, 0.25), x_dist="uniform")
    x = np.asarray(sample_batch(lr.sample, cfg, jax.random.key(3, impl=prng_impl), 40000).info["x"]).reshape(-1, 3)
    half_width = 2.0 * np.sqrt([1.0, 4.0, 0.25])  # x_scale sqrt(x_cov_diag) U(-1, 1)
    assert np.all(np.abs(x) <= half_width * (1 + 1e-6)) and np.all(np.abs(x).max(0) > 0.999 * half_width)
    np.testing.assert_allclose(cfg.x_cov, half_width**2 / 3, rtol=1e-12)
    np.testing.assert_allclose(np.cov(x.T), np.diag(cfg.x_cov), atol=0.05 * cfg.x_cov.max())
    kurtosis = (x**4).mean(0) / (x**2).mean(0) ** 2  # 9/5 for a uniform coordinate (3 for a Gaussian one)
    np.testing.assert_allclose(kurtosis, lr.KURTOSIS["uniform"], rtol=0.03)  # ~0.4% standard error at 160k draws
    with pytest.raises(ConfigError, match="x_dist must be one of"):
        lr.LinearRegression(x_dist="laplace")


@pytest.mark.parametrize("prng_impl", PRNG_IMPLS)
def test_w_statistics_and_noise_free_labels(prng_impl):
    cfg = lr.LinearRegression(dim=4, n_context=6, w_scale=0.5)
    b = sample_batch(lr.sample, cfg, jax.random.key(4, impl=prng_impl), 20000)
    w = np.asarray(b.info["w"])
    np.testing.assert_allclose(np.cov(w.T), 0.25 * np.eye(4), atol=0.01)
    y = np.einsum("bnd,bd->bn", np.asarray(b.info["x"]), w)
    np.testing.assert_allclose(b.info["y"], y, rtol=1e-5, atol=1e-5)
    # paired tokens hold [x; y] with the query label hidden; the target is the query label
    np.testing.assert_allclose(b.inputs[:, :-1, -1], y[:, :-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(b.inputs[:, -1, -1], 0.0)
    np.testing.assert_allclose(b.targets[:, -1], y[:, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(b.mask[0], np.eye(7)[-1])


@pytest.mark.parametrize("prng_impl", PRNG_IMPLS)
def test_noise_has_the_requested_std(prng_impl):
    cfg = lr.LinearRegression(dim=3, n_context=5, noise_std=0.3)
    b = sample_batch(lr.sample, cfg, jax.random.key(5, impl=prng_impl), 20000)
    resid = np.asarray(b.info["y"]) - np.einsum("bnd,bd->bn", b.info["x"], b.info["w"])
    assert abs(resid.std() - 0.3) < 0.005


def test_interleaved_tokens_decode_to_the_pairs():
    cfg = lr.LinearRegression(dim=3, n_context=4, format="interleaved", loss_on="all")
    p = lr.sample(cfg, jax.random.key(6))
    x, y = lr.decode(cfg, p.inputs)
    np.testing.assert_allclose(x, p.info["x"])
    np.testing.assert_allclose(y[:-1], p.info["y"][:-1])
    assert y[-1] == 0.0
    pos = lr.prediction_positions(cfg)
    np.testing.assert_array_equal(pos, [0, 2, 4, 6, 8])
    np.testing.assert_allclose(p.targets[pos], p.info["y"])
    np.testing.assert_array_equal(p.mask, np.isin(np.arange(9), pos).astype(float))
    np.testing.assert_array_equal(p.inputs[1::2, :-1], 0.0)  # label tokens carry no x


def test_finite_pool_draws_only_pool_vectors():
    cfg = lr.LinearRegression(dim=3, n_context=2, n_tasks=4, pool_seed=7)
    w = np.asarray(sample_batch(lr.sample, cfg, jax.random.key(8), 400).info["w"])
    unique = np.unique(w.round(6), axis=0)
    assert len(unique) == 4
    stream = jax.random.fold_in(jax.random.key(7), POOL_STREAM)
    pool = np.stack([jax.random.normal(jax.random.fold_in(stream, i), (3,)) for i in range(4)])
    np.testing.assert_allclose(lr.task_pool(cfg), pool, rtol=1e-6)
    np.testing.assert_allclose(np.sort(unique, axis=0), np.sort(pool, axis=0), rtol=1e-5)


def test_the_pool_is_not_the_initial_weights_of_a_model_built_with_the_same_seed():
    """nnx.Rngs(0) draws its i-th parameter from fold_in(key(0), i); a pool with pool_seed=0 must not reuse those
    keys (it did: each [2, 4, 4] weight of SelfAttention was 0.1 x a pool vector of dim 32). The pool stays a
    function of pool_seed alone, and a pool of n tasks is the first n rows of a larger one."""
    model = SelfAttention(4, num_heads=2, init_scale=0.1, rngs=nnx.Rngs(0))
    leaves = [np.asarray(x).ravel() / 0.1 for x in jax.tree.leaves(nnx.split(model)[1])]
    cfg = lr.LinearRegression(dim=leaves[0].size, n_context=2, n_tasks=16)
    pool = np.asarray(lr.task_pool(cfg))
    # independent N(0, 1) vectors of 32 entries: |correlation| above 0.8 has probability ~1e-8 per pair
    corr = np.corrcoef(np.concatenate([pool, np.stack(leaves)]))[:16, 16:]
    assert np.abs(corr).max() < 0.8
    # another program (32 rows): the same bits, normals equal up to the transform's rounding in another fusion
    np.testing.assert_allclose(lr.task_pool(dataclasses.replace(cfg, n_tasks=32))[:16], pool, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(lr.task_pool(cfg), pool)
    assert not np.allclose(lr.task_pool(dataclasses.replace(cfg, pool_seed=1)), pool)


@pytest.mark.parametrize("kwargs,field", [
    ({"dim": 0}, "dim"), ({"n_context": -1}, "n_context"), ({"noise_std": -0.1}, "noise_std"),
    ({"format": "bogus"}, "format"), ({"loss_on": "middle"}, "loss_on"), ({"n_tasks": -2}, "n_tasks")])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        lr.LinearRegression(**kwargs)


def test_paired_tokens_refuse_a_loss_on_every_pair_since_each_carries_its_own_label():
    with pytest.raises(ConfigError, match="loss_on='all' needs format='interleaved'"):
        lr.LinearRegression(format="paired", loss_on="all")
    prompt = lr.sample(lr.LinearRegression(dim=3, n_context=4, format="interleaved", loss_on="all"), jax.random.key(0))
    scored = np.flatnonzero(prompt.mask)  # every scored position's own token holds no label
    np.testing.assert_array_equal(scored, 2 * np.arange(5))
    np.testing.assert_array_equal(prompt.inputs[scored, -1], 0.0)


def test_batch_is_born_sharded_over_the_data_axis():
    mesh = jax.make_mesh((4,), ("data",))
    cfg = lr.LinearRegression(dim=3, n_context=4)
    with jax.set_mesh(mesh):
        b = sample_batch(lr.sample, cfg, jax.random.key(0), 16)
        assert b.inputs.sharding.spec[0] == "data"
        assert len({s.device for s in b.inputs.addressable_shards}) == 4
        assert b.inputs.addressable_shards[0].data.shape == (4, 5, 4)
        with pytest.raises(ConfigError, match="batch_size=10 does not divide over the 4 devices"):
            sample_batch(lr.sample, cfg, jax.random.key(0), 10)
    unsharded = sample_batch(lr.sample, cfg, jax.random.key(0), 16)
    # the same random bits (threefry is partitionable) through two programs, sharded and not: their
    # vectorised float transforms (erf_inv) may differ in the last ulp on some CPUs
    np.testing.assert_allclose(b.inputs, unsharded.inputs, rtol=1e-6, atol=1e-7)


def test_a_key_made_before_the_mesh_was_set_draws_the_batch_a_key_made_under_it_draws():
    """A key made outside jax.set_mesh (at the top of a script; an evaluate's test key under train's mesh) lives on
    the empty mesh: the sampler traced on it could not be vmapped over keys split on "data" (ValueError: Resource
    axis: data of P('data',) is not found in mesh: ())."""
    cfg = lr.LinearRegression(dim=3, n_context=4, n_tasks=3)
    outside = jax.random.key(5)
    with jax.set_mesh(sweep_mesh(2, 2)):
        other_mesh = jax.random.key(5)
    with jax.set_mesh(data_mesh(4)):
        want = sample_batch(lr.sample, cfg, jax.random.key(5), 8)
        for key in (outside, other_mesh):
            b = sample_batch(lr.sample, cfg, key, 8)
            assert b.inputs.sharding.spec[0] == "data"
            for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(want), strict=True):
                np.testing.assert_array_equal(x, y)  # the same program on the same key bits


def test_a_batch_is_not_sharded_over_an_auto_axis():
    # jax.sharding.Mesh's default Auto axes: jax.reshard raised "PartitionSpec passed to reshard cannot contain axis
    # names that are of type Auto", naming no way out
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("members", "data"))
    message = ("sampling a batch sharded over mesh axis 'data' needs it of type Explicit, got mesh axes {'members': "
               "Auto, 'data': Auto}; build the mesh with jaxicl.train.data_mesh or sweep_mesh, or jax.make_mesh(..., "
               "axis_types=(jax.sharding.AxisType.Explicit, ...))")
    with jax.set_mesh(mesh), pytest.raises(ConfigError, match=f"^{re.escape(message)}"):  # JAX appends a note
        sample_batch(lr.sample, lr.LinearRegression(dim=3, n_context=4), jax.random.key(0), 8)


@pytest.mark.parametrize("fmt,loss_on", [("paired", "query"), ("interleaved", "all")])
def test_a_shorter_context_keeps_the_last_pairs_of_the_full_prompt_and_zeroes_the_rest(fmt, loss_on):
    cfg = lr.LinearRegression(dim=3, n_context=6, noise_std=0.2, format=fmt, loss_on=loss_on)
    key = jax.random.key(8)
    # eager calls: each op runs as its own compiled executable on identical inputs, and multiplying by
    # the 0/1 mask is exact, so the kept pairs equal the full prompt's bit for bit
    full = lr.sample(cfg, key)
    same = lr.sample(cfg, key, n_context=jnp.int32(6))  # k = the field through the padding path: the plain prompt
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(a, b)
    k, pad = 2, 6 - 2
    short = lr.sample(cfg, key, n_context=k)
    np.testing.assert_array_equal(short.info["x"][:pad], 0.0)
    np.testing.assert_array_equal(short.info["y"][:pad], 0.0)
    np.testing.assert_array_equal(short.info["x"][pad:], full.info["x"][pad:])
    np.testing.assert_array_equal(short.info["y"][pad:], full.info["y"][pad:])
    first_real = pad * (1 if fmt == "paired" else 2)  # token index of the first real pair
    np.testing.assert_array_equal(short.inputs[:first_real], 0.0)
    np.testing.assert_array_equal(short.inputs[first_real:], full.inputs[first_real:])
    np.testing.assert_array_equal(short.mask, full.mask * (np.arange(cfg.seq_len) >= first_real))
    assert short.mask.sum() == (k + 1 if loss_on == "all" else 1)


def test_a_plain_int_context_length_outside_1_to_the_field_is_refused_and_a_traced_one_is_clipped_to_it():
    """The sampler would clip k to [0, cfg.n_context] (20 -> 5 real pairs, -2 -> 0) while the GD theory uses k as
    given; a traced k (a sweep member's, under vmap) cannot be checked and is clipped to [1, cfg.n_context]: a
    traced 0 kept no context pair and a negative one zeroed the query and its loss mask too. Plain ints given
    through sample_batch's task_params were traced, so never checked."""
    cfg = lr.LinearRegression(dim=3, n_context=5)
    for k in (0, -2, 6, np.int64(20)):
        msg = f"n_context (the real context pairs kept) must be in [1, cfg.n_context=5], got {k!r}"
        with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
            lr.sample(cfg, jax.random.key(0), n_context=k)
        with pytest.raises(ConfigError) as e:  # raised while tracing: JAX adds a note on its traceback
            sample_batch(lr.sample, cfg, jax.random.key(0), 4, task_params={"n_context": k})
        assert e.value.args == (msg,)
    for k in (1, np.int32(5)):  # the bounds themselves
        x = lr.sample(cfg, jax.random.key(0), n_context=k).info["x"]
        assert int((x[:-1] != 0).any(-1).sum()) == k  # real context pairs
        x = sample_batch(lr.sample, cfg, jax.random.key(0), 4, task_params={"n_context": k}).info["x"]
        np.testing.assert_array_equal((x[:, :-1] != 0).any(-1).sum(-1), [k] * 4)
    b = jax.vmap(lambda k: lr.sample(cfg, jax.random.key(0), n_context=k))(jnp.array([1, 5, 0, 7, -2]))
    np.testing.assert_array_equal((b.info["x"][:, :-1] != 0).any(-1).sum(-1), [1, 5, 1, 5, 1])
    assert np.all(b.info["x"][:, -1] != 0)  # the query is always real
    np.testing.assert_array_equal(b.mask, np.tile([0, 0, 0, 0, 0, 1], (5, 1)))


def test_a_concrete_context_length_of_any_type_is_checked_and_only_a_traced_one_is_clipped():
    """Only a plain int was checked: a concrete jax or numpy scalar was clipped (jnp.asarray(9) kept 5 pairs,
    np.array(0) one) and a float truncated (2.5 kept 2 pairs)."""
    cfg = lr.LinearRegression(dim=3, n_context=5)
    key = jax.random.key(0)
    for k in (jnp.asarray(9), np.array(0), jnp.asarray(-2), np.array(6, np.int8)):
        msg = f"n_context (the real context pairs kept) must be in [1, cfg.n_context=5], got {int(k)}"
        with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
            lr.sample(cfg, key, n_context=k)
    for k, shown in [(2.5, "2.5"), (3.0, "3.0"), (jnp.asarray(3.0), "3.0"), (np.float32(2.0), repr(np.float32(2.0))),
                     (np.array([1, 2]), "array([1, 2])"), (True, "True"), (jnp.asarray(True), "True")]:
        with pytest.raises(ConfigError, match=f"^{re.escape(f'n_context must be an integer, got {shown}')}$"):
            lr.sample(cfg, key, n_context=k)
    with pytest.raises(ConfigError) as e:  # a plain number in task_params is a constant of the program: checked
        sample_batch(lr.sample, cfg, key, 4, task_params={"n_context": 2.5})
    assert e.value.args == ("n_context must be an integer, got 2.5",)
    for k in (jnp.asarray(1), np.array(3), jnp.asarray(5, jnp.int8)):  # in range: as the plain int
        np.testing.assert_array_equal(lr.sample(cfg, key, n_context=k).inputs,
                                      lr.sample(cfg, key, n_context=int(k)).inputs)
    # traced (under jit, or an array in sample_batch's task_params): clipped to [1, 5], as documented
    x = jax.jit(lambda k: lr.sample(cfg, key, n_context=k).info["x"])(jnp.asarray(9))
    assert int((x[:-1] != 0).any(-1).sum()) == 5
    x = sample_batch(lr.sample, cfg, key, 4, task_params={"n_context": jnp.asarray(0)}).info["x"]
    np.testing.assert_array_equal((x[:, :-1] != 0).any(-1).sum(-1), [1] * 4)


def test_a_plain_negative_task_count_is_refused():
    """A plain n_tasks < 0 drew every prompt from a pool of one task; a traced one cannot be checked and still does."""
    cfg = lr.LinearRegression(dim=3, n_context=5)
    for call in (lambda: lr.sample(cfg, jax.random.key(0), n_tasks=-2),
                 lambda: sample_batch(lr.sample, cfg, jax.random.key(0), 4, task_params={"n_tasks": -2})):
        with pytest.raises(ConfigError) as e:
            call()
        assert e.value.args == ("n_tasks must be >= 0, got -2",)
    for bad, message in ((-1.0, "noise_std must be >= 0, got -1.0"), (np.nan, "noise_std must be >= 0, got nan")):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):  # nan noised every label to nan
            lr.sample(cfg, jax.random.key(0), noise_std=jnp.asarray(bad))
    w = jax.vmap(lambda k, t: lr.sample(cfg, k, n_tasks=t).info["w"])(jax.random.split(jax.random.key(0), 4),
                                                                        jnp.full(4, -2, jnp.int32))  # traced
    assert (np.asarray(w) == np.asarray(w)[0]).all()  # one program's rows: equal by construction
    # task_pool's own program, of another shape, may round the normal transform 1 ulp apart (pool_vector): measured
    # 2.4e-7 at XLA's default optimisation level on AVX-512, where the suite's O0 happens to give equal bits
    np.testing.assert_allclose(w, np.tile(lr.task_pool(cfg, 1), (4, 1)), rtol=1e-6, atol=1e-7)


def test_a_concrete_task_count_of_any_type_is_checked():
    """Only a plain int was checked: a concrete jax or numpy n_tasks -2 drew from a pool of one task, as did -2.0,
    and 2.5 drew from the first 2 pool vectors."""
    cfg = lr.LinearRegression(dim=3, n_context=5)
    key = jax.random.key(0)
    for t, msg in [(jnp.asarray(-2), "n_tasks must be >= 0, got -2"), (np.array(-1), "n_tasks must be >= 0, got -1"),
                   (2.5, "n_tasks must be an integer, got 2.5"), (-2.0, "n_tasks must be an integer, got -2.0"),
                   (jnp.asarray(2.5), "n_tasks must be an integer, got 2.5")]:
        with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
            lr.sample(cfg, key, n_tasks=t)
    with pytest.raises(ConfigError) as e:  # a plain number in task_params is a constant of the program: checked
        sample_batch(lr.sample, cfg, key, 4, task_params={"n_tasks": 2.5})
    assert e.value.args == ("n_tasks must be an integer, got 2.5",)
    for t in (jnp.asarray(0), np.array(3)):  # in range: as the plain int
        np.testing.assert_array_equal(lr.sample(cfg, key, n_tasks=t).info["w"],
                                      lr.sample(cfg, key, n_tasks=int(t)).info["w"])


def test_batched_context_lengths_may_differ_per_prompt_group():
    cfg = lr.LinearRegression(dim=2, n_context=5, format="interleaved", loss_on="all")
    b = jax.vmap(lambda k: sample_batch(lr.sample, cfg, jax.random.key(0), 8, task_params={"n_context": k}))(
        jnp.array([1, 3, 5]))
    np.testing.assert_array_equal(b.mask.sum(-1), [[2] * 8, [4] * 8, [6] * 8])
