import json
import math
import re

import numpy as np
import pytest

from experiments import registry
from experiments.common.runner import run_experiment

AR_EXPERIMENTS = [n for n in registry.EXPERIMENTS if n.startswith("ar_")]


def test_every_ar_experiment_is_registered_with_three_presets():
    assert sorted(AR_EXPERIMENTS) == ["ar_fig3_orthogonal", "ar_fig3_unitary", "ar_fig5_augmented",
                                      "ar_fig6_pe_only", "ar_fig7_non_augmented", "ar_gd_step"]
    for name in AR_EXPERIMENTS:
        assert set(registry.load(name).PRESETS) == {"smoke", "quick", "full"}


@pytest.mark.parametrize("name", AR_EXPERIMENTS)
def test_smoke_run_writes_every_check(tmp_path, name):
    result = run_experiment(name, "smoke", str(tmp_path))
    with open(tmp_path / name / "result.json") as f:
        stored = json.load(f)
    assert stored["checks"] == result["checks"] and len(stored["checks"]) >= 2
    for c in stored["checks"]:
        assert isinstance(c["value"], float) and math.isfinite(c["value"]), c
    for fig in stored["figures"]:
        assert (tmp_path / name / fig).stat().st_size > 1000


def test_fig7_local_mass_is_one_for_uniform_causal_weights():
    from experiments.ar_fig7_non_augmented import local_mass
    t = 12
    uniform_weights = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    local_weights = np.zeros((t, t))
    local_weights[np.arange(t), np.arange(t)] = 1.0
    mass, uniform, early = local_mass(np.stack([uniform_weights, local_weights]))
    np.testing.assert_allclose(mass / uniform, [1.0, 1.0 / uniform])
    np.testing.assert_allclose(early, [np.mean(2.0 / np.arange(3, t + 1)), 0.0])


def test_notes_state_the_run_optimiser_not_fixed_text(tmp_path):
    """ar_gd_step's loss note said "SGD" and ar_fig3's "GD steps" whatever train.optimizer was (an adam run was
    reported as SGD); both now state the optimiser, lr and schedule of the config."""
    import dataclasses

    from experiments import ar_fig3_unitary, ar_gd_step
    from experiments.common.autoregressive import run_fig3
    from experiments.common.run_config import optimizer_note

    smoke = ar_gd_step.PRESETS["smoke"]
    adam = dataclasses.replace(smoke.train, optimizer="adam", steps=20, steps_per_call=20)
    cfg = dataclasses.replace(smoke, train=adam, eval_every=20, eval_prompts=64)
    notes = {c.name: c.note for c in ar_gd_step.run(cfg, str(tmp_path / "gd_step")).checks}
    assert "20 steps of adam lr 0.003 constant, batch 64" in notes["rel_gap_loss_vs_closed_form_min"]
    assert "SGD" not in notes["rel_gap_loss_vs_closed_form_min"]
    fig3 = ar_fig3_unitary.PRESETS["smoke"]
    cosine = dataclasses.replace(fig3.train, optimizer="adam", schedule="warmup_cosine", warmup_steps=5, steps=10,
                                 steps_per_call=10)
    notes = {c.name: c.note for c in run_fig3(dataclasses.replace(fig3, train=cosine), str(tmp_path / "f3")).checks}
    assert "after 10 steps of adam lr 0.01 warmup-cosine (5 warmup steps) (float64)" in notes["final_loss"]
    assert optimizer_note(fig3.train) == "sgd lr 0.01 constant"
    clipped = dataclasses.replace(fig3.train, optimizer="adamw", weight_decay=0.1, clip_norm=1.0)
    assert optimizer_note(clipped) == "adamw lr 0.01 constant, weight decay 0.1, clip 1"


def test_fig5_outside_mass_on_the_gd_step_construction_and_a_perturbation():
    from experiments.ar_fig5_augmented import outside_mass
    d = 3
    gd = np.zeros((3 * d, 3 * d))
    gd[d:2 * d, 2 * d:] = 2.0 * np.eye(d)  # query s_t, key s_(t'-1)
    gd[2 * d:, d:2 * d] = -0.5 * np.eye(d)  # query s_(t-1), key s_t'
    assert outside_mass(gd, d) == (0.0, 0.0)  # exact zeros outside the blocks
    rng = np.random.default_rng(0)
    used = gd.copy()
    used[d:2 * d, d:2 * d] = e = rng.normal(size=(d, d))  # (query s_t, key s_t'): used by the tokens, outside
    want = np.linalg.norm(e) / np.hypot(np.linalg.norm(gd), np.linalg.norm(e))  # disjoint supports
    np.testing.assert_allclose(outside_mass(used, d), (want, want), rtol=1e-12)  # float64 rounding only
    zero_rows = gd.copy()
    zero_rows[:d] = f = rng.normal(size=(d, 3 * d))  # the zero block's queries: outside, never used
    all_rel, used_rel = outside_mass(zero_rows, d)
    np.testing.assert_allclose(all_rel, np.linalg.norm(f) / np.hypot(np.linalg.norm(gd), np.linalg.norm(f)),
                               rtol=1e-12)
    assert used_rel == 0.0


