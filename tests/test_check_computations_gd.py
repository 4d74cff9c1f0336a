"""The computations behind the checks of gd_equivalence and gd_sweep, each against an independent
value: numpy, closed forms, planted predictors and hand-built sweep tables."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.common.result import Check, diverged_check
from experiments.gd_equivalence import ood_scaling
from experiments.gd_sweep import gd_sweep_checks, padded_gd_lr
from jaxicl.analysis.equivalence import equivalence_metrics
from jaxicl.baselines import gradient_descent
from jaxicl.models import predictor
from jaxicl.tasks import linear_regression as lr
from jaxicl.tasks import sample_batch
from jaxicl.theory.gd_equivalence import gd_step_model, optimal_gd_lr
from jaxicl.train import query_mse


def _cos(a, b):
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_equivalence_metrics_of_planted_predictors_equal_numpy(x64):
    """f(t) = <U, t> + 1/2 <A, t * t> at every position: d f / d t = U + A * t, exactly (likewise g with V, B)."""
    n, t, dim = 5, 4, 3
    k = jax.random.split(jax.random.key(0), 5)
    tokens = jax.random.normal(k[0], (n, t, dim))
    u, a, v, b = (np.asarray(jax.random.normal(key, (t, dim))) for key in k[1:])
    f = lambda x: jnp.full((t,), jnp.sum(u * x) + 0.5 * jnp.sum(a * x * x))  # noqa: E731
    g = lambda x: jnp.full((t,), jnp.sum(v * x) + 0.5 * jnp.sum(b * x * x))  # noqa: E731
    x = np.asarray(tokens)
    gf, gg = u + a * x, v + b * x  # [n, T, D]
    pf = np.sum(u * x, (1, 2)) + 0.5 * np.sum(a * x * x, (1, 2))
    pg = np.sum(v * x, (1, 2)) + 0.5 * np.sum(b * x * x, (1, 2))
    for position in (-1, 1):
        m = equivalence_metrics(f, g, tokens, position)
        qf, qg = gf[:, position, :-1], gg[:, position, :-1]  # the label slot is not an input
        cf, cg = (np.delete(z, position % t, axis=1).reshape(n, -1) for z in (gf, gg))
        expected = {"pred_diff": np.mean((pf - pg) ** 2),
                    "query_cos": np.mean(_cos(qf, qg)), "query_l2": np.mean(np.linalg.norm(qf - qg, axis=-1)),
                    "context_cos": np.mean(_cos(cf, cg)), "context_l2": np.mean(np.linalg.norm(cf - cg, axis=-1))}
        assert set(m) == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(m[name], value, rtol=1e-12, err_msg=name)  # float64, reassociated sums


def test_query_mse_is_the_mean_squared_error_at_the_last_position():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))  # [members, B, T]
    expected = [np.mean([(pred[m, b, -1] - target[m, b, -1]) ** 2 for b in range(5)]) for m in range(3)]
    np.testing.assert_allclose(query_mse(pred, target), expected, rtol=1e-6)  # float32
    np.testing.assert_allclose(query_mse(pred[1], target[1]), expected[1], rtol=1e-6)


def _gd1_closed_form(dim, n, v, eta):
    """E (GD-1 prediction - y_q)^2 for x ~ N(0, v I_dim), w ~ N(0, I), no noise, n context pairs:
    d v^3 (n + 1 + d) / n eta^2 - 2 d v^2 eta + d v."""
    return dim * v ** 3 * (n + 1 + dim) / n * eta ** 2 - 2 * dim * v ** 2 * eta + dim * v


def test_ood_scaling_of_the_exact_gd1_construction(x64):
    """trained = the analytic GD-1 layer: no gap to GD-1, cosines 1, GD-1's loss at its closed form."""
    task = lr.LinearRegression(dim=3, n_context=6, x_scale=1.5)
    eta = optimal_gd_lr(task)
    gd1 = jax.jit(gradient_descent(task, 1, eta))  # jitted: ood_scaling vmaps and differentiates them eagerly
    construction = jax.tree.map(lambda w: w.astype(jnp.float64), gd_step_model(task.dim, eta, jnp.float64))
    trained = jax.jit(predictor(*nnx.split(construction)))
    scales, num, key = (0.5, 2.0), 4096, jax.random.key(0)
    ood = ood_scaling(task, trained, gd1, eta, scales, key, num)
    assert ood["scale"] == list(scales)
    np.testing.assert_allclose(ood["trained"], ood["gd"], rtol=1e-10)  # the same function, float64
    np.testing.assert_allclose([ood["query_cos"], ood["context_cos"]], 1.0, rtol=1e-12)
    for i, s in enumerate(scales):
        v = (1.5 * s) ** 2  # the inputs' variance: the base x_scale times s
        theory = _gd1_closed_form(task.dim, task.n_context, v, eta)
        np.testing.assert_allclose(ood["theory"][i], theory, rtol=1e-12)
        # the standard error of the mean squared error, from an independent batch of the same size
        fresh = sample_batch(lr.sample, lr.LinearRegression(dim=3, n_context=6, x_scale=1.5 * s),
                             jax.random.key(100 + i), num)
        err = (jax.vmap(gd1)(fresh.inputs)[:, -1] - fresh.targets[:, -1]) ** 2
        assert abs(ood["gd"][i] - theory) < 4 * float(err.std() / np.sqrt(num))


