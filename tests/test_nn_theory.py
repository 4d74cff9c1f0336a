import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxicl.models.nearest_neighbor_attention import NearestNeighborAttention
from jaxicl.tasks import nearest_neighbor as nn
from jaxicl.tasks import sample_batch
from jaxicl.theory import nearest_neighbor as th

N, D = 4, 3


def _label_integrated_grads(xi1: float, xi2: float, num: int):
    """Per-x-sample loss [M] and gradients [M, D+2, D+2] of the full model at W(xi1, xi2), with the labels
    summed exactly over all 2^N sign vectors; and the inner products s [M, N] of the same x."""
    model = NearestNeighborAttention(D, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(jax.tree.map(lambda a: a.astype(jnp.float64), model))
    w0 = th.from_reduced(xi1, xi2, D).astype(jnp.float64)
    x = nn.uniform_sphere(jax.random.key(7), (num, N + 1), D).astype(jnp.float64)
    ys = jnp.asarray(list(itertools.product((1.0, -1.0), repeat=N)), jnp.float64)  # [2^N, N]

    def loss(w, xs):
        def one(y):
            p = jax.tree.map(lambda a: a, params)
            p["w"].set_value(w)
            pred = nnx.merge(graphdef, p)(nn.encode(xs, y[:, None]))[-1]  # the query's prediction
            return 0.5 * (pred - y[nn.nearest_index(xs[:-1], xs[-1])]) ** 2
        return jnp.mean(jax.vmap(one)(ys))

    losses, grads = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0)))(w0, x)
    s = jnp.einsum("mnd,md->mn", x[:, :-1], x[:, -1])
    return np.asarray(losses), np.asarray(grads), s


def test_closed_form_reduced_gradient_is_the_derivative_of_the_reduced_loss(x64):
    s = th.sample_inner_products(jax.random.key(0), 16, 8, 3000).astype(jnp.float64)
    auto_grad = jax.jit(jax.grad(th.reduced_loss, argnums=(0, 1)))
    closed_form = jax.jit(th.reduced_grad)
    for xi1, xi2 in [(0.0, 3.0), (2.0, 1.0), (6.0, 9.0), (-1.0, -2.0)]:
        g = closed_form(xi1, xi2, s)
        np.testing.assert_allclose(g, auto_grad(xi1, xi2, s), rtol=1e-10, atol=1e-14)
        if xi1 >= 0:  # then q_{i*} is the largest context weight and xi2 only grows
            assert g[1] <= 0


