"""The computations behind the checks of the nn_* experiments, each against an independent value.

Finite differences, sphere moments, synthetic runs with known fits, planted weights whose
predictions are known in closed form, and hand-built sweep results.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import nn_fig3_training as fig3
from experiments.common.nearest_neighbor import (eval_batches, family_loss, log_spaced, member_tables, nn_metrics,
                                                paper_loss, smooth)
from experiments.nn_fig2_landscape import _hessian_grid, _hessian_terms
from experiments.nn_random_init import failing_scales, scale_means
from jaxicl.models.nearest_neighbor_attention import NearestNeighborAttention
from jaxicl.tasks import nearest_neighbor as nn_task
from jaxicl.tasks import sample_batch
from jaxicl.theory import nearest_neighbor as theory
from jaxicl.train import SweepResult
from jaxicl.validation import ConfigError


def test_hessian_grid_equals_central_second_differences_of_the_reduced_loss(x64):
    s = theory.sample_inner_products(jax.random.key(0), 4, 4, 2000)
    points = jnp.array([[1.0, 2.0], [3.0, 0.5], [-2.0, 4.0]])
    hess = np.asarray(_hessian_grid(points, s))
    reduced_loss = jax.jit(theory.reduced_loss)
    loss = lambda a, b: float(reduced_loss(a, b, s))  # noqa: E731
    h = 1e-3
    for (a, b), got in zip(np.asarray(points), hess):
        h11 = (loss(a + h, b) - 2 * loss(a, b) + loss(a - h, b)) / h ** 2
        h22 = (loss(a, b + h) - 2 * loss(a, b) + loss(a, b - h)) / h ** 2
        h12 = (loss(a + h, b + h) - loss(a + h, b - h) - loss(a - h, b + h) + loss(a - h, b - h)) / (4 * h ** 2)
        # truncation O(h^2) ~ 1e-6 relative, rounding ~1e-16 / h^2 ~ 1e-10
        np.testing.assert_allclose(got, [[h11, h12], [h12, h22]], rtol=1e-5, atol=1e-7 * np.abs(got).max())


def test_per_sample_hessians_average_to_the_hessian_of_the_mean(x64):
    s = theory.sample_inner_products(jax.random.key(1), 4, 4, 500)
    point = jnp.array([2.0, 1.5])
    terms = _hessian_terms(point, s)
    assert terms.shape == (500, 2, 2)
    np.testing.assert_allclose(terms.mean(0), _hessian_grid(point[None], s)[0], rtol=1e-10)  # float64, two programs


def test_inner_products_have_the_moments_of_a_coordinate_on_the_sphere():
    """s = <x, e_1> for x uniform on S^(d-1): E s = 0, E s^2 = 1/d, E s^4 = 3/(d(d+2))."""
    for d in (2, 5):
        s = np.asarray(theory.sample_inner_products(jax.random.key(d), 3, d, 100_000), np.float64).ravel()
        assert np.all(np.abs(s) <= 1 + 1e-6)
        for power, moment in ((1, 0.0), (2, 1 / d), (4, 3 / (d * (d + 2)))):
            v = s ** power
            assert abs(v.mean() - moment) < 5 * v.std() / np.sqrt(len(v)), (d, power)


LONG = dict(long_horizons=(10_000, 100_000), long_record_every=100)


def _synthetic_run(xi1, xi2, steps: int, reduced_no_d_scale: float, growth=None) -> dict:
    """A run of 2 seeds whose seed-mean (xi1, xi2) [steps] are given; the reduced path is planted on it, and the
    long-horizon paths (at LONG's record steps) on growth(t) -> (xi1, xi2) and on half its xi1."""
    t_long = np.maximum(np.arange(max(LONG["long_horizons"]) // LONG["long_record_every"] + 1)
                        * LONG["long_record_every"], 1)
    long = np.stack(growth(t_long), -1)
    t = np.arange(steps)
    spread = np.array([-0.1, 0.1])  # the seeds differ, their mean is the given path
    xi = np.stack([xi1, xi2], -1)
    path = np.concatenate([xi[::fig3.RECORD], xi[-1:]])  # reduced[k] at step RECORD k, plus the final state
    return {"n": 4,
            "per_step": {"loss": 1 / (t[:, None] + 1) + np.array([0.0, 0.01]),
                         "xi1": xi1[:, None] + spread, "xi2": xi2[:, None] + spread,
                         "off_family": np.tile([0.01, 0.03], (steps, 1))},
            "evals": {"shifted_mse": np.array([[0.1, 0.2], [1e-3, 2e-3]]),
                      "agree_1nn": np.array([[0.5, 0.6], [0.95, 0.92]]),
                      "self_weight": np.array([[0.01, 0.02], [0.005, 0.007]]),
                      "self_weight_max": np.array([[0.5, 0.6], [0.1, 0.2]]),
                      "xi1": np.array([[0.0, 0.0], [3.0, 4.0]]), "xi2": np.array([[0.0, 0.0], [15.0, 30.0]]),
                      "argmax_is_1nn": np.array([[0.2, 0.3], [0.97, 0.99]])},
            "reduced": path, "reduced_no_d": path / reduced_no_d_scale, "d": 4,
            "long": long, "lemma12": long * np.array([0.5, 1.0]),
            # L = 2 / log t on the long path (L log t constant; t = 1 has log t = 0 and is left out)
            "long_loss": np.r_[1.0, 2 / np.log(t_long[1:])],
            "long_self_margin": np.array([-3.0, -1.0, -2.0]), "lemma12_self_margin": np.array([0.5, -1.0]),
            "lemma12_self_over_fraction": 0.25}


def test_summaries_of_a_run_growing_exactly_like_log_t():
    cfg = fig3.Config(runs=("4x4",), seeds=(0, 1), train=dataclasses.replace(fig3.Config.train, steps=200,
                                                                           steps_per_call=100), **LONG)
    t = np.maximum(np.arange(cfg.train.steps), 1)
    log_growth = lambda t: (1.7 * np.log(t) + 3, 2.3 * np.log(t) + 1)  # noqa: E731
    xi1, xi2 = log_growth(t)
    s = fig3._summaries(cfg, _synthetic_run(xi1, xi2, cfg.train.steps, 1.01, log_growth))
    np.testing.assert_allclose(list(s["long_drift"].values()), 1.0, rtol=1e-9)  # exact a log t + b at every horizon
    t_end = max(LONG["long_horizons"])
    np.testing.assert_allclose(s["long_ratio"], (1.7 * np.log(t_end) + 3) / (2.3 * np.log(t_end) + 1), rtol=1e-12)
    t_first = LONG["long_record_every"]  # the planted ratio falls with t: its max is at the first record after 0
    ratio = 0.5 * (1.7 * np.log(t_first) + 3) / (2.3 * np.log(t_first) + 1)
    np.testing.assert_allclose(s["lemma12_max_ratio"], ratio, rtol=1e-12)
    np.testing.assert_allclose(s["lemma12_sigma"], 3 * np.log(2 * 4**4 * 4 * (2 * 4 * 2) ** 2), rtol=1e-12)
    z = 4 + np.exp(-cfg.sigma)
    np.testing.assert_allclose(s["initial_loss"], 0.5 * (1 - 2 / z + 4 / z ** 2), rtol=1e-15)
    # float64 means of a few numbers
    np.testing.assert_allclose(s["final_loss"], np.mean(1 / np.arange(191, 201)) + 0.005, rtol=1e-12)
    np.testing.assert_allclose(s["mid_loss"], np.mean(1 / np.arange(91, 101)) + 0.005, rtol=1e-12)
    assert (s["shifted_mse"], s["agreement"], s["off_family"]) == (2e-3, 0.92, 0.03)  # max, min, max of the last row
    np.testing.assert_allclose(s["slopes"], [1.7, 2.3], rtol=1e-10)  # an exact a log t + b: least squares is exact
    np.testing.assert_allclose([s["r2"], s["slope_drift"]], 1.0, rtol=1e-10)
    # the planted reduced path: no gap, but for the seed mean's rounding (the mean of v - 0.1 and v + 0.1)
    np.testing.assert_allclose([s["reduced_gap"], s["reduced_gap_early"]], 0.0, atol=1e-14)
    np.testing.assert_allclose(s["reduced_gap_no_d"], 0.01, rtol=1e-10)  # |xi - xi / 1.01| / (xi / 1.01)
    np.testing.assert_allclose(s["ratio"], (1.7 * np.log(199) + 3) / (2.3 * np.log(199) + 1), rtol=1e-12)
    # L log t constant on the long path: the late-half mean over the early-half mean is 1 at every horizon; the
    # stalled-loss contrast is that ratio for log t itself (numpy here, on the same halves of the log window)
    np.testing.assert_allclose(list(s["loss_log_t"].values()), 1.0, rtol=1e-12)
    t_long = np.arange(1, t_end // LONG["long_record_every"] + 1) * LONG["long_record_every"]
    for h, stall in s["stall"].items():
        lo, mid = cfg.fit_from * h, np.sqrt(cfg.fit_from * h * h)
        logs = np.log(t_long)
        late, early = logs[(t_long >= mid) & (t_long <= h)], logs[(t_long >= lo) & (t_long < mid)]
        np.testing.assert_allclose(stall, late.mean() / early.mean(), rtol=1e-12)
    np.testing.assert_allclose(s["long_loss_log_t_final"], 2.0, rtol=1e-12)
    np.testing.assert_allclose(s["self_weight"], [0.015, 0.015, 0.006], rtol=1e-12)  # seed means: init, peak, end
    assert s["self_weight_max"] == 0.2 and s["argmax_1nn"] == 0.97  # the last row's max and min
    np.testing.assert_allclose(s["self_over_lemma12"], max(0.1 * np.exp(1.0), 0.2 * np.exp(2.0)), rtol=1e-12)
    np.testing.assert_allclose(s["self_bound_2xi1"], max(np.exp(6.0 - 15.0), np.exp(8.0 - 30.0)), rtol=1e-12)
    np.testing.assert_allclose([s["long_self_over_lemma12"], s["lemma12_self_over_bound"]], np.exp([-1.0, 0.5]),
                               rtol=1e-12)


def test_fit_from_is_refused_unless_each_half_of_every_log_window_holds_two_steps(recwarn):
    """fit_from=0 (log 0) or >= 1 (an empty half) trained the runs, then crashed in fit_log_growth; near 1 a half
    held one step (a RankWarning and a meaningless slope). The full-W fits read every step: with 200 steps,
    fit_from = 0.95 splits [190, 200) at 194.9 into 190..194 and 195..199 and is accepted, every fit running; 0.99
    leaves {198} and {199}. 0.96 leaves no step recorded every 10 (the last, 190) for the gap to the reduced
    dynamics. (The check first counted the full-W halves on that every-10 grid and refused 0.85, which fits.)"""
    train = dataclasses.replace(fig3.Config.train, steps=200, steps_per_call=100)
    cfg = fig3.Config(runs=("4x4",), seeds=(0, 1), train=train, fit_from=0.95, **LONG)
    t = np.maximum(np.arange(cfg.train.steps), 1)
    log_growth = lambda t: (1.7 * np.log(t) + 3, 2.3 * np.log(t) + 1)  # noqa: E731
    for fit_from in (0.95, 0.85):
        run = dataclasses.replace(cfg, fit_from=fit_from)
        s = fig3._summaries(run, _synthetic_run(*log_growth(t), cfg.train.steps, 1.01, log_growth))
        # exact a log t + b: each half's least-squares slope is exact, so their ratio is 1 but for rounding
        np.testing.assert_allclose([s["slope_drift"], *s["long_drift"].values()], 1.0, rtol=1e-9)
    assert not recwarn.list  # no RankWarning from a one-point fit
    for fit_from, halves in ((0.99, "1 and 1"), (0.0, "0 and 200"), (1.0, "0 and 0")):
        with pytest.raises(ConfigError, match=rf"^fit_from={fit_from} leaves {halves} steps in the halves of the "
                           r"log-t window \[fit_from t, t\] at t = 200 \(split at sqrt\(fit_from\) t, steps every "
                           r"1\): the log-t fits need t > 0 and 2 steps in each half; fit_from must be in \(0, 1\), "
                           r"far enough from both ends$"):
            dataclasses.replace(cfg, fit_from=fit_from)
    with pytest.raises(ConfigError, match=r"^fit_from=0.96 leaves no step of the full-W runs at or after fit_from \* "
                       r"train.steps = 192 where they meet the reduced dynamics \(every 10 steps, the last at 190\)$"):
        dataclasses.replace(cfg, fit_from=0.96)


@pytest.mark.parametrize("growth,xi1_scale,passed", [
    (lambda t: (np.log(t) + 1, 3 * np.log(t) + 1), 0.5, True),
    (lambda t: (1.7 * np.log(t) + 3, 2.3 * np.log(t) + 1), 0.6, False)])
def test_lemma12_notes_say_whether_the_ratio_bound_holds_as_measured(growth, xi1_scale, passed):
    """The notes said the ratio bound xi1 <= 7/15 xi2 "fails on this path" and is exceeded at cfg.sigma whatever was
    measured; the smoke run's xi1_over_xi2_at_lemma12_sigma passed (0.463). A run planted on both sides of 7/15."""
    cfg = fig3.Config(runs=("4x4",), seeds=(0, 1), train=dataclasses.replace(fig3.Config.train, steps=200,
                                                                           steps_per_call=100), **LONG)
    t = np.maximum(np.arange(cfg.train.steps), 1)
    run = _synthetic_run(*growth(t), cfg.train.steps, 1.0, growth)
    run["lemma12"] = run["long"] * np.array([xi1_scale, 1.0])
    ratio, self_weight = fig3.lemma12_checks(cfg, [run], [fig3._summaries(cfg, run)])
    assert ratio.passed is passed
    # the planted ratios fall with t: from sigma_12 the max is at the first record after 0; from cfg.sigma the
    # note gives the last record's (t = 1e5)
    (a, b), (c, e) = growth(LONG["long_record_every"]), growth(max(LONG["long_horizons"]))
    max_ratio, sigma_ratio = xi1_scale * a / b, c / e
    assert [bool(max_ratio < 7 / 15), bool(sigma_ratio < 7 / 15)] == [passed, passed]  # both sides planted
    assert (f"from sigma = 3.0 the ratio at t = 1e+05 is {sigma_ratio:.3f} (worst run), "
            f"{'within' if passed else 'above'} it.") in ratio.note
    second = (f"which holds on this path (max xi1 / xi2 {max_ratio:.3f} < 7/15, xi1_over_xi2_at_lemma12_sigma), so "
              "q_(N+1) <= exp(-xi2 / 15) on every prompt." if passed else
              f"which fails on this path (max xi1 / xi2 {max_ratio:.3f} >= 7/15, xi1_over_xi2_at_lemma12_sigma), and "
              "then prompts whose nearest point is far enough (1 - s_(1) > 14/15 xi2 / xi1 < 2) can exceed "
              "exp(-xi2 / 15).")
    assert f"the second needs xi1 <= 7/15 xi2, {second}" in self_weight.note


def test_summaries_fit_the_exponent_of_a_power_law():
    cfg = fig3.Config(runs=("4x4",), seeds=(0, 1), train=dataclasses.replace(fig3.Config.train, steps=200,
                                                                           steps_per_call=100), **LONG)
    t = np.maximum(np.arange(cfg.train.steps), 1)
    power = lambda t: (2 * t ** 0.4, 3 * t ** 0.3)  # noqa: E731
    s = fig3._summaries(cfg, _synthetic_run(*power(t), cfg.train.steps, 1.0, power))
    np.testing.assert_allclose(s["powers"], [0.4, 0.3], rtol=1e-6)  # log xi is exactly linear in log t
    assert s["r2"] < 1 and s["slope_drift"] > 1  # faster than log t: d xi / d log t grows
    # t^p over a log window [a, b] halved at sqrt(ab): the late / early slope ratio of a log-linear fit is
    # about (b / a)^(p / 2) = 10^(0.2) for p = 0.4 (exact for the secant slopes; the fits differ slightly)
    assert all(1.4 < v < 1.8 for v in s["long_drift"].values())


def _merged_model(w: jax.Array, dim: int):
    model = NearestNeighborAttention(dim, rngs=nnx.Rngs(0))
    model.w[...] = w
    return nnx.split(model)


def test_family_loss_reports_the_family_coordinates_and_the_distance_to_it(x64):
    w = theory.from_reduced(2.0, 5.0, 3)
    w = w.at[0, 0].add(0.6).at[0, 1].set(0.3).at[3, 3].set(-0.4)  # diag x block (2.6, 2, 2): xi1 = 2.2
    graphdef, params = _merged_model(w, 3)
    batch = sample_batch(nn_task.sample, nn_task.NearestNeighbor(dim=3, n_context=4), jax.random.key(0), 8, axis=None)
    loss, aux = family_loss(graphdef)(params, batch)
    np.testing.assert_allclose(loss, paper_loss(graphdef)(params, batch)[0], rtol=1e-15)  # the same computation
    np.testing.assert_allclose([aux["xi1"], aux["xi2"]], [2.2, 5.0], rtol=1e-14)
    # W - W(2.2, 5) = diag(0.4, -0.2, -0.2, -0.4, 0) + 0.3 e_0 e_1^T; |W|_F^2 = 2.6^2 + 8 + 0.09 + 0.16 + 25
    np.testing.assert_allclose(aux["off_family"], 0.7 / np.sqrt(40.01), rtol=1e-12)


def test_member_tables_fill_nan_after_a_member_stops():
    members = [{"train.seed": 0}, {"train.seed": 1}]
    train_rows = [{"step": t, "split": "train", "member": m, "train.seed": m, "loss": 10.0 * m + t, "xi1": -t}
                  for m, steps in ((0, 4), (1, 2)) for t in range(steps)]  # member 1 stops after 2 steps
    eval_rows = [{"step": t, "split": "eval", "member": m, "train.seed": m, "agree_1nn": 0.1 * t + m}
                 for t in (0, 2, 4) for m in (0, 1)]
    result = SweepResult(members, None, {1: 2}, train_rows, eval_rows, 2, {})
    per_step, eval_steps, evals = member_tables(result, 4)
    assert set(per_step) == {"loss", "xi1"} and set(evals) == {"agree_1nn"}
    np.testing.assert_array_equal(per_step["loss"], [[0, 10], [1, 11], [2, np.nan], [3, np.nan]])  # copies
    np.testing.assert_array_equal(per_step["xi1"][:, 0], [0, -1, -2, -3])
    np.testing.assert_array_equal(eval_steps, [0, 2, 4])
    np.testing.assert_array_equal(evals["agree_1nn"], [[0.0, 1.0], [0.2, 1.2], [0.4, 1.4]])


def test_nn_metrics_at_the_paper_init_are_those_of_the_label_mean(x64):
    """W = diag(0, .., 0, -sigma): every context point scores 0 and the query -sigma, so the prediction
    is sum_j y_j / (N + e^-sigma)."""
    task, sigma = nn_task.NearestNeighbor(dim=3, n_context=4), 3.0
    uniform, shifted = eval_batches(task, 0, 256)
    graphdef, params = nnx.split(NearestNeighborAttention(3, sigma=sigma, rngs=nnx.Rngs(0)))
    m = jax.jit(nn_metrics(graphdef, uniform, shifted))(params)
    expected = {}
    for name, batch in (("uniform", uniform), ("shifted", shifted)):
        pred = np.asarray(batch.info["labels"])[..., 0].sum(-1) / (4 + np.exp(-sigma))
        target = np.asarray(batch.targets)[:, -1]
        expected[f"{name}_mse"] = np.mean((pred - target) ** 2)
        if name == "uniform":  # class 1 is the label -1; a prediction of exactly 0 is class 0
            expected["agree_1nn"] = np.mean((pred < 0) == (target < 0))
    assert 0.5 < expected["agree_1nn"] < 1  # the label mean often has the 1-NN label's sign, not always
    for name, value in expected.items():
        np.testing.assert_allclose(m[name], value, rtol=1e-12, err_msg=name)  # float64
    # 3 classes, 2 label coordinates: the MSE is the squared error summed over the coordinates, averaged over prompts
    task = nn_task.NearestNeighbor(dim=3, n_context=4, num_classes=3)
    uniform, shifted = eval_batches(task, 0, 256)
    graphdef, params = nnx.split(NearestNeighborAttention(3, task.label_dim, sigma=sigma, rngs=nnx.Rngs(0)))
    m = jax.jit(nn_metrics(graphdef, uniform, shifted))(params)
    for name, batch in (("uniform", uniform), ("shifted", shifted)):
        pred = np.asarray(batch.inputs)[:, :4, 3:5].sum(1) / (4 + np.exp(-sigma))  # [B, 2] the context label slots
        want = np.mean(np.sum((pred - np.asarray(batch.targets)[:, -1]) ** 2, -1))
        np.testing.assert_allclose(m[f"{name}_mse"], want, rtol=1e-12, err_msg=name)


def test_nn_metrics_of_a_hard_1nn_weight_matrix(x64):
    """xi1 = 1e7, xi2 = 1e8: the softmax puts all weight on the nearest context point, the prediction is its label."""
    task = nn_task.NearestNeighbor(dim=3, n_context=4)
    uniform, shifted = eval_batches(task, 0, 256)
    graphdef, params = _merged_model(theory.from_reduced(1e7, 1e8, 3), 3)
    m = jax.jit(nn_metrics(graphdef, uniform, shifted))(params)
    assert float(m["agree_1nn"]) == 1.0  # 256 prompts: an exact count
    assert float(m["uniform_mse"]) < 1e-20 and float(m["shifted_mse"]) < 1e-20


def test_scale_means_and_failing_scales():
    member_scales = np.array([0.3, 0.3, 5.0, 5.0, 1.0, 1.0])
    metrics = {"agree": np.array([0.9, 0.96, 0.5, 0.7, 0.86, 0.8]), "off_family": np.arange(6.0)}
    per_scale = scale_means(member_scales, metrics, (0.3, 5.0, 1.0))
    assert list(per_scale) == [0.3, 5.0, 1.0]
    np.testing.assert_allclose([[v["agree"], v["off_family"]] for v in per_scale.values()],
                               [[0.93, 0.5], [0.6, 2.5], [0.83, 4.5]], rtol=1e-15)
    assert failing_scales(per_scale, 0.85) == [5.0, 1.0]  # mean agreement below 0.85
    assert failing_scales({0.1: {"agree": 0.9}, 3.0: {"agree": 0.84}, 0.5: {"agree": 0.85}}, 0.85) == [3.0]


def test_the_long_horizon_reduced_dynamics_equals_the_recorded_trajectory_at_small_step_counts():
    s = theory.sample_inner_products(jax.random.key(3), 4, 4, 512)
    fine = np.asarray(theory.reduced_gd(0.0, 3.0, s, eta=2.0, dim=4, steps=400, record_every=10))
    coarse = np.asarray(theory.reduced_gd(0.0, 3.0, s, eta=2.0, dim=4, steps=400, record_every=100))
    # the same 400 steps, scanned in blocks of 10 and of 100: float32 sums in two compiled programs
    np.testing.assert_allclose(coarse, fine[::10], rtol=1e-5)


def test_log_slope_drift_and_lemma12_sigma_against_closed_forms():
    t = np.geomspace(100, 10_000, 2001)  # log-uniform: each half is symmetric about its centre
    assert abs(theory.log_slope_drift(t, 3 * np.log(t) + 2, 100, 10_000) - 1.0) < 1e-9
    # (log t)^2: a line fitted on points symmetric about log-centre c has slope 2c exactly; c = 2.5, 3.5 ln 10
    assert abs(theory.log_slope_drift(t, np.log(t) ** 2, 100, 10_000) - 3.5 / 2.5) < 1e-3
    a = (2 * 16 * np.sqrt(8)) ** (-2 / 5)
    np.testing.assert_allclose(theory.lemma12_sigma(16, 8), 3 * np.log(2 * 16**4 * 8 / a), rtol=1e-12)
    assert 46 < theory.lemma12_sigma(16, 8) < 48  # the notes: about 47 for d = 8, N = 16


def test_the_compensated_float32_reduced_dynamics_follows_float64_over_many_steps(x64):
    s64 = theory.sample_inner_products(jax.random.key(4), 4, 4, 256).astype(jnp.float64)
    kw = dict(eta=2.0, dim=4, steps=50_000, record_every=5000)
    ref = np.asarray(theory.reduced_gd(0.0, 3.0, s64, **kw))
    got = np.asarray(theory.reduced_gd(0.0, 3.0, s64.astype(jnp.float32), **kw))
    assert got.dtype == np.float32
    # per-step gradients carry float32 rounding (~1e-7 relative); compensated sums keep the path within ~1e-5
    np.testing.assert_allclose(got, ref, rtol=2e-5)


def test_smooth_is_a_centred_window_mean_by_a_loop_and_log_spaced_spans_1_to_n():
    """The window at t spans t +- min(half_width, t // 4, T - 1 - t): the curves' smoothing, by a plain loop."""
    values = np.random.default_rng(0).normal(size=(120, 2, 3))
    want = np.empty_like(values)
    for t in range(120):
        h = min(12, t // 4, 119 - t)
        want[t] = values[t - h:t + h + 1].mean(0)
    np.testing.assert_allclose(smooth(values), want, rtol=1e-12, atol=1e-12)
    steps = log_spaced(5000, 50)
    assert steps[0] == 1 and steps[-1] == 5000 and np.all(np.diff(steps) > 0) and 40 <= len(steps) <= 50
