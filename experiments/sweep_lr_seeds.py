"""Vmapped sweeps: the GD-1 model over seeds x learning rates, and the task-diversity transition (Raventos+ 2023).

Part 1 trains the gd_equivalence model (one linear self-attention layer) for every (seed, lr) in
one vmapped program and plots the final test loss against the learning rate with seed bands,
marking the learning rates where every seed matches GD-1 at eta*. Part 2 trains a linear
attention stack on linear regression whose tasks come from a pool of n_tasks vectors (0 = a fresh
task per prompt) and plots its loss on fresh tasks against the pool size next to ridge
(lam = sigma^2 / tau^2, Bayes for the Gaussian task prior), dMMSE (Bayes for the pool) and the zero predictor
(E[y^2]). The dMMSE comparisons use only informative pools, whose dMMSE is below half the zero predictor's loss: a
small pool's dMMSE on fresh tasks is worse than predicting 0 (pool 1: d + |w_1|^2 + sigma^2 against d + sigma^2),
so a model that beats it or sits near it may have learned nothing. At the smallest informative pool the model's
fresh-task loss must be log-nearest dMMSE (not ridge, not the zero predictor); some informative pool's model must
beat its dMMSE. Quick (d = 3, zero predictor 3.31, ridge 0.301): pools 1 and 4 are not informative (dMMSE 12.1 and
2.99); at pool 16 the model's 0.756 is log-nearer dMMSE 1.57 (0.73) than ridge (0.92), a narrow pass, and it beats
dMMSE at 16 and 64: the transition is already under way at 16. An untrained model (0.02-scale init) predicts ~0
(3.31 at every pool) and fails every task-diversity check.

Part 2's model and training are ours at every preset, full included: a stack of `layers` linear-attention layers
(4 at full) trained for 20,000 steps at a constant learning rate with the loss on the query alone, where Raventos et
al. train a GPT-2 (8 layers, 2 heads, width 128) for 500k steps with a triangle schedule and the loss on every
position; the task (d = 8, N = 16, sigma = 0.5, batch 256) is theirs. So the transition's place on the pool axis is
not expected to match their figure.

`--sweep` on this experiment runs part 1's sweep only: its axes, fields of the gd_equivalence config
(`--sweep gd.train.lr=log:1e-4:1e-1:8 gd.train.seed=0:8`), take the place of the seeds x lrs grid, and its checks are
the sweep's own (some member within match_tolerance of GD-1, no member diverged); part 1's two learning-rate checks
and part 2 do not run, so an override of lrs, seeds or diversity.* is refused with it. gd_equivalence itself takes
`--sweep lr=... seed=...`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments import gd_equivalence
from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Check, Outcome, check_above, check_below, diverged_check
from experiments.common.run_config import run_config
from experiments.common.sweep_report import aggregate, plot_vs_axis, write_sweep_report
from experiments.common.gd_sweep import (  # noqa: F401  sweep_fields: what --sweep varies (the registry reads it)
    check_unread_gd_fields, gd_sweep_checks, run_gd_sweep, sweep_fields)
from jaxicl.models.attention import sweep_init
from jaxicl.baselines import dmmse, ridge
from jaxicl.models import predictor
from jaxicl.tasks import linear_regression as lr_task
from jaxicl.tasks import sample_batch
from jaxicl.train import TrainConfig, eval_key, query_mse, regression_loss, train_sweep
from jaxicl.train.sweep_spec import Axis, grid
from jaxicl.validation import ConfigError, check_distinct, check_positive, check_set_by


@dataclasses.dataclass(frozen=True)
class Diversity:
    """Part 2: a linear-attention stack on regression whose tasks come from a pool of n_tasks vectors."""

    # task.n_tasks and train.seed are set per member (from n_tasks and seeds); train.seed only picks the test prompts
    task: lr_task.LinearRegression = lr_task.LinearRegression(dim=8, n_context=16, noise_std=0.5)
    train: TrainConfig = TrainConfig(steps=20000, batch_size=256, lr=1e-3, steps_per_call=500, log_every=50)
    n_tasks: tuple[int, ...] = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 0)  # 0: a fresh task per prompt
    seeds: int = 4  # seeds 0..seeds - 1
    layers: int = 4
    init_scale: float = 0.02
    eval_prompts: int = 4096
    max_infinite_over_ridge: float = 2.0  # a few preconditioned GD steps, not exact ridge
    max_informative_dmmse: float = 0.5  # a pool counts where its dMMSE is below this x the zero predictor's loss
    min_transition_ratio: float = 2.0  # fresh-task MSE, smallest pool / fresh task per prompt

    def __post_init__(self):
        for name in ("seeds", "layers", "eval_prompts"):
            check_positive(name, getattr(self, name))
        if self.task.noise_std <= 0:
            raise ConfigError("diversity.task.noise_std must be > 0 (dMMSE and ridge use sigma^2)")
        pools = [n for n in self.n_tasks if n > 0]
        if 0 not in self.n_tasks or not pools or min(self.n_tasks) < 0 or len(set(self.n_tasks)) < len(self.n_tasks):
            raise ConfigError(f"diversity.n_tasks must hold 0 (a fresh task per prompt) and at least one pool size "
                              f"> 0, each once; its checks compare them, got {self.n_tasks}")
        check_set_by("diversity.task.n_tasks", self.task.n_tasks, lr_task.LinearRegression.n_tasks, "diversity.n_tasks",
                     self.n_tasks, self.n_tasks, "member")
        check_set_by("diversity.train.seed", self.train.seed, TrainConfig.seed, "diversity.seeds", self.seeds,
                     tuple(range(self.seeds)), "member", does="pick the test prompts")


@dataclasses.dataclass(frozen=True)
class Config:
    # the grid sets gd.train.seed and gd.train.lr per member (from seeds and lrs): gd.train.seed only picks the test
    # prompts; under --sweep, which replaces the grid, give them as axes
    gd: gd_equivalence.Config = gd_equivalence.Config()
    seeds: int = 8  # seeds 0..seeds - 1
    lrs: tuple[float, ...] = (1e-4, 2.7e-4, 7.2e-4, 1.9e-3, 5.2e-3, 1.4e-2, 3.7e-2, 1e-1)
    match_tolerance: float = 0.05  # |L / L_GD1 - 1| for "matches GD-1"
    diversity: Diversity = Diversity()
    chunk_size: int = 0  # members trained at once; 0 = all

    def __post_init__(self):
        check_positive("seeds", self.seeds)
        check_positive("chunk_size", self.chunk_size, allow_zero=True)
        if not self.lrs:
            raise ConfigError("lrs must name at least one learning rate")
        for i, lr in enumerate(self.lrs):
            check_positive(f"lrs[{i}]", lr)
        check_distinct("lrs", self.lrs)
        for name, by, values, does in (("seed", "seeds", tuple(range(self.seeds)), "pick the test prompts"),
                                       ("lr", "lrs", self.lrs, "")):
            check_set_by(f"gd.train.{name}", getattr(self.gd.train, name), getattr(TrainConfig, name), by,
                         getattr(self, by), values, "member", does=does,
                         hint=f"--sweep, which replaces the grid, takes it as an axis: --sweep gd.train.{name}=...")
        check_unread_gd_fields(self.gd, self.match_tolerance)


_SMALL_GD = gd_equivalence.Config(task=lr_task.LinearRegression(dim=4, n_context=8),
                                  train=TrainConfig(steps=600, batch_size=256, schedule="warmup_cosine",
                                                    steps_per_call=200, log_every=10),
                                  eval_every=200, eval_prompts=2048)
PRESETS = {
    "smoke": Config(gd=dataclasses.replace(_SMALL_GD, task=lr_task.LinearRegression(dim=2, n_context=6),
                                           train=TrainConfig(steps=200, batch_size=128, steps_per_call=100)),
                    seeds=2, lrs=(1e-3, 1e-2, 1e-1),
                    diversity=Diversity(task=lr_task.LinearRegression(dim=2, n_context=6, noise_std=0.5),
                                        train=TrainConfig(steps=200, batch_size=128, lr=1e-2, steps_per_call=100),
                                        n_tasks=(1, 16, 0), seeds=1, layers=1, eval_prompts=512)),
    "quick": Config(gd=_SMALL_GD, seeds=3, lrs=(1e-4, 5e-4, 2.5e-3, 1.25e-2, 6.25e-2),
                    diversity=Diversity(task=lr_task.LinearRegression(dim=3, n_context=16, noise_std=0.5),
                                        train=TrainConfig(steps=1500, batch_size=256, lr=3e-3, steps_per_call=500,
                                                          log_every=10, checkpoint_every=500),
                                        n_tasks=(1, 4, 16, 64, 256, 0), seeds=2, layers=2, eval_prompts=2048)),
    "full": Config(gd=dataclasses.replace(Config.gd, train=dataclasses.replace(Config.gd.train, checkpoint_every=300)),
                   diversity=dataclasses.replace(Config.diversity, train=dataclasses.replace(Config.diversity.train,
                                                                                             checkpoint_every=2000))),
}


SWEEP_SECTION = "gd"  # --sweep varies fields of cfg.gd (gd.train.lr), members of a gd_equivalence sweep
SWEEP_IGNORES = {"lrs": "its axes replace part 1's seeds x lrs grid: give learning rates as --sweep gd.train.lr=...",
                 "seeds": "its axes replace part 1's seeds x lrs grid: give seeds as --sweep gd.train.seed=...",
                 "diversity": "it runs part 1's sweep only, not part 2, task diversity"}


def run_sweep(cfg: Config, axes: tuple[Axis, ...], out_dir: str) -> Outcome:
    """--sweep on this experiment: part 1 only, the axes (on fields of cfg.gd, e.g. gd.train.lr) in place of the seed
    x lr grid, with the sweep's checks; lrs, seeds and diversity are not read (SWEEP_IGNORES)."""
    gd_equivalence.check_fresh_tasks(cfg.gd.task, "gd.task.n_tasks")
    axes = tuple(Axis(a.field.removeprefix(f"{SWEEP_SECTION}."), a.values) for a in axes)
    table, figures = run_gd_sweep(cfg.gd, axes, f"{out_dir}/gd_sweep", cfg.chunk_size)
    return Outcome(gd_sweep_checks(table, cfg.match_tolerance), [f"gd_sweep/{f}" for f in figures if f.endswith(".png")])


