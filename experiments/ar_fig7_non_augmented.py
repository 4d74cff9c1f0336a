"""Sander et al. 2024 Fig. 7: a multi-head transformer with positional attention on raw (tiled) Haar O(d) tokens.

Each query convention of `queries` is trained and checked on its own (into out_dir/<query>/): "current" is the
official non_augmented.py (ordinary causal self-attention: row t queries with token t), "previous" the theory's
(Section 5 and the closed forms query with s_(t-1); shared/papers/autoregressive_sander2024.md, "Index
convention"). The full preset (64 heads, batch 1024, 3200 steps: 200 epochs of 2^14 sequences, per convention) is
sized for one GPU and has not been run on one yet: its time is unmeasured. XLA counts 25 GFLOP a step (161 TFLOP
for both conventions; about 1.3 s a step on a 2-core CPU), so a fifth of an H200's float32 peak would take under a
minute; `python -m benchmarks gpu-check` runs it with a 130-second limit.

The paper's head count does not bring the local structure on a CPU: the full preset at a quarter of its batch
(`--preset full train.batch_size=256`: 64 heads, 3200 steps of Adam 1e-2, 48 minutes on 2 cores) gave a local
positional mass of 0.93x uniform under the current-token query and 1.08x under the previous one (12 and 11 of the 64
heads above 1.5x), at test MSEs 1.29x and 1.18x the best GD step's; that run drew the fixed training set from the
keys nnx.Rngs(seed) also initialises the model with, as the quick runs before December 2026 did. The quick
preset's 8 heads gave 0.94x and 1.44x with that draw, and give 0.95x and 0.52x with the set drawn from its own key
stream (the same distribution): under the previous-token query, 8 heads' local mass depends on the data draw.

That the model learns is checked against two references, not against its initial loss (predicting 0 already
divides that by almost 4): the fraction of the way from the zero predictor's test MSE (0.20) to the best single
GD step's (0.060) that the model covers, above one half. Quick: 0.73 under the current-token query and 0.74 under
the previous one (test MSE 0.098 and 0.096); the untrained model, at 0.75, sits at -3.96.

Settings ours at quick (PRESETS): 8 heads instead of 64, batch 64 instead of 1024, 1600 steps instead of 3200, and a
warmup-cosine lr (50 warmup steps) instead of a constant one.
"""

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from experiments.common.autoregressive import haar_task, held_out_set
from jaxicl.baselines import best_gd_step
from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Outcome, check_above
from experiments.common.run_config import run_config
from jaxicl.models import apply
from jaxicl.models.ar_transformer import QUERIES, PositionalTransformer
from jaxicl.prng import seed_key
from jaxicl.tasks import autoregressive as ar
from jaxicl.train import TrainConfig, per_position_loss, regression_loss, train
from jaxicl.validation import ConfigError, check_choice, check_positive


@dataclasses.dataclass(frozen=True)
class Config:
    task: ar.Autoregressive = haar_task("tiled")
    heads: int = 64
    queries: tuple[str, ...] = QUERIES  # each trained and checked on its own
    train: TrainConfig = TrainConfig(steps=3200, batch_size=1024, optimizer="adam", lr=1e-2, log_every=10)
    test_sequences: int = 1024
    eval_every: int = 160
    min_local_mass_ratio: float = 1.5
    # (zero - final) / (zero - GD) test loss, zero: predicting 0, GD: the best GD step; initial models sit above
    # zero (gap closed < 0), so passing needs the model past predicting 0, half way to the GD step
    min_gap_closed: float = 0.5

    def __post_init__(self):
        check_positive("heads", self.heads)
        if not self.queries or len(set(self.queries)) != len(self.queries):
            raise ConfigError(f"queries must name distinct conventions from {QUERIES}, got {self.queries!r}")
        for q in self.queries:
            check_choice("queries", q, QUERIES)
        check_positive("test_sequences", self.test_sequences)
        if self.task.family != "haar" or self.task.format != "tiled":
            raise ConfigError("ar_fig7_non_augmented needs task.family='haar' and task.format='tiled'")


