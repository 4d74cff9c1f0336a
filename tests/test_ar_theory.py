import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxicl.models.ar_linear_attention import positional_attention
from jaxicl.sites import null_sites
from jaxicl.tasks import autoregressive as ar
from jaxicl.tasks import sample_batch
from jaxicl.theory import autoregressive as th

loss_jit = jax.jit(th.population_loss, static_argnums=0)


def _eigenbasis_states(family, dim, seq_len, n, seed=0):
    """States lambda^t [n, T + 1, d] in the complex eigenbasis (s_0 = 1), from the task sampler's angles."""
    cfg = ar.Autoregressive(family=family, dim=dim, seq_len=seq_len, format="tiled", tile=1)
    theta = sample_batch(ar.sample, cfg, jax.random.key(seed), n, axis=None).info["angles"]
    lam = jax.vmap(lambda a: ar.eigenvalues(cfg, a))(theta)
    return lam[:, None, :] ** jnp.arange(seq_len + 1)[None, :, None]


def _mc_row_losses(a, b, p, s):
    """Monte Carlo per-row losses [T - 1] and their standard errors, summed over coordinates."""
    pred = jax.vmap(lambda x: positional_attention(a, b, p, x, null_sites))(s[:, :-1])
    err = jnp.sum(jnp.abs(pred - s[:, 1:]) ** 2, -1)[:, 1:]  # positions 1..T-1 = rows 0..T-2
    return np.asarray(err.mean(0)), np.asarray(err.std(0) / np.sqrt(err.shape[0]))


@pytest.mark.parametrize("family,dim,heads", [("unitary", 4, 3), ("orthogonal", 4, 3)])
def test_closed_form_loss_matches_monte_carlo(x64, family, dim, heads):
    t = 5
    k = jax.random.split(jax.random.key(1), 3)
    a, b = 0.6 * jax.random.normal(k[0], (heads, dim)), 0.6 * jax.random.normal(k[1], (heads, dim))
    p = 0.5 * jax.random.normal(k[2], (t, t))
    s = _eigenbasis_states(family, dim, t, 100_000)
    mc, se = _mc_row_losses(a, b, p, s)
    cf = np.asarray(th.row_losses(family, a, b, p))
    assert np.all(np.abs(mc - cf) < 5 * se + 1e-9)
    np.testing.assert_allclose(mc, cf, rtol=0.02)  # stated tolerance: 2% per row (MC std error ~0.3%)
    np.testing.assert_allclose(float(th.population_loss(family, a, b, p)), cf.sum(), rtol=1e-12)


def test_the_two_families_differ_and_the_official_unitary_term_is_needed(x64):
    """The unitary formula differs from orthogonal ones, and dropping -||C||_F^2 (official code) is wrong."""
    k = jax.random.split(jax.random.key(2), 3)
    a, b, p = (jax.random.normal(kk, sh) for kk, sh in zip(k, [(3, 4), (3, 4), (5, 5)]))
    assert abs(th.population_loss("unitary", a, b, p) - th.population_loss("orthogonal", a, b, p)) > 0.1
    c = b.T @ a
    st = th.row_statistics(p)
    official = th.row_losses("unitary", a, b, p) + st["p_prev"] ** 2 * jnp.sum(c ** 2)
    s = _eigenbasis_states("unitary", 4, 5, 20_000)
    mc, se = _mc_row_losses(a, b, p, s)
    assert np.max(np.abs(np.asarray(official) - mc) / se) > 20


