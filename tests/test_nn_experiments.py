import json
import math
import os

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
