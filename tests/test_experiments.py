import pytest

from experiments import registry
from experiments.cli import main
from jaxicl.config_paths import apply_overrides
from experiments.common.report import write_report
from experiments.gd_equivalence import Config
from jaxicl.validation import ConfigError


@pytest.mark.parametrize("name", list(registry.EXPERIMENTS))
def test_every_experiment_has_the_three_presets_and_a_run_function(name):
    module = registry.load(name)
    assert set(module.PRESETS) == set(registry.PRESET_NAMES)
    assert all(isinstance(cfg, module.Config) for cfg in module.PRESETS.values())
    assert callable(module.run) and module.__doc__


@pytest.mark.parametrize("argv,message", [
    (["gd_equivalence", "train.lr=-1"], "train.lr=-1: lr must be > 0, got -1.0"),
    (["gd_equivalence", "train.optimiser=adam"], "unknown field 'train.optimiser'"),
    (["gd_equivalence", "train.steps=many"], "train.steps expects a value of type int"),
    (["gd_equivalence", "task=3"], "task is a nested config"),
    (["gd_equivalence", "lr"], "must look like field=value"),
    (["no_such_experiment"], "unknown experiment 'no_such_experiment'"),
])
def test_bad_command_lines_fail_early_with_a_message_naming_the_field(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "gd_equivalence").exists()


def test_overrides_reach_nested_fields_and_parse_types():
    cfg = apply_overrides(Config(), ["train.lr=3e-4", "train.steps=2e3", "task.noise_std=0.5",
                                     "scales=0.5,2", "task.format=paired"])
    assert (cfg.train.lr, cfg.train.steps, cfg.task.noise_std, cfg.scales) == (3e-4, 2000, 0.5, (0.5, 2.0))
    with pytest.raises(ConfigError, match="format must be one of"):
        apply_overrides(Config(), ["task.format=spiral"])


def test_report_has_a_checks_table_and_figures_per_experiment(tmp_path):
    results = [{"experiment": "a", "preset": "quick", "wall_seconds": 3.0, "figures": ["f.png"],
                "checks": [{"name": "c1", "value": 0.5, "target": "< 1", "passed": True, "note": "n"},
                           {"name": "c2", "value": 2.0, "target": "< 1", "passed": False, "note": ""}]}]
    text = open(write_report(str(tmp_path), "quick", results, {"b": "Traceback: boom"})).read()
    assert "1 experiments ran, 1 raised; 1/2 checks passed." in text
    assert "| c1 | 0.5 | < 1 | yes | n |" in text and "| c2 | 2 | < 1 | **NO** |  |" in text
    assert "![f.png](a/f.png)" in text and "Traceback: boom" in text
