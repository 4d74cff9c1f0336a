import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxicl.baselines import k_nearest_neighbors, one_nearest_neighbor
from jaxicl.models.nearest_neighbor_attention import NearestNeighborAttention
from jaxicl.tasks import nearest_neighbor as nn
from jaxicl.tasks import sample_batch
from jaxicl.tasks.batching import POOL_STREAM
from jaxicl.train import TrainConfig, data_key, regression_loss, train, train_sweep
from jaxicl.validation import ConfigError


def test_shapes_embedding_and_targets_against_a_brute_force_loop():
    cfg = nn.NearestNeighbor(dim=5, n_context=7)
    b = sample_batch(nn.sample, cfg, jax.random.key(0), 64)
    assert b.inputs.shape == (64, 8, 7) and b.targets.shape == (64, 8) and b.mask.shape == (64, 8)
    # the same compiled program on the same key: deterministic
    np.testing.assert_array_equal(b.inputs, sample_batch(nn.sample, cfg, jax.random.key(0), 64).inputs)
    x, tok = np.asarray(b.info["x"]), np.asarray(b.inputs)
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(tok[:, -1, 5:], np.tile([0.0, 1.0], (64, 1)))  # query column [x_q; 0; 1]
    np.testing.assert_array_equal(tok[:, :-1, 6], 0.0)
    assert set(np.unique(tok[:, :-1, 5])) == {-1.0, 1.0}
    for p in range(64):
        dist = [np.sum((x[p, j] - x[p, -1]) ** 2) for j in range(7)]
        assert b.targets[p, -1] == tok[p, int(np.argmin(dist)), 5]
        assert np.all(b.targets[p, :-1] == 0) and b.mask[p, -1] == 1 and b.mask[p, :-1].sum() == 0


@pytest.mark.parametrize("delta", [0.3, 1.5, 3.0])
def test_shifted_set_has_the_promised_margin(delta):
    """Every point but the copied one at squared distance >= shifted_margin = min(delta, 4 - delta) (a point flipped
    from just inside delta lands just beyond 4 - delta), and some point near it: the margin is the sampler's own."""
    cfg = nn.NearestNeighbor(dim=3, n_context=12, distribution="shifted", delta=delta)
    b = sample_batch(nn.sample, cfg, jax.random.key(1), 2000)
    x = np.asarray(b.info["x"], np.float64)
    sq = np.sum((x[:, :-1] - x[:, -1:]) ** 2, -1)  # [B, N]
    copied = np.asarray(b.info["copied"])
    rows = np.arange(len(copied))
    np.testing.assert_allclose(sq[rows, copied], 0.0, atol=1e-12)
    others = np.ones_like(sq, bool)
    others[rows, copied] = False
    assert cfg.shifted_margin == min(delta, 4 - delta)
    assert cfg.shifted_margin - 1e-5 <= sq[others].min() < cfg.shifted_margin + 0.05
    # without the flip about 1 - F(delta) of the points would be closer than delta: the flip really happened
    unflipped = np.asarray(sample_batch(nn.sample, nn.NearestNeighbor(dim=3, n_context=12), jax.random.key(1),
                                        2000).info["x"])
    assert np.mean(np.sum((unflipped[:, :-1] - unflipped[:, -1:]) ** 2, -1) < delta) > 0.05
    # exact by construction: the target is a gather of the one materialised label array (nn.sample)
    np.testing.assert_array_equal(b.targets[:, -1], np.asarray(b.info["labels"])[rows, copied, 0])
    labels = np.asarray(b.info["labels"]).ravel()
    assert abs(labels.mean()) < 5 / np.sqrt(labels.size) and abs(labels.var() - 1) < 0.05


