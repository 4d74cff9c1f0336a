"""Sander et al. 2024 Fig. 5: an augmented-token transformer on Haar O(d) sequences learns GD-step blocks.

At quick the depth check (deeper is not worse: loss(L) <= 1.05 loss(L - 1)) sits at the edge of run-to-run noise:
L = 2 beats L = 1 clearly (0.025 vs 0.036), but L = 3 ends level with L = 2 or up to 6% above it depending on the
seed and on the draw of the fixed training set (train.seed 0, 1, 2: 1.054, 1.055, 1.009 in an earlier version;
seed 0 gave 1.029-1.031 before, and 1.002 since, the fixed set is drawn from its own key stream, not from the keys
nnx.Rngs(seed) initialises the model with), and float-level changes move it. A warmup-cosine schedule makes it
worse (1.10, 1.29). So quick does not show that a third layer helps. The full preset (the official recipe: 8x
the batch, 3.2x the steps; 7.3 minutes on 2 CPU cores; run with the earlier draw of the training set) does: test
MSE 0.0357, 0.0240, 0.0206 for L = 1, 2, 3 (ratio 0.86), one layer 0.59x the best one-step GD, and the
(s_t, s_(t'-1)) block 0.11 from 2.61 I; all three checks pass there.

The structure at quick (L = 1; reported in the block check's note, no check: the notes give it as a qualitative
reimplementation result): the (s_t, s_(t'-1)) block of W_Q W_K^T is 0.10 from 2.21 I, the (s_(t-1), s_t') block
-0.51 I, and the rest is small: 0.055 of the norm on the coordinates the tokens use (0.34 over the whole matrix,
whose zero-block rows and columns never act on the tokens). The value copies s_t' as the theory model's does, but
in its own basis: W_V W_O's block (value s_t', output first block) is 0.96 from its best multiple of I, while the
map from s_t' through the LayerNorm (centring, scale) and the final readout to the prediction is 0.031 from 0.38 I.
"""

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from experiments.common.autoregressive import haar_task, held_out_set
from jaxicl.baselines import best_gd_step
from experiments.common.figures import heatmap, new_figure, save_figure
from experiments.common.result import Outcome, check_below
from experiments.common.run_config import run_config
from jaxicl.models.ar_transformer import AugmentedTransformer
from jaxicl.prng import seed_key
from jaxicl.tasks import autoregressive as ar
from jaxicl.train import TrainConfig, per_position_loss, regression_loss, train
from jaxicl.validation import ConfigError, check_increasing, check_positive

@dataclasses.dataclass(frozen=True)
class Config:
    task: ar.Autoregressive = haar_task("augmented")
    train: TrainConfig = TrainConfig(steps=3200, batch_size=1024, optimizer="adam", lr=1e-2, log_every=10)
    depths: tuple[int, ...] = (1, 2, 3)
    test_sequences: int = 1024
    eval_every: int = 160
    max_block_identity_err: float = 0.3
    depth_tolerance: float = 0.05  # deeper is "not worse": loss(L) <= (1 + tol) loss(L - 1)

    def __post_init__(self):
        check_positive("test_sequences", self.test_sequences)
        if self.task.family != "haar" or self.task.format != "augmented":
            raise ConfigError("ar_fig5_augmented needs task.family='haar' and task.format='augmented'")
        check_increasing("depths", self.depths, positive=True)  # the depth check compares each with the one before
        if len(self.depths) < 2:
            raise ConfigError(f"depths must hold at least two depths (the depth check compares each with the one "
                              f"before), got {self.depths}")


PRESETS = {
    "smoke": Config(task=haar_task("augmented", dim=3, seq_len=8, n_sequences=512), depths=(1, 2),
                    train=TrainConfig(steps=60, batch_size=32, lr=1e-2, steps_per_call=60), test_sequences=128,
                    eval_every=60),
    # CPU: 8x smaller batch and 3.2x fewer steps than the official recipe (Adam 1e-2, batch 1024, 3200 steps)
    "quick": Config(train=TrainConfig(steps=1000, batch_size=128, optimizer="adam", lr=1e-2, log_every=10,
                                      checkpoint_every=500),
                    eval_every=250),
    # the official recipe: Adam 1e-2, batch 1024, 3200 steps = 200 epochs of 2^14 sequences (here drawn with
    # replacement from the fixed set, the official script shuffles it each epoch)
    "full": Config(train=dataclasses.replace(Config.train, checkpoint_every=320)),  # every 2nd evaluation
}