def test_gd_sweep_checks_use_the_best_finite_member_and_count_the_diverged():
    table = [{"member": 0, "diverged_at": None, "rel_gap": 0.08},
             {"member": 1, "diverged_at": 5, "rel_gap": 0.001},  # diverged: its gap does not count
             {"member": 2, "diverged_at": None, "rel_gap": -0.03},  # |gap| counts
             {"member": 3, "diverged_at": None, "rel_gap": None}]  # never evaluated
    best, diverged = gd_sweep_checks(table, 0.05)
    assert (best.name, best.value, best.target, best.passed) == ("best_member_rel_gap_to_gd1", 0.03, "< 0.05", True)
    assert "min over 2 finite members" in best.note
    assert not gd_sweep_checks(table, 0.02)[0].passed
    assert (diverged.value, diverged.passed) == (1, False) and "{1: 5}" in diverged.note
    none_finite = gd_sweep_checks([{"member": 0, "diverged_at": 3, "rel_gap": 0.0}], 0.05)[0]
    assert none_finite.value == float("inf") and not none_finite.passed


def test_diverged_check_counts_members_and_names_them():
    ok = diverged_check({})
    assert ok == Check("diverged_members", 0, "== 0", True, ok.note) and "none" in ok.note
    bad = diverged_check({"lr 3e3": 4, "lr 1e4": 0})
    assert (bad.value, bad.passed) == (2, False) and "{'lr 3e3': 4, 'lr 1e4': 0}" in bad.note


def test_padded_gd_lr_on_padded_prompts_is_gd1_at_eta_star_of_the_real_pairs(x64):
    """GD-1 at padded_gd_lr on prompts front-padded to N = 8 is GD-1 with step k / (k + d + 1 + sigma^2) on
    the k real pairs (isotropic unit inputs)."""
    task = lr.LinearRegression(dim=3, n_context=8, noise_std=0.5)
    d, n = task.dim, task.n_context
    for k, sigma in ((2, 0.5), (5, 1.0), (8, 0.0)):
        step = padded_gd_lr(task, jnp.asarray(k), jnp.asarray(sigma))  # arrays, as per sweep member
        np.testing.assert_allclose(step, n / (k + d + 1 + sigma ** 2), rtol=1e-12)  # eta*(k, sigma) n / k
        batch = sample_batch(lr.sample, task, jax.random.key(k), 16, task_params={"n_context": k})
        pred = jax.vmap(gradient_descent(task, 1, step))(batch.inputs)[:, -1]
        x, y = np.asarray(batch.info["x"]), np.asarray(batch.info["y"])
        real = slice(n - k, n)  # the last k context pairs; the query is x[n]
        w = k / (k + d + 1 + sigma ** 2) / k * np.einsum("bi,bid->bd", y[:, real], x[:, real])
        np.testing.assert_allclose(pred, np.einsum("bd,bd->b", w, x[:, n]), rtol=1e-12)  # float64

