"""Sweeps of the gd_equivalence model (one linear self-attention layer), each member scored against GD-1.

Used by `gd_equivalence --sweep`, `sweep_lr_seeds` and `sweep_context_length`. The grid may include
task.n_context: members with fewer context pairs train and are evaluated on front-padded prompts
(jaxicl.tasks.linear_regression), and each member's reference is GD-1 at its own context length k
with its own optimal step eta*(k); likewise a task.noise_std axis: every swept task field reaches the
member's evaluation (its prompts and its GD-1 step eta*(k, sigma)).
"""

import dataclasses

import jax
import jax.numpy as jnp

from experiments.common.result import Check, check_below, diverged_check
from experiments.common.run_config import run_config
from experiments.common.sweep_report import final_table, write_sweep_report
from jaxicl.baselines import gradient_descent
from jaxicl.models import predictor
from jaxicl.models.attention import sweep_init
from jaxicl.tasks import linear_regression as lr_task
from jaxicl.tasks import sample_batch
from jaxicl.theory.gd_equivalence import optimal_gd_lr
from jaxicl.train import eval_key, query_mse, regression_loss
from jaxicl.train.sweep import train_sweep
from jaxicl.train.sweep_fields import SWEEPABLE_TRAIN_FIELDS, keywords
from jaxicl.train.sweep_spec import Axis, grid
from jaxicl.validation import ConfigError, check_set_by

CONTEXT_FIELD = "task.n_context"


def padded_gd_lr(task: lr_task.LinearRegression, n_context, noise_std):
    """The GD-1 step on prompts padded to task.n_context that equals GD-1 at eta*(k, sigma) on k = n_context pairs.

    GD-1 divides by the pairs it sees, padding included, so the step is eta*(k, sigma) * task.n_context / k.
    n_context, noise_std: a member's values (arrays under the sweep's vmap).
    """
    return optimal_gd_lr(task, n_context=n_context, noise_std=noise_std) * task.n_context / n_context


def sweep_fields(cfg) -> tuple[str, ...]:
    """The fields of cfg (gd_equivalence.Config) run_gd_sweep can sweep, as dotted paths: the train fields a sweep
    varies, the sampler's array keywords and the keywords of the members' init."""
    init, _ = sweep_init(cfg.task.dim + 1)
    return (*(f"train.{f}" for f in SWEEPABLE_TRAIN_FIELDS), *(f"task.{f}" for f in keywords(lr_task.sample, 2)),
            *keywords(init))


def check_unread_gd_fields(gd, match_tolerance: float) -> None:
    """Refuses the fields of gd (gd_equivalence.Config, the `gd` section of an experiment that trains it by
    run_gd_sweep) that only gd_equivalence's own checks read, unless they hold their defaults: the run reads
    gd.task, gd.train, gd.init_scale, gd.eval_every and gd.eval_prompts, and its match_tolerance takes the part of
    gd.loss_tolerance, so any other value would be written to config.json and ignored."""
    check_set_by("gd.loss_tolerance", gd.loss_tolerance, type(gd).loss_tolerance, "match_tolerance", match_tolerance,
                 (match_tolerance,), "run")
    names = ("scales", "min_cosine", "max_construction_err", "max_ood_gap")
    unread = [f"gd.{n}={getattr(gd, n)!r}" for n in names if getattr(gd, n) != getattr(type(gd), n)]
    if unread:
        raise ConfigError(f"{', '.join(unread)}: read by gd_equivalence's own checks only, which this experiment "
                          "does not run (it scores the trained gd model against GD-1 with match_tolerance); leave "
                          f"{', '.join(f'gd.{n}' for n in names)} at their defaults")


def run_gd_sweep(cfg, axes: tuple[Axis, ...], out_dir: str, chunk_size: int = 0) -> tuple[list[dict], list[str]]:
    """Trains the gd_equivalence model (cfg: gd_equivalence.Config) for every member of the grid `axes`.

    Returns (table, report files written in out_dir); the table has one row per member with its values,
    final eval `loss`, `gd1_loss` and `gd1_loss_se` (GD-1 at eta*(k, sigma) on the same prompts, k the member's
    context length and sigma its noise; the mean query MSE and its standard error), `pred_diff` (mean squared prediction gap
    to GD-1) and `rel_gap` = loss / gd1_loss - 1. Every member is evaluated on one test set, eval_key(cfg.train.seed)'s
    (the base config's seed), so members of a seed axis share it; a lone run of a member's seed draws its own, so its
    eval losses differ from the member's by that set's sampling noise (its training losses agree).
    """
    members = grid(axes)
    if "init_scale" not in members[0]:
        members = [m | {"init_scale": cfg.init_scale} for m in members]
    lengths = sorted({m.get(CONTEXT_FIELD, cfg.task.n_context) for m in members})
    task = dataclasses.replace(cfg.task, n_context=max(lengths))  # the sweep's shape: the longest context
    key = eval_key(cfg.train.seed)
    init, graphdef = sweep_init(task.dim + 1)

    def evaluate(params, **task_params):  # the member's swept task fields (noise_std, n_tasks, n_context)
        batch = sample_batch(lr_task.sample, task, key, cfg.eval_prompts, task_params=task_params)
        gd_lr = padded_gd_lr(task, task_params.get("n_context", task.n_context),
                             task_params.get("noise_std", task.noise_std))
        gd_pred = jax.vmap(gradient_descent(task, steps=1, lr=gd_lr))(batch.inputs)
        pred = jax.vmap(predictor(graphdef, params))(batch.inputs)
        gd_err = (gd_pred[:, -1] - batch.targets[:, -1]) ** 2
        return {"loss": query_mse(pred, batch.targets), "gd1_loss": jnp.mean(gd_err),
                "gd1_loss_se": jnp.std(gd_err, ddof=1) / jnp.sqrt(gd_err.shape[0]),
                "pred_diff": jnp.mean((pred[:, -1] - gd_pred[:, -1]) ** 2)}

    train_sweep(regression_loss(graphdef), lr_task.sample, task, cfg.train, init, members, out_dir=out_dir,
                chunk_size=chunk_size or None, evaluate=evaluate, eval_every=cfg.eval_every,
                run_config=run_config("gd_sweep", cfg), desc="gd sweep")
    files = write_sweep_report(out_dir)
    _, table = final_table(out_dir)
    for row in table:
        row["rel_gap"] = None if row.get("loss") is None else row["loss"] / row["gd1_loss"] - 1
    return table, files


def gd_sweep_checks(table: list[dict], tolerance: float) -> list[Check]:
    """Checks of a GD-1 sweep: some member matches GD-1, and no member diverged."""
    gaps = [abs(r["rel_gap"]) for r in table if r["diverged_at"] is None and r["rel_gap"] is not None]
    return [check_below("best_member_rel_gap_to_gd1", min(gaps) if gaps else float("inf"), tolerance,
                        f"min over {len(gaps)} finite members of |L / L_GD1 - 1|"),
            diverged_check({r["member"]: r["diverged_at"] for r in table if r["diverged_at"] is not None})]
