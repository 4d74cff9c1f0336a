"""The computations behind the checks of gd_equivalence, gd_sweep and the sweep_* experiments, each
against an independent value: numpy, closed forms, planted predictors and hand-built sweep tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.common.result import Check, diverged_check
from experiments.gd_equivalence import ood_scaling, rescaled_pq
from experiments.common.gd_sweep import gd_sweep_checks, padded_gd_lr
from jaxicl.models.attention import sweep_init
from experiments.sweep_context_length import context_length_summary
from experiments.sweep_lr_seeds import _matched_lrs, member_query_mse, pool_summary
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
    for position in (t, -t - 1):  # wrapped onto another position (t -> 0), which it scored
        with pytest.raises(ValueError, match=rf"position must be in \[-4, 3\], got {position}"):
            equivalence_metrics(f, g, tokens, position)


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
    construction = gd_step_model(task.dim, eta)  # float64 under x64
    trained = jax.jit(predictor(*nnx.split(construction)))
    scales, num, key = (2.0,), 4096, jax.random.key(0)  # one scale: each costs a sampler compile (~2 s)
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


def _row(member, k, seed, rel_gap, loss, diverged_at=None):
    gd1 = {2: (1.52, 0.01), 4: (1.19, 0.02), 8: (0.905, 0.001)}[k]  # GD-1's mean and standard error at k
    return {"member": member, "train.seed": seed, "task.n_context": k, "diverged_at": diverged_at, "loss": loss,
            "gd1_loss": gd1[0], "gd1_loss_se": gd1[1], "rel_gap": rel_gap}


def test_context_length_summary_of_a_hand_built_table():
    theory = {2: 1.5, 4: 1.2, 8: 0.9}
    table = [_row(0, 2, 0, 0.04, 1.6), _row(1, 4, 0, 5.0, 99.0, diverged_at=3), _row(2, 8, 0, 0.01, 0.95),
             _row(3, 2, 1, 0.02, 1.55), _row(4, 4, 1, -0.06, 1.25), _row(5, 8, 1, 0.03, 0.93)]
    s = context_length_summary(table, theory)
    assert s["finite"] == 5
    np.testing.assert_allclose(s["worst"], 0.06, rtol=1e-15)  # |-0.06|; the diverged member's 5.0 is left out
    assert s["gd_mean"] == {2: 1.52, 4: 1.19, 8: 0.905}
    np.testing.assert_allclose([s["z"][k] for k in (2, 4, 8)], [2.0, 0.5, 5.0], rtol=1e-12)  # |mean - theory| / se
    np.testing.assert_allclose([s["trained"][k] for k in (2, 4, 8)], [1.575, 1.25, 0.94], rtol=1e-15)
    assert s["falls"] == 2 and s["falling"] is True
    table[5]["loss"] = 1.6  # k = 8 now averages 1.275 > 1.25
    s = context_length_summary(table, theory)
    assert s["falls"] == 1 and s["falling"] is False


def test_matched_lrs_need_every_seed_finite_and_within_tolerance():
    gaps = {1e-3: [(0.01, None), (-0.04, None)], 3e-3: [(-0.01, None), (-0.02, None)],
            1e-2: [(0.01, None), (0.06, None)], 1e-1: [(0.0, None), (0.01, 7)]}  # lr: [(rel_gap, diverged_at)]
    table = [{"train.lr": v, "train.seed": s, "rel_gap": g, "diverged_at": at}
             for v, rows in gaps.items() for s, (g, at) in enumerate(rows)]
    assert _matched_lrs(table, 0.05) == [1e-3, 3e-3]
    assert _matched_lrs(table, 0.015) == []


def test_the_sampler_with_an_n_tasks_override_draws_only_the_task_pool_vectors():
    """The diversity sweep passes task.n_tasks per member to a task with n_tasks = 0; dMMSE's pool is task_pool."""
    task = lr.LinearRegression(dim=3, n_context=4)
    pool = np.asarray(lr.task_pool(task, 4))
    for n_tasks in (4, 0):
        w = np.asarray(sample_batch(lr.sample, task, jax.random.key(1), 256,
                                    task_params={"n_tasks": jnp.asarray(n_tasks)}).info["w"])
        dist = np.linalg.norm(w[:, None] - pool[None], axis=-1)  # [256, 4]
        if n_tasks:  # float32 from two programs: equal up to rounding
            assert np.all(dist.min(1) < 1e-6) and set(dist.argmin(1)) == {0, 1, 2, 3}
        else:  # fresh Gaussian tasks
            assert np.all(dist.min(1) > 1e-3)