def qk_vo(layer) -> tuple[np.ndarray, np.ndarray]:
    """The layer's bilinear score matrix W_Q W_K^T and value-output map W_V W_O (row-vector convention) [D, D]."""
    wq, wk, wv, wo = (np.asarray(m.w[...]) for m in (layer.q, layer.k, layer.v, layer.o))
    return wq @ wk.T, wv @ wo


def identity_error(block: np.ndarray) -> tuple[float, float]:
    """(||X - alpha I|| / ||X||, alpha) with alpha = tr X / d the best multiple of the identity."""
    alpha = np.trace(block) / len(block)
    return float(np.linalg.norm(block - alpha * np.eye(len(block))) / np.linalg.norm(block)), float(alpha)


def outside_mass(qk: np.ndarray, d: int) -> tuple[float, float]:
    """The relative Frobenius norm of W_Q W_K^T [3d, 3d] (rows: query, columns: key coordinates of the token
    (0, s_t, s_(t-1))) outside the notes' two blocks (query s_t, key s_(t'-1)) and (query s_(t-1), key s_t'):
    (over the whole matrix, over the coordinates the tokens use). The first layer's tokens are zero in the first
    block, so its rows and columns never act on the scores there and nothing trains them to vanish."""
    expected = np.zeros(qk.shape, bool)
    expected[d:2 * d, 2 * d:] = expected[2 * d:, d:2 * d] = True
    used = np.ix_(range(d, 3 * d), range(d, 3 * d))
    return (float(np.linalg.norm(qk[~expected]) / np.linalg.norm(qk)),
            float(np.linalg.norm(qk[used][~expected[used]]) / np.linalg.norm(qk[used])))


def value_readout_map(vo: np.ndarray, scale: np.ndarray, readout: np.ndarray, d: int) -> np.ndarray:
    """[d, d] the linear map from a key's s_t' (rows d:2d of W_V W_O [3d, 3d]) through the LayerNorm's centring and
    scale [3d] and the final readout's prediction columns (readout [3d, 3d], first d columns) to the prediction,
    up to the LayerNorm's per-token 1 / std (the direct path into the readout: the whole path for one layer). The
    readout can undo any basis the value writes in, so the notes' copy of s_t' shows here, not in W_V W_O alone."""
    centre = np.eye(len(vo)) - 1 / len(vo)
    return vo[d:2 * d] @ centre @ (scale[:, None] * readout[:, :d])