def run(cfg: Config, out_dir: str) -> Outcome:
    gd_equivalence.check_fresh_tasks(cfg.gd.task, "gd.task.n_tasks")
    axes = (Axis("train.seed", tuple(range(cfg.seeds))), Axis("train.lr", tuple(cfg.lrs)))
    table, _ = run_gd_sweep(cfg.gd, axes, f"{out_dir}/lr_seeds", cfg.chunk_size)
    matched = _matched_lrs(table, cfg.match_tolerance)
    figures = [_plot_lr(table, table[0]["gd1_loss"], matched, cfg.match_tolerance, cfg.gd.train, out_dir)]
    checks = gd_sweep_checks(table, cfg.match_tolerance)
    checks.append(Check("lrs_where_all_seeds_match_gd1", len(matched), ">= 1", bool(matched),
                        f"learning rates {matched} (tolerance {cfg.match_tolerance})"))
    small = min(cfg.lrs)
    worst = max(float("inf") if r["diverged_at"] is not None else abs(r["rel_gap"])
                for r in table if r["train.lr"] == small)
    checks.append(Check("smallest_lr_does_not_match_gd1", worst, f">= {cfg.match_tolerance}", small not in matched,
                        f"the worst seed's |L / L_GD1 - 1| at the smallest lr, {small:g}: under-trained there, the "
                        "loss depends on the lr, so the sweep shows something"))
    div_checks, div_figure = _diversity(cfg, f"{out_dir}/task_diversity", out_dir)
    return Outcome(checks + div_checks, figures + [div_figure])


