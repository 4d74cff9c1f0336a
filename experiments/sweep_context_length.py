"""GD-1 at every context length: the gd_equivalence model swept over n_context in one vmapped program.

Members (seeds x context lengths k) share one prompt shape, the longest context N: a member with k < N
context pairs trains and is evaluated on prompts with N - k zero pairs in front and no loss on them. One
linear self-attention layer ignores zero tokens up to a factor k / N that its weights absorb, so each
member should learn GD-1 with the optimal step for its own k (von Oswald et al. 2023): its test loss
should match GD-1 at eta*(k) = k / (k + d + 1 + sigma^2), whose closed-form loss falls with k.

An extension (the paper trains one N = 10): its settings are ours, x ~ N(0, I_d) (gd_equivalence draws the paper's
U(-1, 1)^d; `gd.task.x_dist=uniform` does here too, with eta*(k) and GD-1's loss from the uniform inputs' kurtosis,
jaxicl.theory.gd_equivalence), and every preset's lengths, seeds and warmup-cosine Adam schedule.
"""

import dataclasses

import numpy as np
from matplotlib.ticker import NullFormatter

from experiments import gd_equivalence
from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Check, Outcome, check_below, diverged_check
from experiments.common.sweep_report import aggregate, plot_vs_axis
from experiments.common.gd_sweep import CONTEXT_FIELD, check_unread_gd_fields, run_gd_sweep
from jaxicl.tasks import linear_regression as lr_task
from jaxicl.theory.gd_equivalence import gd_one_step_loss, optimal_gd_lr
from jaxicl.train import TrainConfig
from jaxicl.train.sweep_spec import Axis
from jaxicl.validation import ConfigError, check_positive, check_set_by


@dataclasses.dataclass(frozen=True)
class Config:
    gd: gd_equivalence.Config = gd_equivalence.Config(task=lr_task.LinearRegression(dim=10, n_context=40))
    context_lengths: tuple[int, ...] = (5, 10, 20, 40)  # the sweep's prompts have max(context_lengths) pairs
    seeds: int = 8
    match_tolerance: float = 0.05  # |L / L_GD1(k) - 1| for every member
    max_standard_errors: float = 4.0  # GD-1 on padded prompts vs its closed-form loss, in standard errors

    def __post_init__(self):
        check_positive("seeds", self.seeds)
        if not self.context_lengths or len(set(self.context_lengths)) != len(self.context_lengths):
            raise ConfigError(f"context_lengths must be distinct and non-empty, got {self.context_lengths}")
        for k in self.context_lengths:
            check_positive("context_lengths[i]", k)
        # run() gives the sweep's prompts max(context_lengths) pairs, and its members the seeds 0..seeds-1
        check_set_by("gd.task.n_context", self.gd.task.n_context, lr_task.LinearRegression.n_context,
                     "context_lengths", self.context_lengths, (max(self.context_lengths),), "run",
                     hint=f"each preset sets it to its own largest length, so new context_lengths need "
                     f"gd.task.n_context={max(self.context_lengths)} beside them")
        check_set_by("gd.train.seed", self.gd.train.seed, TrainConfig.seed, "seeds", self.seeds,
                     tuple(range(self.seeds)), "member", does="pick the test prompts")
        check_unread_gd_fields(self.gd, self.match_tolerance)


def _small(dim: int, lengths: tuple[int, ...], train: TrainConfig, **kw) -> gd_equivalence.Config:
    return gd_equivalence.Config(task=lr_task.LinearRegression(dim=dim, n_context=max(lengths)), train=train, **kw)


PRESETS = {
    "smoke": Config(gd=_small(3, (2, 6), TrainConfig(steps=800, batch_size=512, lr=3e-3, steps_per_call=200),
                              eval_every=200, eval_prompts=1024), context_lengths=(2, 6), seeds=1),
    "quick": Config(gd=_small(4, (2, 4, 8, 16), TrainConfig(steps=2000, batch_size=256, lr=1.25e-2,
                                                            schedule="warmup_cosine", warmup_steps=100,
                                                            steps_per_call=250, log_every=10, checkpoint_every=500),
                              eval_every=250, eval_prompts=4096), context_lengths=(2, 4, 8, 16), seeds=2),
    "full": Config(gd=_small(10, (5, 10, 20, 40), TrainConfig(steps=20000, batch_size=2048, lr=1e-3,
                                                              schedule="warmup_cosine", warmup_steps=1000,
                                                              steps_per_call=1000, log_every=100,
                                                              checkpoint_every=2000),
                             eval_every=1000, eval_prompts=10000)),
}


