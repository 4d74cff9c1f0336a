import json
import math

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
