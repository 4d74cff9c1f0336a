import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import registry
from experiments.common.runner import run_experiment

NN_EXPERIMENTS = [name for name in registry.EXPERIMENTS if name.startswith("nn_")]


def test_the_three_nn_experiments_are_registered():
    assert sorted(NN_EXPERIMENTS) == ["nn_fig2_landscape", "nn_fig3_training", "nn_random_init"]


@pytest.mark.parametrize("name", NN_EXPERIMENTS)
def test_smoke_run_writes_every_check_and_figure(name, tmp_path):
    result = run_experiment(name, "smoke", str(tmp_path))
    out = tmp_path / name
    with open(out / "result.json") as f:
        stored = json.load(f)
    assert stored["checks"] == result["checks"] and len(stored["checks"]) >= 2
    for check in stored["checks"]:
        assert isinstance(check["value"], (int, float)) and math.isfinite(check["value"]), check
    for fig in stored["figures"]:
        assert os.path.getsize(out / fig) > 10_000


def test_random_init_notes_state_the_run_optimiser(tmp_path):
    """The setup note said "SGD lr=..." whatever train.optimizer was; it states the config's optimiser now."""
    import dataclasses

    from experiments import nn_random_init

    smoke = nn_random_init.PRESETS["smoke"]
    train = dataclasses.replace(smoke.train, optimizer="adam", lr=0.01, steps=20, steps_per_call=10)
    cfg = dataclasses.replace(smoke, train=train, eval_prompts=64)
    notes = {c.name: c.note for c in nn_random_init.run(cfg, str(tmp_path)).checks}
    assert "adam lr 0.01 constant, batch 64, 20 steps" in notes["agreement_with_1nn_at_reference_scale"]
    assert "SGD" not in notes["agreement_with_1nn_at_reference_scale"]


