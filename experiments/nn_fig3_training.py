"""Li et al. 2024 Fig. 3: full-matrix GD from diag(0, .., 0, -sigma) learns 1-NN; matches the reduced dynamics.

For each (N, d) in `runs`, the merged W of the one-layer model is trained from the theorem's deterministic
initialisation (the paper's own experiments start from a random init: nn_random_init) by gradient steps on the
query loss, the gradient estimated on fresh prompts sampled on device each step; the seeds are the members of
one vmapped sweep (jaxicl.train.sweep) writing N<n>_d<d>/ (metrics, checkpoints; a rerun into the same
directory resumes). The full-W trajectory of (xi1, xi2) is compared with the closed-form two-parameter
dynamics (step eta/d on xi1, eta on xi2; jaxicl.theory.nearest_neighbor).

Two regimes: the full-W runs (3000 steps at quick) are pre-asymptotic, and there xi grows faster than log t; the
reduced dynamics, exact on the invariant family that the full run is shown to follow, is run on to
long_horizons (1e5 and 1e6 steps) where the lemmas' Theta(log t) growth is checked with the same slope-drift
statistic and Theorem 1's L = O(1/log t) as L log t not growing, and from the sigma Lemma 12 assumes, where its
ratio bound xi1 <= 7/15 xi2 and the query weight bound q_(N+1) <= exp(-xi2/15) drawn from it are checked. The r^2
of xi ~ a log t + b is reported, not checked: a power law t^p up to p = 0.8 also reaches 0.95.

Settings: every preset's are ours. The paper's experiments (shared/papers/nearest_neighbor_li2024.md, Section 3)
train from a random init by SGD on a fixed set of 10,000 prompts for 2,000 epochs; here every preset starts from
the theorem's init and draws fresh prompts each step; quick's (N, d) = (4, 4), (8, 4), (16, 8), sigma 3, lr 2.0,
3000 steps of batch 128 and 4 seeds, and full's (N, d) grid, lr 0.5, 100,000 steps of batch 512 and 8 seeds are ours
(the paper's lr, batch and grid are not known).

What the quick preset shows (61 s on a 2-core Intel Xeon): the trained W becomes 1-NN (0.96 of uniform prompts agree
with the 1-NN label, the shifted test set's MSE 5e-4, the train loss at 0.20 of its start and still falling) and stays
on the invariant family (1.2% off it), where the full-W runs follow the reduced dynamics within 1.2% over the second
half. Notes Section 7's diagnostics: the attention's argmax is the 1-NN point i* on 0.987, 0.981 and 0.971 of uniform
prompts (N = 4, 8, 16, worst seed), and the query's weight on itself q_(N+1) (mean over prompts and seeds) goes from
0.012, 0.006 and 0.003 at init up to about 0.03 and down to 0.006, 0.007 and 0.006 at 3000 steps; the worst prompt's
is still 0.66, 0.98 and 0.31 there (1.8, 2.5 and 0.68 times exp(-xi2/15); reported only, as sigma = 3 is far below
Lemma 12's). Theorem 1's L = O(1/log t) holds on the reduced dynamics in our sense (L log t does not grow): over
[1e4, 1e5] and [1e5, 1e6] its late-half mean is 0.77 and 0.84 of its early-half mean (worst run; a stalled loss would
give 1.12 and 1.10), and L log t is 0.07 to 0.14 at 1e6: the loss falls faster than 1/log t here. Not shown (5 of 14
checks fail): the lemmas' Theta(log t) growth. Over 3000 steps xi grows faster than log t (slope drift 1.47, check
1.25), and the reduced dynamics run on to 1e5 and 1e6 steps do not reach log t either (1.43 and 1.44; xi ~ t^0.3
there, the t^(1/3) of the flow once the loss is ~ C / xi1); from the sigma Lemma 12 assumes its ratio bound
xi1 <= 7/15 xi2 is exceeded in every run (at most 0.69, 0.75 and 1.10 for N = 4, 8, 16), with the step eta = 2.0
ours, and so is the bound the notes draw from it, q_(N+1) <= exp(-xi2/15): the worst of 256 Monte Carlo prompts is at
41, 36 and 12 times it (one prompt in each run at 1e6 steps, one whose nearest point is far: q_(N+1) <=
exp(xi1 (1 - s_(1)) - xi2) always, and 1 - s_(1) reaches 14/15 xi2 / xi1 once xi1 > 7/15 xi2).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Check, Outcome, check_above, check_below, diverged_check
from experiments.common.nearest_neighbor import (eval_batches, family_loss, log_axes, log_spaced, member_tables,
                                                 nn_metrics, smooth)
from experiments.common.run_config import run_config
from jaxicl.models.nearest_neighbor_attention import NearestNeighborAttention
from jaxicl.prng import seed_key
from jaxicl.tasks import nearest_neighbor as nn_task
from jaxicl.theory import nearest_neighbor as theory
from jaxicl.train import TrainConfig, train_sweep
from jaxicl.validation import ConfigError, check_distinct, check_positive, check_range, check_set_by


RECORD = 10  # the reduced dynamics are compared with the full run every RECORD steps


@dataclasses.dataclass(frozen=True)
class Config:
    # each run sets dim and n_context (from runs) and each member train.seed (from seeds): those fields are refused
    # unless they hold the class's default or the one value every run (member) takes
    task: nn_task.NearestNeighbor = nn_task.NearestNeighbor(delta=0.5)
    runs: tuple[str, ...] = ("4x4", "8x4", "16x8")  # "NxD": context size N and dimension d of each run
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # trained together (vmap); the init is the same, the data differ
    sigma: float = 3.0
    # plain GD W <- W - eta grad L(W), the gradient estimated on batch_size fresh prompts per step
    train: TrainConfig = TrainConfig(optimizer="sgd", lr=2.0, steps=3000, batch_size=128, steps_per_call=250,
                                     log_every=1, checkpoint_every=1000)
    eval_prompts: int = 2048
    reduced_samples: int = 4096  # Monte Carlo x samples of the reduced two-parameter dynamics
    long_horizons: tuple[int, ...] = (100_000, 1_000_000)  # reduced dynamics only: the asymptotic regime
    long_record_every: int = 1000
    long_samples: int = 256  # Monte Carlo samples of the long runs (their cost is steps x samples x N)
    fit_from: float = 0.1  # fits and comparisons use t >= fit_from * steps
    max_final_loss_fraction: float = 0.3  # final train loss / L(0, sigma)
    max_shifted_mse: float = 0.01
    max_off_family: float = 0.05  # |W - W(xi1, xi2)|_F / |W|_F
    max_log_slope_drift: float = 1.25  # "roughly linear in log t": the slope changes by < 25% over the window
    max_reduced_rel_gap: float = 0.02  # over the second half of training
    min_agreement: float = 0.9

    def __post_init__(self):
        if self.task.num_classes != 2:
            raise ConfigError(f"nn_fig3_training needs task.num_classes=2 (the paper's +-1 labels, one label "
                              f"channel), got {self.task.num_classes}")
        if not self.runs:
            raise ConfigError("runs must name at least one 'NxD' pair")
        for run in self.runs:
            parts = run.split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ConfigError(f"runs entries must look like '16x8' (N x d, positive integers), got {run!r}")
        check_distinct("runs", (f"{n}x{d}" for n, d in self.pairs))  # as read: '04x4' is '4x4', trained into N4_d4
        for name in ("eval_prompts", "reduced_samples", "long_record_every", "long_samples"):
            check_positive(name, getattr(self, name))
        if not self.long_horizons or any(h <= 0 or h % self.long_record_every for h in self.long_horizons):
            raise ConfigError(f"long_horizons must be positive multiples of long_record_every="
                              f"{self.long_record_every}, got {self.long_horizons}")
        check_distinct("long_horizons", self.long_horizons)
        if any(d <= 3 for _, d in self.pairs):
            raise ConfigError("Lemma 12's sigma needs d > 3: every runs entry 'NxD' must have D >= 4")
        t = self.train
        if t.optimizer != "sgd" or t.schedule != "constant" or t.log_every != 1:
            raise ConfigError("nn_fig3_training is plain GD with every step logged: train.optimizer='sgd', "
                              "train.schedule='constant', train.log_every=1")
        if t.steps_per_call % RECORD:
            raise ConfigError(f"train.steps_per_call={t.steps_per_call} must be a multiple of {RECORD}")
        if t.steps % t.steps_per_call:
            raise ConfigError(f"train.steps={t.steps} must be a multiple of train.steps_per_call={t.steps_per_call}")
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")
        check_distinct("seeds", self.seeds)
        check_range("fit_from", self.fit_from, 0.0, 1.0)
        # the fits split each log-t window [fit_from t, t] at sqrt(fit_from) t (theory.log_slope_drift) and fit a
        # line in log t to each half: they need t > 0 and two steps per half, on the full-W runs' every step and the
        # long runs' every long_record_every; the gap to the reduced dynamics needs a step recorded every RECORD
        for stop, last, every in ((t.steps, t.steps - 1, 1),
                                  *((h, h, self.long_record_every) for h in self.long_horizons)):
            grid = np.arange(0, last + 1, every)
            edges = self.fit_from * stop, np.sqrt(self.fit_from) * stop
            halves = np.sum((grid >= edges[0]) & (grid < edges[1])), np.sum((grid >= edges[1]) & (grid <= stop))
            if min(halves) < 2:
                raise ConfigError(f"fit_from={self.fit_from!r} leaves {halves[0]} and {halves[1]} steps in the "
                                  f"halves of the log-t window [fit_from t, t] at t = {stop} (split at sqrt(fit_from) "
                                  f"t, steps every {every}): the log-t fits need t > 0 and 2 steps in each half; "
                                  f"fit_from must be in (0, 1), far enough from both ends")
        if (last_recorded := (t.steps - 1) // RECORD * RECORD) < self.fit_from * t.steps:
            raise ConfigError(f"fit_from={self.fit_from!r} leaves no step of the full-W runs at or after fit_from * "
                              f"train.steps = {self.fit_from * t.steps:g} where they meet the reduced dynamics (every "
                              f"{RECORD} steps, the last at {last_recorded})")
        for k, name in enumerate(("n_context", "dim")):
            check_set_by(f"task.{name}", getattr(self.task, name), getattr(nn_task.NearestNeighbor, name), "runs",
                         self.runs, tuple(p[k] for p in self.pairs), "run")
        check_set_by("train.seed", t.seed, TrainConfig.seed, "seeds", self.seeds, self.seeds, "member")

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(N, d) of each run."""
        return [tuple(map(int, run.split("x"))) for run in self.runs]


