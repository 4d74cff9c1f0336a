"""Sander et al. 2024 (augmented tokens): SGD on the block linear attention learns one GD step, B A^T -> eta* I.

Not a figure of the paper: the notes' check of its one-GD-step optimum (shared/papers/autoregressive_sander2024.md,
Section 4: eta* = 1 / (r^2 (t + d - 1)) for the unitary family with random-phase s_0, found there by alternating
least squares at d = 5, t = 8). Every setting is ours: d = 5, T = 10 positions sharing one eta*, the init scale,
and plain SGD (lr 3e-3, batch 256 quick, 1024 full) on fresh prompts.
"""

import dataclasses

import jax
import numpy as np
from flax import nnx

from experiments.common.figures import heatmap, new_figure, save_figure
from experiments.common.result import Outcome, check_below
from experiments.common.run_config import optimizer_note, run_config
from jaxicl.models.ar_linear_attention import AugmentedLinearAttention
from jaxicl.prng import seed_key
from jaxicl.tasks import autoregressive as ar
from jaxicl.tasks import sample_batch
from jaxicl.theory import autoregressive as th
from jaxicl.train import TrainConfig, eval_key, per_position_loss, regression_loss, train
from jaxicl.validation import ConfigError, check_positive, check_range

@dataclasses.dataclass(frozen=True)
class Config:
    task: ar.Autoregressive = ar.Autoregressive(family="unitary", dim=5, seq_len=10, init="random_phase")
    train: TrainConfig = TrainConfig(steps=1500, batch_size=256, optimizer="sgd", lr=3e-3, log_every=10)
    init_scale: float = 0.3
    eval_every: int = 250
    eval_prompts: int = 8192
    max_rel_eta_err: float = 0.1
    max_rel_loss_gap: float = 0.03

    def __post_init__(self):
        check_positive("eval_prompts", self.eval_prompts)
        check_range("task.seq_len", self.task.seq_len, low=2)  # position 0 has no context pairs: eta* needs another
        if self.task.family != "unitary" or self.task.init != "random_phase" or self.task.format != "augmented":
            raise ConfigError("ar_gd_step needs task.family='unitary', task.init='random_phase' and "
                              "task.format='augmented'")
        if self.task.mu != 1.0 or self.task.noise_std or self.task.n_sequences:
            # eta* = 1 / (r^2 (t + d - 1)) is the optimum for angles on the whole circle, no noise, fresh sequences
            raise ConfigError(f"ar_gd_step's closed-form eta* assumes task.mu=1, task.noise_std=0 and "
                              f"task.n_sequences=0 (fresh sequences), got mu={self.task.mu}, noise_std="
                              f"{self.task.noise_std}, n_sequences={self.task.n_sequences}")


PRESETS = {
    "smoke": Config(task=ar.Autoregressive(family="unitary", dim=3, seq_len=6, init="random_phase"),
                    train=TrainConfig(steps=200, batch_size=64, optimizer="sgd", lr=3e-3, steps_per_call=200),
                    eval_every=200,
                    eval_prompts=1024),
    "quick": Config(),
    "full": Config(train=TrainConfig(steps=20000, batch_size=1024, optimizer="sgd", lr=3e-3, steps_per_call=1000,
                                     log_every=100, checkpoint_every=2000), eval_prompts=65536),
}


def step_matrix_error(a: np.ndarray, b: np.ndarray, eta: float) -> tuple[np.ndarray, float]:
    """(B A^T [d, d], ||B A^T - eta I||_F / ||eta I||_F) for the model's A, B [d, d]: 0 for one GD step of size eta."""
    bat = b @ a.T
    eye = eta * np.eye(len(bat))
    return bat, np.linalg.norm(bat - eye) / np.linalg.norm(eye)


def run(cfg: Config, out_dir: str) -> Outcome:
    task, d = cfg.task, cfg.task.dim
    positions = np.arange(task.seq_len)  # position t has t context pairs
    r = task.init_scale
    eta = th.optimal_shared_gd_step(d, positions, r)
    theory = th.gd_step_loss(d, positions, eta, r)  # [T] at the shared eta*
    model = AugmentedLinearAttention(d, init_scale=cfg.init_scale, rngs=nnx.Rngs(seed_key(cfg.train.seed)))
    graphdef, params = nnx.split(model)
    eval_batch = sample_batch(ar.sample, task, eval_key(cfg.train.seed),
                              cfg.eval_prompts)
    loss_fn = regression_loss(graphdef)

    @jax.jit
    def evaluate(p):
        return {"loss": loss_fn(p, eval_batch)[0]}

    result = train(loss_fn, ar.sample, task, cfg.train, params, out_dir=out_dir, evaluate=evaluate,
                   eval_every=cfg.eval_every, run_config=run_config("ar_gd_step", cfg), desc="ar_gd_step")
    p = result.state.params
    bat, eta_err = step_matrix_error(np.asarray(p["a"][...]), np.asarray(p["b"][...]), eta)
    final = result.eval_rows[-1]["loss"]
    gap = abs(final - theory.mean()) / theory.mean()
    measured = per_position_loss(graphdef, p, eval_batch)
    checks = [
        check_below("rel_err_BAT_vs_eta_star_I", eta_err, cfg.max_rel_eta_err,
                    f"||B A^T - eta* I||_F / ||eta* I||_F; eta* = {eta:.4g} (shared over positions "
                    f"0..{task.seq_len - 1}),"
                    f" learned diag mean {np.mean(np.diag(bat)):.4g}"),
        check_below("rel_gap_loss_vs_closed_form_min", gap, cfg.max_rel_loss_gap,
                    f"eval loss {final:.4g} vs closed form at eta* {theory.mean():.4g} ({cfg.eval_prompts} prompts; "
                    f"{cfg.train.steps} steps of {optimizer_note(cfg.train)}, batch {cfg.train.batch_size}, on the "
                    "unitary family with random-phase s_0)"),
    ]
    return Outcome(checks, [_plot(result.eval_rows, theory, measured, bat, eta, d, r, out_dir)])


def _plot(rows, theory, measured, bat, eta, d, r, out_dir) -> str:
    fig, axes = new_figure(3)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="trained (eval)")
    ax.axhline(theory.mean(), color="k", ls="--", label="one GD step at eta* (theory)")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    t = np.arange(len(theory))
    ax.plot(t, measured, "o", label="trained")
    ax.plot(t, theory, "-", label="GD step, shared eta*")
    ax.plot(t[1:], th.gd_step_min_loss(d, t[1:], r), ":", color="gray", label="GD step, eta* per position")
    ax.set(xlabel="position t (context pairs)", ylabel="loss", title="per position")
    ax.legend(fontsize=8)
    heatmap(axes[0, 2], bat / eta, "learned $B A^T / \\eta^*$")
    return save_figure(fig, out_dir, "gd_step")