@pytest.mark.parametrize("family", ["unitary", "orthogonal"])
def test_optima_have_zero_loss_and_perturbations_increase_it(x64, family):
    d, h, t = 6, (6 if family == "unitary" else 3), 8
    opt = th.unitary_optimum if family == "unitary" else th.orthogonal_optimum
    a, b, p = (jnp.asarray(x) for x in opt(d, h, t, c=-1.7))
    assert abs(float(th.population_loss(family, a, b, p))) < 1e-10
    rng = np.random.default_rng(0)
    for _ in range(5):
        da, db, dp = (1e-3 * rng.standard_normal(x.shape) for x in (a, b, p))
        dp[-1] = 0.0  # the last row is never used
        assert float(loss_jit(family, a + da, b + db, p + dp)) > 1e-9
    s = _eigenbasis_states(family, d, t, 64)
    mc, _ = _mc_row_losses(a, b, p, s)
    assert mc.max() < 1e-20  # exact prediction on every sample


def test_unitary_optimum_needs_all_heads_and_trig_solution_works_in_the_real_basis(x64):
    with pytest.raises(ValueError, match="num_heads >= dim"):
        th.unitary_optimum(10, 8, 20)
    a, b, p = (jnp.asarray(x) for x in th.orthogonal_optimum(10, 8, 20, c=0.5))
    assert abs(float(th.population_loss("unitary", a, b, p))) > 1.0  # not an optimum for independent eigenvalues
    # real picture: W = blockdiag of rotations, s_0 = 1 per coordinate
    cfg = ar.Autoregressive(family="orthogonal", dim=10, seq_len=20, format="tiled", tile=1)
    s = sample_batch(ar.sample, cfg, jax.random.key(3), 32, axis=None).info["states"]
    mc, _ = _mc_row_losses(a, b, p, s)
    assert mc.max() < 1e-20


def test_orthogonal_optimum_is_exact_on_the_task_states_only_with_the_identity_basis(x64):
    """orthogonal_optimum's documented scope: exact on the real states for random_basis=False (Q = I); with a Haar Q
    its prediction error is worse than predicting 0 (E ||s_{t+1}||^2 = ||s_0||^2 = dim)."""
    a, b, p = (jnp.asarray(x) for x in th.orthogonal_optimum(4, 2, 6))
    for random_basis in (False, True):
        cfg = ar.Autoregressive(family="orthogonal", dim=4, seq_len=6, format="tiled", tile=1,
                                random_basis=random_basis)
        s = sample_batch(ar.sample, cfg, jax.random.key(0), 256, axis=None).info["states"]
        mc, _ = _mc_row_losses(a, b, p, s)
        if random_basis:
            assert mc.min() > 4.0  # measured 6.0 to 7.8 per row, standard errors 0.3
        else:
            assert mc.max() < 1e-20  # exact prediction on every sample


def test_bad_family_or_odd_dim_fail_with_the_argument_named():
    """Both entry points share the checks: an unknown family, or the orthogonal family's coordinate pairs (i, i ^ 1)
    with odd d (the last partner index would be out of bounds and silently clamped)."""
    a, b, p = jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.eye(4)
    for loss in (th.population_loss, th.row_losses):
        with pytest.raises(ValueError, match=r"family must be one of \('unitary', 'orthogonal'\), got 'orthogonl'"):
            loss("orthogonl", a, b, p)
        with pytest.raises(ValueError, match="d must be even, got d=3"):
            loss("orthogonal", a, b, p)
        assert np.isfinite(float(jnp.sum(loss("unitary", a, b, p))))  # odd d is fine for independent eigenvalues


def test_gamma_is_one_gd_step_on_the_inner_objective(x64):
    cfg = ar.Autoregressive(family="haar", dim=4, seq_len=6)
    s = sample_batch(ar.sample, cfg, jax.random.key(4), 1, axis=None).info["states"][0]
    eta = 0.3
    w1 = -eta * jax.grad(th.inner_objective)(jnp.zeros((4, 4)), s)
    np.testing.assert_allclose(th.gd_step_gamma(s, eta), w1, rtol=1e-12)