def test_simplex_vertices_and_multiclass_reduces_to_binary_for_k2():
    np.testing.assert_allclose(nn.simplex_vertices(2), [[1.0], [-1.0]], atol=1e-12)
    for k in (3, 5):
        v = nn.simplex_vertices(k)
        np.testing.assert_allclose(v @ v.T, np.where(np.eye(k), 1.0, -1.0 / (k - 1)), atol=1e-12)
        np.testing.assert_array_equal(nn.decode_class(jnp.asarray(v), k), np.arange(k))
    binary = nn.decode_class(jnp.array([[0.3], [-0.2]]), 2)  # sign rule: +1 is class 0
    np.testing.assert_array_equal(binary, [0, 1])
    cfg = nn.NearestNeighbor(dim=4, n_context=6, num_classes=3)
    b = sample_batch(nn.sample, cfg, jax.random.key(2), 32)
    assert b.inputs.shape == (32, 7, 4 + 2 + 1) and b.targets.shape == (32, 7, 2)
    classes = np.asarray(b.info["classes"])
    np.testing.assert_allclose(b.inputs[:, :-1, 4:6], nn.simplex_vertices(3)[classes], rtol=1e-6)
    nearest = classes[np.arange(32), np.asarray(b.info["nearest"])]
    np.testing.assert_array_equal(nn.decode_class(b.targets[:, -1], 3), nearest)


def test_labels_are_the_exact_float64_simplex_vertices_under_x64(x64):
    # they were float32 in every mode: 1.6e-8 off the float64 vertices in a float64 run
    b = sample_batch(nn.sample, nn.NearestNeighbor(dim=4, n_context=6, num_classes=3), jax.random.key(2), 8)
    assert b.info["labels"].dtype == jnp.float64
    # a one-hot sum of the vertices: one nonzero term, exact
    np.testing.assert_array_equal(b.info["labels"], nn.simplex_vertices(3)[np.asarray(b.info["classes"])])


def test_sampler_trains_in_a_sweep_under_its_explicit_member_sharding():
    cfg = nn.NearestNeighbor(dim=2, n_context=3, num_classes=3)
    graphdef, params = nnx.split(NearestNeighborAttention(2, label_dim=2, rngs=nnx.Rngs(0)))
    loss_fn = regression_loss(graphdef, coords="sum", scale=0.5)  # Li et al.'s loss
    train_cfg = TrainConfig(steps=2, batch_size=4, optimizer="sgd", log_every=1)
    result = train_sweep(loss_fn, nn.sample, cfg, train_cfg, lambda key: params,
                         [{"train.seed": 0}, {"train.seed": 1}], progress=False)
    assert not result.diverged and len(result.train_rows) == 4  # 2 steps x 2 members
    for seed in (0, 1):  # each member's losses and parameters are those of the member trained alone
        alone = train(loss_fn, nn.sample, cfg, dataclasses.replace(train_cfg, seed=seed), params,
                      progress=False)
        swept = [r["loss"] for r in result.train_rows if r["member"] == seed]
        np.testing.assert_allclose(swept, [r["loss"] for r in alone.train_rows], rtol=1e-5)  # vmapped vs not
        np.testing.assert_allclose(result.member_params(seed)["w"], alone.state.params["w"], rtol=1e-5, atol=1e-7)
    first = sample_batch(nn.sample, cfg, jax.random.fold_in(data_key(0), 0), 4)  # member 0's first batch
    np.testing.assert_allclose(result.train_rows[0]["loss"], loss_fn(params, first)[0], rtol=1e-5)