def _matched_lrs(table: list[dict], tolerance: float) -> list[float]:
    lrs = sorted({r["train.lr"] for r in table})
    return [v for v in lrs if all(r["diverged_at"] is None and abs(r["rel_gap"]) < tolerance
                                  for r in table if r["train.lr"] == v)]


def lr_axis_label(train: TrainConfig) -> str:
    """The learning-rate axis as train runs it: "learning rate (sgd, constant)", "peak learning rate (adam,
    warmup-cosine)"."""
    if train.schedule == "constant":
        return f"learning rate ({train.optimizer}, constant)"
    return f"peak learning rate ({train.optimizer}, warmup-cosine)"


def _plot_lr(table: list[dict], gd_loss: float, matched: list[float], tolerance: float, train: TrainConfig,
             out_dir: str) -> str:
    fields = ["train.seed", "train.lr", "init_scale"]
    agg = aggregate(table, fields)
    fig, axes = new_figure(size=(5.5, 3.8))
    ax = axes[0, 0]
    plot_vs_axis(agg, fields, "train.lr", "loss", ax=ax, label_prefix="trained LSA ")
    ax.axhline(gd_loss, color="k", ls="--", label="GD-1 at eta*")
    ax.axhspan(gd_loss * (1 - tolerance), gd_loss * (1 + tolerance), color="k", alpha=0.08)
    for i, v in enumerate(matched):
        ax.axvline(v, color="tab:green", alpha=0.4, lw=6, label="all seeds match GD-1" if i == 0 else None)
    ax.set(xlabel=lr_axis_label(train), ylabel="final test loss (query MSE)",
           title=f"{len({r['train.seed'] for r in table})} seeds x {len({r['train.lr'] for r in table})} lrs, one program")
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, "loss_vs_lr")


