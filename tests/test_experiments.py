import ast
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import registry
from experiments.cli import main
from experiments.common.report import write_report
from experiments.common.result import Outcome
from experiments.common.runner import interrupt_message, run_experiment
from experiments.gd_equivalence import Config
from jaxicl.config_paths import apply_overrides, leaf_paths
from jaxicl.models.gpt import GPT
from jaxicl.train import TrainConfig, train
from tiny_run import tiny_setup
from jaxicl.validation import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the subprocess imports from it


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
    (["gd_equivalence", "steps=10", "train.steps=20"], "train.steps is set twice: 'steps=10' and 'train.steps=20'"),
    (["no_such_experiment"], "unknown experiment 'no_such_experiment'"),
    (["gd_equivalence", "train.weight_decay=0.1"], "weight_decay=0.1 needs optimizer='adamw', got optimizer='adam'"),
    (["gd_equivalence", "scales=2,1"], "scales must be a non-empty, strictly increasing tuple, got (2.0, 1.0)"),
    (["ar_fig5_augmented", "depths=2,1"], "depths must be a non-empty, strictly increasing tuple, got (2, 1)"),
    # one depth passed the depth check (1.0) with nothing compared
    (["ar_fig5_augmented", "depths=1"], "depths=1: depths must hold at least two depths (the depth check compares "
     "each with the one before), got (1,)"),
    (["ar_fig6_pe_only", "mus=300,50"], "mus must be a non-empty, strictly increasing tuple, got (300.0, 50.0)"),
    (["nn_fig3_training", "task.num_classes=3"], "nn_fig3_training needs task.num_classes=2"),
    (["nn_random_init", "task.num_classes=3"], "nn_random_init needs task.num_classes=2"),
    # trained every run, then crashed in the log-t fits
    (["nn_fig3_training", "fit_from=0"], "fit_from=0: fit_from=0.0 leaves 0 and 3000 steps in the halves of "
     "the log-t window [fit_from t, t] at t = 3000"),
    # computed the landscape, then failed in matplotlib's contour
    (["nn_fig2_landscape", "grid=1"], "grid=1: grid must be in [2, inf], got 1"),
    (["abstractions_lea", "task.n_roots=2"], "task.n_roots must be in [3, inf], got 2"),
    # crashed in the words' k-means refit: a ZeroDivisionError (k = 0 words) before the first step, or "kmeans needs
    # at least k=127 vectors, got 112", naming no field, while the first chunk compiled
    (["abstractions_lea", "model.n_words=1"], "model.n_words=1: model.n_words must be in [2, inf], got 1"),
    (["abstractions_lea", "train.batch_size=7"], "train.batch_size=7: continuous_until=3000 refits the model.n_words "
     "- 1 = 127 words by k-means on a batch's speech vectors, train.batch_size * model.message_len = 7 * 16 = 112: "
     "it needs at least 127; raise train.batch_size or model.message_len, lower model.n_words, or set "
     "continuous_until=0 (no refit)"),
    (["sweep_lr_seeds", "diversity.n_tasks=16,64"], "diversity.n_tasks must hold 0 (a fresh task per prompt)"),
    (["sweep_lr_seeds", "diversity.n_tasks=0"], "and at least one pool size > 0, each once"),
    (["sweep_lr_seeds", "lrs=1e-3,-1"], "lrs[1] must be > 0"),
    (["abstractions_manipulation", "training.model.n_layers=1"], "training.model.n_layers must be in [2, inf], got 1"),
    (["abstractions_geometry", "mask_p=0"], "mask_p must be > 0: it is the masked variant's mask rate"),
    (["all", "train.steps=5"], "overrides ['train.steps=5'] need one experiment name, not 'all'"),
    (["gd_equivalence", "loss_tolerance=nan"], "loss_tolerance expects a finite number, got 'nan'"),
    # passed the checks (max_ood_gap has none, scales checked its first value only), then crashed writing config.json
    (["gd_equivalence", "max_ood_gap=inf"], "max_ood_gap=inf: max_ood_gap expects a finite number, got 'inf'"),
    (["gd_equivalence", "scales=0.5,1,inf"], "scales=0.5,1,inf: scales expects a finite number, got 'inf'"),
    (["clustering_dynamics", "task.patterns=ab,cd"], "task.patterns is a tuple of tuples, which a command line"),
    # started, and failed 20 s later in lea_loss
    (["abstractions_lea", "rfs_ramp=10,20,30"], "rfs_ramp=10,20,30: rfs_ramp takes 2 comma-separated values "
     "(tuple[int, int]), got 3"),
    (["sweep_context_length", "gd.task.n_context=12"], "gd.task.n_context is set per run by context_lengths="),
    (["sweep_context_length", "gd.train.seed=3"], "which would only pick the test prompts"),
    # gd_equivalence's check fields, which the gd sweeps of these two do not read: recorded and ignored
    (["sweep_context_length", "gd.loss_tolerance=0.0001"], "gd.loss_tolerance=0.0001: gd.loss_tolerance is set per "
     "run by match_tolerance=0.05: override match_tolerance instead; gd.loss_tolerance may only be 0.05 (its "
     "default), got 0.0001, which would be ignored"),
    (["sweep_lr_seeds", "gd.scales=0.1,0.2"], "gd.scales=0.1,0.2: gd.scales=(0.1, 0.2): read by gd_equivalence's own "
     "checks only, which this experiment does not run (it scores the trained gd model against GD-1 with "
     "match_tolerance); leave gd.scales, gd.min_cosine, gd.max_construction_err, gd.max_ood_gap at their defaults"),
    # eta* holds for angles on the whole circle and no noise; the closed-form fits draw no sequences at all
    (["ar_gd_step", "task.mu=4"], "ar_gd_step's closed-form eta* assumes task.mu=1, task.noise_std=0"),
    (["ar_gd_step", "task.noise_std=0.3"], "got mu=1.0, noise_std=0.3, n_sequences=0"),
    (["ar_fig3_orthogonal", "task.random_basis=true"], "task.random_basis=True: the closed-form fit draws no"),
    (["ar_fig3_unitary", "task.n_sequences=100"], "task.n_sequences=100: the closed-form fit draws no sequences"),
    # one position: the fig3 statistics crashed on a zero-size reduction, ar_gd_step's checks were NaN
    (["ar_fig3_unitary", "task.seq_len=1"], "task.seq_len=1: task.seq_len must be in [2, inf], got 1"),
    (["ar_fig3_orthogonal", "task.seq_len=1"], "task.seq_len=1: task.seq_len must be in [2, inf], got 1"),
    (["ar_gd_step", "task.seq_len=1"], "task.seq_len=1: task.seq_len must be in [2, inf], got 1"),
    # a ValueError, which the CLI showed as a traceback
    (["gd_equivalence", "task.n_tasks=4"], "task.n_tasks=4: GD-1 is compared at its closed-form step eta*, which "
     "assumes a fresh task per prompt: task.n_tasks must be 0 (sweep pool sizes as --sweep task.n_tasks=...)"),
    (["gd_equivalence", "task.n_tasks=4", "--sweep", "lr=1e-3,1e-2"], "task.n_tasks=4: GD-1 is compared"),
    (["sweep_lr_seeds", "gd.task.n_tasks=4"], "gd.task.n_tasks=4: GD-1 is compared at its closed-form step eta*, "
     "which assumes a fresh task per prompt: gd.task.n_tasks must be 0 (sweep pool sizes as --sweep "
     "gd.task.n_tasks=...)"),
    (["sweep_lr_seeds", "gd.task.n_tasks=4", "--sweep", "gd.train.seed=0:2"], "gd.task.n_tasks=4: GD-1 is compared"),
    (["sweep_context_length", "gd.task.n_tasks=4"], "gd.task.n_tasks=4: GD-1 is compared at its closed-form step "
     "eta*, which assumes a fresh task per prompt: gd.task.n_tasks must be 0"),
    (["gd_equivalence", "task.format=interleaved"],
     "task.format=interleaved: gd_equivalence needs task.format='paired' (Prop. 1's tokens [x_j; y_j]), got "
     "'interleaved'"),
    # passed the pre-flight, raised AttributeError in training and left a config.json that blocked later runs
    (["sweep_lr_seeds", "--sweep", "diversity.train.lr=1e-3,1e-2"],
     "--sweep diversity.train.lr=1e-3,1e-2: diversity.train.lr cannot be swept by sweep_lr_seeds; sweepable fields: "
     "('gd.train.seed', 'gd.train.lr', 'gd.train.weight_decay', 'gd.train.warmup_steps', 'gd.task.noise_std', "
     "'gd.task.n_tasks', 'gd.task.n_context', 'gd.init_scale')"),
    # --sweep ran part 1's sweep alone on its axes: these were recorded in config.json and ignored
    (["sweep_lr_seeds", "lrs=1e-4,1e-3", "--sweep", "gd.train.seed=0:2"],
     "override lrs=1e-4,1e-3 would be ignored: --sweep does not read lrs (its axes replace part 1's seeds x lrs grid: "
     "give learning rates as --sweep gd.train.lr=...); drop the override or run without --sweep"),
    (["sweep_lr_seeds", "seeds=4", "--sweep", "gd.train.lr=1e-3,1e-2"],
     "override seeds=4 would be ignored: --sweep does not read seeds (its axes replace part 1's seeds x lrs grid: give "
     "seeds as --sweep gd.train.seed=...); drop the override or run without --sweep"),
    (["sweep_lr_seeds", "layers=3", "--sweep", "gd.train.seed=0:2"],
     "override layers=3 would be ignored: --sweep does not read diversity.layers (it runs part 1's sweep only, not "
     "part 2, task diversity); drop the override or run without --sweep"),
    (["gd_equivalence", "min_cosine=0.5", "--sweep", "lr=1e-3,1e-2"],
     "override min_cosine=0.5 would be ignored: --sweep does not read min_cosine (the sweep's checks are "
     "loss_tolerance and divergence only); drop the override or run without --sweep"),
    (["gd_equivalence", "scales=1,2", "--sweep", "lr=1e-3,1e-2"],
     "override scales=1,2 would be ignored: --sweep does not read scales (the out-of-distribution scales are not "
     "evaluated: the sweep's checks are loss_tolerance and divergence only); drop the override or run without --sweep"),
    # the members trained at the axis' values, config.json recorded the override
    (["gd_equivalence", "train.lr=5e-3", "--sweep", "lr=1e-3,1e-2"],
     "override train.lr=5e-3 and --sweep lr=1e-3,1e-2 both set train.lr: the sweep would drop the override; give "
     "one of them"),
    # fields the run sets itself, from another field: an override was written to config.json and ignored
    (["nn_fig3_training", "task.dim=10"], "task.dim=10: task.dim is set per run by runs=('4x4', '8x4', '16x8'): "
     "override runs instead; task.dim may only be 8 (its default), got 10, which would be ignored"),
    (["nn_fig3_training", "runs=4x4", "task.n_context=5"],
     "task.n_context may only be 16 (its default) or 4 (the value every run takes), got 5, which would be ignored"),
    (["nn_fig3_training", "seed=1"], "train.seed=1: train.seed is set per member by seeds=(0, 1, 2, 3): override "
     "seeds instead; train.seed may only be 0 (its default), got 1, which would be ignored"),
    (["nn_random_init", "seed=1"], "train.seed=1: train.seed is set per member by seeds=(0, 1): override seeds "
     "instead; train.seed may only be 0 (its default), got 1, which would be ignored"),
    (["ar_fig6_pe_only", "task.mu=100"], "task.mu=100: task.mu is set per fit by mus=(50.0, 100.0, 200.0, 300.0): "
     "override mus instead; task.mu may only be 1.0 (its default), got 100.0, which would be ignored"),
    (["sweep_lr_seeds", "gd.train.lr=0.05"], "gd.train.lr=0.05: gd.train.lr is set per member by lrs=(0.0001, "
     "0.0005, 0.0025, 0.0125, 0.0625): override lrs instead; gd.train.lr may only be 0.001 (its default), got 0.05, "
     "which would be ignored; --sweep, which replaces the grid, takes it as an axis: --sweep gd.train.lr=..."),
    (["sweep_lr_seeds", "gd.train.seed=1"], "gd.train.seed=1: gd.train.seed is set per member by seeds=3: override "
     "seeds instead; gd.train.seed may only be 0 (its default), got 1, which would only pick the test prompts; "
     "--sweep, which replaces the grid, takes it as an axis: --sweep gd.train.seed=..."),
    (["sweep_lr_seeds", "diversity.task.n_tasks=7"], "diversity.task.n_tasks=7: diversity.task.n_tasks is set per "
     "member by diversity.n_tasks=(1, 4, 16, 64, 256, 0): override diversity.n_tasks instead; diversity.task.n_tasks "
     "may only be 0 (its default), got 7, which would be ignored"),
    (["sweep_lr_seeds", "diversity.train.seed=1"], "diversity.train.seed=1: diversity.train.seed is set per member by "
     "diversity.seeds=2: override diversity.seeds instead; diversity.train.seed may only be 0 (its default), got 1, "
     "which would only pick the test prompts"),
    (["affine_mechanism", "seed=1"], "train.seed=1: train.seed is set per member by seeds=(0, 1): override seeds "
     "instead; train.seed may only be 0 (its default), got 1, which would only pick the test prompts"),
    # its key takes the seed's int32 value (jaxicl.prng.seed_key): a seed outside int32 is refused before the run
    (["nn_fig2_landscape", "seed=4294967296"], "seed=4294967296: seed must be in [-2147483648, 2147483647], got "
     "4294967296"),
    (["all", "--jobs", "0"], "--jobs must be >= 1, got 0"),
    # accepted by list, refused only as the model was built, naming no section
    (["abstractions_lea", "model.ema_init=bogus"], "model.ema_init=bogus: ema_init must be one of ('normal', "
     "'codebook'), got 'bogus'"),
    # trained to step 0, and the notes said 200 steps
    (["ar_gd_step", "train.stop_loss=100"], "train.stop_loss=100.0: ar_gd_step trains for its train.steps (its notes "
     "and checks say so), not to a loss; leave train.stop_loss=0"),
    (["gd_equivalence", "scales=1,,2"], "scales=1,,2: scales: empty value in the comma-separated list '1,,2'"),  # 1,2
    (["sweep_context_length", "context_lengths=2,4,8"], "each preset sets it to its own largest length, so new "
     "context_lengths need gd.task.n_context=8 beside them"),
    # checked together: the overrides that make the config
    (["gd_equivalence", "train.schedule=warmup_cosine", "train.warmup_steps=0", "train.optimizer=sgd",
      "train.betas=0.5,0.5"], "train.schedule=warmup_cosine train.warmup_steps=0 train.optimizer=sgd "
     "train.betas=0.5,0.5: betas=(0.5, 0.5) are Adam's: they need optimizer='adam' or 'adamw', got optimizer='sgd'"),
    (["list", "gd_equivalence", "--sweep", "lr=1e-3,1e-2"], "error: list shows one config; --sweep runs one member"),
    (["gd_equivalence", "--jobs", "2"], "--jobs 2 runs several experiments at a time: it needs 'all', not "
     "'gd_equivalence'"),
    (["all", "--jobs", "2", "--distributed"], "--jobs 2 starts its own processes on this host: it cannot run under "
     "--distributed"),
])
def test_bad_command_lines_fail_early_with_a_message_naming_the_field(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written, under any experiment's name


@pytest.mark.parametrize("name,override,message", [
    ("nn_random_init", "seeds=0,0", "seeds=0,0: seeds repeats the value 0: give each value once, got (0, 0)"),
    ("nn_random_init", "scales=0.3,5,0.3", "scales=0.3,5,0.3: scales repeats the value 0.3: give each value once, "
     "got (0.3, 5.0, 0.3)"),
    ("nn_fig3_training", "seeds=0,1,1", "seeds=0,1,1: seeds repeats the value 1: give each value once, got "
     "(0, 1, 1)"),
    ("nn_fig3_training", "runs=4x4,8x4,04x4", "runs=4x4,8x4,04x4: runs repeats the value '4x4': give each value "
     "once, got ('4x4', '8x4', '4x4')"),  # as read: both trained into N4_d4
    ("nn_fig3_training", "long_horizons=100000,100000", "long_horizons=100000,100000: long_horizons repeats the "
     "value 100000: give each value once, got (100000, 100000)"),
    ("affine_mechanism", "seeds=1,1", "seeds=1,1: seeds repeats the value 1: give each value once, got (1, 1)"),
    ("sweep_lr_seeds", "lrs=1e-3,1e-3", "lrs=1e-3,1e-3: lrs repeats the value 0.001: give each value once, got "
     "(0.001, 0.001)"),
    ("abstractions_geometry", "reconstruction_alphas=1,2,1", "reconstruction_alphas=1,2,1: reconstruction_alphas "
     "repeats the value 1.0: give each value once, got (1.0, 2.0, 1.0)"),
])
def test_a_repeated_seed_or_grid_value_is_refused_naming_the_field_and_the_value(name, override, message):
    """A repeated seed trained one member twice and counted it as independent repeats (a repeated scale, lr, run or
    horizon: the same curve twice), where --sweep refuses a repeated value."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        apply_overrides(registry.load(name).PRESETS["smoke"], [override])


def test_a_field_the_run_sets_may_hold_the_one_value_the_run_gives_it(capsys):
    """The fields test_bad_command_lines refuses still take their default and, where every run or member takes one
    value, that value (what the run uses, so nothing is ignored)."""
    for argv, row in ((["nn_fig3_training", "runs=4x8", "task.dim=8", "task.n_context=4"], "task.n_context = 4"),
                      (["ar_fig6_pe_only", "mus=50", "task.mu=50"], "task.mu = 50.0"),
                      (["affine_mechanism", "seeds=3", "seed=3"], "train.seed = 3"),
                      (["nn_random_init", "seeds=2", "seed=2"], "train.seed = 2"),
                      (["sweep_context_length", "match_tolerance=0.1", "gd.loss_tolerance=0.1"],
                       "gd.loss_tolerance = 0.1"),
                      (["sweep_context_length", "context_lengths=2,4,8", "gd.task.n_context=8"],
                       "gd.task.n_context = 8"),
                      # checked together, in either order: each alone was refused (a warmup needs warmup_cosine)
                      (["gd_equivalence", "train.warmup_steps=50", "train.schedule=warmup_cosine"],
                       "train.warmup_steps = 50"),
                      (["gd_equivalence", "train.schedule=warmup_cosine", "train.warmup_steps=50"],
                       "train.warmup_steps = 50")):
        assert main(["list", *argv, "--preset", "smoke"]) == 0, capsys.readouterr().err
        assert f"  {row}\n" in capsys.readouterr().out


def test_run_experiment_refuses_an_override_of_a_swept_field_before_writing(tmp_path):
    overrides = ["train.steps=20", "train.steps_per_call=10", "eval_every=10", "train.lr=5e-3"]
    with pytest.raises(ConfigError, match=r"^override train\.lr=5e-3 and --sweep lr=1e-3,1e-2 both set train\.lr"):
        run_experiment("gd_equivalence", "smoke", str(tmp_path), overrides, sweep=["lr=1e-3,1e-2"])
    assert not list(tmp_path.iterdir())


def test_list_name_prints_every_field_of_the_config_as_the_preset_and_overrides_set_it(capsys):
    assert main(["list", "gd_equivalence", "--preset", "smoke", "lr=3e-4", "scales=1,2"]) == 0
    rows = dict(line.strip().split(" = ", 1) for line in capsys.readouterr().out.splitlines()[1:])
    cfg = registry.load("gd_equivalence").PRESETS["smoke"]
    assert list(rows) == leaf_paths(cfg)
    assert rows["train.lr"] == "0.0003" and rows["scales"] == "(1.0, 2.0)"
    assert rows["task.dim"] == str(cfg.task.dim) and rows["init_scale"] == str(cfg.init_scale)
    assert main(["list", "gd_equivalence", "lr=-1"]) == 2
    assert "train.lr=-1: lr must be > 0" in capsys.readouterr().err


def test_help_shows_the_command_and_every_word_name_takes_besides_an_experiment(capsys):
    """--help's positional `name` left out 'sweep-report'."""
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.startswith("usage: python -m experiments ")
    positional = printed.split("positional arguments:")[1].split("options:")[0]
    assert all(f"'{word}'" in positional for word in ("all", "list", "sweep-report"))


def test_a_rerun_with_any_other_setting_is_refused_and_keeps_the_old_config_json(capsys, tmp_path):
    """Every field of the experiment's config is stored with its checkpoints, not only train and task: a rerun with
    another init scale resumed the old run's checkpoint and reported its results under the new config.json."""
    argv = ["gd_equivalence", "--preset", "smoke", "train.steps=20", "train.steps_per_call=10", "eval_every=10",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    path, result = tmp_path / "gd_equivalence" / "config.json", tmp_path / "gd_equivalence" / "result.json"
    before, checks = path.read_text(), result.read_text()
    for other, field in (("init_scale=0.3", "config.init_scale: checkpoint 0.1 vs now 0.3"),
                         ("eval_prompts=64", "config.eval_prompts: checkpoint 1024 vs now 64")):
        assert main([*argv, other]) == 2
        assert field in capsys.readouterr().err
        assert path.read_text() == before  # still the config of the run the directory holds
        assert result.read_text() == checks  # and its result
    assert main(argv) == 0  # the same settings resume (from the final checkpoint)


def test_a_rerun_with_another_config_of_a_run_that_saved_no_checkpoint_is_refused_and_keeps_its_files(capsys,
                                                                                                         tmp_path):
    """nn_fig2_landscape trains nothing: with no checkpoint to refuse it, a rerun with another sigma replaced the
    finished run's config.json, result.json and figure. The same config still reruns."""
    argv = ["nn_fig2_landscape", "--preset", "smoke", "--out", str(tmp_path)]
    assert main([*argv, "sigma=-1"]) == 0
    folder = tmp_path / "nn_fig2_landscape"
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert main([*argv, "sigma=2"]) == 2
    assert (f"error: --out: {folder} holds a finished run of another config (sigma: earlier -1.0 vs now 2.0) and no "
            "checkpoint; this run would replace its result.json and figures") in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == files
    assert main([*argv, "sigma=-1"]) == 0


def test_a_run_that_raises_leaves_no_earlier_result_beside_its_config(monkeypatch, tmp_path):
    """The earlier run's result.json (passing checks) stayed beside the config.json of a run that then raised."""
    from experiments import gd_equivalence

    argv = ["gd_equivalence", "--preset", "smoke", "train.steps=20", "train.steps_per_call=10", "eval_every=10",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    assert (tmp_path / "gd_equivalence" / "result.json").exists()

    def blow_up(cfg, out_dir):
        raise FloatingPointError("training blew up")

    monkeypatch.setattr(gd_equivalence, "run", blow_up)
    with pytest.raises(FloatingPointError):
        run_experiment("gd_equivalence", "smoke", str(tmp_path), ["train.steps=20", "train.steps_per_call=10",
                                                                  "eval_every=10", "init_scale=0.3"])
    config = json.loads((tmp_path / "gd_equivalence" / "config.json").read_text())
    assert config["config"]["init_scale"] == 0.3 and not (tmp_path / "gd_equivalence" / "result.json").exists()


def test_a_run_killed_by_a_signal_python_does_not_see_leaves_no_earlier_result_beside_its_config(tmp_path):
    """The earlier result.json was removed only in an except clause, which SIGKILL, SIGTERM's default action and the
    OOM killer never reach: the directory then held the new config.json beside the old run's checks. Here the run
    exits as a killed one does (os._exit in a subprocess: no except clause, no finally)."""
    overrides = ["train.steps=20", "train.steps_per_call=10", "eval_every=10"]
    run_experiment("gd_equivalence", "smoke", str(tmp_path), overrides)
    code = ("import os, sys; from experiments import gd_equivalence; from experiments.common.runner import "
            "run_experiment; gd_equivalence.run = lambda cfg, out_dir: os._exit(9); "
            "run_experiment('gd_equivalence', 'smoke', sys.argv[1], sys.argv[2:])")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path), *overrides, "init_scale=0.3"], cwd=ROOT)
    assert killed.returncode == 9
    config = json.loads((tmp_path / "gd_equivalence" / "config.json").read_text())
    assert config["config"]["init_scale"] == 0.3 and not (tmp_path / "gd_equivalence" / "result.json").exists()


