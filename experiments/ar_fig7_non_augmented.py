"""Sander et al. 2024 Fig. 7: a multi-head transformer with positional attention on raw (tiled) Haar O(d) tokens."""

import dataclasses

import jax
import numpy as np
from flax import nnx

from experiments.common.autoregressive import haar_task, held_out_set
from jaxicl.baselines import best_gd_step
from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Outcome, check_above, check_below
from jaxicl.models import apply
from jaxicl.models.ar_transformer import PositionalTransformer
from jaxicl.tasks import autoregressive as ar
from jaxicl.train import TrainConfig, per_position_loss, regression_loss, train
from jaxicl.validation import ConfigError, check_positive


@dataclasses.dataclass(frozen=True)
class Config:
    task: ar.Autoregressive = haar_task("tiled")
    heads: int = 64
    train: TrainConfig = TrainConfig(steps=3200, batch_size=1024, optimizer="adam", lr=1e-2, log_every=10)
    test_sequences: int = 1024
    eval_every: int = 160
    min_local_mass_ratio: float = 1.5
    max_loss_ratio: float = 0.5  # final / initial test loss: the model learns something

    def __post_init__(self):
        check_positive("heads", self.heads)
        check_positive("test_sequences", self.test_sequences)
        if self.task.family != "haar" or self.task.format != "tiled":
            raise ConfigError("ar_fig7_non_augmented needs task.family='haar' and task.format='tiled'")


PRESETS = {
    "smoke": Config(task=haar_task("tiled", dim=3, seq_len=8, n_sequences=512), heads=2,
                    train=TrainConfig(steps=40, batch_size=32, lr=1e-2, steps_per_call=40), test_sequences=128,
                    eval_every=40),
    # CPU: 8 heads instead of 64, batch 128 instead of 1024, the paper's 3200 steps with a warmup-cosine lr
    "quick": Config(heads=8, train=TrainConfig(steps=3200, batch_size=128, optimizer="adam", lr=1e-2,
                                               schedule="warmup_cosine", warmup_steps=50, log_every=10),
                    eval_every=320),
    "full": Config(),  # the official recipe: 64 heads, Adam 1e-2, batch 1024, 200 epochs of 2^14 sequences
}


def local_mass(weights: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """(mass [H], uniform, early [H]): positional-attention mass per head, mean over rows t >= 2.

    weights: [H, T, T] softmax positional weights. mass: on the current and previous keys (t, t - 1);
    uniform: the same for uniform causal weights (row t has t + 1 keys, so 2 / (t + 1)), so
    mass / uniform is 1 for uniform weights whatever the row lengths; early: on keys 0 and 1 (s_0 is
    the same fixed vector in every sequence and s_1 = W s_0, so these keys can probe W).
    """
    weights = np.asarray(weights, np.float64)
    rows = np.arange(2, weights.shape[-1])
    mass = (weights[:, rows, rows] + weights[:, rows, rows - 1]).mean(-1)
    early = weights[:, rows, :2].sum(-1).mean(-1)
    return mass, float(np.mean(2.0 / (rows + 1))), early


def run(cfg: Config, out_dir: str) -> Outcome:
    task, d = cfg.task, cfg.task.dim
    test = held_out_set(task, cfg.test_sequences)
    _, gd_loss = best_gd_step(test)
    model = PositionalTransformer(task.token_dim, d, num_heads=cfg.heads, rngs=nnx.Rngs(cfg.train.seed))
    graphdef, params = nnx.split(model)
    loss_fn = regression_loss(graphdef, coords="mean")
    evaluate = jax.jit(lambda p: {"test_loss": loss_fn(p, test)[0]})
    result = train(loss_fn, ar.sample, task, cfg.train, params, out_dir=out_dir, evaluate=evaluate,
                   eval_every=cfg.eval_every, run_config={"experiment": "ar_fig7_non_augmented"}, desc="fig7")
    p = result.state.params
    _, cache = jax.jit(lambda q, x: apply(graphdef, q, x, capture={"attn.positional_weights"}))(p, test.inputs[0])
    weights = np.asarray(cache["attn.positional_weights"])  # token-independent
    mass, uniform, early = local_mass(weights)
    rows = result.eval_rows
    final, initial = rows[-1]["test_loss"], rows[0]["test_loss"]
    per_position = per_position_loss(graphdef, p, test, coords="mean")
    checks = [
        check_above("local_positional_mass_over_uniform", mass.mean() / uniform, cfg.min_local_mass_ratio,
                    f"positional softmax mass on the current + previous position, mean over the {cfg.heads} heads "
                    f"and rows t >= 2: {mass.mean():.3f} vs {uniform:.3f} for uniform causal weights on the same "
                    f"rows (ratio 1 for uniform weights whatever the row lengths); per head / uniform: "
                    f"{np.round(mass / uniform, 2).tolist()}; per-head mass on keys 0, 1 (fixed s_0, s_1 = W s_0): "
                    f"{np.round(early, 2).tolist()}. The Section-5 structure (attend to the current and previous "
                    "positions) is the plausible reading of Fig. 7; no reference numbers exist, and with the current "
                    "token as the query (Section 5 queries s_{t-1}) a head on key t sees s_t alone, so keys t, t-1 "
                    "cannot give the Chebyshev 2 cos(theta) s_t - s_{t-1}: the theory does not force it here. CPU runs "
                    "(8 heads, batch 128 unless said; ratio, test MSE): 600 steps constant lr 0.77, 0.107; 1500 "
                    "warmup-cosine 0.92, 0.098; 3000 warmup-cosine 1.07, 0.093; batch 512, 900 warmup-cosine 0.82, "
                    "0.106; 32 heads, 800 warmup-cosine 0.79, 0.101. The ratio grows with training, a few heads "
                    "become local (up to 2.6x uniform) but others saturate onto key 1 (a per-sequence probe of W) "
                    "and mostly stay there; no run beats the one-step-GD baseline. Not reproduced at CPU scale"),
        check_below("final_over_initial_test_loss", final / initial, cfg.max_loss_ratio,
                    f"test MSE {initial:.4g} -> {final:.4g}; one GD step with the best eta per position on augmented "
                    f"information: {np.mean(gd_loss):.4g} (reference only)"),
    ]
    return Outcome(checks, [_plot(weights, rows, per_position, gd_loss, out_dir)])


def _plot(weights, rows, per_position, gd_loss, out_dir) -> str:
    shown = min(3, len(weights))
    fig, axes = new_figure(shown + 2, size=(3.2, 3.0))
    for h in range(shown):
        axes[0, h].imshow(weights[h], cmap="cividis")
        axes[0, h].set_title(f"softmax(PE) head {h}", fontsize=9)
    axes[0, shown].imshow(weights.mean(0), cmap="cividis")
    axes[0, shown].set_title("softmax(PE), mean over heads", fontsize=9)
    ax = axes[0, shown + 1]
    ax.plot([r["step"] for r in rows], [r["test_loss"] for r in rows], label="test loss")
    ax.set(xlabel="step", ylabel="test MSE", yscale="log", title="training")
    ax2 = ax.inset_axes([0.45, 0.5, 0.5, 0.4])
    ax2.plot(per_position, label="trained")
    ax2.plot(gd_loss, "k--", lw=0.8, label="GD step")
    ax2.set_yscale("log")
    ax2.set_title("per position", fontsize=7)
    ax2.tick_params(labelsize=6)
    return save_figure(fig, out_dir, "fig7_positional")