def member_query_mse(graphdef, params, batch) -> np.ndarray:
    """[M] query MSE on one batch of every member of the stacked parameters params [M, ...] (one vmapped program)."""
    model = jax.jit(jax.vmap(lambda p: query_mse(jax.vmap(predictor(graphdef, p))(batch.inputs), batch.targets)))
    return np.asarray(model(params))


def pool_summary(losses: np.ndarray, members: list[dict], dmmse_loss: dict[int, float]) -> dict:
    """The members' fresh-task losses [M] by pool size task.n_tasks (dmmse_loss's keys; 0: a fresh task per prompt).

    by_pool {k: losses of the members of pool k, a diverged member's at its last finite state (the divergence is a
    check of its own)}; smallest: the smallest finite pool; small, infinite: the mean loss at the smallest pool and
    at pool 0 (else the largest); beyond: the finite pools whose mean loss is below their own dMMSE.
    """
    pools = sorted(dmmse_loss)
    by_pool = {k: losses[[i for i, m in enumerate(members) if m["task.n_tasks"] == k]] for k in pools}
    smallest = min(k for k in pools if k)
    return {"by_pool": by_pool, "smallest": smallest, "small": float(np.mean(by_pool[smallest])),
            "infinite": float(np.mean(by_pool[0 if 0 in pools else max(pools)])),
            "beyond": [k for k in pools if k and float(np.mean(by_pool[k])) < dmmse_loss[k]]}


DMMSE_ELEMENTS = 2**24  # prompts x pool x pairs that dmmse_query_mse evaluates at once (64 MiB of float32)