@pytest.mark.parametrize("xi1,xi2", [(0.0, 3.0), (2.0, 4.0)])
def test_full_model_gradient_on_the_family_is_the_reduced_gradient(x64, xi1, xi2):
    losses, g, s = _label_integrated_grads(xi1, xi2, 3000)
    loss_r, g1, g2 = (np.asarray(a) for a in th.reduced_terms(xi1, xi2, s))
    # identities per x sample (labels integrated out exactly): the loss, d/dxi1 = trace of the x block, d/dxi2
    np.testing.assert_allclose(losses, loss_r, rtol=1e-10)
    np.testing.assert_allclose(np.trace(g[:, :D, :D], axis1=1, axis2=2), g1, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(g[:, -1, -1], -g2, rtol=1e-9, atol=1e-13)
    # the query's label slot multiplies 0: that column has exactly zero gradient
    np.testing.assert_array_equal(g[:, :, D], 0.0)
    # in expectation: each x-diagonal entry is (1/d) dL/dxi1 (so one GD step of size eta moves xi1 by
    # -(eta / d) dL/dxi1), and every other entry vanishes, up to Monte Carlo error
    mean, se = g.mean(0), g.std(0) / np.sqrt(len(g))
    target = np.zeros_like(mean)
    target[np.arange(D), np.arange(D)] = g1.mean() / D
    target[-1, -1] = -g2.mean()
    # 5 standard errors; 1e-12 absorbs float64 rounding in entries that cancel exactly per sample (se ~ 1e-19)
    assert np.all(np.abs(mean - target) < 5 * se + 1e-12), np.abs(mean - target) / np.maximum(se, 1e-300)
    assert abs(g1.mean()) > 10 * g1.std() / np.sqrt(len(g1))  # the diagonal signal itself is resolved
    eta = 0.7
    new_xi1, new_xi2 = th.to_reduced(th.from_reduced(xi1, xi2, D) - eta * mean, D)
    np.testing.assert_allclose([new_xi1, new_xi2], [xi1 - eta / D * g1.mean(), xi2 - eta * g2.mean()], rtol=1e-10)


def test_sanity_value_at_init(x64):
    np.testing.assert_allclose(th.loss_at_init(16, 50.0), 0.46875, rtol=1e-12)
    s = th.sample_inner_products(jax.random.key(1), 16, 8, 500).astype(jnp.float64)
    np.testing.assert_allclose(th.reduced_loss(0.0, 3.0, s), th.loss_at_init(16, 3.0), rtol=1e-12)


def test_family_mapping_round_trip_and_off_family_norm():
    w = th.from_reduced(2.5, 4.0, 3, label_dim=2)
    assert w.shape == (6, 6)
    np.testing.assert_allclose(th.to_reduced(w, 3), (2.5, 4.0))
    assert float(th.off_family_norm(w, 3)) == 0.0
    bump = jnp.zeros((6, 6)).at[0, 1].set(0.3).at[4, 5].set(-0.4).at[1, 1].add(0.2).at[2, 2].add(-0.2)
    np.testing.assert_allclose(th.off_family_norm(w + bump, 3), np.sqrt(0.09 + 0.16 + 0.08), rtol=1e-6)


def test_reduced_gd_takes_eta_over_d_steps_on_xi1(x64):
    s = th.sample_inner_products(jax.random.key(2), 6, 5, 1000).astype(jnp.float64)
    path = th.reduced_gd(0.5, 3.0, s, eta=0.8, dim=5, steps=4, record_every=2)
    xi = np.array([0.5, 3.0])
    for _ in range(4):
        g1, g2 = th.reduced_grad(xi[0], xi[1], s)
        xi = xi - np.array([0.8 / 5 * g1, 0.8 * g2])
    assert path.shape == (3, 2)
    np.testing.assert_allclose(path[-1], xi, rtol=1e-12)
    for steps, every in ((5, 2), (4, 0)):  # 5 steps in blocks of 2 would drop the last step
        with pytest.raises(ValueError, match=f"got steps={steps}, record_every={every}"):
            th.reduced_gd(0.5, 3.0, s, eta=0.8, dim=5, steps=steps, record_every=every)


def _assert_within_informative_bound(err, bound, label_bound):
    """err <= bound on the prompts where the bound beats the trivial |err| <= 2 B (elsewhere it cannot fail), and
    there are such prompts. 1e-5: float32 predictions of labels of size ~1."""
    informative = bound < 2 * label_bound
    assert informative.any()
    assert np.all(err[informative] <= bound[informative] + 1e-5)


# xi1 = 10: on the shifted set (delta 0.5) the bound is 2 B (9 exp(-2.5) + exp(-14)) = 1.5 B < 2 B, where (5, 8)
# gave 5.2 B, above the trivial bound
@pytest.mark.parametrize("xi1,xi2", [(10.0, 14.0), (20.0, 30.0)])
def test_theorem2_bound_holds_per_prompt(xi1, xi2):
    n, d = 10, 4
    model = NearestNeighborAttention(d, rngs=nnx.Rngs(0))
    g, params = nnx.split(model)
    params["w"].set_value(th.from_reduced(xi1, xi2, d))
    f = jax.jit(jax.vmap(nnx.merge(g, params)))
    # shifted set: margin delta, query copies the nearest point
    shifted = sample_batch(nn.sample, nn.NearestNeighbor(dim=d, n_context=n, distribution="shifted", delta=0.5),
                           jax.random.key(3), 512)
    err = np.abs(f(shifted.inputs)[:, -1] - shifted.targets[:, -1])
    b = np.max(np.abs(np.asarray(shifted.info["labels"])[..., 0]), -1)
    bound = np.asarray(th.theorem2_bound(xi1, xi2, n, 0.5, b))
    _assert_within_informative_bound(err, bound, b)
    if xi1 >= 20:  # the bound is informative on the shifted set, not just |err| <= 2 B
        assert np.median(bound / b) < 0.5
    # uniform set: each prompt's own margin and query gap
    uni = sample_batch(nn.sample, nn.NearestNeighbor(dim=d, n_context=n), jax.random.key(4), 512)
    x = np.asarray(uni.info["x"], np.float64)
    sq = np.sort(np.sum((x[:, :-1] - x[:, -1:]) ** 2, -1), -1)
    err = np.abs(f(uni.inputs)[:, -1] - uni.targets[:, -1])
    bound = np.asarray(th.theorem2_bound(xi1, xi2, n, sq[:, 1] - sq[:, 0], 1.0, sq[:, 0] / 2))
    _assert_within_informative_bound(err, bound, 1.0)


def test_log_growth_fit_recovers_a_logarithm():
    t = np.arange(10, 10_000)
    slope, intercept, r2 = th.fit_log_growth(t, 1.7 * np.log(t) + 0.3)
    np.testing.assert_allclose([slope, intercept, r2], [1.7, 0.3, 1.0], rtol=1e-9)
    assert th.fit_log_growth(t, np.sqrt(t))[2] < 0.95


@pytest.mark.parametrize("n,d", [(16, 8), (4, 4)])
def test_lemma20_top_gap_laplace_transform_is_theta_one_over_xi(n, d):
    """Lemma 20: E[exp(xi (s_(2) - s_(1)))] = Theta(1/xi), s_(1) >= s_(2) the top two of s_j = <x_j, x_q>."""
    s = th.sample_inner_products(jax.random.key(5), n, d, 200_000)
    xi = np.geomspace(10.0, 1000.0, 9)
    scaled = xi * np.asarray(th.top_gap_laplace(s, xi), np.float64)
    # xi E roughly flat over two decades: a power xi^-(1 +- p) would move it by 100^p, so a max / min below 2
    # rejects |p| >= 0.15 (observed 1.46 at (16, 8), 1.12 at (4, 4): the approach to the limit from below)
    assert scaled.max() / scaled.min() < 2
    # and flat at the right level: xi E -> p(0), the gap's density at 0 (quadrature, independent of the samples).
    # Tolerance: 4 standard errors of the Monte Carlo mean at xi = 1000 (2% and 3.5% here) plus 2% for the O(1/xi)
    # approach (xi E moves by < 1% between xi = 562 and 1000 here)
    top = jax.lax.top_k(s, 2)[0]
    e = np.exp(-1000.0 * np.asarray(top[:, 0] - top[:, 1], np.float64))
    se = 1000.0 * e.std() / np.sqrt(len(e))
    p0 = th.top_gap_density_at_zero(n, d)
    assert abs(scaled[-1] - p0) < 4 * se + 0.02 * p0, (scaled[-1], p0, se)
    # control: the gap to the third largest has density 0 at 0, so xi E falls like 1/xi and the flatness test fails
    third = jax.lax.top_k(s, 3)[0]
    far = xi * np.mean(np.exp(-xi[:, None] * np.asarray(third[:, 0] - third[:, 2], np.float64)), -1)
    assert far.max() / far.min() > 5


@pytest.mark.parametrize("n,d", [(4, 2), (1, 5), (3, 1)])
def test_top_gap_density_outside_n_at_least_2_and_d_at_least_3_is_refused(n, d):
    """These gave ZeroDivisionError (d = 2), a silent 0.0 (N = 1) and nan (d = 1)."""
    msg = (f"the top gap's density at 0 needs n_context >= 2 (two points to have a gap) and dim >= 3 (it is infinite "
           f"at dim 2), got n_context={n}, dim={d}")
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        th.top_gap_density_at_zero(n, d)


def test_window_mean_ratio_and_log_query_weight():
    t = np.arange(1, 10_001)
    # halves [10, 316.2) and [316.2, 10^4] of the window [10, 10^4], i.e. t = 10..316 and 317..10^4
    np.testing.assert_allclose(th.window_mean_ratio(t, np.full(t.shape, 3.0), 10, 10_000), 1.0, rtol=1e-12)
    expected = np.mean(np.log(t[316:])) / np.mean(np.log(t[9:316]))
    np.testing.assert_allclose(th.window_mean_ratio(t, np.log(t), 10, 10_000), expected, rtol=1e-12)
    s = th.sample_inner_products(jax.random.key(6), 5, 4, 7)
    qc, q_self = th._weights(3.0, 40.0, s)
    # the same softmax in logs (float32: relative 1e-6 of log q ~ -40)
    np.testing.assert_allclose(th.log_query_weight(3.0, 40.0, s), np.log(q_self), rtol=1e-5)


def test_reduced_loss_grid_takes_a_2d_meshgrid_and_refuses_unequal_shapes():
    """A 2-D meshgrid raised a broadcasting error (lax.map ran over its rows): it is now flattened inside."""
    s = th.sample_inner_products(jax.random.key(0), 4, 4, 2000)
    g1, g2 = jnp.meshgrid(jnp.linspace(0, 4, 3), jnp.linspace(0, 6, 4))  # [4, 3]
    grid = np.asarray(th.reduced_loss_grid(g1, g2, s))
    assert grid.shape == (4, 3)
    # the same 12 points in the same order, flattened: two compiled programs (input shapes [4, 3] and [12]) whose
    # arithmetic is the same, but XLA may fuse and vectorise them differently: float32 rounding (~1e-7)
    np.testing.assert_allclose(grid, np.asarray(th.reduced_loss_grid(g1.ravel(), g2.ravel(), s)).reshape(4, 3),
                               rtol=1e-6)
    # and each is L at its point (separate per-point programs: float32 sums over 2000 samples, rounding ~1e-7)
    ref = [[float(th.reduced_loss(a, b, s)) for a, b in zip(r1, r2)] for r1, r2 in zip(g1, g2)]
    np.testing.assert_allclose(grid, ref, rtol=1e-5)
    with pytest.raises(ValueError, match=re.escape("xi1 and xi2 must have equal shapes (one point per entry), got "
                                                   "(4, 3) and (12,)")):
        th.reduced_loss_grid(g1, g2.ravel(), s)