def context_length_summary(table: list[dict], theory: dict[int, float]) -> dict:
    """The sweep's table (gd_sweep.run_gd_sweep) against GD-1 at every context length k in theory {k: closed form}.

    finite: the number of members that did not diverge; worst: max |rel_gap| over them; gd_mean {k: GD-1's loss
    on the evaluation prompts of k}; z {k: |gd_mean - theory| / its standard error}; trained {k: mean loss of
    the finite members}; falls: the number of steps from one k to the next where trained falls; falling: whether
    it falls at every step.
    """
    lengths = sorted(theory)
    finite = [r for r in table if r["diverged_at"] is None]
    gd_row = {r[CONTEXT_FIELD]: r for r in table}  # GD-1 on the evaluation prompts of each k (same for every seed)
    gd_mean = {k: gd_row[k]["gd1_loss"] for k in lengths}
    trained = {k: float(np.mean([r["loss"] for r in finite if r[CONTEXT_FIELD] == k])) for k in lengths}
    falls = sum(trained[a] > trained[b] for a, b in zip(lengths, lengths[1:]))
    return {"finite": len(finite), "worst": max((abs(r["rel_gap"]) for r in finite), default=float("inf")),
            "gd_mean": gd_mean, "z": {k: abs(gd_mean[k] - theory[k]) / gd_row[k]["gd1_loss_se"] for k in lengths},
            "trained": trained, "falls": falls, "falling": falls == len(lengths) - 1}


def run(cfg: Config, out_dir: str) -> Outcome:
    gd_equivalence.check_fresh_tasks(cfg.gd.task, "gd.task.n_tasks", sweepable=False)
    lengths = sorted(cfg.context_lengths)
    gd = dataclasses.replace(cfg.gd, task=dataclasses.replace(cfg.gd.task, n_context=lengths[-1]))
    axes = (Axis("train.seed", tuple(range(cfg.seeds))), Axis(CONTEXT_FIELD, tuple(lengths)))
    table, _ = run_gd_sweep(gd, axes, f"{out_dir}/context_length")
    theory = {k: gd_one_step_loss(dataclasses.replace(gd.task, n_context=k),
                                  optimal_gd_lr(dataclasses.replace(gd.task, n_context=k))) for k in lengths}
    summary = context_length_summary(table, theory)
    worst, gd_mean, z, trained = (summary[k] for k in ("worst", "gd_mean", "z", "trained"))
    checks = [
        check_below("worst_member_rel_gap_to_gd1_at_its_k", worst, cfg.match_tolerance,
                    f"max over {summary['finite']} members of |L / L_GD1(k) - 1|, GD-1 at eta*(k) on the same "
                    "padded prompts"),
        check_below("gd1_on_padded_prompts_vs_closed_form_in_se", max(z.values()), cfg.max_standard_errors,
                    "max over k of |mean - closed form| / standard error, GD-1 at eta*(k) n_context/k on prompts "
                    f"padded to {lengths[-1]}: " + ", ".join(f"k={k}: {gd_mean[k]:.4f} vs {theory[k]:.4f}"
                                                            for k in lengths)),
        Check("trained_loss_falls_with_context_length", summary["falls"], f"== {len(lengths) - 1}", summary["falling"],
              "the number of steps from one context length to the next where the trained loss falls; mean over "
              "seeds: " + ", ".join(f"k={k}: {trained[k]:.4f}" for k in lengths)),
        diverged_check({r["member"]: r["diverged_at"] for r in table if r["diverged_at"] is not None}),
    ]
    return Outcome(checks, [_plot(table, theory, gd.task.dim, out_dir)])


def _plot(table: list[dict], theory: dict, dim: int, out_dir: str) -> str:
    fields = ["train.seed", CONTEXT_FIELD, "init_scale"]
    agg = aggregate(table, fields)
    fig, axes = new_figure(size=(5.5, 3.8))
    ax = axes[0, 0]
    plot_vs_axis(agg, fields, CONTEXT_FIELD, "loss", ax=ax, label_prefix="trained LSA on padded prompts, ")
    ks = sorted(theory)
    ax.plot(ks, [np.mean([r["gd1_loss"] for r in table if r[CONTEXT_FIELD] == k]) for k in ks], "s",
            color="k", mfc="none", label="GD-1 at eta*(k), same prompts")
    ax.plot(ks, [theory[k] for k in ks], "k--", lw=1, label="GD-1 at eta*(k), closed form")
    ax.set(xscale="log", xlabel="context pairs k (prompts padded to the longest)", ylabel="test loss (query MSE)",
           title=f"one LSA layer, d={dim}: one program for every k")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, "loss_vs_context_length")
