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