PRESETS = {
    "smoke": Config(runs=("4x4",), seeds=(0, 1),
                    train=dataclasses.replace(Config.train, steps=200, steps_per_call=100, batch_size=64),
                    eval_prompts=256, reduced_samples=512, long_horizons=(2000, 10_000), long_record_every=100,
                    long_samples=128),
    "quick": Config(),
    "full": Config(runs=("4x4", "8x8", "16x8", "16x16", "32x16"), seeds=tuple(range(8)),
                   train=dataclasses.replace(Config.train, lr=0.5, steps=100_000, batch_size=512, steps_per_call=2000,
                                             checkpoint_every=10_000),
                   eval_prompts=10_000, reduced_samples=65_536),
}


def run_one(cfg: Config, n: int, d: int, out_dir: str) -> dict:
    """Trains every seed on (N = n, d) into out_dir; returns per-step metrics, evaluations, diverged members
    {seed: step} and the reduced-dynamics path."""
    task = dataclasses.replace(cfg.task, dim=d, n_context=n)
    graphdef, params = nnx.split(NearestNeighborAttention(d, sigma=cfg.sigma, rngs=nnx.Rngs(seed_key(0))))
    uniform, shifted = eval_batches(task, cfg.seeds[0], cfg.eval_prompts)
    metrics = nn_metrics(graphdef, uniform, shifted)
    label_bound = jnp.max(jnp.abs(shifted.info["labels"][..., 0]), axis=-1)

    def init(key):
        return params  # the theorem's deterministic init; the seeds differ only in their data

    def evaluate(p):
        xi1, xi2 = theory.to_reduced(p["w"][...], d)
        bound = theory.theorem2_bound(xi1, xi2, n, cfg.task.shifted_margin, label_bound)
        return {**metrics(p), "theorem2_mse_bound": jnp.mean(jnp.minimum(bound, 2 * label_bound) ** 2),
                "xi1": xi1, "xi2": xi2}

    result = train_sweep(family_loss(graphdef), nn_task.sample, task, cfg.train, init,
                         [{"train.seed": seed} for seed in cfg.seeds], out_dir=out_dir, evaluate=evaluate,
                         eval_every=cfg.train.steps_per_call, desc=f"nn_fig3 N={n} d={d}",
                         run_config=run_config("nn_fig3_training", cfg))
    per_step, eval_steps, evals = member_tables(result, cfg.train.steps)
    s = theory.sample_inner_products(seed_key(cfg.seeds[0]), n, d, cfg.reduced_samples)
    # reduced[k] is (xi1, xi2) after RECORD * k steps; per_step[..][t] is measured at W^t, before update t.
    reduced, no_d = (np.asarray(theory.reduced_gd(0.0, cfg.sigma, s, eta=cfg.train.lr, dim=dim, steps=cfg.train.steps,
                                                  record_every=RECORD)) for dim in (d, 1))
    loss_path = np.asarray(theory.reduced_loss_grid(*reduced[:-1].T, s))
    # long[k] is (xi1, xi2) after long_record_every * k steps, from sigma and from Lemma 12's sigma
    s_long = theory.sample_inner_products(jax.random.fold_in(seed_key(cfg.seeds[0]), 1), n, d, cfg.long_samples)
    long, lemma12 = (np.asarray(theory.reduced_gd(0.0, sigma, s_long, eta=cfg.train.lr, dim=d,
                                                  steps=max(cfg.long_horizons), record_every=cfg.long_record_every))
                     for sigma in (cfg.sigma, theory.lemma12_sigma(n, d)))
    long_loss = np.asarray(theory.reduced_loss_grid(*long.T, s_long))
    # max over the samples of log q_{N+1} + xi2 / 15 along each path: Lemma 12's q_{N+1} <= exp(-xi2 / 15) in logs
    margin = jax.vmap(lambda xi: jnp.max(theory.log_query_weight(xi[0], xi[1], s_long)) + xi[1] / 15)
    self_margin = [np.asarray(margin(jnp.asarray(path))) for path in (long, lemma12)]
    over = theory.log_query_weight(*lemma12[-1], s_long) + lemma12[-1, 1] / 15 > 0  # prompts over the bound at the end
    return {"n": n, "d": d, "per_step": per_step, "eval_steps": eval_steps, "evals": evals, "reduced": reduced,
            "reduced_no_d": no_d, "reduced_loss": loss_path, "long": long, "lemma12": lemma12,
            "long_loss": long_loss, "long_self_margin": self_margin[0], "lemma12_self_margin": self_margin[1],
            "lemma12_self_over_fraction": float(jnp.mean(over)),
            "diverged": {cfg.seeds[m]: step for m, step in result.diverged.items()}}


