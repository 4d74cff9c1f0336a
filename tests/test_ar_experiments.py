import json
import math

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
