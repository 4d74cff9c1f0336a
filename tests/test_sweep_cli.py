"""The --sweep command line and sweep-report, the sweep_lr_seeds and sweep_context_length smoke runs, and
sweep_lr_seeds' task-diversity checks against the zero predictor."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gd_equivalence, sweep_lr_seeds
from experiments.cli import main
from experiments.common.runner import resolve_config, run_experiment, sweep_axes
from experiments.common.gd_sweep import run_gd_sweep
from jaxicl.models.attention import sweep_init
from jaxicl.baselines import dmmse, gradient_descent
from jaxicl.models import predictor
from jaxicl.tasks import linear_regression as lr_task
from jaxicl.tasks import sample_batch
from jaxicl.theory.gd_equivalence import optimal_gd_lr
from jaxicl.train import eval_key, query_mse, regression_loss, train
from jaxicl.train.sweep_spec import Axis
from jaxicl.validation import ConfigError


@pytest.mark.parametrize("argv,message", [
    (["gd_equivalence", "--sweep", "lr=1e-4;1e-3"], "is not a number"),
    (["gd_equivalence", "--sweep", "seed=0:8:0"], "step must not be 0"),
    (["gd_equivalence", "--sweep", "learning_rate=1,2"], "unknown field 'learning_rate'"),
    (["gd_equivalence", "--sweep", "n_tasks=1.5,2"], "takes integers"),
    (["gd_equivalence", "--sweep", "lr=1,2", "lr=3"], "given twice"),
    (["sweep_lr_seeds", "--sweep", "lr=1e-3,1e-2"], "'lr' is ambiguous"),
    (["all", "--sweep", "lr=1e-3,1e-2"], "needs one experiment"),
    (["sweep-report"], "usage"),
    (["sweep-report", "no_such_dir"], "no_such_dir is not a directory"),
    (["gd_equivalence", "--sweep", "lr=-1,1e-3"], "--sweep train.lr=-1.0: lr must be > 0"),  # before training
    (["gd_equivalence", "--sweep", "seed=0:2", "train.steps=50"],
     "(train.steps=50: one value; overrides go before --sweep)"),
])
def test_malformed_sweeps_exit_2_with_a_clear_message_before_training(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "gd_equivalence").exists()


def test_a_single_run_and_a_sweep_do_not_share_a_directory(capsys, tmp_path):
    """A single run into a sweep's directory deleted the sweep's chunk checkpoints (its store took the directory,
    which held no run config of its own, for a stale one) and left sweep.json for sweep-report to crash on."""
    common = ["gd_equivalence", "--preset", "smoke", "train.steps=20", "train.steps_per_call=10", "eval_every=10"]
    swept, single = str(tmp_path / "swept"), str(tmp_path / "single")
    assert main([*common, "--out", swept, "--sweep", "seed=0:2"]) == 0
    assert main([*common, "--out", single]) == 0
    before = {d: sorted(os.listdir(os.path.join(d, "gd_equivalence"))) for d in (swept, single)}
    assert main([*common, "--out", swept]) == 2
    assert "holds a sweep (--sweep seed=0:2); a single run cannot share its directory" in capsys.readouterr().err
    assert main([*common, "--out", single, "--sweep", "seed=0:2"]) == 2
    assert "holds a single run; a sweep cannot share" in capsys.readouterr().err
    assert {d: sorted(os.listdir(os.path.join(d, "gd_equivalence"))) for d in (swept, single)} == before
    assert os.listdir(os.path.join(swept, "gd_equivalence", "checkpoints")) == ["chunk0"]
    assert main(["sweep-report", swept]) == 0


def test_an_out_that_is_a_file_and_an_interrupt_end_with_a_message_not_a_traceback(monkeypatch, capsys, tmp_path):
    (tmp_path / "f").write_text("")
    assert main(["gd_equivalence", "--preset", "smoke", "--out", str(tmp_path / "f")]) == 2
    assert f"--out: {tmp_path / 'f'} is a file, not a directory" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("experiments.cli.run_experiment", interrupted)
    assert main(["gd_equivalence", "--preset", "smoke", "--out", str(tmp_path)]) == 130
    assert (f"saved no checkpoint under {tmp_path / 'gd_equivalence'}: the same command restarts it from step 0"
            in capsys.readouterr().err)


def test_unsweepable_field_is_refused_naming_the_allowed_ones(capsys, tmp_path):
    argv = ["gd_equivalence", "--preset", "smoke", "--out", str(tmp_path), "--sweep", "task.dim=2,3"]
    assert main(argv) == 2
    assert "task.dim cannot be swept" in capsys.readouterr().err


def test_sweep_lr_seeds_sweeps_the_fields_its_grid_sets_validated_on_the_gd_config(capsys, tmp_path):
    """A plain sweep_lr_seeds run refuses gd.train.lr and gd.train.seed (its seed x lr grid sets them); --sweep, which
    replaces the grid, varies them: each value is checked on cfg.gd, the config the sweep trains."""
    _, cfg = resolve_config("sweep_lr_seeds", "smoke", [])
    assert sweep_axes("sweep_lr_seeds", cfg, ["gd.train.lr=1e-4,0.05", "gd.train.seed=3"]) == (
        Axis("gd.train.lr", (1e-4, 0.05)), Axis("gd.train.seed", (3,)))
    with pytest.raises(ConfigError, match=r"^--sweep gd\.train\.lr=-1\.0: lr must be > 0, got -1\.0$"):
        sweep_axes("sweep_lr_seeds", cfg, ["gd.train.lr=-1,0.05"])
    assert main(["sweep_lr_seeds", "gd.train.lr=0.05", "--out", str(tmp_path), "--sweep", "gd.train.seed=0:2"]) == 2
    assert "takes it as an axis: --sweep gd.train.lr=..." in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_sweep_trains_the_grid_and_sweep_report_regenerates_it(tmp_path, capsys):
    out = str(tmp_path)
    argv = ["gd_equivalence", "--preset", "smoke", "train.steps=20", "train.steps_per_call=10", "eval_every=10",
            "--out", out, "--sweep", "lr=1e-3,1e-2", "seed=0:2"]
    assert main(argv) == 0
    with open(os.path.join(out, "gd_equivalence", "sweep.json")) as f:
        spec = json.load(f)
    assert spec["members"] == [{"train.lr": lr, "train.seed": s, "init_scale": 0.1}
                               for lr in (1e-3, 1e-2) for s in (0, 1)]
    table = os.path.join(out, "gd_equivalence", "sweep_seeds.md")
    os.remove(table)
    assert main(["sweep-report", out]) == 0
    with open(table) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("| train.lr | init_scale | seeds |") and len(lines) == 4  # header, rule, 2 lrs
    assert os.path.exists(os.path.join(out, "gd_equivalence", "sweep_loss_vs_train_lr.png"))


def test_sweep_lr_seeds_smoke_computes_every_check(tmp_path):
    result = run_experiment("sweep_lr_seeds", "smoke", str(tmp_path))
    names = [c["name"] for c in result["checks"]]
    assert {"best_member_rel_gap_to_gd1", "transition_ratio_small_over_infinite_pool", "diverged_members",
            "diversity_diverged_members"} <= set(names)
    assert len(set(names)) == len(names)
    for c in result["checks"]:
        assert isinstance(c["value"], (int, float)) and math.isfinite(c["value"]), c
    for fig in result["figures"]:
        assert os.path.getsize(os.path.join(tmp_path, "sweep_lr_seeds", fig)) > 10_000


# fresh-task losses of the quick preset's references (d = 3, sigma = 0.5): dMMSE per pool, ridge, E[y^2]
_DMMSE = {1: 12.07, 4: 2.985, 16: 1.572, 64: 0.746, 0: 0.301}
_RIDGE, _ZERO = 0.301, 3.308


def _diversity_checks(model: dict[int, float]) -> dict[str, dict]:
    members = [{"train.seed": 0, "task.n_tasks": k} for k in _DMMSE]
    summary = sweep_lr_seeds.pool_summary(np.array([model[k] for k in _DMMSE]), members, _DMMSE)
    checks = sweep_lr_seeds.diversity_checks(summary, _DMMSE, _RIDGE, _ZERO, sweep_lr_seeds.Diversity())
    return {c.name: c for c in checks}


def test_diversity_checks_fail_for_the_zero_predictor_and_pass_for_a_dmmse_like_model():
    # predicting 0 beats dMMSE at pools 1 (12.07) and 4 (2.985), which are not informative (dMMSE >= 0.5 x 3.308)
    zero = _diversity_checks({k: _ZERO for k in _DMMSE})
    assert not zero["small_informative_pool_nearest_dmmse"].passed  # pool 16: log-nearest the zero predictor
    assert zero["small_informative_pool_nearest_dmmse"].value == _ZERO
    assert zero["informative_pools_where_model_beats_its_dmmse"].value == 0
    assert not zero["informative_pools_where_model_beats_its_dmmse"].passed
    # near dMMSE at pool 16, below dMMSE at pool 64: both pass; pools 1 and 4 are not counted though beaten
    good = _diversity_checks({1: 5.0, 4: 1.0, 16: 1.7, 64: 0.6, 0: 0.45})
    assert good["small_informative_pool_nearest_dmmse"].passed
    assert good["informative_pools_where_model_beats_its_dmmse"].value == 1  # pool 64
    # above sqrt(1.572 x 3.308) = 2.280 the zero predictor is nearer; at ridge's level ridge is
    assert not _diversity_checks({**{k: 1.0 for k in _DMMSE}, 16: 2.3})["small_informative_pool_nearest_dmmse"].passed
    assert _diversity_checks({**{k: 1.0 for k in _DMMSE}, 16: 2.2})["small_informative_pool_nearest_dmmse"].passed
    assert not _diversity_checks({**{k: 1.0 for k in _DMMSE}, 16: 0.5})["small_informative_pool_nearest_dmmse"].passed


def test_dmmse_evaluation_at_the_full_presets_largest_pool_fits_in_a_small_fixed_memory():
    """Compiled, not run: the full preset's dMMSE over pool 65,536 on its 4096 fresh prompts (d = 8, 17 pairs). A
    vmap over every prompt (as _diversity ran it) holds arrays [4096, 65536, 17], 17 GiB each; the chunks of
    dmmse_query_mse hold a few [chunk, K, 17] of DMMSE_ELEMENTS float32 (64 MiB; XLA's CPU analysis: 139 MiB in all),
    so 1 GiB is 16 such arrays."""
    div = sweep_lr_seeds.PRESETS["full"].diversity
    task, k = div.task, max(div.n_tasks)
    pool = jax.ShapeDtypeStruct((k, task.dim), jnp.float32)
    inputs = jax.ShapeDtypeStruct((div.eval_prompts, task.seq_len, task.token_dim), jnp.float32)
    targets = jax.ShapeDtypeStruct((div.eval_prompts, task.seq_len), jnp.float32)

    def total(m):
        return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

    chunked = total(sweep_lr_seeds.dmmse_query_mse.lower(task, pool, inputs, targets).compile().memory_analysis())
    vmapped = jax.jit(lambda p, x, t: query_mse(jax.vmap(dmmse(task, p))(x), t)).lower(pool, inputs, targets)
    assert chunked < 2**30 < 16 * 2**30 < total(vmapped.compile().memory_analysis())


def test_dmmse_evaluation_in_chunks_is_the_numpy_posterior_mean_on_every_prompt(x64):
    """The full preset's task and largest pool on one chunk of prompts and a remainder: every prompt's query
    prediction is the posterior mean over the pool (float64 numpy, log-sum-exp)."""
    task = sweep_lr_seeds.PRESETS["full"].diversity.task
    k = 65536
    chunk = sweep_lr_seeds.DMMSE_ELEMENTS // (k * (task.n_context + 1))
    n = chunk + 5
    assert 5 < chunk  # one full chunk, then a remainder of 5
    pool = lr_task.task_pool(task, k)
    b = sample_batch(lr_task.sample, task, jax.random.key(0), n)
    mse = float(sweep_lr_seeds.dmmse_query_mse(task, pool, b.inputs, b.targets))
    w = np.asarray(pool)
    x, y = np.asarray(b.info["x"]), np.asarray(b.info["y"])
    preds = []
    for i in range(n):
        log_lik = -np.sum((y[i, :-1] - w @ x[i, :-1].T) ** 2, axis=1) / (2 * task.noise_std**2)
        p = np.exp(log_lik - log_lik.max())
        preds.append(p @ w @ x[i, -1] / p.sum())
    np.testing.assert_allclose(mse, np.mean((np.array(preds) - y[:, -1]) ** 2), rtol=1e-9)


def test_sweep_context_length_smoke_matches_gd1_at_every_context_length(tmp_path):
    result = run_experiment("sweep_context_length", "smoke", str(tmp_path))
    checks = {c["name"]: c for c in result["checks"]}
    assert all(c["passed"] for c in checks.values()), checks
    with open(os.path.join(tmp_path, "sweep_context_length", "context_length", "sweep.json")) as f:
        assert [m["task.n_context"] for m in json.load(f)["members"]] == [2, 6]


def test_a_noise_sweep_evaluates_each_member_on_its_own_noise_like_the_member_alone(tmp_path):
    """Every swept task field reaches the member's evaluation: its prompts and its GD-1 step eta*(sigma)."""
    cfg = dataclasses.replace(gd_equivalence.PRESETS["smoke"], eval_every=10, eval_prompts=256,
                              train=dataclasses.replace(gd_equivalence.PRESETS["smoke"].train, steps=20,
                                                        steps_per_call=10))
    table, _ = run_gd_sweep(cfg, (Axis("task.noise_std", (0.0, 1.0)),), str(tmp_path))
    for row in table:
        task = dataclasses.replace(cfg.task, noise_std=row["task.noise_std"])
        init, graphdef = sweep_init(task.dim + 1)
        alone = train(regression_loss(graphdef), lr_task.sample, task, cfg.train,
                      init(jax.random.key(cfg.train.seed), init_scale=cfg.init_scale), progress=False)
        batch = sample_batch(lr_task.sample, task, eval_key(cfg.train.seed), cfg.eval_prompts)
        loss = query_mse(jax.vmap(predictor(graphdef, alone.state.params))(batch.inputs), batch.targets)
        gd1 = gradient_descent(task, steps=1, lr=optimal_gd_lr(task))
        gd1_loss = query_mse(jax.vmap(gd1)(batch.inputs), batch.targets)
        # vmapped sweep vs a lone run: different XLA programs for 20 Adam steps, float32
        np.testing.assert_allclose(row["loss"], loss, rtol=1e-4)
        np.testing.assert_allclose(row["gd1_loss"], gd1_loss, rtol=1e-5)
        err = np.asarray(jax.vmap(gd1)(batch.inputs)[:, -1] - batch.targets[:, -1], np.float64) ** 2
        np.testing.assert_allclose(row["gd1_loss_se"], err.std(ddof=1) / np.sqrt(len(err)), rtol=1e-4)  # float32
    assert table[1]["gd1_loss"] > table[0]["gd1_loss"] + 0.5  # label noise of variance 1 is really in the prompts