def _summaries(cfg: Config, r: dict) -> dict:
    t = np.arange(cfg.train.steps)
    late = t >= cfg.fit_from * cfg.train.steps
    loss = r["per_step"]["loss"].mean(1)
    xi = np.stack([r["per_step"]["xi1"].mean(1), r["per_step"]["xi2"].mean(1)], -1)  # [steps, 2]
    t_r = t[::RECORD]

    def rel_gap(start: float, reduced: np.ndarray, k) -> float:
        sel = t_r >= start * cfg.train.steps
        return float(np.max(np.abs(xi[::RECORD][sel, k] - reduced[:-1][sel, k]) / np.abs(reduced[:-1][sel, k])))

    fits = [theory.fit_log_growth(t[late], xi[late, k]) for k in range(2)]
    drift = [theory.log_slope_drift(t, xi[:, k], cfg.fit_from * cfg.train.steps, cfg.train.steps) for k in range(2)]
    t_long = np.arange(len(r["long"])) * cfg.long_record_every
    long_drift = {h: max(theory.log_slope_drift(t_long, r["long"][:, k], cfg.fit_from * h, h) for k in range(2))
                  for h in cfg.long_horizons}
    lemma12_ratio = r["lemma12"][1:, 0] / r["lemma12"][1:, 1]
    horizon = max(cfg.long_horizons)
    window = (t_long >= cfg.fit_from * horizon) & (t_long <= horizon)
    long_powers = [float(np.polyfit(np.log(t_long[window]), np.log(r["long"][window, k]), 1)[0]) for k in range(2)]
    powers = [np.polyfit(np.log(t[late]), np.log(xi[late, k]), 1)[0] for k in range(2)]
    # Theorem 1's L = O(1/log t): a finite window cannot show boundedness, so our criterion is that L log t does not
    # grow (late-half mean over early-half mean of the log window <= 1; a stalled loss would give the ratio of the
    # halves' mean log t, stall), chosen before looking at the values
    log_t = np.log(t_long[1:])
    loss_log_t, stall = ({h: theory.window_mean_ratio(t_long[1:], v, cfg.fit_from * h, h) for h in cfg.long_horizons}
                         for v in (r["long_loss"][1:] * log_t, log_t))
    train_log_t = theory.window_mean_ratio(t[1:], loss[1:] * np.log(t[1:]), cfg.fit_from * cfg.train.steps,
                                           cfg.train.steps)
    ev = r["evals"]
    window = max(cfg.train.steps // 20, 1)
    return {"initial_loss": theory.loss_at_init(r["n"], cfg.sigma), "final_loss": float(loss[-window:].mean()),
            "mid_loss": float(loss[cfg.train.steps // 2 - window:cfg.train.steps // 2].mean()),
            "shifted_mse": float(r["evals"]["shifted_mse"][-1].max()),
            "agreement": float(r["evals"]["agree_1nn"][-1].min()),
            "off_family": float(r["per_step"]["off_family"][-1].max()),
            "reduced_gap": rel_gap(0.5, r["reduced"], slice(None)),
            "reduced_gap_early": rel_gap(cfg.fit_from, r["reduced"], slice(None)),
            "reduced_gap_no_d": rel_gap(0.5, r["reduced_no_d"], 0),
            "r2": min(f[2] for f in fits), "slopes": [f[0] for f in fits], "powers": powers,
            "slope_drift": max(drift), "ratio": float(xi[-1, 0] / xi[-1, 1]), "long_drift": long_drift,
            "long_ratio": float(r["long"][-1, 0] / r["long"][-1, 1]), "long_powers": long_powers,
            "lemma12_sigma": theory.lemma12_sigma(r["n"], r["d"]), "lemma12_max_ratio": float(lemma12_ratio.max()),
            "lemma12_final": r["lemma12"][-1].tolist(), "loss_log_t": loss_log_t, "stall": stall,
            "train_loss_log_t": train_log_t,
            "long_loss_log_t_final": float(r["long_loss"][-1] * np.log(t_long[-1])),
            "self_weight": [float(ev["self_weight"][0].mean()), float(ev["self_weight"].mean(1).max()),
                            float(ev["self_weight"][-1].mean())],  # seed means: at init, peak, end
            "self_weight_max": float(ev["self_weight_max"][-1].max()),
            # the end's worst prompt and seed over exp(-xi2 / 15), and exp(2 xi1 - xi2), the bound before Lemma 12
            "self_over_lemma12": float(np.max(ev["self_weight_max"][-1] * np.exp(ev["xi2"][-1] / 15))),
            "self_bound_2xi1": float(np.max(np.exp(2 * ev["xi1"][-1] - ev["xi2"][-1]))),
            "argmax_1nn": float(ev["argmax_is_1nn"][-1].min()),
            "long_self_over_lemma12": float(np.exp(r["long_self_margin"].max())),
            "lemma12_self_over_bound": float(np.exp(r["lemma12_self_margin"].max())),
            "lemma12_self_over_fraction": r["lemma12_self_over_fraction"]}


def run(cfg: Config, out_dir: str) -> Outcome:
    runs = [run_one(cfg, n, d, os.path.join(out_dir, f"N{n}_d{d}")) for n, d in cfg.pairs]
    sums = [_summaries(cfg, r) for r in runs]
    label = ", ".join(f"(N={r['n']}, d={r['d']})" for r in runs)
    seeds = (f"{len(cfg.seeds)} seeds, {cfg.train.steps} steps of full-matrix gradient descent, eta={cfg.train.lr}, the gradient "
             f"estimated on {cfg.train.batch_size} fresh prompts per step")
    worst = lambda key, f=max: f(s[key] for s in sums)  # noqa: E731
    fraction = max(s["final_loss"] / s["initial_loss"] for s in sums)
    checks = [
        check_below("final_train_loss_fraction", fraction, cfg.max_final_loss_fraction,
                    f"max over {label} of (train loss, last 5% of steps) / L(0, sigma); {seeds}"),
        check_below("train_loss_late_over_mid", max(s["final_loss"] / s["mid_loss"] for s in sums), 1.0,
                    "loss still decreasing: mean over the last 5% / mean just before the midpoint (worst run)"),
        check_below("shifted_test_mse", worst("shifted_mse"), cfg.max_shifted_mse,
                    f"Appendix-B shifted test set, delta={cfg.task.delta}, {cfg.eval_prompts} prompts, worst seed and run"),
        check_above("agreement_with_1nn_uniform", worst("agreement", min), cfg.min_agreement,
                    "fraction of uniform prompts with sign(prediction) = 1-NN label (worst seed and run); the "
                    "paper expects a plateau below 1 from queries near a 1-NN decision boundary. Reported, not "
                    "checked (the notes give no number): the fraction whose attention argmax over all N + 1 tokens "
                    "is the 1-NN point i* (worst seed; notes Section 7's diagnostic): " + ", ".join(
                        f"N={r['n']}: {s['argmax_1nn']:.3f}" for r, s in zip(runs, sums))),
        check_below("off_family_fraction", worst("off_family"), cfg.max_off_family,
                    "|W - diag(xi1 I, 0, -xi2)|_F / |W|_F at the end (worst seed and run)"),
        check_below("xi_log_slope_late_over_early", worst("slope_drift"), cfg.max_log_slope_drift,
                    "full-W runs: d xi / d log t fitted on the later half of the log-t window over the earlier half "
                    "(worst of xi1, xi2 and runs; 1 for exact a log t + b). Above 1 means xi grows faster than log t "
                    f"here: over {cfg.train.steps} steps the runs are pre-asymptotic, and the asymptotic Theta(log t) "
                    "of the paper's lemmas is not reached; the xi_log_slope_drift_reduced checks follow the same "
                    "dynamics (reduced, exact on the family) to the horizons where the lemmas speak. Reported, not "
                    f"checked: r^2 of xi ~ a log t + b for t >= {cfg.fit_from} * steps (worst of xi1, xi2 and runs) "
                    f"{worst('r2', min):.3f} (r^2 cannot tell log t from t^p up to p = 0.8, which also gives 0.95); "
                    "best power-law exponents xi ~ t^p: " + "; ".join(
                        f"N={r['n']}: p1={s['powers'][0]:.2f}, p2={s['powers'][1]:.2f}" for r, s in zip(runs, sums))
                    + ". xi1 / xi2 at the end: " + ", ".join(f"N={r['n']}: {s['ratio']:.2f}" for r, s in zip(runs, sums))
                    + f" (Lemma 12's bound xi1 <= 7/15 xi2 assumes a much larger sigma than {cfg.sigma})"),
        *[check_below(f"xi_log_slope_drift_reduced[t<={h:.0e}]", max(s["long_drift"][h] for s in sums),
                      cfg.max_log_slope_drift,
                      f"the same statistic on the reduced dynamics (step eta/d on xi1, {cfg.long_samples} Monte "
                      f"Carlo samples) over [{cfg.fit_from} t, t] with t = {h:.0e} steps, worst of xi1, xi2 and runs "
                      "(per run: " + ", ".join(f"N={r['n']} d={r['d']}: {s['long_drift'][h]:.3f}"
                                                for r, s in zip(runs, sums)) + "). The asymptotic regime of Lemmas "
                      "4, 5 and 13: near 1 means xi grows like log t there" + (
                          "; xi1 / xi2 at the end: " + ", ".join(f"N={r['n']}: {s['long_ratio']:.2f}"
                                                                  for r, s in zip(runs, sums))
                          + "; best power-law exponents xi ~ t^p over the window: " + "; ".join(
                              f"N={r['n']}: p1={s['long_powers'][0]:.2f}, p2={s['long_powers'][1]:.2f}"
                              for r, s in zip(runs, sums))
                          + " (p near 1/3 is the t^(1/3) of the flow d xi1 / dt ~ C / xi1^2 once L ~ C / xi1, "
                          "jaxicl.theory.nearest_neighbor.fit_log_growth; p near 0 would be log t)"
                          if h == max(cfg.long_horizons) else ""))
          for h in cfg.long_horizons],
        *lemma12_checks(cfg, runs, sums),
        *[check_below(f"loss_log_t_late_over_early_reduced[t<={h:.0e}]", max(s["loss_log_t"][h] for s in sums), 1.0,
                      f"Theorem 1's L = O(1/log t) on the reduced dynamics from sigma = {cfg.sigma}: mean of L log t "
                      f"over the later half of the log window [{cfg.fit_from} t, t] over its mean over the earlier "
                      f"half, t = {h:.0e}, worst run (per run: " + ", ".join(
                          f"N={r['n']}: {s['loss_log_t'][h]:.3f}" for r, s in zip(runs, sums))
                      + "). The criterion is ours: a finite window cannot show L log t bounded, only that it does "
                      f"not grow; a loss stalled at a plateau would give {sums[0]['stall'][h]:.3f}" + (
                          "; L log t at the end: " + ", ".join(f"N={r['n']}: {s['long_loss_log_t_final']:.3f}"
                                                                for r, s in zip(runs, sums))
                          + f"; the full-W train loss (seed mean) over [{cfg.fit_from} steps, steps], reported "
                          "(pre-asymptotic): " + ", ".join(f"N={r['n']}: {s['train_loss_log_t']:.3f}"
                                                           for r, s in zip(runs, sums))
                          if h == max(cfg.long_horizons) else ""))
          for h in cfg.long_horizons],
        check_below("full_vs_reduced_dynamics_rel_gap", worst("reduced_gap"), cfg.max_reduced_rel_gap,
                    "max over t >= steps / 2 and xi1, xi2 of |xi(full W, seed mean) - xi(reduced)| / xi(reduced), "
                    "reduced GD with step eta/d on xi1 (per run: "
                    + ", ".join(f"N={r['n']}: {s['reduced_gap']:.4f}" for r, s in zip(runs, sums))
                    + f"). Over t >= {cfg.fit_from} * steps the gap is {worst('reduced_gap_early'):.3f}: the full "
                    f"run's xi2 starts growing slightly later. With step eta (no 1/d) on xi1 the late gap would be "
                    f"{worst('reduced_gap_no_d'):.2f}"),
        diverged_check({f"N={r['n']} d={r['d']} seed {seed}": step for r in runs
                        for seed, step in r["diverged"].items()}),
    ]
    figures = [_plot(cfg, runs, out_dir), _plot_long_horizon(cfg, runs, out_dir)]
    return Outcome(checks, figures)


def lemma12_checks(cfg: Config, runs: list[dict], sums: list[dict]) -> list[Check]:
    """The checks on the reduced dynamics from Lemma 12's sigma_12, from the runs (run_one's n, d) and their
    _summaries: xi1 <= 7/15 xi2, and the query's weight on itself under the bound drawn from it. Their notes state
    what was measured: whether the ratio bound holds here and at cfg.sigma."""
    horizon = max(cfg.long_horizons)
    per_run = list(zip(runs, sums))
    ratio = max(s["lemma12_max_ratio"] for s in sums)
    sigma_ratio = max(s["long_ratio"] for s in sums)
    ratio_check = check_below(
        "xi1_over_xi2_at_lemma12_sigma", ratio, 7 / 15,
        f"max over t <= {horizon:.0e} of xi1 / xi2 on the reduced dynamics started from (0, sigma_12) with the sigma "
        "Lemma 12 assumes, sigma_12 = 3 log(2 N^4 d / a_(N,d)) ("
        + ", ".join(f"N={r['n']} d={r['d']}: sigma_12 {s['lemma12_sigma']:.1f}, max ratio "
                    f"{s['lemma12_max_ratio']:.3f}, final (xi1, xi2) ({s['lemma12_final'][0]:.3g}, "
                    f"{s['lemma12_final'][1]:.3g})" for r, s in per_run)
        + f"). Lemma 12's bound is 7/15 = {7 / 15:.3f}; from sigma = {cfg.sigma} the ratio at t = {horizon:.0e} is "
        f"{sigma_ratio:.3f} (worst run), {'within' if sigma_ratio < 7 / 15 else 'above'} it. Step eta = "
        f"{cfg.train.lr} as in the full-W runs (ours; the notes record no condition on eta for Lemma 12): a ratio "
        "above the bound here is a mismatch with the lemma as restated, reported as measured")
    if ratio_check.passed:
        second = (f"which holds on this path (max xi1 / xi2 {ratio:.3f} < 7/15, xi1_over_xi2_at_lemma12_sigma), so "
                  "q_(N+1) <= exp(-xi2 / 15) on every prompt")
    else:
        second = (f"which fails on this path (max xi1 / xi2 {ratio:.3f} >= 7/15, xi1_over_xi2_at_lemma12_sigma), and "
                  "then prompts whose nearest point is far enough (1 - s_(1) > 14/15 xi2 / xi1 < 2) can exceed "
                  "exp(-xi2 / 15)")
    return [ratio_check, check_below(
        "self_weight_over_lemma12_bound_at_lemma12_sigma", max(s["lemma12_self_over_bound"] for s in sums), 1.0,
        f"max over t <= {horizon:.0e} and the {cfg.long_samples} Monte Carlo prompts of q_(N+1) / exp(-xi2 / 15), "
        "the query's weight on itself over the bound the notes draw from Lemma 12 (q_(N+1) <= exp(2 xi1 - xi2) <= "
        "exp(-xi2 / 15)), on the reduced dynamics from sigma_12 (per run: " + ", ".join(
            f"N={r['n']}: {s['lemma12_self_over_bound']:.2g}, over it on a fraction "
            f"{s['lemma12_self_over_fraction']:.3f} of the prompts at the end" for r, s in per_run)
        + "). The first step, q_(N+1) <= exp(xi1 (1 - s_(1)) - xi2) <= exp(2 xi1 - xi2), holds for every prompt; the "
        f"second needs xi1 <= 7/15 xi2, {second}. Reported, not checked (sigma = {cfg.sigma} is far below Lemma "
        f"12's): the same ratio on the reduced dynamics from sigma = {cfg.sigma} to t = {horizon:.0e}: " + ", ".join(
            f"N={r['n']}: {s['long_self_over_lemma12']:.2g}" for r, s in per_run)
        + f"; the full-W runs' q_(N+1) on {cfg.eval_prompts} uniform prompts, seed mean at init, peak and end, then "
        "the end's max over prompts and seeds, that max over exp(-xi2 / 15), and exp(2 xi1 - xi2) (worst seed): "
        + "; ".join(f"N={r['n']}: " + ", ".join(f"{v:.2g}" for v in s["self_weight"])
                    + f", max {s['self_weight_max']:.2g}, over the bound {s['self_over_lemma12']:.2g}, "
                    f"exp(2 xi1 - xi2) {s['self_bound_2xi1']:.2g}" for r, s in per_run))]


def _plot(cfg: Config, runs: list[dict], out_dir: str) -> str:
    fig, axes = new_figure(4, 2)
    t_log = log_spaced(cfg.train.steps)
    t_reduced = np.arange(0, cfg.train.steps, RECORD)
    colors = [f"C{i}" for i in range(len(runs))]
    for r, c in zip(runs, colors):
        tag = f"N={r['n']}, d={r['d']}"
        loss = smooth(r["per_step"]["loss"])
        idx = t_log[t_log < cfg.train.steps]
        ax = axes[0, 0]
        ax.plot(idx, loss[idx].mean(1), color=c, label=tag)
        ax.fill_between(idx, loss[idx].min(1), loss[idx].max(1), color=c, alpha=0.2)
        ax.plot(t_reduced[1:], r["reduced_loss"][1:], color=c, ls="--", lw=1)
        ax = axes[0, 1]
        mse = r["evals"]["shifted_mse"]
        ax.plot(r["eval_steps"][1:], mse[1:].mean(1), color=c, marker=".", label=tag)
        ax.plot(r["eval_steps"][1:], r["evals"]["theorem2_mse_bound"][1:].mean(1), color=c, ls=":", lw=1)
        ax = axes[0, 2]
        ax.plot(r["eval_steps"], r["evals"]["agree_1nn"].mean(1), color=c, marker=".", label=tag)
        ax.plot(r["eval_steps"], r["evals"]["argmax_is_1nn"].mean(1), color=c, ls="--")
        _plot_self_weight(axes[0, 3], r, c, tag)
        for k, ls in ((0, "-"), (1, "-.")):
            ax = axes[1, k]
            xi = r["per_step"][f"xi{k + 1}"]
            ax.plot(idx, xi[idx].mean(1), color=c, ls=ls, label=f"{tag} full W")
            ax.plot(t_reduced[1:], r["reduced"][1:-1, k], color="k", ls=":", lw=1)
        ax = axes[1, 2]
        ax.plot(idx, r["per_step"]["off_family"][idx].mean(1), color=c, label=tag)
    axes[0, 0].set(xlabel="step t", ylabel="train loss", title="training loss (dashed: reduced L)")
    axes[0, 1].set(yscale="log", xlabel="step t", ylabel="MSE",
                   title=f"shifted test MSE (dotted: Thm 2 bound, margin {cfg.task.shifted_margin:g}), "
                         f"delta={cfg.task.delta}")
    axes[0, 2].set(xlabel="step t", ylabel="fraction", ylim=(0.4, 1.02),
                   title="sign(pred) = 1-NN label (dashed: argmax attention = i*)")
    axes[0, 3].set(yscale="log", xlabel="step t", ylabel="q_(N+1), max over prompts and seeds (dashed: mean)",
                   title="query's weight on itself (dotted: exp(-xi2/15))")
    axes[1, 0].set(xlabel="step t", ylabel="xi1", title="xi1 = mean diag W_xx (dotted: reduced)")
    axes[1, 1].set(xlabel="step t", ylabel="xi2", title="xi2 = -W[-1,-1] (dotted: reduced)")
    axes[1, 2].set(yscale="log", xlabel="step t", ylabel="|W - W(xi)|_F / |W|_F",
                   title="distance from the invariant family")
    axes[1, 3].axis("off")
    for ax in axes.flat[:-1]:
        ax.legend(fontsize=7)
    log_axes(*axes.flat[:-1])
    return save_figure(fig, out_dir, "training")


def _plot_self_weight(ax, r: dict, color: str, tag: str) -> None:
    """The query's weight on itself q_(N+1) at the evaluations (r["evals"] arrays [evals, seeds]) against Lemma 12's
    per-prompt bound exp(-xi2/15) (dotted, seed-mean xi2): the max over prompts and seeds, the one the check note
    compares with the bound, and the mean over prompts (dashed, seed mean)."""
    ev = r["evals"]
    ax.plot(r["eval_steps"], ev["self_weight_max"].max(1), color=color, marker=".", label=tag)
    ax.plot(r["eval_steps"], ev["self_weight"].mean(1), color=color, ls="--", lw=1)
    ax.plot(r["eval_steps"], np.exp(-ev["xi2"].mean(1) / 15), color=color, ls=":", lw=1)


def _plot_long_horizon(cfg: Config, runs: list[dict], out_dir: str) -> str:
    """xi1, xi2 of the reduced dynamics against log t to the longest horizon, the full-W runs overlaid;
    xi1 / xi2 at sigma and at Lemma 12's sigma against its 7/15 bound; and L log t (Theorem 1: bounded)."""
    fig, axes = new_figure(4)
    t_long = np.arange(len(runs[0]["long"])) * cfg.long_record_every
    idx = log_spaced(cfg.train.steps)
    idx = idx[idx < cfg.train.steps]
    for i, r in enumerate(runs):
        c, tag = f"C{i}", f"N={r['n']}, d={r['d']}"
        for k in range(2):
            axes[0, k].plot(t_long[1:], r["long"][1:, k], color=c, label=f"{tag} reduced")
            axes[0, k].plot(idx, r["per_step"][f"xi{k + 1}"][idx].mean(1), color=c, ls=":", lw=2,
                            label=f"{tag} full W")
        axes[0, 2].plot(t_long[1:], r["long"][1:, 0] / r["long"][1:, 1], color=c, label=f"{tag}, sigma={cfg.sigma}")
        axes[0, 2].plot(t_long[1:], r["lemma12"][1:, 0] / r["lemma12"][1:, 1], color=c, ls="--",
                        label=f"{tag}, sigma_12={theory.lemma12_sigma(r['n'], r['d']):.0f}")
        axes[0, 3].plot(t_long[1:], r["long_loss"][1:] * np.log(t_long[1:]), color=c, label=f"{tag} reduced")
        axes[0, 3].plot(idx[1:], smooth(r["per_step"]["loss"].mean(1))[idx[1:]] * np.log(idx[1:]), color=c, ls=":",
                        lw=2, label=f"{tag} full W")
    axes[0, 2].axhline(7 / 15, color="k", ls=":", label="Lemma 12: 7/15")
    for k in range(2):
        axes[0, k].set(xlabel="step t (log)", ylabel=f"xi{k + 1}", title=f"xi{k + 1}: linear in log t = straight")
    axes[0, 2].set(xlabel="step t (log)", ylabel="xi1 / xi2", title="ratio bound (Lemma 12)")
    axes[0, 3].set(xlabel="step t (log)", ylabel="L log t", title="loss x log t (Theorem 1: O(1))")
    for ax in axes.flat:
        ax.legend(fontsize=6)
    log_axes(*axes.flat)
    return save_figure(fig, out_dir, "long_horizon")
