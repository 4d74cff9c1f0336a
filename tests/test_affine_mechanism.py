"""affine_mechanism: its smoke run computes every check, its score-similarity regression against numpy, its
ablation control, and the settings its notes state."""

import json
import math
import os
import re

import numpy as np
import pytest

import dataclasses

from experiments.affine_mechanism import PRESETS, ratio_over_other_heads, score_similarity_slope, settings_note
from jaxicl.tasks import affine_recurrence as ar
from jaxicl.train import TrainConfig
from experiments.common.runner import run_experiment


def test_smoke_run_writes_every_check_and_figure(tmp_path):
    result = run_experiment("affine_mechanism", "smoke", str(tmp_path))
    out = tmp_path / "affine_mechanism"
    stored = json.loads((out / "result.json").read_text())
    assert stored["checks"] == result["checks"] and len(stored["checks"]) == 10
    # the per-head attention masses print as rounded float64, not float32 noise (0.19099999964237213)
    local = next(c["note"] for c in stored["checks"] if c["name"] == "layer0_local_attention_mass")
    masses = re.findall(r"-?\d+\.\d+", local.split("per head [")[1].split("]")[0])
    assert len(masses) == PRESETS["smoke"].model.n_heads and all(len(m.split(".")[1]) <= 3 for m in masses), local
    for check in stored["checks"]:
        if check["name"] == "ablation_loss_ratio_over_other_heads" and check["value"] == "nan":
            assert not check["passed"]  # every layer-2 head was ablated: no other head to compare with
            continue
        assert isinstance(check["value"], (int, float)) and math.isfinite(check["value"]), check
    assert {f for f in stored["figures"]} == {"losses.png", "mechanism.png", "patching.png"}
    for fig in stored["figures"]:
        assert os.path.getsize(out / fig) > 10_000


def test_score_similarity_slope_recovers_a_planted_linear_score():
    rng = np.random.default_rng(0)
    estimate, values = rng.normal(size=(50, 6)), rng.normal(size=(50, 6))
    sim = -np.abs(estimate[:, :, None] - values[:, None, :])  # [B, query, key]
    slope, corr = score_similarity_slope(2.0 * sim + 1.0, estimate, values, start=2)
    np.testing.assert_allclose([slope, corr], [2.0, 1.0], rtol=1e-10)
    noisy = 2.0 * sim + rng.normal(size=sim.shape)
    q, k = np.tril_indices(6)
    keep = q >= 2
    ref = np.polyfit(sim[:, q[keep], k[keep]].ravel(), noisy[:, q[keep], k[keep]].ravel(), 1)[0]
    np.testing.assert_allclose(score_similarity_slope(noisy, estimate, values, start=2)[0], ref, rtol=1e-10)


def test_ablation_control_compares_the_ablated_heads_with_the_others():
    ratios = [44.0, 1.09, 565.0, 9.23]  # quick's per-head loss ratios: the ablated head 3 is not the most important
    assert ratio_over_other_heads(ratios, [3]) == pytest.approx(9.23 / 44.0)  # median of 1.09, 44, 565
    assert ratio_over_other_heads(ratios, [2, 3]) == pytest.approx(9.23 / np.median([44.0, 1.09]))
    assert np.isnan(ratio_over_other_heads(ratios, [0, 1, 2, 3]))


def test_settings_note_states_the_run_distributions_and_optimiser():
    """The checks' notes said "a, b, x_0 ~ U[-1, 1] ... Adam <lr> warmup-cosine" whatever the config: the smoke
    preset (constant lr) and any override of the task's distributions were misreported."""
    assert "adam lr 0.003 constant, 60 steps of 32" in settings_note(PRESETS["smoke"])
    quick = settings_note(PRESETS["quick"])
    assert "a ~ U[-1, 1], b ~ U[-1, 1], x_0 ~ U[-1, 1], T = 16" in quick
    assert "adam lr 0.003 warmup-cosine (300 warmup steps), 6000 steps of 64" in quick
    cfg = dataclasses.replace(PRESETS["smoke"], task=ar.AffineRecurrence(
        seq_len=8, a=ar.Distribution("normal", std=0.5), b=ar.Distribution("fixed", mean=0.25),
        x0=ar.Distribution(low=0.0, high=2.0), rescale=True),
        train=TrainConfig(steps=60, batch_size=32, optimizer="adamw", lr=1e-3))
    assert ("a ~ N(0, 0.5^2), b ~ fixed at 0.25, x_0 ~ U[0, 2], rescaled by max |x|, T = 8" in settings_note(cfg)
            and "adamw lr 0.001 constant" in settings_note(cfg))


def test_the_mechanism_scatter_shows_the_heads_the_checks_select(tmp_path, monkeypatch):
    """mechanism.png's score scatter showed the head of the most negative gain correlation (head 2 here), not the
    head the negative-similarity and ablation checks select (head 3); it shows the selected heads, named in the
    title with the rule."""
    import matplotlib.pyplot as plt

    from experiments import affine_mechanism as am

    figures = []
    monkeypatch.setattr(am, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    rng = np.random.default_rng(0)
    b, n_heads, t = 4, 4, 8
    scores2 = rng.normal(size=(b, n_heads, t, t))
    estimate, x = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    heads2 = [{"head": h, "gain_corr": g} for h, g in enumerate([0.1, 0.2, -0.93, -0.88])]
    cfg = am.PRESETS["smoke"]
    am._plot_mechanism(cfg, np.full(2, 0.5), heads2, [3], "the negative-similarity heads", scores2, estimate, x,
                       0.3, str(tmp_path))
    ax = figures[0].axes[2]
    plt.close(figures[0])
    (points,) = ax.collections
    q, k = np.tril_indices(t)
    keep = q >= cfg.from_position
    np.testing.assert_array_equal(points.get_offsets()[:, 1], scores2[:, 3][:, q[keep], k[keep]].ravel())
    assert ax.get_title() == "layer-2 heads [3] checked\n(the negative-similarity heads)"
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["head 3"]


def test_the_losses_legend_names_each_seed_curve_and_the_baselines_floor(tmp_path, monkeypatch):
    """losses.png: the second seed's curve had no legend entry, and baselines below 1e-12 (three_term's 7e-15) were
    drawn at 1e-12 unannounced."""
    import matplotlib.pyplot as plt

    from experiments import affine_mechanism as am

    figures = []
    monkeypatch.setattr(am, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    cfg = dataclasses.replace(PRESETS["smoke"], seeds=(0, 1, 2))
    t = cfg.task.seq_len
    rows = [{"member": m, "step": s, "loss": 1.0} for m in range(3) for s in (0, 10)]
    am._plot_losses(cfg, [np.ones(t)] * 3, {"copy": np.ones(t), "three_term": np.full(t, 7e-15)}, rows,
                    str(tmp_path))
    ax = figures[0].axes[0]
    plt.close(figures[0])
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [
        "trained GPT, seed 0", "other seeds", "copy", "three_term"]
    assert ax.get_title() == "per position (baselines floored at 1e-12)"
    np.testing.assert_array_equal(ax.get_lines()[-1].get_ydata(), np.full(t, 1e-12))