def test_fixed_prompt_set_repeats_exactly_n_prompts_prompts():
    """Prompt m of the set is the fresh prompt of pool_key(pool_seed, m), a key of its own stream: not
    fold_in(key(pool_seed), m), the key of the m-th parameter nnx.Rngs(pool_seed) initialises."""
    cfg = nn.NearestNeighbor(dim=3, n_context=4, n_prompts=5, pool_seed=2)
    b = sample_batch(nn.sample, cfg, jax.random.key(3), 200)
    drawn = np.asarray(b.inputs).reshape(200, -1)
    fresh = dataclasses.replace(cfg, n_prompts=0)
    prompts = lambda keys: np.asarray(jax.vmap(lambda k: nn.sample(fresh, k))(keys).inputs).reshape(5, -1)  # noqa: E731
    the_set = prompts(jax.vmap(lambda m: jax.random.fold_in(jax.random.fold_in(jax.random.key(2), POOL_STREAM), m))(
        jnp.arange(5)))
    init_keys = prompts(jax.vmap(lambda m: jax.random.fold_in(jax.random.key(2), m))(jnp.arange(5)))
    # another compiled program than the batch's: equal up to float32 rounding
    nearest = np.abs(drawn[:, None] - the_set[None]).max(-1)  # [200, 5]
    assert nearest.min(1).max() < 1e-5 and set(nearest.argmin(1)) == set(range(5))
    assert np.abs(init_keys[:, None] - the_set[None]).max(-1).min() > 0.1


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="distribution"):
        nn.NearestNeighbor(distribution="gaussian")
    with pytest.raises(ConfigError, match="num_classes"):
        nn.NearestNeighbor(num_classes=1)
    with pytest.raises(ConfigError, match="k must be"):
        k_nearest_neighbors(nn.NearestNeighbor(n_context=4), 5)


@pytest.mark.parametrize("distribution", ["uniform", "shifted"])
def test_one_nn_baseline_is_the_target_and_knn_matches_a_loop(distribution):
    cfg = nn.NearestNeighbor(dim=3, n_context=9, distribution=distribution)
    b = sample_batch(nn.sample, cfg, jax.random.key(4), 128)
    pred = jax.vmap(one_nearest_neighbor(cfg))(b.inputs)
    # both pick a label by argmax and copy it from the same materialised labels; two programs, so inner products
    # within float32 rounding (~1e-7) of each other could make them pick different points: the closest are 2e-3 apart
    np.testing.assert_array_equal(pred, b.targets)
    knn = np.asarray(jax.vmap(k_nearest_neighbors(cfg, 3))(b.inputs))
    x, y = np.asarray(b.info["x"]), np.asarray(b.info["labels"])[..., 0]
    for p in range(128):
        order = sorted(range(9), key=lambda j: np.sum((x[p, j] - x[p, -1]) ** 2))
        np.testing.assert_allclose(knn[p, -1], np.mean(y[p, order[:3]]), rtol=1e-5, atol=1e-6)
        assert np.all(knn[p, :-1] == 0)


def test_nn_baselines_refuse_a_batch_and_tokens_of_another_width():
    """A config whose num_classes or dim is not the prompts' sliced the tokens into plausible wrong x and labels
    (silently wrong 1-NN / k-NN predictions); a batch failed inside on a dot product of the wrong axes."""
    cfg = nn.NearestNeighbor(dim=8, n_context=16, num_classes=4)
    b = sample_batch(nn.sample, cfg, jax.random.key(0), 3)
    cases = [(nn.NearestNeighbor(dim=8, n_context=16), "[T, 10] (x 8 + labels 1 + flag 1 for dim=8, num_classes=2)"),
             (nn.NearestNeighbor(dim=4, n_context=16, num_classes=4),
              "[T, 8] (x 4 + labels 3 + flag 1 for dim=4, num_classes=4)")]
    for wrong, takes in cases:
        for predictor in (one_nearest_neighbor(wrong), k_nearest_neighbors(wrong, 3)):
            with pytest.raises(ValueError, match=re.escape(f"nearest_neighbor.decode takes tokens {takes}, got tokens "
                                                           "of width 12 (shape (17, 12))")):
                predictor(b.inputs[0])
    for predictor in (one_nearest_neighbor(cfg), k_nearest_neighbors(cfg, 3)):
        with pytest.raises(ValueError, match=re.escape("nearest_neighbor.decode takes one prompt, tokens [T, 12] (x 8 "
                                                       "+ labels 3 + flag 1 for dim=8, num_classes=4), got shape "
                                                       "(3, 17, 12): jax.vmap it over a batch [B, T, 12]")):
            predictor(b.inputs)
    np.testing.assert_array_equal(jax.vmap(one_nearest_neighbor(cfg))(b.inputs), b.targets)