def run(cfg: Config, out_dir: str) -> Outcome:
    task, d = cfg.task, cfg.task.dim
    test = held_out_set(task, cfg.test_sequences)
    _, gd_loss = best_gd_step(test)
    runs = {}
    for depth in cfg.depths:
        model = AugmentedTransformer(task.token_dim, depth, out_dim=d, rngs=nnx.Rngs(seed_key(cfg.train.seed)))
        graphdef, params = nnx.split(model)
        loss_fn = regression_loss(graphdef, coords="mean")
        evaluate = jax.jit(lambda p, loss_fn=loss_fn: {"test_loss": loss_fn(p, test)[0]})
        sub = os.path.join(out_dir, f"L{depth}")
        result = train(loss_fn, ar.sample, task, cfg.train, params, out_dir=sub, evaluate=evaluate,
                       eval_every=cfg.eval_every, run_config=run_config("ar_fig5_augmented", cfg, depth=depth),
                       desc=f"fig5 L={depth}")
        runs[depth] = {"rows": result.eval_rows, "loss": result.eval_rows[-1]["test_loss"],
                       "per_position": per_position_loss(graphdef, result.state.params, test, "mean"),
                       "model": nnx.merge(graphdef, result.state.params)}
    first = runs[cfg.depths[0]]
    layer = first["model"].layers[0]
    qk, vo = qk_vo(layer)
    block_err, alpha = identity_error(qk[d:2 * d, 2 * d:])
    _, alpha2 = identity_error(qk[2 * d:, d:2 * d])
    outside_all, outside_used = outside_mass(qk, d)
    copy_err, copy_alpha = identity_error(vo[d:2 * d, :d])
    path_err, path_alpha = identity_error(value_readout_map(vo, np.asarray(layer.norm.scale[...]),
                                                            np.asarray(first["model"].final.w[...]), d))
    losses = [runs[L]["loss"] for L in cfg.depths]
    ratio = max(b / a for a, b in zip(losses, losses[1:]))
    gd_mean = float(np.mean(gd_loss))
    checks = [
        check_below("qk_block_identity_rel_err", block_err, cfg.max_block_identity_err,
                    f"block (query s_t, key s_(t'-1)) of W_Q W_K^T (L={cfg.depths[0]}) vs its best multiple "
                    f"{alpha:.3g} I; block (query s_(t-1), key s_t'): {alpha2:.3g} I; outside these two blocks: "
                    f"{outside_used:.3f} of the norm on the coordinates tokens use (s_t, s_(t-1)), {outside_all:.3f} "
                    f"over the whole matrix (the zero block's rows and columns never act on the tokens); W_V W_O's "
                    f"block (value s_t', output first block) {copy_err:.3f} from its best multiple {copy_alpha:.3g} I, "
                    f"the map from s_t' through the LayerNorm and readout to the prediction {path_err:.3f} from "
                    f"{path_alpha:.3g} I"),
        check_below("trained_over_best_gd_step_loss", first["loss"] / gd_mean, 1.0,
                    f"test MSE L={cfg.depths[0]}: {first['loss']:.4g} vs one GD step with the best eta per "
                    f"position (fitted on the test set): {gd_mean:.4g}"),
        check_below("max_loss_ratio_deeper_over_shallower", ratio, 1 + cfg.depth_tolerance,
                    "test MSE by depth: " + ", ".join(f"L={L}: {runs[L]['loss']:.4g}" for L in cfg.depths)),
    ]
    figures = [_plot_losses(runs, gd_loss, cfg.depths, out_dir), _plot_weights(qk, vo, d, out_dir)]
    return Outcome(checks, figures)


def _plot_losses(runs, gd_loss, depths, out_dir) -> str:
    fig, axes = new_figure(3)
    ax = axes[0, 0]
    ax.plot(depths, [runs[L]["loss"] for L in depths], "o-", label="trained")
    ax.axhline(np.mean(gd_loss), color="k", ls="--", label="GD step, best eta per position")
    ax.set(xlabel="layers L", ylabel="test MSE", title="test loss vs depth", xticks=list(depths))
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for L in depths:
        ax.plot(runs[L]["per_position"], label=f"L={L}")
    ax.plot(gd_loss, "k--", label="GD step (best eta_t)")
    ax.set(xlabel="position t", ylabel="test MSE", yscale="log", title="per position")
    ax.legend(fontsize=8)
    ax = axes[0, 2]
    for L in depths:
        ax.plot([r["step"] for r in runs[L]["rows"]], [r["test_loss"] for r in runs[L]["rows"]], label=f"L={L}")
    ax.set(xlabel="step", ylabel="test MSE", yscale="log", title="training")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, "fig5_losses")


def _plot_weights(qk, vo, d, out_dir) -> str:
    fig, axes = new_figure(2, size=(4.2, 3.6))
    for ax, m, title in ((axes[0, 0], qk, "$W_Q W_K^T$ (rows: query (0, s_t, s_{t-1}))"),
                         (axes[0, 1], vo, "$W_V W_O$ (L=1)")):
        heatmap(ax, m, title)
        for x in (d - 0.5, 2 * d - 0.5):
            ax.axhline(x, color="k", lw=0.5)
            ax.axvline(x, color="k", lw=0.5)
    return save_figure(fig, out_dir, "fig5_weights")