def test_member_query_mse_equals_a_loop_over_members(x64):
    task = lr.LinearRegression(dim=2, n_context=5)
    init, graphdef = sweep_init(task.dim + 1, num_layers=2)
    members = [init(jax.random.key(i), init_scale=0.3) for i in range(3)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *members)
    batch = sample_batch(lr.sample, task, jax.random.key(2), 64)
    one = jax.jit(lambda p: query_mse(jax.vmap(predictor(graphdef, p))(batch.inputs), batch.targets))
    loop = [float(one(p)) for p in members]
    np.testing.assert_allclose(member_query_mse(graphdef, stacked, batch), loop, rtol=1e-12)  # float64, two programs
    assert len(set(loop)) == 3  # the members differ


def test_pool_summary_groups_every_member_by_pool():
    """A diverged member's loss (its last finite state) stays in its pool's mean: dropping it would make the pool
    look better than its seeds trained (the divergence fails a check of its own)."""
    members = [{"train.seed": s, "task.n_tasks": k} for s in (0, 1) for k in (1, 4, 0)]
    losses = np.array([0.9, 0.4, 0.35, 99.0, 0.5, 0.37])  # member 3 (seed 1, pool 1) diverged: 99
    s = pool_summary(losses, members, {0: 0.5, 1: 0.3, 4: 0.46})
    assert sorted(s["by_pool"]) == [0, 1, 4]
    for k, values in {0: [0.35, 0.37], 1: [0.9, 99.0], 4: [0.4, 0.5]}.items():
        np.testing.assert_array_equal(s["by_pool"][k], values)  # copies of the inputs
    assert (s["smallest"], s["beyond"]) == (1, [4])  # pool 4: 0.45 < 0.46; pool 1: 49.95 > 0.3
    np.testing.assert_allclose([s["small"], s["infinite"]], [49.95, 0.36], rtol=1e-15)  # pools 1 and 0
    no_fresh = pool_summary(losses, members, {1: 0.3, 4: 0.46})
    np.testing.assert_allclose(no_fresh["infinite"], 0.45, rtol=1e-15)  # the largest pool stands in for 0


def test_the_weights_figure_puts_any_rescaling_of_the_construction_on_the_construction():
    """The layer is the same function for (P c, Q / c), c of either sign: each such model rescales onto the
    construction's P (-eta in the label row) and Q (identity on the inputs)."""
    from jaxicl.models.pq_view import from_pq, to_pq

    construction = gd_step_model(4, 0.3)
    p, q = to_pq(construction)
    for c in (1.0, 2.5, -0.4):
        rp, rq = rescaled_pq(from_pq(p * c, q / c))
        np.testing.assert_allclose(rp, p[0, 0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(rq, q[0, 0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p[0, 0][-1, -1], -0.3, rtol=1e-6)  # what the figure's construction panels show
    np.testing.assert_allclose(q[0, 0][:-1, :-1], np.eye(4), rtol=0, atol=1e-7)


def test_a_check_stores_non_finite_values_as_strings_so_result_json_stays_strict_json():
    import json

    from experiments.common.result import check_above, check_below

    rows = [Check("a", float("nan"), "< 1", False).as_dict(), check_below("b", float("inf"), 1.0).as_dict(),
            check_above("c", 2, 1.0).as_dict(), Check("d", 3, "== 3", True).as_dict()]
    assert [r["value"] for r in rows] == ["nan", "inf", 2.0, 3]
    assert [r["passed"] for r in rows] == [False, False, True, True]
    assert not check_below("e", 1.0, 1.0).passed and not check_above("f", 1.0, 1.0).passed  # strict, as "< 1" says
    json.dumps(rows, allow_nan=False)  # a bare NaN or Infinity is not JSON


def test_the_lr_sweep_axis_names_the_configured_optimiser_and_schedule(tmp_path, monkeypatch):
    """loss_vs_lr.png's x label said "peak learning rate (adam)" whatever gd.train was (an sgd constant-lr override
    was accepted and mislabelled); the label comes from the config now."""
    import matplotlib.pyplot as plt

    from experiments import sweep_lr_seeds
    from jaxicl.train import TrainConfig

    figures = []
    monkeypatch.setattr(sweep_lr_seeds, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    table = [{"train.seed": s, "train.lr": lr, "init_scale": 0.1, "diverged_at": None, "loss": 1.0 + lr + s}
             for s in range(2) for lr in (1e-3, 1e-2)]
    for train, want in ((TrainConfig(optimizer="sgd", schedule="constant"), "learning rate (sgd, constant)"),
                        (TrainConfig(optimizer="adam", schedule="warmup_cosine", warmup_steps=5),
                         "peak learning rate (adam, warmup-cosine)")):
        sweep_lr_seeds._plot_lr(table, 1.0, [], 0.05, train, str(tmp_path))
        assert figures[-1].axes[0].get_xlabel() == want
        plt.close(figures[-1])