def test_a_rerun_with_another_config_stopped_before_it_writes_leaves_the_earlier_run_as_it_was(monkeypatch, capsys,
                                                                                                 tmp_path):
    """Ctrl-C in a rerun with another config before its resume check left its config.json beside the earlier run's
    checkpoints, and the earlier result.json deleted; the CLI then said the same command would resume, which was
    refused. Stopped before it writes, the directory is the earlier run's again; stopped after, the new config stays,
    and the CLI said the same command resumed the earlier run's checkpoints, which the run had not reached: it is
    refused there, as the message now says."""
    from experiments import gd_equivalence

    overrides = ["train.steps=20", "train.steps_per_call=10", "eval_every=10"]
    argv = ["gd_equivalence", "--preset", "smoke", *overrides, "--out", str(tmp_path)]
    assert main(argv) == 0
    out = tmp_path / "gd_equivalence"
    before = {f: (out / f).read_text() for f in ("config.json", "result.json")}

    def stopped(cfg, out_dir):
        raise KeyboardInterrupt

    real_run = gd_equivalence.run
    monkeypatch.setattr(gd_equivalence, "run", stopped)
    assert main([*argv, "init_scale=0.3"]) == 130
    assert capsys.readouterr().err.endswith(f"interrupted: gd_equivalence wrote nothing under {out}: it holds the "
                                            f"earlier run as it was\n")
    assert {f: (out / f).read_text() for f in ("config.json", "result.json")} == before

    def stopped_after_writing(cfg, out_dir):
        (out / "metrics.jsonl").write_text("")  # the run's first file
        raise KeyboardInterrupt

    monkeypatch.setattr(gd_equivalence, "run", stopped_after_writing)
    assert main([*argv, "init_scale=0.3"]) == 130
    assert capsys.readouterr().err.endswith(
        f"interrupted: gd_equivalence: the checkpoints under {out} are an earlier run's, which this run had not "
        f"reached, and this command changes the config {out} held (init_scale: earlier 0.1 vs now 0.3): the same "
        f"command stops at them (\"cannot resume ...\") where they were made with another config; to train this one, "
        f"use another --out or delete their checkpoints/\n")
    assert json.loads((out / "config.json").read_text())["config"]["init_scale"] == 0.3
    assert not (out / "result.json").exists()
    monkeypatch.setattr(gd_equivalence, "run", real_run)
    assert main([*argv, "init_scale=0.3"]) == 2  # the same command
    assert capsys.readouterr().err.startswith(f"error: cannot resume from {out / 'checkpoints'}: the checkpoint was "
                                              f"made with another config: config.init_scale: checkpoint 0.1 vs now "
                                              f"0.3;")


