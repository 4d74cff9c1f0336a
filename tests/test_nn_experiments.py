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