def test_nn_metrics_attention_diagnostics_match_numpy_brute_force():
    """self_weight (q_{N+1}) and argmax_is_1nn against float64 numpy on the raw tokens: the scores h_j^T W h_q over
    all N + 1 tokens, and i* = argmin_j |x_j - x_q| from the tokens' x (not the sampler's `nearest`)."""
    from flax import nnx

    from experiments.common.nearest_neighbor import eval_batches, nn_metrics
    from jaxicl.models.nearest_neighbor_attention import NearestNeighborAttention
    from jaxicl.tasks import nearest_neighbor as nn_task
    from jaxicl.theory.nearest_neighbor import from_reduced

    n, d = 6, 4
    task = nn_task.NearestNeighbor(dim=d, n_context=n)
    uniform, shifted = eval_batches(task, 0, 64)
    graphdef, params = nnx.split(NearestNeighborAttention(d, rngs=nnx.Rngs(0)))
    # off the family, with the query's own score (xi1 - xi2 = 2.5) competing: every outcome occurs
    w = np.asarray(from_reduced(4.0, 1.5, d)) + 0.4 * np.random.default_rng(0).standard_normal((d + 2, d + 2))
    params["w"].set_value(jnp.asarray(w, jnp.float32))
    metrics = nn_metrics(graphdef, uniform, shifted)(params)

    tokens = np.asarray(uniform.inputs, np.float64)  # [B, N + 1, D]
    scores = np.einsum("btk,kl,bl->bt", tokens, w.astype(np.float32).astype(np.float64), tokens[:, -1])
    q = np.exp(scores - scores.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    dist = np.linalg.norm(tokens[:, :-1, :d] - tokens[:, -1:, :d], axis=-1)
    nearest = np.argmin(dist, -1)
    hits = np.argmax(q, -1) == nearest
    # integer counts compared exactly: no near ties in either argmax (float32 rounding moves weights of size < 1
    # with scores of size ~5 by ~1e-6 at most, and distances by ~1e-7)
    top2 = np.sort(q, -1)[:, -2:]
    assert np.min(top2[:, 1] - top2[:, 0]) > 1e-5
    assert np.min(np.diff(np.sort(dist, -1)[:, :2], axis=-1)) > 1e-5
    assert 0 < hits.sum() < len(hits) and (np.argmax(q, -1) == n).any()  # misses both ways: to the query, to j != i*
    assert round(float(metrics["argmax_is_1nn"]) * len(hits)) == hits.sum()
    # float32 softmax of scores of size ~5 against float64: relative error ~1e-6
    np.testing.assert_allclose(metrics["self_weight"], q[:, -1].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["self_weight_max"], q[:, -1].max(), rtol=1e-5)


def test_the_self_weight_panel_plots_the_max_over_prompts_against_the_per_prompt_bound():
    """training.png's q_(N+1) panel: Lemma 12's exp(-xi2/15) bounds each prompt, so the solid curve is the max over
    prompts and seeds (the check note's number); it plotted the seed mean of the prompts' mean, far below."""
    import matplotlib.pyplot as plt

    from experiments.nn_fig3_training import _plot_self_weight

    xi2 = np.array([[0.0, 0.0], [15.0, 30.0]])  # [evals, seeds]
    r = {"eval_steps": np.array([0, 10]),
         "evals": {"self_weight": np.array([[0.2, 0.3], [0.01, 0.03]]),
                   "self_weight_max": np.array([[0.5, 0.7], [0.6, 0.2]]), "xi2": xi2}}
    fig, ax = plt.subplots()
    _plot_self_weight(ax, r, "C0", "N=4, d=4")
    plt.close(fig)
    solid, mean, bound = ax.get_lines()
    assert solid.get_label() == "N=4, d=4" and solid.get_linestyle() == "-"
    np.testing.assert_array_equal(solid.get_ydata(), [0.7, 0.6])
    np.testing.assert_array_equal(mean.get_ydata(), [0.25, 0.02])
    assert mean.get_linestyle() == "--" and bound.get_linestyle() == ":"
    np.testing.assert_allclose(bound.get_ydata(), [1.0, np.exp(-1.5)], rtol=1e-15)  # float64 exp: rounding only


def test_landscape_heatmap_cells_are_centred_on_the_grid_points(tmp_path, monkeypatch):
    """imshow with extent=(first, last grid point) put the cells' edges, not their centres, on the grid: each value
    was drawn half a cell off the contour lines drawn through the same grid."""
    import matplotlib.pyplot as plt

    from experiments import nn_fig2_landscape as fig2

    figures = []
    monkeypatch.setattr(fig2, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    xi1, xi2 = np.linspace(-1.0, 2.0, 4), np.linspace(0.0, 1.0, 3)
    loss = np.arange(12.0).reshape(3, 4)
    fig2._plot(fig2.PRESETS["smoke"], xi1, xi2, loss, loss - 5.0, str(tmp_path))
    fig = figures[0]
    plt.close(fig)
    for ax in (fig.axes[0], fig.axes[3]):  # the loss and the smallest eigenvalue (axes 1, 2: its bar, the surface)
        (mesh,) = ax.collections[:1]
        corners = mesh.get_coordinates()  # (3 + 1, 4 + 1, 2): cell edges
        centres_x = (corners[0, :-1, 0] + corners[0, 1:, 0]) / 2
        centres_y = (corners[:-1, 0, 1] + corners[1:, 0, 1]) / 2
        np.testing.assert_allclose(centres_x, xi1, atol=1e-12)  # midpoints of float64 edges: rounding only
        np.testing.assert_allclose(centres_y, xi2, atol=1e-12)


def test_the_landscape_grid_needs_two_points_per_axis_which_the_plots_draw(tmp_path, monkeypatch):
    """grid=1 passed the config, computed the landscape, then failed in matplotlib's contour (it needs a 2 x 2 grid)."""
    import dataclasses

    import matplotlib.pyplot as plt

    from experiments import nn_fig2_landscape as fig2
    from jaxicl.validation import ConfigError

    with pytest.raises(ConfigError, match=r"grid must be in \[2, inf\], got 1"):
        dataclasses.replace(fig2.PRESETS["smoke"], grid=1)
    figures = []
    monkeypatch.setattr(fig2, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    xi = np.array([-1.0, 2.0])
    loss = np.array([[0.0, 1.0], [2.0, 3.0]])
    assert fig2._plot(dataclasses.replace(fig2.PRESETS["smoke"], grid=2), xi, xi, loss, loss - 1.5,
                      str(tmp_path)) == "landscape"
    plt.close(figures[0])
    assert len(figures[0].axes[0].collections) == 2  # the heatmap and its contour lines