def test_a_rerun_stopped_after_its_resume_check_passed_says_the_same_command_resumes_and_it_does(monkeypatch, capsys,
                                                                                                 tmp_path):
    """train.steps=40 over a run of 20 steps (a constant schedule may grow) changes the config the folder held, yet
    resumes its checkpoint at step 20: stopped at step 30, the message says the same command resumes, not that it
    may be refused (the config changed), since the run passed its resume check there
    (jaxicl.train.checkpoint.continuing); and the same command does resume and finish."""
    from experiments import gd_equivalence

    argv = ["gd_equivalence", "--preset", "smoke", "train.steps_per_call=10", "eval_every=10", "--out", str(tmp_path)]
    assert main([*argv, "train.steps=20"]) == 0
    out = tmp_path / "gd_equivalence"

    def stopped_at_first_evaluation(*args, evaluate, **kw):  # the resumed run's first: after step 30
        return train(*args, evaluate=lambda params: (_ for _ in ()).throw(KeyboardInterrupt), **kw)

    monkeypatch.setattr(gd_equivalence, "train", stopped_at_first_evaluation)
    assert main([*argv, "train.steps=40"]) == 130
    assert capsys.readouterr().err.endswith(f"interrupted: gd_equivalence resumes from its last checkpoint under "
                                            f"{out} (the same command)\n")
    monkeypatch.setattr(gd_equivalence, "train", train)
    assert main([*argv, "train.steps=40"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [0, 10, 20, 30, 39]  # log_every 10, and the last
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 10, 20, 30, 40]


def test_an_interrupted_run_says_whether_the_same_command_resumes_or_restarts_from_step_0(monkeypatch, capsys,
                                                                                          tmp_path):
    """The CLI said a stopped run "resumes from its last checkpoint" where none was saved (full presets that only
    saved at the end restarted from step 0), and abstractions_geometry, stopped while training the shared model in
    abstractions_training/run, "had written nothing". Each message names the folders whose checkpoints it found."""
    from experiments import gd_equivalence

    def stopped_after_writing(cfg, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        open(os.path.join(out_dir, "metrics.jsonl"), "w").close()  # the run's first file, no checkpoint yet
        raise KeyboardInterrupt

    monkeypatch.setattr(gd_equivalence, "run", stopped_after_writing)
    assert main(["gd_equivalence", "--preset", "smoke", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.endswith(f"interrupted: gd_equivalence saved no checkpoint under "
                                            f"{tmp_path / 'gd_equivalence'}: the same command restarts it from step "
                                            f"0\n")
    geometry, training = tmp_path / "abstractions_geometry", tmp_path / "abstractions_training"
    assert interrupt_message("abstractions_geometry", str(tmp_path), False) == (
        f"abstractions_geometry saved no checkpoint under {geometry}, {training}: the same command restarts it from "
        f"step 0")
    loss_fn, sample, task, cfg, params = tiny_setup(steps=10, checkpoint_every=5)
    train(loss_fn, sample, task, cfg, params, out_dir=str(training / "run"), progress=False)
    assert interrupt_message("abstractions_geometry", str(tmp_path), True) == (
        f"abstractions_geometry wrote nothing under {geometry}: it holds the earlier run as it was; the same command "
        f"resumes its training from the last checkpoint under {training}")
    assert interrupt_message("abstractions_geometry", str(tmp_path), False) == (
        f"abstractions_geometry resumes from its last checkpoint under {training} (the same command)")
    assert interrupt_message("abstractions_training", str(tmp_path), False) == (
        f"abstractions_training resumes from its last checkpoint under {training} (the same command)")
    # restored: the checkpoints in its own folder are the earlier run's, which the same command may not resume
    assert interrupt_message("abstractions_training", str(tmp_path), True) == (
        f"abstractions_training wrote nothing under {training}: it holds the earlier run as it was")
    # a command that changes the config: checkpoints the run went on from resume, the others may be refused
    changed = ("seed: earlier 0 vs now 1",)
    store = str(training / "run" / "checkpoints")
    assert interrupt_message("abstractions_geometry", str(tmp_path), False, frozenset({store}), changed) == (
        f"abstractions_geometry resumes from its last checkpoint under {training} (the same command)")
    assert interrupt_message("abstractions_geometry", str(tmp_path), True, frozenset(), changed) == (
        f"abstractions_geometry wrote nothing under {geometry}: it holds the earlier run as it was; the checkpoints "
        f"under {training / 'run'} are an earlier run's, which this run had not reached, and this command changes the "
        f"config {geometry} held (seed: earlier 0 vs now 1): the same command stops at them (\"cannot resume ...\") "
        f"where they were made with another config; to train this one, use another --out or delete their "
        f"checkpoints/")


def test_a_config_json_cannot_hold_leaves_the_earlier_run_as_it_was(monkeypatch, tmp_path):
    """The earlier result.json was removed, then writing config.json raised (an infinity, which JSON has not) outside
    the try that restores it: the earlier run's checks were lost. A fresh directory gets nothing, not even out_dir."""
    from experiments import gd_equivalence

    overrides = ["train.steps=20", "train.steps_per_call=10", "eval_every=10"]
    run_experiment("gd_equivalence", "smoke", str(tmp_path / "old"), overrides)
    out = tmp_path / "old" / "gd_equivalence"
    before = {f: (out / f).read_text() for f in ("config.json", "result.json")}
    # a preset built in Python (overrides refuse inf as text) with a threshold no check bounds above
    monkeypatch.setitem(gd_equivalence.PRESETS, "smoke",
                        dataclasses.replace(gd_equivalence.PRESETS["smoke"], max_ood_gap=float("inf")))
    for root in (tmp_path / "old", tmp_path / "fresh"):
        message = (f"{root / 'gd_equivalence' / 'config.json'}: Out of range float values are not JSON compliant: "
                   f"inf (standard JSON has none: write None)")
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            run_experiment("gd_equivalence", "smoke", str(root), overrides)
    assert {f: (out / f).read_text() for f in ("config.json", "result.json")} == before
    assert not (tmp_path / "fresh").exists()


def test_overrides_reach_nested_fields_and_parse_types():
    cfg = apply_overrides(Config(), ["train.lr=3e-4", "train.steps=2e3", "task.noise_std=0.5",
                                     "scales=0.5,2", "task.format=paired"])
    assert (cfg.train.lr, cfg.train.steps, cfg.task.noise_std, cfg.scales) == (3e-4, 2000, 0.5, (0.5, 2.0))
    with pytest.raises(ConfigError, match="format must be one of"):
        apply_overrides(Config(), ["task.format=spiral"])


@pytest.mark.parametrize("name,field,values,message", [
    ("gd_equivalence", "scales", (0.5, 1.0, float("inf")), "scales[2] must be a finite number, got inf"),
    ("gd_equivalence", "scales", (0.5, float("nan"), 2.0), "scales[1] must be a finite number, got nan"),
    ("ar_fig6_pe_only", "mus", (50.0, float("inf")), "mus[1] must be a finite number, got inf"),
])
def test_an_increasing_grid_refuses_a_non_finite_value_anywhere(name, field, values, message):
    """check_increasing checked only the first value for finiteness: an inf last passed the order check (so did a NaN
    anywhere, which compares false), and the run crashed writing config.json after deleting the earlier result.json."""
    cfg = registry.load(name).PRESETS["smoke"]
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        dataclasses.replace(cfg, **{field: values})


def test_report_has_a_checks_table_and_figures_per_experiment(tmp_path):
    results = [{"experiment": "a", "preset": "quick", "wall_seconds": 3.0, "figures": ["f.png"],
                "checks": [{"name": "c1", "value": 0.5, "target": "< 1", "passed": True, "note": "n"},
                           {"name": "c2", "value": 2.0, "target": "< 1", "passed": False, "note": ""},
                           {"name": "c3", "value": 0.25, "target": "< 1", "passed": True, "note": "|L / L_GD - 1|"}]}]
    text = open(write_report(str(tmp_path), "quick", results, {"b": "Traceback: boom"})).read()
    assert "1 experiments ran, 1 raised; 2/3 checks passed." in text
    assert "| c1 | 0.5 | < 1 | yes | n |" in text and "| c2 | 2 | < 1 | **NO** |  |" in text
    row = next(line for line in text.splitlines() if line.startswith("| c3 "))
    assert row == r"| c3 | 0.25 | < 1 | yes | \|L / L_GD - 1\| |"  # 5 cells: the note's bars escaped
    assert len(row.replace(r"\|", "").split("|")) == 7
    assert "![f.png](a/f.png)" in text and "Traceback: boom" in text


NOT_TRAINING = {"nn_fig2_landscape"}  # evaluates the closed-form loss landscape; nothing is trained


def _configs(cfg):
    """cfg and every nested config dataclass in it (TrainConfig and task configs included)."""
    yield cfg
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _configs(value)


@pytest.mark.parametrize("name", sorted(set(registry.EXPERIMENTS) - NOT_TRAINING))
def test_every_training_experiment_has_task_and_train_sections(name):
    """One config convention: what trains sits in a `train: TrainConfig` next to its `task`; no flattened lr/steps."""
    for preset, cfg in registry.load(name).PRESETS.items():
        sections = [c for c in _configs(cfg) if any(isinstance(getattr(c, f.name), TrainConfig)
                                                     for f in dataclasses.fields(c))]
        assert sections, (name, preset)
        for c in sections:
            fields = {f.name for f in dataclasses.fields(c)}
            assert {"task", "train"} <= fields and isinstance(c.train, TrainConfig), (name, type(c).__name__)
            assert not fields & {"lr", "steps", "batch_size", "steps_per_call"}, (name, fields)


@pytest.mark.parametrize("name", sorted(set(registry.EXPERIMENTS) - NOT_TRAINING))
def test_every_full_run_saves_periodic_checkpoints(name):
    """An interrupted full run continues from its last checkpoint (README): full presets that saved only at the end
    (nn_random_init's 156,250 steps of 32 members among them) restarted from step 0, and so did ar_fig3_unitary's
    100 closed-form GD steps in one compiled call, once exempt."""
    configs = [c.train for c in _configs(registry.load(name).PRESETS["full"])
               if isinstance(getattr(c, "train", None), TrainConfig)]
    assert configs
    for c in configs:
        assert 0 < c.checkpoint_every < c.steps, (name, c.checkpoint_every, c.steps)


def _dot_precisions(cfg, out_dir, seen):
    """A stand-in for an experiment's run: lowers a GPT's loss gradient and records each dot's precision."""
    graphdef, params = nnx.split(GPT(d_model=8, n_layers=1, n_heads=2, input_dim=3, max_len=4, rngs=nnx.Rngs(0)))
    loss = lambda p, x: (nnx.merge(graphdef, p)(x) ** 2).sum()  # noqa: E731
    text = jax.jit(jax.grad(loss)).lower(params, jax.numpy.ones((4, 3))).as_text()  # StableHLO
    seen.extend(re.findall(r"stablehlo\.dot_general .*precision = \[(\w+), (\w+)\]", text))
    return Outcome(checks=[], figures=[])


@pytest.mark.parametrize("flag,expected", [([], "HIGHEST"), (["--matmul-precision", "default"], "DEFAULT"),
                                           (["--matmul-precision", "tensorfloat32"], "HIGH"),
                                           (["--matmul-precision", "bfloat16"], "DEFAULT")])
def test_experiments_compute_matmuls_at_the_chosen_precision(flag, expected, monkeypatch, tmp_path):
    """float32 by default (JAX's own default is TF32 on recent GPUs, one bfloat16 pass on TPUs): every dot of the
    forward and backward pass is lowered at that precision, and config.json records it beside the choice (bfloat16
    is lowered as default is: TF32 on a GPU, recorded as "bfloat16" alone)."""
    seen = []
    monkeypatch.setattr(registry.load("gd_equivalence"), "run", lambda cfg, out_dir: _dot_precisions(cfg, out_dir,
                                                                                                      seen))
    assert main(["gd_equivalence", "--preset", "smoke", "--out", str(tmp_path), *flag]) == 0
    assert len(seen) >= 6 and set(seen) == {(expected, expected)}  # q, k, v, scores, z, out, MLP, ... and grads
    config = json.load(open(tmp_path / "gd_equivalence" / "config.json"))
    assert (config["matmul_precision"], config["matmul_lax_precision"]) == (flag[1] if flag else "float32", expected)


def test_a_bad_matmul_precision_names_the_allowed_values(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["gd_equivalence", "--matmul-precision", "f32", "--out", str(tmp_path)])
    assert "float32" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"matmul_precision must be one of \('float32'"):
        run_experiment("gd_equivalence", "smoke", str(tmp_path), matmul_precision="f32")


def _default_impl_keys(source: str) -> list[str]:
    """The calls in source that make a key of JAX's global default implementation: jax.random.key or PRNGKey (of a
    seed's Python value, jaxicl.prng.seed_key's single use aside), and nnx.Rngs given anything but a key (a
    seed_key(...) call or a name ending in "key": nnx.Rngs(seed) calls jax.random.key(seed))."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        if func.endswith(("random.key", "PRNGKey")):
            found.append(ast.unparse(node))
        elif func in ("nnx.Rngs", "Rngs"):
            given = node.args + [k.value for k in node.keywords]
            if not all((isinstance(a, ast.Call) and ast.unparse(a.func) == "seed_key") or
                       (isinstance(a, ast.Name) and a.id.endswith("key")) for a in given):
                found.append(ast.unparse(node))
    return found


def test_keys_made_from_seeds_do_not_take_jax_default_prng_impl():
    """The experiments' own keys (test sets, a lone run's init, probe boards) were jax.random.key(seed) and
    nnx.Rngs(seed): under JAX_DEFAULT_PRNG_IMPL=rbg (a TPU setting) their test sets and inits changed, though the
    README promises that every key made from a seed takes an explicit implementation (jaxicl.prng.seed_key). Every
    file of experiments/ and jaxicl/, and the benchmarks whose results compare against a sweep or label a key
    implementation, is read for calls that make one from JAX's default."""
    assert _default_impl_keys("a = jax.random.key(0); b = random.PRNGKey(s); c = nnx.Rngs(cfg.train.seed); "
                              "d = nnx.Rngs(0, params=seed_key(1)); ok = nnx.Rngs(seed_key(2)), nnx.Rngs(key)"
                              ) == ["jax.random.key(0)", "random.PRNGKey(s)", "nnx.Rngs(cfg.train.seed)",
                                    "nnx.Rngs(0, params=seed_key(1))"]
    paths = [os.path.join(d, f) for top in ("experiments", "jaxicl") for d, _, files in os.walk(os.path.join(ROOT, top))
             for f in files if f.endswith(".py")]
    paths += [os.path.join(ROOT, "benchmarks", f) for f in ("sampler_throughput.py", "sweep_vs_loop.py")]
    assert len(paths) > 100
    found = {os.path.relpath(p, ROOT): _default_impl_keys(open(p).read()) for p in paths}
    seed_key = found.pop(os.path.join("jaxicl", "prng.py"))
    assert {p: calls for p, calls in found.items() if calls} == {}
    assert seed_key == ["jax.random.key(jnp.asarray(seed, jnp.int32) + jnp.int32(offset), impl=impl)"]


def test_experiment_test_sets_and_inits_do_not_follow_jax_default_prng_impl():
    """The autoregressive experiments' held-out set, the abstractions experiments' evaluation sets and a lone run's
    initial parameters are the same under jax_default_prng_impl=rbg as under JAX's default: the same programs on the
    same key data, so the same numbers exactly."""
    from experiments.abstractions_training import SMOKE
    from experiments.common import abstractions as ab
    from experiments.common.autoregressive import haar_task, held_out_set
    from jaxicl.tasks import boards as bd

    def arrays():
        test = held_out_set(haar_task("augmented", dim=2, seq_len=5, n_sequences=4), 3)
        evals = ab.eval_sets(SMOKE, bd.build(SMOKE.task))
        init = nnx.state(ab.build_model(SMOKE), nnx.Param)
        return [np.asarray(a) for a in jax.tree.leaves((test.inputs, evals, init))]

    before = jax.config.jax_default_prng_impl
    default = arrays()
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        rbg = arrays()
    finally:
        jax.config.update("jax_default_prng_impl", before)
    assert len(default) == len(rbg) > 10
    for a, b in zip(default, rbg, strict=True):
        np.testing.assert_array_equal(a, b)