def test_fig5_value_readout_map_of_a_copy_into_the_first_block():
    from experiments.ar_fig5_augmented import identity_error, value_readout_map
    d, dim = 3, 9
    readout = np.zeros((dim, dim))
    readout[:d, :d] = np.eye(d)  # the prediction reads the first block
    scale = np.full(dim, 0.5)
    # the value writes b s_t' into the first block and -b s_t' into the s_t block (which the readout ignores), so
    # the written vector has zero mean and the LayerNorm's centring leaves it: the map is 0.5 b I = I
    vo = np.zeros((dim, dim))
    vo[d:2 * d, :d], vo[d:2 * d, d:2 * d] = 2.0 * np.eye(d), -2.0 * np.eye(d)
    np.testing.assert_allclose(value_readout_map(vo, scale, readout, d), np.eye(d), rtol=1e-12, atol=1e-15)
    err, alpha = identity_error(value_readout_map(vo, scale, readout, d))
    assert err < 1e-14 and alpha == pytest.approx(1.0, rel=1e-14)  # float64 rounding of the centring only
    # a traceless perturbation E of the readout: the error is ||E|| / ||I + E||
    e = np.random.default_rng(1).normal(size=(d, d))
    e -= np.trace(e) / d * np.eye(d)
    perturbed = readout.copy()
    perturbed[:d, :d] += e
    err, alpha = identity_error(value_readout_map(vo, scale, perturbed, d))
    np.testing.assert_allclose([err, alpha], [np.linalg.norm(e) / np.linalg.norm(np.eye(d) + e), 1.0], rtol=1e-12)
    # a copy with nonzero mean: the centring subtracts J / dim, so the map is 0.5 b (I - J / dim)
    vo[d:2 * d, d:2 * d] = 0.0
    np.testing.assert_allclose(value_readout_map(vo, scale, readout, d), np.eye(d) - np.ones((d, d)) / dim,
                               rtol=1e-12)


def test_fig6_heatmaps_share_one_colour_scale(tmp_path, monkeypatch):
    """fig6_pe_only.png autoscaled each mu's P heatmap without a colour bar, so one colour meant different values
    across mu; they share the limits of all of them now, with one bar."""
    import matplotlib.pyplot as plt

    from experiments import ar_fig6_pe_only as fig6

    figures = []
    monkeypatch.setattr(fig6, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    t = 6
    res = {mu: {"P": np.tril(np.full((t, t), scale)), "steps": 3, "ridge": np.zeros((t, t))}
           for mu, scale in ((50.0, 0.5), (100.0, 2.0))}
    res[50.0]["P"][2, 0] = -0.3
    fig6._plot(res, str(tmp_path), {})
    fig = figures[0]
    plt.close(fig)
    images = [ax.images[0] for ax in fig.axes[:2]]
    assert [im.get_clim() for im in images] == [(-0.3, 2.0)] * 2  # exact: the matrices' own min and max
    (bar,) = fig.axes[1].child_axes
    assert bar.get_ylim() == pytest.approx((-0.3, 2.0), rel=1e-12)  # the bar maps its limits through a scale: ulps


def test_fig6_keeps_apart_mus_with_one_integer_part(tmp_path):
    """pe_only.npz, the stop-step note and the figure keyed every mu by int(mu): mus 50.2 and 50.7 overwrote each
    other (P_mu50 only, one stop-step entry); they are keyed by f"{mu:g}" now, as official_rows is."""
    result = run_experiment("ar_fig6_pe_only", "smoke", str(tmp_path), ["mus=50.2,50.7"])
    assert sorted(np.load(tmp_path / "ar_fig6_pe_only" / "pe_only.npz").files) == [
        "P_mu50.2", "P_mu50.7", "current_mu50.2", "current_mu50.7"]
    (note,) = [c["note"] for c in result["checks"] if c["name"] == "stop_steps_decrease_with_mu"]
    assert re.search(r"loss < 0\.001: mu=50\.2: \d+, mu=50\.7: \d+; at the", note), note


def test_fig7_trains_sequences_longer_than_the_official_position_table(tmp_path):
    """task.seq_len > 100 was accepted, then the 100-row position table raised after the test set and the GD
    baseline were computed; the table has max(100, seq_len) rows now."""
    result = run_experiment("ar_fig7_non_augmented", "smoke", str(tmp_path), ["task.seq_len=101"])
    assert [c["name"] for c in result["checks"]] == ["local_positional_mass_over_uniform[previous]",
                                                     "test_loss_gap_closed_zero_to_gd[previous]"]
    assert all(math.isfinite(c["value"]) for c in result["checks"])


def test_fig7_heatmaps_share_a_colour_bar_and_the_inset_has_a_legend(tmp_path, monkeypatch):
    """fig7_positional.png: the softmax heatmaps had no colour bar (each autoscaled) and the per-position inset set
    labels ("trained", "GD step") without a legend."""
    import matplotlib.pyplot as plt

    from experiments import ar_fig7_non_augmented as fig7

    figures = []
    monkeypatch.setattr(fig7, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    t = 5
    causal = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    weights = np.stack([causal, np.eye(t), causal])  # the largest weight: 1 (row 0, and head 1's diagonal)
    rows = [{"step": 0, "test_loss": 1.0}, {"step": 10, "test_loss": 0.5}]
    fig7._plot(weights, rows, np.linspace(1, 0.5, t), np.full(t, 0.4), "previous", str(tmp_path))
    fig = figures[0]
    plt.close(fig)
    assert [ax.images[0].get_clim() for ax in fig.axes[:4]] == [(0.0, 1.0)] * 4
    assert len(fig.axes[3].child_axes) == 1  # the bar beside the mean over heads
    (inset,) = fig.axes[4].child_axes
    assert [text.get_text() for text in inset.get_legend().get_texts()] == ["trained", "GD step"]