def test_eta_star_minimises_the_monte_carlo_loss(x64):
    d, t, r, n = 4, 6, 1.5, 100_000
    cfg = ar.Autoregressive(family="unitary", dim=d, seq_len=t + 1, init="random_phase", init_scale=r)
    s = sample_batch(ar.sample, cfg, jax.random.key(5), n, axis=None).info["states"]  # [n, t + 2, d]
    m = jnp.einsum("ntj,ntk->njk", s[:, 1:t + 1], jnp.conj(s[:, :t]))  # t context pairs
    base = jnp.einsum("njk,nk->nj", m, s[:, t])
    etas = np.linspace(0.6, 1.4, 17) * th.optimal_gd_step(d, t, r)
    losses = np.array([float(jnp.mean(jnp.sum(jnp.abs(e * base - s[:, t + 1]) ** 2, -1))) for e in etas])
    assert np.argmin(losses) == 8  # the grid's middle point is eta*
    np.testing.assert_allclose(losses, th.gd_step_loss(d, t, etas, r), rtol=0.02)
    np.testing.assert_allclose(losses[8], th.gd_step_min_loss(d, t, r), rtol=0.02)
    np.testing.assert_allclose(th.gd_step_min_loss(d, t, r), d * r ** 2 * (d - 1) / (t + d - 1))


def test_shared_eta_minimises_the_summed_closed_form():
    d, ts = 5, np.arange(1, 21)
    eta = th.optimal_shared_gd_step(d, ts)
    grid = eta * np.linspace(0.9, 1.1, 41)
    total = [th.gd_step_loss(d, ts, e).sum() for e in grid]
    assert np.argmin(total) == 20


def test_min_norm_positional_solution_equals_numpy_lstsq(x64):
    cfg = ar.Autoregressive(family="complex_1d", dim=1, mu=50.0, seq_len=8, format="tiled", tile=1)
    s = sample_batch(ar.sample, cfg, jax.random.key(6), 300, axis=None).info["states"][..., 0]  # [n, T + 1]
    s = np.asarray(s)
    for rcond in (1e-3, 0.03):
        p = np.asarray(th.min_norm_positional(jnp.asarray(s), rcond))
        for r in range(cfg.seq_len - 1):
            k = np.arange(r + 2)
            f = np.conj(s[:, r])[:, None] * s[:, k] ** 2
            a = np.concatenate([f.real, f.imag])
            y = np.concatenate([s[:, r + 2].real, s[:, r + 2].imag])
            ref = np.linalg.lstsq(a, y, rcond=rcond)[0]
            np.testing.assert_allclose(p[r, :r + 2], ref, rtol=1e-6, atol=1e-9)
            np.testing.assert_array_equal(p[r, r + 2:], 0.0)
        np.testing.assert_array_equal(p[-1], 0.0)


def test_positional_quadratic_equals_the_model_loss(x64):
    cfg = ar.Autoregressive(family="complex_1d", dim=1, mu=20.0, seq_len=7, format="tiled", tile=1)
    s = sample_batch(ar.sample, cfg, jax.random.key(7), 50, axis=None).info["states"]  # [n, T + 1, 1]
    p = jax.random.normal(jax.random.key(8), (7, 7))
    g, h, c = th.positional_quadratic(s[..., 0])
    quad = jnp.sum(jnp.einsum("rk,rkl,rl->r", p[:-1], g, p[:-1]) - 2 * jnp.sum(h * p[:-1], 1) + c)
    one = jnp.ones((1, 1))
    pred = jax.vmap(lambda x: positional_attention(one, one, p, x, null_sites))(s[:, :-1])
    direct = jnp.sum(jnp.abs(pred - s[:, 1:])[:, 1:] ** 2)
    np.testing.assert_allclose(quad, direct, rtol=1e-10)