@functools.partial(jax.jit, static_argnums=0)
def dmmse_query_mse(task: lr_task.LinearRegression, pool: jax.Array, inputs: jax.Array,
                    targets: jax.Array) -> jax.Array:
    """dMMSE's query MSE over pool [K, dim] on prompts inputs [B, T, D], targets [B, T]. One prompt holds a few
    [K, n_context + 1] arrays, so the prompts go DMMSE_ELEMENTS / (K (n_context + 1)) at a time, whatever K: a vmap
    over the full preset's 4096 prompts at its pool 65,536 held [4096, 65536, 17] arrays, 17 GiB each."""
    batch_size = max(1, DMMSE_ELEMENTS // (pool.shape[0] * (task.n_context + 1)))
    return query_mse(jax.lax.map(dmmse(task, pool), inputs, batch_size=batch_size), targets)


def _diversity(cfg: Config, sweep_dir: str, out_dir: str) -> tuple[list[Check], str]:
    div, chunk_size = cfg.diversity, cfg.chunk_size
    task = div.task
    init, graphdef = sweep_init(task.dim + 1, div.layers)
    members = grid((Axis("train.seed", tuple(range(div.seeds))), Axis("task.n_tasks", tuple(div.n_tasks))))
    members = [m | {"init_scale": div.init_scale} for m in members]
    result = train_sweep(regression_loss(graphdef), lr_task.sample, task, div.train, init, members,
                         out_dir=sweep_dir, chunk_size=chunk_size or None, run_config=run_config("diversity", div),
                         desc="task diversity")
    write_sweep_report(sweep_dir)
    key = eval_key(div.train.seed)
    fresh = sample_batch(lr_task.sample, dataclasses.replace(task, n_tasks=0), key, div.eval_prompts)
    losses = member_query_mse(graphdef, result.params, fresh)
    lam = task.noise_std**2 / task.w_scale**2
    ridge_loss = float(query_mse(jax.vmap(ridge(task, lam))(fresh.inputs), fresh.targets))
    pools = sorted(set(div.n_tasks))
    dmmse_loss = {k: ridge_loss if k == 0 else float(dmmse_query_mse(task, lr_task.task_pool(task, k), fresh.inputs,
                                                                     fresh.targets)) for k in pools}
    zero_loss = float(query_mse(jnp.zeros_like(fresh.targets), fresh.targets))  # E[y^2] on the fresh prompts
    summary = pool_summary(losses, members, dmmse_loss)
    figure = _plot_diversity(summary["by_pool"], dmmse_loss, ridge_loss, zero_loss, out_dir)
    diverged = {f"seed {members[m]['train.seed']} n_tasks {members[m]['task.n_tasks']}": step
                for m, step in result.diverged.items()}
    return (diversity_checks(summary, dmmse_loss, ridge_loss, zero_loss, div)
            + [diverged_check(diverged, "diversity_diverged_members")]), figure


def diversity_checks(summary: dict, dmmse_loss: dict[int, float], ridge_loss: float, zero_loss: float,
                     div: Diversity) -> list[Check]:
    """Part 2's checks from pool_summary's summary and the fresh-task losses of dMMSE per pool, ridge and the zero
    predictor. Only informative pools take part in the dMMSE comparisons: those whose dMMSE is below
    div.max_informative_dmmse x the zero predictor's loss. A smaller pool's dMMSE (pool 1: E|w - w_1|^2 + sigma^2,
    above E[y^2]) is beaten by predicting 0, so beating it, or being near it, says nothing."""
    bound = div.max_informative_dmmse * zero_loss
    informative = [k for k in sorted(dmmse_loss) if k and dmmse_loss[k] < bound]
    beyond = [k for k in summary["beyond"] if k in informative]
    by_pool = {k: float(np.mean(v)) for k, v in summary["by_pool"].items()}
    refs = {"zero": zero_loss, "ridge": ridge_loss}
    if informative:
        k = informative[0]
        refs["dMMSE"] = dmmse_loss[k]
        dist = {r: abs(np.log(by_pool[k] / v)) for r, v in refs.items()}
        nearest = min(dist, key=dist.get)
        pool_check = Check("small_informative_pool_nearest_dmmse", by_pool[k],
                           f"log-nearest dMMSE {dmmse_loss[k]:.3g} (not ridge {ridge_loss:.3g}, zero {zero_loss:.3g})",
                           nearest == "dMMSE",
                           f"fresh-task MSE at n_tasks={k}, the smallest pool whose dMMSE is below "
                           f"{div.max_informative_dmmse:g} x the zero predictor's {zero_loss:.3g}; |log(model / ref)|: "
                           + ", ".join(f"{r} {v:.2f}" for r, v in dist.items())
                           + f" (so the model must be below sqrt(dMMSE x zero) = "
                           f"{np.sqrt(dmmse_loss[k] * zero_loss):.3g}); model per pool "
                           + ", ".join(f"{p}: {v:.3g}" for p, v in by_pool.items()))
    else:
        pool_check = Check("small_informative_pool_nearest_dmmse", float("nan"), "an informative pool", False,
                           f"no pool's dMMSE is below {div.max_informative_dmmse:g} x the zero predictor's "
                           f"{zero_loss:.3g}: {dmmse_loss}")
    return [
        pool_check,
        Check("informative_pools_where_model_beats_its_dmmse", len(beyond), ">= 1", bool(beyond),
              f"n_tasks {beyond} of the informative pools {informative} (dMMSE "
              + ", ".join(f"{p}: {dmmse_loss[p]:.3g}" for p in sorted(dmmse_loss) if p)
              + f"; informative below {bound:.3g}): on fresh tasks the model beats the Bayes predictor of its own "
              "pool, i.e. it generalises beyond the pool (the transition)"),
        check_below("infinite_pool_model_over_ridge", summary["infinite"] / ridge_loss, div.max_infinite_over_ridge,
                    f"fresh-task MSE with a fresh task per prompt / ridge {ridge_loss:.3g}; a {div.layers}-"
                    "layer linear attention model is a few preconditioned GD steps, not exact ridge"),
        check_above("transition_ratio_small_over_infinite_pool", summary["small"] / summary["infinite"],
                    div.min_transition_ratio,
                    "fresh-task MSE drops as the pretraining task pool grows"),
    ]


def _plot_diversity(by_pool: dict, dmmse_loss: dict, ridge_loss: float, zero_loss: float, out_dir: str) -> str:
    finite = [k for k in by_pool if k]
    x = {k: (k if k else max(finite) * 8) for k in by_pool}  # "infinite" drawn to the right of the largest pool
    ks = sorted(by_pool, key=lambda k: x[k])
    fig, axes = new_figure(size=(5.5, 3.8))
    ax = axes[0, 0]
    mean = np.array([by_pool[k].mean() for k in ks])
    lo, hi = np.array([by_pool[k].min() for k in ks]), np.array([by_pool[k].max() for k in ks])
    ax.plot([x[k] for k in ks], mean, "o-", label="trained model (mean over seeds)")
    ax.fill_between([x[k] for k in ks], lo, hi, alpha=0.25, label="seed range")
    ax.plot([x[k] for k in ks], [dmmse_loss[k] for k in ks], "s--", label="dMMSE (Bayes for the pool)")
    ax.axhline(ridge_loss, color="k", ls=":", label="ridge lam = sigma^2/tau^2")
    ax.axhline(zero_loss, color="0.5", ls="-.", label="predicting 0 (E[y^2])")
    ax.set_xscale("log")
    ax.set_xticks([x[k] for k in ks], [str(k) if k else "inf" for k in ks])
    ax.set(xlabel="pretraining tasks in the pool", ylabel="query MSE on fresh tasks", yscale="log",
           title="task-diversity transition (Raventos et al. 2023)")
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, "task_diversity")
