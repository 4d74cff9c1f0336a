"""Bhargav & Gu 2024: a 3-layer GPT learns affine recurrences in context; layer 0 copies, layer-2 negative heads refine.

Seeds are the members of one vmapped sweep. The analyses use seed 0's model (the others are reported): per-position
loss against the copy, linear-extrapolation, exact three-term and least-squares predictors and the best fixed affine
filter of the prefix (least squares per position on training prompts: the same weights for every (a, b), so the
control a model must beat to show in-context inference); layer-0 attention mass on positions n and n - 1 and ridge
probes of the layer-0 output for x_n and x_{n+1}; for every layer-2 head the correlation of the value it attends to
with its direct contribution to the prediction (negative: a negative head; the embedding path W_E W_V W_O W_U is
reported, but a layer-2 head's values read a rewritten stream, so its sign does not decide) and the regression
of its attention score on the similarity -|x_hat_q - x_k| between the query's current estimate (a probe of the
stream entering layer 2) and the key's value; mean ablation of the negative similarity heads, against every layer-2
head ablated alone; activation-patching heatmaps (layers x positions, layers x heads) from clean prompts into prompts
with other (a, b, x_0).

The paper's data ranges, sizes and hyperparameters are not public: every setting here is ours. The task (a, b, x_0 ~
U[-1, 1], 16 terms, MSE on every position) and the model family (3-layer pre-LN GPT, learned positions, linear embed
and unembed of the scalar) are the defaults of shared/papers/affine_recurrence_bhargav2024.md, Section 4; the sizes
and optimiser are not (the notes suggest d_model 64, 4 heads, Adam 1e-3; quick trains d_model 32, 4 heads with Adam
3e-3 warmup-cosine, full d_model 128, 8 heads with Adam 1e-3 warmup-cosine). The definitions of "copying" and
"negative-similarity head" are the notes' recommendations, not the paper's.

What the quick preset shows (2 seeds, seed 0 analysed; 6,000 steps of Adam 3e-3, about two minutes on 2 CPU cores):
in-context inference: the model's MSE is 0.0048 of copy's and 0.056 of the best fixed affine filter's (seed 1
0.052; the filter itself reaches 0.086 of copy's, so beating copy alone would show nothing). Layer 0 has a local
head (attention mass 0.55 on positions n and n - 1 against 0.27 for uniform weights), and what layer 0 writes
encodes x_n at R^2 0.978 against 0.879 for seed 0's initial parameters (training leaves 1/5 of the unexplained
variance). Layer 2 has one head that meets both negative-similarity criteria (head 3: direct contribution
anti-correlated with the value it reads, -0.88; score growing with the similarity of the query's estimate and the
key's value, 0.31), whose ablation raises the loss 9.2x. Not shown: that this head matters more than the others
(the control: ablated alone, the median other layer-2 head raises the loss 44x, so head 3's ratio to it is 0.21;
the head with the most negative gain, head 2, -0.93, whose score falls with similarity instead, raises it 565x);
that layer 0 favours x_n over x_(n+1) more than at init (lead 0.009 against the untrained 0.038: a random layer 0
already does); and that the ablation moves the predictions toward the copy (correlation of the change with
x_n - prediction -0.20; the ablated predictions are 1.18x further from x_n). With the earlier quick settings (2,000
steps of Adam 1e-3) the model was 1.5x worse than the fixed filter: the mechanism needs the longer training.
Other seeds (`seeds=2,3`, seed 2 analysed): in-context inference again (0.041 and 0.052 of the filter's MSE), three
layer-2 heads meet both negative-similarity criteria, but no layer-0 head is local (at most 0.34 on positions n and
n - 1): the local layer-0 head is seed-dependent at quick.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.common.figures import heatmap, new_figure, save_figure
from experiments.common.result import Check, Outcome, check_above, check_below, diverged_check
from experiments.common.run_config import optimizer_note, run_config
from jaxicl.analysis.ablation import ablate_heads
from jaxicl.analysis.cache import run_with_cache
from jaxicl.analysis.direct_attribution import direct_attribution, ov_gain
from jaxicl.analysis.patching import activation_patching
from jaxicl.analysis.probes import probe
from jaxicl.baselines import affine_recurrence as baselines
from jaxicl.models.gpt import GPT
from jaxicl.prng import seed_key
from jaxicl.tasks import affine_recurrence as ar
from jaxicl.tasks import sample_batch
from jaxicl.train import TrainConfig, eval_key, regression_loss, train_sweep
from jaxicl.validation import ConfigError, check_distinct, check_positive, check_set_by

BASELINES = {"copy": baselines.copy, "linear_extrapolation": baselines.linear_extrapolation,
             "three_term": baselines.three_term, "least_squares": baselines.least_squares}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    d_model: int = 32
    n_layers: int = 3
    n_heads: int = 4
    d_mlp: int = 128  # 0: attention only
    final_norm: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    task: ar.AffineRecurrence = ar.AffineRecurrence(seq_len=16)
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig(steps=6000, batch_size=64, lr=3e-3, schedule="warmup_cosine", warmup_steps=300,
                                     steps_per_call=500, log_every=10, checkpoint_every=2000)
    # trained together, seeds[0]'s model analysed. train.seed, which each member sets from seeds, only picks the test
    # prompts: it is refused unless 0 (its default) or the one seed, so seed=1 cannot pass for a trained seed
    seeds: tuple[int, ...] = (0, 1)
    eval_prompts: int = 2048
    from_position: int = 2  # losses and comparisons from the third term on (three terms identify (a, b))
    max_loss_over_copy: float = 0.5
    # The control for in-context inference: the best fixed affine filter of the whole prefix x_0..x_n, fitted per
    # position by least squares on filter_fit_prompts fresh training prompts. Its weights are the same for every
    # (a, b), so it infers nothing from the prompt, yet it beats copy ~12x (a 3-tap filter, the terms the exact
    # three-term solver uses, ~10x). An in-context solver reaches the three-term solver's ~0: the model must at
    # least halve the filter's MSE (the ratio's noise over 2048 test prompts is a few percent).
    filter_fit_prompts: int = 16384
    max_loss_over_filter: float = 0.5
    min_layer0_local_mass: float = 0.5  # some layer-0 head puts this much mass on positions n and n - 1
    # layer-0 probes against the seed's initial parameters, whose random layer 0 already writes a function of x_n
    # (R^2 ~0.88): what training adds must at least halve the unexplained variance 1 - R^2 of x_n, and widen the
    # lead of x_n over x_(n+1) by more than the probes' noise (R^2 on the quarter of the eval_prompts x positions
    # pairs the probe holds out, ~7k at quick: well below 0.01)
    min_layer0_unexplained_ratio: float = 2.0
    min_layer0_copy_lead_gain: float = 0.01
    min_ablation_loss_ratio: float = 1.5
    # ablation control: the most negative-gain layer-2 head alone must raise the loss more than the median other alone
    min_ablation_over_other_heads: float = 1.0
    # toward the copy: the correlation must exceed this many standard errors of a zero correlation, 1 / sqrt(n),
    # with n the test prompts (conservative: the positions of one prompt are not independent)
    toward_copy_standard_errors: float = 3.0
    min_head_corr: float = 0.1  # a negative-similarity head: |correlations| of gain and score-similarity above this

    def __post_init__(self):
        check_positive("eval_prompts", self.eval_prompts)
        check_positive("filter_fit_prompts", self.filter_fit_prompts)
        if self.task.dim != 1:
            raise ConfigError("affine_mechanism studies the scalar recurrence: task.dim=1")
        if self.model.n_layers != 3:
            raise ConfigError("the mechanism is stated for the paper's three layers: model.n_layers=3")
        if self.model.n_heads < 2:
            raise ConfigError(f"the ablation control compares layer-2 heads: model.n_heads must be >= 2, got "
                              f"{self.model.n_heads}")
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")
        check_distinct("seeds", self.seeds)
        if not 0 <= self.from_position < self.task.seq_len:
            raise ConfigError(f"from_position must be in [0, {self.task.seq_len - 1}], got {self.from_position}")
        check_set_by("train.seed", self.train.seed, TrainConfig.seed, "seeds", self.seeds, self.seeds, "member",
                     does="pick the test prompts")


PRESETS = {
    "smoke": Config(task=ar.AffineRecurrence(seq_len=8), model=ModelConfig(d_model=16, n_heads=2, d_mlp=32),
                    train=TrainConfig(steps=60, batch_size=32, lr=3e-3, steps_per_call=30, log_every=10),
                    seeds=(0,), eval_prompts=128),
    "quick": Config(),
    "full": Config(model=ModelConfig(d_model=128, n_heads=8, d_mlp=512),
                   train=TrainConfig(steps=30000, batch_size=512, lr=1e-3, schedule="warmup_cosine", warmup_steps=1000,
                                     steps_per_call=1000, log_every=100, checkpoint_every=5000),
                   seeds=tuple(range(8)), eval_prompts=16384),
}


def build_model(cfg: Config, key: jax.Array) -> GPT:
    m = cfg.model
    return GPT(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, d_mlp=m.d_mlp, max_len=cfg.task.seq_len,
               input_dim=1, final_norm=m.final_norm, rngs=nnx.Rngs(key))


def settings_note(cfg: Config) -> str:
    """The run's settings, as the checks' notes state them (every one is ours: the paper's are not public)."""
    task, m, tc = cfg.task, cfg.model, cfg.train
    return (f"settings are ours (the paper's are not public): a ~ {task.a.describe()}, b ~ {task.b.describe()}, x_0 ~ "
            f"{task.x0.describe()}{', rescaled by max |x|' if task.rescale else ''}, T = {task.seq_len}, d_model "
            f"{m.d_model}, {m.n_heads} heads, d_mlp {m.d_mlp}, {optimizer_note(tc)}, {tc.steps} steps of "
            f"{tc.batch_size} fresh prompts")


def position_mse(pred: jax.Array, targets: jax.Array) -> np.ndarray:
    """[T] mean squared error per position: pred, targets [B, T]."""
    return np.asarray(jnp.mean((pred - targets) ** 2, axis=0))


def ratio_over_other_heads(ratios: list[float], heads: list[int]) -> float:
    """The least of heads' loss ratios (ratios [H]: each head ablated alone) over the median of the other heads'; NaN
    where heads holds every head."""
    others = [r for h, r in enumerate(ratios) if h not in heads]
    return min(ratios[h] for h in heads) / float(np.median(others)) if others else float("nan")


def score_similarity_slope(scores: np.ndarray, estimate: np.ndarray, values: np.ndarray, start: int) -> tuple[float, float]:
    """(slope, correlation) of the attention scores [B, T, T] (query, key) of one head regressed on the
    similarity -|estimate_q - value_k| over causal pairs with query >= start (estimate [B, T], values [B, T])."""
    q, k = np.tril_indices(scores.shape[-1])
    keep = q >= start
    q, k = q[keep], k[keep]
    sim = -np.abs(estimate[:, q] - values[:, k]).ravel()
    s = scores[:, q, k].ravel()
    slope = np.cov(sim, s)[0, 1] / np.var(sim, ddof=1)
    return float(slope), float(np.corrcoef(sim, s)[0, 1])


def layer0_probes(graphdef, params, inputs: jax.Array, targets: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
    """Held-out ridge-probe R^2 of what layer 0 writes (its attention and MLP outputs, not the input token already
    in the stream) at positions rows, for x_n and for x_(n+1): inputs [B, T, 1], targets [B, T]."""
    _, cache = run_with_cache(graphdef, params, inputs, ["layer0.resid_pre", "layer0.resid_post"])
    write0 = np.asarray(cache["layer0.resid_post"] - cache["layer0.resid_pre"])[:, rows]
    write0 = write0.reshape(-1, write0.shape[-1])
    return (probe(write0, np.asarray(inputs[..., 0])[:, rows].ravel())["score"],
            probe(write0, targets[:, rows].ravel())["score"])


def run(cfg: Config, out_dir: str) -> Outcome:
    task, start = cfg.task, cfg.from_position
    graphdef = nnx.graphdef(build_model(cfg, seed_key(0)))
    result = train_sweep(regression_loss(graphdef), ar.sample, task, cfg.train,
                         lambda key: nnx.state(build_model(cfg, key), nnx.Param),
                         [{"train.seed": s} for s in cfg.seeds], out_dir=os.path.join(out_dir, "seeds"),
                         run_config=run_config("affine_mechanism", cfg),
                         desc="affine_mechanism")
    test = sample_batch(ar.sample, task, eval_key(cfg.train.seed), cfg.eval_prompts, axis=None)
    targets = np.asarray(test.targets)
    base = {n: position_mse(jax.jit(jax.vmap(f))(test.inputs), test.targets) for n, f in BASELINES.items()}
    fit = sample_batch(ar.sample, task, jax.random.fold_in(eval_key(cfg.train.seed), 2), cfg.filter_fit_prompts,
                       axis=None)
    for name, taps in (("fixed_filter", None), ("fixed_filter_3_taps", 3)):
        f = baselines.fit_linear_filter(fit.inputs, fit.targets, taps)
        base[name] = position_mse(jax.jit(jax.vmap(f))(test.inputs), test.targets)
    model_losses = [position_mse(run_with_cache(graphdef, result.member_params(i), test.inputs, [])[0], test.targets)
                    for i in range(len(cfg.seeds))]
    params = result.member_params(0)
    model = nnx.merge(graphdef, params)
    names = ["layer0.attn.weights", "layer1.resid_post", "layer2.attn.scores", "layer2.attn.weights"]
    pred, cache = run_with_cache(graphdef, params, test.inputs, names)
    x = np.asarray(test.inputs[..., 0])  # x_n at position n

    # Layer 0: attention on n and n - 1, and what its output encodes.
    w0 = cache["layer0.attn.weights"]  # [B, H, T, T]
    rows = np.arange(start, task.seq_len)
    local_by_row = np.asarray(w0[:, :, rows, rows] + w0[:, :, rows, rows - 1], np.float64).mean(0)  # [H, rows]
    local, local_last = local_by_row.mean(-1), local_by_row[:, -1]  # [H]
    uniform = float(np.mean(np.minimum(2, rows + 1) / (rows + 1)))  # row 0 has one key
    r2_xn, r2_next = layer0_probes(graphdef, params, test.inputs, targets, rows)
    r2_xn_init, r2_next_init = layer0_probes(graphdef, nnx.state(build_model(cfg, seed_key(cfg.seeds[0])),
                                                                 nnx.Param), test.inputs, targets, rows)

    # Layer 2: OV gain and score-similarity per head.
    stream1 = np.asarray(cache["layer1.resid_post"])
    est_fit = probe(stream1[:, rows].reshape(-1, cfg.model.d_model), targets[:, rows].ravel())
    w = est_fit["weights"]
    estimate = stream1 @ w[:-1] + w[-1]  # [B, T]: the estimate of x_{n+1} entering layer 2
    scores2 = np.asarray(cache["layer2.attn.scores"])  # [B, H, T, T]
    attended = np.einsum("bhqk,bk->bhq", np.asarray(cache["layer2.attn.weights"]), x)  # the value each head reads
    direct = np.asarray(jax.jit(jax.vmap(lambda t: direct_attribution(graphdef, params, t)["heads"][2, ..., 0]))(
        test.inputs))  # [B, H, T]: each layer-2 head's direct contribution to the prediction
    heads2 = []
    for h in range(cfg.model.n_heads):
        slope, corr = score_similarity_slope(scores2[:, h], estimate, x, start)
        gain = float(np.corrcoef(attended[:, h, rows].ravel(), direct[:, h, rows].ravel())[0, 1])
        heads2.append({"head": h, "ov_gain": float(ov_gain(model, 2, h)[0, 0]), "gain_corr": gain, "slope": slope,
                       "corr": corr})
    negative = [r["head"] for r in heads2 if r["gain_corr"] < -cfg.min_head_corr and r["corr"] > cfg.min_head_corr]

    # Ablate the negative-similarity heads (or, where none qualifies, the one of the most negative gain correlation)
    # by their mean; the control: every layer-2 head ablated alone (the ablated heads against the others; NaN, a
    # failed check, where the set holds them all).
    mse = lambda p: float(np.mean(position_mse(p, test.targets)[start:]))  # noqa: E731
    trained_mse = mse(pred)
    lead = min(heads2, key=lambda r: r["gain_corr"])["head"]  # the most negative gain
    ablated_heads = negative or [lead]
    which = "the negative-similarity heads" if negative else "none qualified: the most negative gain"

    def ablate(heads):  # (MSE ratio to the trained model, correlation of the change with x_n - prediction)
        p = np.asarray(ablate_heads(graphdef, params, test.inputs, [(2, h) for h in heads], kind="mean"))
        change, to_copy = (p - np.asarray(pred))[:, start:].ravel(), (x - np.asarray(pred))[:, start:].ravel()
        return mse(p) / trained_mse, float(np.corrcoef(change, to_copy)[0, 1]), p

    ablation_ratio, toward_copy, ablated = ablate(ablated_heads)
    distance_ratio = float(np.mean(np.abs(ablated - x)[:, start:]) / np.mean(np.abs(np.asarray(pred) - x)[:, start:]))
    alone = [ablate([h])[:2] for h in range(cfg.model.n_heads)]  # [(ratio, toward-copy correlation)] per head
    over_others = ratio_over_other_heads([r for r, _ in alone], ablated_heads)
    min_toward_copy = cfg.toward_copy_standard_errors / np.sqrt(cfg.eval_prompts)

    # Patching heatmaps: clean prompts into prompts with other (a, b, x_0); metric: the clean targets' MSE at the end.
    n_patch = min(256, cfg.eval_prompts)
    clean = test.inputs[:n_patch]
    corrupted = sample_batch(ar.sample, task, jax.random.fold_in(eval_key(cfg.train.seed), 1), n_patch,
                             axis=None).inputs
    clean_last = test.targets[:n_patch, -1]

    def metric(p):  # the clean targets' MSE at the last position
        return jnp.mean((p[:, -1] - clean_last) ** 2)

    layers = range(cfg.model.n_layers)
    by_pos = activation_patching(graphdef, params, clean, corrupted, metric, [f"layer{l}.resid_pre" for l in layers],
                                 by="pos")
    by_head = activation_patching(graphdef, params, clean, corrupted, metric, [f"layer{l}.attn.z" for l in layers],
                                  by="head")
    corrupted_mse = float(metric(run_with_cache(graphdef, params, corrupted, [])[0]))

    copy_mse, filter_mse, filter3_mse, extrap_mse = (float(np.mean(base[n][start:])) for n in (
        "copy", "fixed_filter", "fixed_filter_3_taps", "linear_extrapolation"))
    all_seeds = [float(np.mean(m[start:])) for m in model_losses]
    ours = settings_note(cfg)
    checks = [
        check_below("loss_over_copy", trained_mse / copy_mse, cfg.max_loss_over_copy,
                    f"test MSE from position {start}: model {trained_mse:.3g} vs copy {copy_mse:.3g}; seeds "
                    f"{np.round(all_seeds, 4).tolist()}; {ours}. Shows training, not inference: the fixed filter "
                    f"below passes too ({filter_mse / copy_mse:.3g}; linear extrapolation "
                    f"{extrap_mse / copy_mse:.3g})"),
        check_below("loss_over_fixed_linear_filter", trained_mse / filter_mse, cfg.max_loss_over_filter,
                    f"test MSE from position {start}, model over the best fixed affine filter of x_0..x_n (least "
                    f"squares per position on {cfg.filter_fit_prompts} training prompts; the same weights for every "
                    f"(a, b)) {filter_mse:.3g}; seeds {np.round(np.array(all_seeds) / filter_mse, 3).tolist()}; 3-tap "
                    f"filter {filter3_mse:.3g}; the in-context solvers: exact three-term "
                    f"{float(np.mean(base['three_term'][start:])):.2g}, least squares "
                    f"{float(np.mean(base['least_squares'][start:])):.2g}"),
        check_above("layer0_local_attention_mass", float(local.max()), cfg.min_layer0_local_mass,
                    f"max over layer-0 heads of the attention mass on positions n and n - 1, averaged over positions "
                    f">= {start} (per head {np.round(local, 3).tolist()}; uniform causal weights: {uniform:.3f}; at the "
                    f"last position {np.round(local_last, 3).tolist()}, uniform {2 / task.seq_len:.3f})"),
        check_above("layer0_x_n_unexplained_untrained_over_trained", (1 - r2_xn_init) / (1 - r2_xn),
                    cfg.min_layer0_unexplained_ratio,
                    f"(1 - R^2) of a held-out ridge probe of what layer 0 writes (layer0.resid_post - resid_pre, "
                    f"positions >= {start}) for x_n, seed {cfg.seeds[0]}'s initial parameters over the trained: R^2 "
                    f"trained {r2_xn:.3f}, untrained {r2_xn_init:.3f}; for x_(n+1): trained {r2_next:.3f}, untrained "
                    f"{r2_next_init:.3f}"),
        check_above("layer0_x_n_lead_over_x_next_gain", (r2_xn - r2_next) - (r2_xn_init - r2_next_init),
                    cfg.min_layer0_copy_lead_gain,
                    f"R^2(x_n) - R^2(x_(n+1)) of the layer-0 probes, trained {r2_xn - r2_next:.3f} minus untrained "
                    f"{r2_xn_init - r2_next_init:.3f}: does training make layer 0 a copy (the initial estimate) "
                    "rather than a predictor of x_(n+1)? An untrained layer 0 already writes x_n more than x_(n+1)"),
        Check("negative_similarity_heads_in_layer2", len(negative), ">= 1", bool(negative),
              f"layer-2 heads whose direct contribution to the prediction is anti-correlated with the value they "
              f"attend to (corr < -{cfg.min_head_corr}) and whose attention score grows with the similarity "
              f"-|x_hat_q - x_k| of the query's estimate (a probe of layer 1's output) and the key's value (corr > "
              f"{cfg.min_head_corr}): " +
              "; ".join(f"head {r['head']}: gain corr {r['gain_corr']:.2f} (embedding path W_E W_V W_O W_U "
                        f"{r['ov_gain']:.2g}, not the head's sign), "
                        f"score slope {r['slope']:.3g}, corr {r['corr']:.2f}" for r in heads2)),
        check_above("ablation_loss_ratio", ablation_ratio, cfg.min_ablation_loss_ratio,
                    f"test MSE with layer-2 heads {ablated_heads} mean-ablated over the trained model's "
                    f"{trained_mse:.3g} ({which}); any important head passes this: the next check is its control"),
        check_above("ablation_loss_ratio_over_other_heads", over_others, cfg.min_ablation_over_other_heads,
                    f"the control of the check above: the least loss ratio of heads {ablated_heads} mean-ablated "
                    f"alone over the median of the other layer-2 heads alone; per head (loss ratio, toward-copy "
                    f"correlation): " +
                    "; ".join(f"{h}: {r:.3g}, {c:.2f}" for h, (r, c) in enumerate(alone))),
        check_above("ablation_moves_toward_copy", toward_copy, min_toward_copy,
                    f"correlation of the change the ablation of heads {ablated_heads} makes to the predictions with "
                    f"(x_n - prediction); the bound is {cfg.toward_copy_standard_errors:g} standard errors of a zero "
                    f"correlation over {cfg.eval_prompts} prompts; mean |prediction - x_n| with the heads ablated / "
                    f"without: {distance_ratio:.3g}"),
        diverged_check({f"seed {cfg.seeds[m]}": s for m, s in result.diverged.items()}),
    ]
    figures = [_plot_losses(cfg, model_losses, base, result.train_rows, out_dir),
               _plot_mechanism(cfg, local, heads2, ablated_heads, which, scores2, estimate, x, uniform, out_dir),
               _plot_patching(by_pos, by_head, corrupted_mse, float(metric(pred[:n_patch])), out_dir)]
    return Outcome(checks, figures)


def _plot_losses(cfg, model_losses, base, rows, out_dir) -> str:
    fig, axes = new_figure(2)
    ax = axes[0, 0]
    t = np.arange(cfg.task.seq_len)
    for i, m in enumerate(model_losses):
        ax.plot(t, m, color="k", alpha=1.0 if i == 0 else 0.3,
                label=f"trained GPT, seed {cfg.seeds[i]}" if i == 0 else "other seeds" if i == 1 else None)
    for name, v in base.items():
        ax.plot(t, np.maximum(v, 1e-12), ls="--", label=name)
    ax.set(xlabel="position n (predicting x_(n+1))", ylabel="test MSE", yscale="log",
           title="per position (baselines floored at 1e-12)")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for m in sorted({r["member"] for r in rows}):
        r = [row for row in rows if row["member"] == m]
        ax.plot([row["step"] for row in r], [row["loss"] for row in r], label=f"seed {cfg.seeds[m]}")
    ax.set(xlabel="step", ylabel="train MSE", yscale="log", title="training")
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, "losses")


def _plot_mechanism(cfg, local, heads2, heads, which, scores2, estimate, x, uniform, out_dir) -> str:
    """Layer 0's local attention mass local [H] against uniform, layer 2's gain correlations (heads2), and the
    scores2 [B, H, T, T] of the layer-2 heads the checks select (heads, by the rule which) against the similarity of
    estimate [B, T] and x [B, T]."""
    fig, axes = new_figure(3)
    ax = axes[0, 0]
    ax.bar(np.arange(len(local)), local)
    ax.axhline(uniform, color="k", ls=":", label="uniform causal")
    ax.set(xlabel="layer-0 head", ylabel="mass on n and n-1", title="layer 0: local attention")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    ax.bar(np.arange(len(heads2)), [r["gain_corr"] for r in heads2])
    ax.set(xlabel="layer-2 head", ylabel="corr(attended value, direct contribution)", title="layer 2: head gain")
    ax = axes[0, 2]
    q, k = np.tril_indices(scores2.shape[-1])
    keep = q >= cfg.from_position
    sim = -np.abs(estimate[:256][:, q[keep]] - x[:256][:, k[keep]]).ravel()
    for h in heads:
        ax.scatter(sim, scores2[:256, h][:, q[keep], k[keep]].ravel(), s=1, alpha=0.2, label=f"head {h}")
    ax.set(xlabel="-|x_hat_q - x_k|", ylabel="attention score", title=f"layer-2 heads {heads} checked\n({which})")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, markerscale=5)
    return save_figure(fig, out_dir, "mechanism")


def _plot_patching(by_pos, by_head, corrupted_mse, clean_mse, out_dir) -> str:
    fig, axes = new_figure(2, size=(5.0, 3.2))
    metric = "clean-target MSE, last position"
    heatmap(axes[0, 0], by_pos, f"resid_pre patched (layer x position)\ncorrupted {corrupted_mse:.3g}, clean "
            f"{clean_mse:.3g}", symmetric=False).colorbar.set_label(metric, fontsize=8)
    axes[0, 0].set(xlabel="position", ylabel="layer", yticks=range(by_pos.shape[0]))
    heatmap(axes[0, 1], by_head, "attn.z patched (layer x head)", symmetric=False).colorbar.set_label(metric,
                                                                                                      fontsize=8)
    axes[0, 1].set(xlabel="head", ylabel="layer", xticks=range(by_head.shape[1]), yticks=range(by_head.shape[0]))
    return save_figure(fig, out_dir, "patching")