def test_ridge_positional_equals_augmented_lstsq(x64):
    cfg = ar.Autoregressive(family="complex_1d", dim=1, mu=30.0, seq_len=6, format="tiled", tile=1)
    s = np.asarray(sample_batch(ar.sample, cfg, jax.random.key(9), 200, axis=None).info["states"][..., 0])
    lam = 0.7
    p = np.asarray(th.ridge_positional(jnp.asarray(s), lam))
    for r in range(cfg.seq_len - 1):
        f = np.conj(s[:, r])[:, None] * s[:, :r + 2] ** 2
        a = np.concatenate([f.real, f.imag, np.sqrt(lam) * np.eye(r + 2)])
        y = np.concatenate([s[:, r + 2].real, s[:, r + 2].imag, np.zeros(r + 2)])
        np.testing.assert_allclose(p[r, :r + 2], np.linalg.lstsq(a, y, rcond=None)[0], rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(p[r, r + 2:], 0.0, atol=1e-14)


def test_gd_ridge_penalty_is_the_ridge_early_stopped_gd_approximates(x64):
    """k GD steps of size lr from P = 0 on sum_r |F_r p_r - y_r|^2 / normaliser (a numpy loop over the explicit
    features) and the ridge fit with lam = gd_ridge_penalty(lr, k, normaliser) agree to first order in
    alpha k lambda_max (alpha = 2 lr / normaliser), set to 1e-3 here: both are alpha k h up to O(1e-3) relative,
    where a penalty off by a factor 2 is 50% off."""
    cfg = ar.Autoregressive(family="complex_1d", dim=1, mu=30.0, seq_len=6, format="tiled", tile=1)
    s = np.asarray(sample_batch(ar.sample, cfg, jax.random.key(9), 200, axis=None).info["states"][..., 0])
    normaliser, k = 200.0 * 5, 10
    features = [np.conj(s[:, r])[:, None] * s[:, :r + 2] ** 2 for r in range(cfg.seq_len - 1)]
    lam_max = max(np.linalg.eigvalsh((f.conj().T @ f).real).max() for f in features)
    lr = 1e-3 * normaliser / (2 * k * lam_max)
    gd = np.zeros((cfg.seq_len, cfg.seq_len))
    for _ in range(k):
        for r, f in enumerate(features):
            gd[r, :r + 2] -= lr * 2 * np.real(f.conj().T @ (f @ gd[r, :r + 2] - s[:, r + 2])) / normaliser
    ridge = np.asarray(th.ridge_positional(jnp.asarray(s), th.gd_ridge_penalty(lr, k, normaliser)))
    rel = np.linalg.norm(ridge - gd) / np.linalg.norm(gd)
    assert rel < 2e-3, rel  # measured 4e-4


def test_the_positional_fits_take_states_split_over_a_data_mesh_inside_the_mesh_and_after_it(x64):
    """States of a batch drawn under jax.set_mesh are split over "data" (4 simulated devices), the axis the Gram
    sums run over: JAX refused the contraction without an output sharding ("Contracting dimensions are sharded"),
    inside the mesh and after it. The fits now equal those of the same states unsplit (float64; the replicated states
    go through the same operations)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxicl.train import data_mesh

    cfg = ar.Autoregressive(family="complex_1d", dim=1, mu=30.0, seq_len=6, format="tiled", tile=1)
    s = sample_batch(ar.sample, cfg, jax.random.key(9), 64, axis=None).info["states"][..., 0]  # [n, T + 1]
    fits = {"quadratic": th.positional_quadratic, "min_norm": lambda x: th.min_norm_positional(x, 1e-3),
            "ridge": lambda x: th.ridge_positional(x, 0.7)}
    want = {name: f(s) for name, f in fits.items()}
    mesh = data_mesh(4)
    with jax.set_mesh(mesh):
        split = jax.device_put(s, NamedSharding(mesh, P("data")))
        inside = {name: f(split) for name, f in fits.items()}
    after = {name: f(split) for name, f in fits.items()}
    for got in (inside, after):
        for name in fits:
            jax.tree.map(lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12,
                                                                          err_msg=name), got[name], want[name])