PRESETS = {
    "smoke": Config(task=haar_task("tiled", dim=3, seq_len=8, n_sequences=512), heads=2,
                    train=TrainConfig(steps=40, batch_size=32, lr=1e-2, steps_per_call=40), test_sequences=128,
                    eval_every=40, queries=("previous",)),  # the current-token query: the model's tests
    # CPU: 8 heads instead of 64, batch 64 instead of 1024, half the paper's 3200 steps (the quick reproduction's
    # 30-minute budget; 3200 steps of batch 128 moved neither check's outcome) with a warmup-cosine lr
    "quick": Config(heads=8, train=TrainConfig(steps=1600, batch_size=64, optimizer="adam", lr=1e-2,
                                               schedule="warmup_cosine", warmup_steps=50, log_every=10,
                                               checkpoint_every=400),
                    eval_every=320),
    # the official recipe: 64 heads, Adam 1e-2, batch 1024, 3200 steps = 200 epochs of 2^14 sequences (drawn with
    # replacement from the fixed set, the official script shuffles it each epoch)
    "full": Config(train=dataclasses.replace(Config.train, checkpoint_every=320)),  # every 2nd evaluation
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


CURRENT_QUERY_HISTORY = (
    "Earlier CPU runs with the current-token query (8 heads, batch 128 unless said; ratio, test MSE): 600 steps "
    "constant lr 0.77, 0.107; 1500 warmup-cosine 0.92, 0.098; 3000 warmup-cosine 1.07, 0.093; batch 512, 900 "
    "warmup-cosine 0.82, 0.106; 32 heads, 800 warmup-cosine 0.79, 0.101: the ratio grows with training, a few heads "
    "become local (up to 2.6x uniform) but others saturate onto key 1 (a per-sequence probe of W) and mostly stay "
    "there. With the current token as the query a head on key t sees s_t alone, so keys t, t-1 cannot give the "
    "Chebyshev 2 cos(theta) s_t - s_(t-1): the theory does not force the local structure there.")


def run(cfg: Config, out_dir: str) -> Outcome:
    test = held_out_set(cfg.task, cfg.test_sequences)
    _, gd_loss = best_gd_step(test)
    zero_loss = float(np.mean(np.asarray(test.targets) ** 2))  # predicting 0 (the task's mask is all ones)
    checks, figures = [], []
    for query in cfg.queries:
        c, f = run_query(cfg, query, test, gd_loss, zero_loss, os.path.join(out_dir, query))
        checks += c
        figures.append(os.path.join(query, f))
    return Outcome(checks, figures)


def run_query(cfg: Config, query: str, test, gd_loss: np.ndarray, zero_loss: float, out_dir: str) -> tuple[list, str]:
    """Trains one query convention into out_dir; its checks and its figure (relative to out_dir)."""
    task, d = cfg.task, cfg.task.dim
    # the official position table has 100 rows; longer sequences get one row a position (rows past T are unused)
    model = PositionalTransformer(task.token_dim, d, num_heads=cfg.heads, max_len=max(100, task.seq_len), query=query,
                                  rngs=nnx.Rngs(seed_key(cfg.train.seed)))
    graphdef, params = nnx.split(model)
    loss_fn = regression_loss(graphdef, coords="mean")
    evaluate = jax.jit(lambda p: {"test_loss": loss_fn(p, test)[0]})
    result = train(loss_fn, ar.sample, task, cfg.train, params, out_dir=out_dir, evaluate=evaluate,
                   eval_every=cfg.eval_every, run_config=run_config("ar_fig7_non_augmented", cfg, query=query),
                   desc=f"fig7 query={query}")
    p = result.state.params
    _, cache = jax.jit(lambda q, x: apply(graphdef, q, x, capture={"attn.positional_weights"}))(p, test.inputs[0])
    weights = np.asarray(cache["attn.positional_weights"])  # token-independent
    mass, uniform, early = local_mass(weights)
    rows = result.eval_rows
    final, initial = rows[-1]["test_loss"], rows[0]["test_loss"]
    gd = float(np.mean(gd_loss))
    per_position = per_position_loss(graphdef, p, test, coords="mean")
    whose = ("the official code's convention (non_augmented.py: each token queries with itself)" if query == "current"
             else "the theory's convention (Section 5: the query is s_(t-1), keys and values up to s_t)")
    checks = [
        check_above(f"local_positional_mass_over_uniform[{query}]", mass.mean() / uniform, cfg.min_local_mass_ratio,
                    f"query={query}, {whose}. Positional softmax mass on the current + previous position, mean over "
                    f"the {cfg.heads} heads and rows t >= 2: {mass.mean():.3f} vs {uniform:.3f} for uniform causal "
                    f"weights on the same rows (ratio 1 for uniform weights whatever the row lengths); per head / "
                    f"uniform: {np.round(mass / uniform, 2).tolist()}; heads above 1.5x uniform: "
                    f"{int(np.sum(mass / uniform > 1.5))} of {cfg.heads}; per-head mass on keys 0, 1 (fixed s_0, "
                    f"s_1 = W s_0): {np.round(early, 2).tolist()}. The Section-5 structure (attend to the current and "
                    "previous positions) is the plausible reading of Fig. 7; no reference numbers exist. "
                    + (CURRENT_QUERY_HISTORY if query == "current" else "")),
        check_above(f"test_loss_gap_closed_zero_to_gd[{query}]", (zero_loss - final) / (zero_loss - gd),
                    cfg.min_gap_closed,
                    f"query={query}: (zero - final) / (zero - GD) test MSE, zero: predicting 0 ({zero_loss:.4g}), GD: "
                    f"one GD step with the best eta per position on augmented information ({gd:.4g}), final "
                    f"{final:.4g} (final / GD {final / gd:.3g}); the untrained model: {initial:.4g}, gap closed "
                    f"{(zero_loss - initial) / (zero_loss - gd):.3g}"),
    ]
    return checks, _plot(weights, rows, per_position, gd_loss, query, out_dir)


def _plot(weights, rows, per_position, gd_loss, query, out_dir) -> str:
    """The positional softmax weights [H, T, T] of the first heads and their mean over heads on one colour scale (the
    bar beside the mean), and the test loss over training with the per-position loss [T] against one GD step's."""
    shown = min(3, len(weights))
    fig, axes = new_figure(shown + 2, size=(3.2, 3.0))
    maps = [*weights[:shown], weights.mean(0)]
    top = max(float(m.max()) for m in maps)
    titles = [*(f"softmax(PE) head {h}" for h in range(shown)), "softmax(PE), mean over heads"]
    for ax, m, title in zip(axes[0], maps, titles):
        image = ax.imshow(m, cmap="cividis", vmin=0.0, vmax=top)
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, cax=axes[0, shown].inset_axes((1.04, 0.0, 0.05, 1.0)))
    ax = axes[0, shown + 1]
    ax.plot([r["step"] for r in rows], [r["test_loss"] for r in rows], label="test loss")
    ax.set(xlabel="step", ylabel="test MSE", yscale="log", title=f"training (query={query})")
    ax2 = ax.inset_axes([0.45, 0.5, 0.5, 0.4])
    ax2.plot(per_position, label="trained")
    ax2.plot(gd_loss, "k--", lw=0.8, label="GD step")
    ax2.set_yscale("log")
    ax2.set_title("per position", fontsize=7)
    ax2.tick_params(labelsize=6)
    ax2.legend(fontsize=5)
    return save_figure(fig, out_dir, "fig7_positional")
