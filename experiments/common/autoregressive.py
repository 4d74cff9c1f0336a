"""Shared pieces of the Sander et al. 2024 experiments: the Fig. 3 run (GD on the closed-form loss through the
engine), the Haar task and held-out set of Figs. 5/7, plots."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import reference
from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Outcome, check_below
from experiments.common.run_config import optimizer_note, run_config
from jaxicl import outputs
from jaxicl.prng import seed_key
from jaxicl.tasks import autoregressive as ar
from jaxicl.tasks import sample_batch
from jaxicl.theory import autoregressive as th
from jaxicl.train import TrainConfig, train
from jaxicl.validation import ConfigError, check_choice, check_positive, check_range


def cividis(ax, matrix, title: str, ylabel: str | None = None):
    """A matrix as a cividis image with a colour bar (the paper's Fig. 3 style)."""
    im = ax.imshow(np.asarray(matrix), cmap="cividis")
    ax.set_title(title, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


@dataclasses.dataclass(frozen=True)
class Fig3Config:
    """Full-batch GD on the closed-form population loss of `task` (the official recipe: A, B [heads, d] and
    P [T, T] initialised init_scale * N(0, 1) from key train.seed, plain GD)."""

    task: ar.Autoregressive = ar.Autoregressive(family="unitary", dim=10, seq_len=20)
    heads: int = 10
    train: TrainConfig = TrainConfig(optimizer="sgd", lr=0.01, steps=100, steps_per_call=100, log_every=1)
    init_scale: float = 0.1
    max_loss: float = 1e-3
    max_offdiag: float = 0.05
    max_invariant_err: float = 0.05
    max_eig_err: float = 0.05  # orthogonal: | |eig(A B^T)| / |2c| - 1 | over the d/2 largest
    # the official recipe: | |c| / |c_official| - 1 | against the official code's saved parameters, whose init draw
    # differs from ours. Over seeds 0-4 here |c| spans 1.186-1.210 (unitary) and 1.279-1.296 (orthogonal, the four
    # that converge): at most 2% apart, within 1.4% of the official values; the bound is twice the spread
    max_official_scale_dev: float = 0.04

    def __post_init__(self):
        check_choice("task.family", self.task.family, th.FAMILIES)
        check_range("task.seq_len", self.task.seq_len, low=2)  # the fitted P's statistics read rows below row 0
        if self.task.mu != 1.0 or self.task.init != "fixed" or self.task.init_scale != 1.0 or self.task.noise_std:
            raise ConfigError("the closed-form loss assumes task.mu=1, task.init='fixed', task.init_scale=1 and "
                              "task.noise_std=0")
        default = ar.Autoregressive(family=self.task.family, dim=self.task.dim, seq_len=self.task.seq_len)
        unused = [f"task.{n}={getattr(self.task, n)!r}" for n in ("random_basis", "basis_seed", "n_sequences",
                                                                  "format", "tile")
                  if getattr(self.task, n) != getattr(default, n)]
        if unused:  # the run would store them in its config while the closed form ignores them
            raise ConfigError(f"{', '.join(unused)}: the closed-form fit draws no sequences and takes only "
                              f"task.family, task.dim and task.seq_len from the task; leave the others at their "
                              f"defaults")
        for name in ("heads", "init_scale"):
            check_positive(name, getattr(self, name))


def _structure(family: str, c: np.ndarray) -> np.ndarray:
    return np.eye(len(c)) if family == "unitary" else th.block_structure(c)


def fig3_metrics(family: str, a: np.ndarray, b: np.ndarray, p: np.ndarray) -> dict:
    """The Fig. 3 structure of A, B [H, d] and P [T, T] (float64 numpy), over P's trained rows 0..T-2.

    offdiag: ||C outside its structure (I or blockdiag(J))||_F / ||C||_F, C = B^T A; scale: c, the mean of C
    on its structure; cur_err: max |c p_cur - 1|; other: ||P entries other than p_cur (and p_prev for
    "orthogonal")|| / ||p_cur||. Orthogonal only: prev_err: max |c p_prev + 1/2|; eigs: |eigenvalues| of
    A B^T [H], descending; eig_err: max over the d/2 largest of | |eig| / |2c| - 1 |.
    """
    c = b.T @ a
    mask = _structure(family, c)
    scale = float(np.mean(c[mask > 0]))  # c: C ~ c * structure
    st = {k: np.asarray(v) for k, v in th.row_statistics(p).items()}
    p_cur, p_prev = st["p_cur"], st["p_prev"]
    lower = np.tril(p[:-1], -1)  # keys before the query's own position
    out = {"offdiag": np.linalg.norm(c * (1 - mask)) / np.linalg.norm(c), "scale": scale,
           "cur_err": np.max(np.abs(scale * p_cur - 1)),
           "other": np.linalg.norm(lower if family == "orthogonal" else np.tril(p[:-1])) / np.linalg.norm(p_cur)}
    if family == "orthogonal":
        eig = np.sort(np.abs(np.linalg.eigvals(a @ b.T)))[::-1]
        out |= {"prev_err": np.max(np.abs(scale * p_prev + 0.5)), "eigs": eig,
                "eig_err": float(np.max(np.abs(eig[:a.shape[1] // 2] / abs(2 * scale) - 1)))}
    return out


def official_scale(cfg: Fig3Config) -> float | None:
    """c of the official code's saved Fig. 3 parameters where cfg is the recipe that produced them, else None."""
    ref = reference.load("sander2024_fig3_scale")["families"].get(cfg.task.family)
    mine = {"dim": cfg.task.dim, "seq_len": cfg.task.seq_len, "heads": cfg.heads, "lr": cfg.train.lr,
            "steps": cfg.train.steps, "init_scale": cfg.init_scale}
    return ref["c"] if ref and plain_gd(cfg.train) and mine == ref["recipe"] else None


def plain_gd(train: TrainConfig) -> bool:
    """Whether train is the official scripts' optimiser: plain GD (sgd, constant lr, no clipping)."""
    return train.optimizer == "sgd" and train.schedule == "constant" and not train.clip_norm


def run_fig3(cfg: Fig3Config, out_dir: str) -> Outcome:
    task = cfg.task
    with jax.enable_x64(True):
        keys = jax.random.split(seed_key(cfg.train.seed), 3)
        shapes = {"a": (cfg.heads, task.dim), "b": (cfg.heads, task.dim), "p": (task.seq_len, task.seq_len)}
        params = {n: cfg.init_scale * jax.random.normal(k, s, jnp.float64) for k, (n, s) in zip(keys, shapes.items())}

        def loss_fn(q, batch):  # the population loss needs no batch
            return th.population_loss(task.family, q["a"], q["b"], q["p"]), {}

        result = train(loss_fn, None, task, cfg.train, params, out_dir=out_dir, desc=f"fig3 {task.family}",
                       run_config=run_config(f"ar_fig3_{task.family}", cfg))
        final = float(loss_fn(result.state.params, None)[0])
        a, b, p = (np.asarray(result.state.params[n]) for n in "abp")
    steps = np.array([r["step"] for r in result.train_rows])
    losses = np.array([r["loss"] for r in result.train_rows])
    m = fig3_metrics(task.family, a, b, p)
    checks = [
        check_below("final_loss", final, cfg.max_loss, f"closed-form population loss after {cfg.train.steps} steps "
                    f"of {optimizer_note(cfg.train)} (float64); initial {losses[0]:.3g}"),
        check_below("offdiag_mass_of_C", m["offdiag"], cfg.max_offdiag,
                    f"||C outside {'the diagonal' if task.family == 'unitary' else 'blockdiag(J)'}||_F / ||C||_F"),
        check_below("max_abs_c_p_cur_minus_1", m["cur_err"], cfg.max_invariant_err,
                    f"c = {m['scale']:.4g} (mean of C on its structure), over the {task.seq_len - 1} trained rows of P"),
    ]
    if task.family == "orthogonal":
        checks.append(check_below("max_abs_c_p_prev_plus_half", m["prev_err"],
                                  cfg.max_invariant_err, "trigonometric (Chebyshev) relation c p_prev = -1/2"))
        checks.append(check_below("AB^T_eigs_at_2c", m["eig_err"], cfg.max_eig_err,
                                  f"|eigenvalues| of A B^T: {np.round(m['eigs'], 3).tolist()}; expected d/2 at |2c|, "
                                  "rest 0"))
    checks.append(check_below("other_P_mass", m["other"], cfg.max_offdiag,
                              "||P entries other than p_cur" + (", p_prev" if task.family == "orthogonal" else "")
                              + "|| / ||p_cur|| over trained rows"))
    official = official_scale(cfg)
    if official is not None:
        checks.append(check_below(
            "abs_c_vs_official_rel_dev", abs(abs(m["scale"]) / abs(official) - 1), cfg.max_official_scale_dev,
            f"|c| = {abs(m['scale']):.4f} against {abs(official):.4f} for the official code's saved parameters "
            "(github.com/michaelsdr/ical tensors/; another init draw; the sign of c follows the init)"))
    outputs.save_arrays(f"{out_dir}/params.npz", A=a, B=b, P=p, steps=steps, losses=losses)
    return Outcome(checks, [_plot_fig3(a, b, p, steps, losses, task.family, out_dir)])


def _plot_fig3(a, b, p, steps, losses, family, out_dir) -> str:
    fig, axes = new_figure(5, size=(3.4, 3.0))
    cividis(axes[0, 0], a, "A", ylabel="Heads")
    cividis(axes[0, 1], b, "B")
    cividis(axes[0, 2], b.T @ a, "$B^T A$")
    shown = np.triu(np.ones_like(p[:-1, :-1]), 2) == 0
    cividis(axes[0, 3], np.where(shown, p[:-1, :-1], 0.0), "P (above 1st superdiag. zeroed)")
    axes[0, 4].semilogy(steps, np.maximum(losses, 1e-16))
    axes[0, 4].set(xlabel="GD step", ylabel="population loss", title=f"{family}: loss")
    return save_figure(fig, out_dir, f"fig3_{family}")


TEST_SEED = 0x7E57  # test sets: fresh sequences from this key (training sets are fixed pools)


def haar_task(fmt: str, dim: int = 5, seq_len: int = 50, n_sequences: int = 16384) -> ar.Autoregressive:
    """The official Figs. 5/7 data: Haar O(d) W, fixed s_0 = 1/sqrt(d), a fixed training set of n_sequences."""
    return ar.Autoregressive(family="haar", dim=dim, seq_len=seq_len, init="fixed", init_scale=dim ** -0.5,
                             format=fmt, tile=2, n_sequences=n_sequences)


def held_out_set(task: ar.Autoregressive, n: int):
    """n fresh sequences of the task's distribution (independent of its fixed training pool)."""
    return sample_batch(ar.sample, dataclasses.replace(task, n_sequences=0), seed_key(TEST_SEED), n)
