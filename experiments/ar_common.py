"""Shared pieces of the Sander et al. 2024 experiments: compiled full-batch GD, the Fig. 3 run, plots."""

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Outcome, check_below
from jaxicl.tasks import autoregressive as ar
from jaxicl.tasks import sample_batch
from jaxicl.theory import autoregressive as th
from jaxicl.validation import check_choice, check_positive


def gd_fit(loss_fn: Callable, params, lr: float, steps: int, chunk: int = 10_000, desc: str = "gd"):
    """Full-batch GD params <- params - lr grad(loss_fn)(params), `steps` times, as compiled lax.scan chunks.

    Returns (params, losses [steps]) with losses[i] the loss before step i.
    """

    def step(p, _):
        loss, g = jax.value_and_grad(loss_fn)(p)
        return jax.tree.map(lambda x, gx: x - lr * gx, p, g), loss

    run = jax.jit(lambda p, n: jax.lax.scan(step, p, length=n), static_argnums=1)
    losses = []
    with tqdm(total=steps, desc=desc, dynamic_ncols=True) as bar:
        done = 0
        while done < steps:
            n = min(chunk, steps - done)
            params, loss = run(params, n)
            losses.append(np.asarray(loss))
            done += n
            bar.update(n)
            bar.set_postfix(loss=f"{float(loss[-1]):.3g}")
    return params, np.concatenate(losses)


def cividis(ax, matrix, title: str, ylabel: str | None = None):
    """A matrix as a cividis image with a colour bar (the paper's Fig. 3 style)."""
    im = ax.imshow(np.asarray(matrix), cmap="cividis")
    ax.set_title(title, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


@dataclasses.dataclass(frozen=True)
class Fig3Config:
    """Full-batch GD on the closed-form population loss (official recipe: init 0.1 N(0, 1), key 0)."""

    family: str = "unitary"
    dim: int = 10
    heads: int = 10
    seq_len: int = 20
    lr: float = 0.01
    steps: int = 100
    init_scale: float = 0.1
    seed: int = 0
    max_loss: float = 1e-3
    max_offdiag: float = 0.05
    max_invariant_err: float = 0.05

    def __post_init__(self):
        check_choice("family", self.family, th.FAMILIES)
        for name in ("dim", "heads", "seq_len", "lr", "steps", "init_scale"):
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


def run_fig3(cfg: Fig3Config, out_dir: str) -> Outcome:
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(cfg.seed), 3)
        shapes = [(cfg.heads, cfg.dim), (cfg.heads, cfg.dim), (cfg.seq_len, cfg.seq_len)]
        params = tuple(cfg.init_scale * jax.random.normal(k, s, jnp.float64) for k, s in zip(keys, shapes))
        loss_fn = lambda p: th.population_loss(cfg.family, *p)  # noqa: E731
        (a, b, p), losses = gd_fit(loss_fn, params, cfg.lr, cfg.steps, desc=f"fig3 {cfg.family}")
        final = float(loss_fn((a, b, p)))
        a, b, p = (np.asarray(x) for x in (a, b, p))
    m = fig3_metrics(cfg.family, a, b, p)
    checks = [
        check_below("final_loss", final, cfg.max_loss, f"closed-form population loss after {cfg.steps} GD steps "
                    f"(lr {cfg.lr}, float64); initial {losses[0]:.3g}"),
        check_below("offdiag_mass_of_C", m["offdiag"], cfg.max_offdiag,
                    f"||C outside {'the diagonal' if cfg.family == 'unitary' else 'blockdiag(J)'}||_F / ||C||_F"),
        check_below("max_abs_c_p_cur_minus_1", m["cur_err"], cfg.max_invariant_err,
                    f"c = {m['scale']:.4g} (mean of C on its structure), over the {cfg.seq_len - 1} trained rows of P"),
    ]
    if cfg.family == "orthogonal":
        checks.append(check_below("max_abs_c_p_prev_plus_half", m["prev_err"],
                                  cfg.max_invariant_err, "trigonometric (Chebyshev) relation c p_prev = -1/2"))
        checks.append(check_below("AB^T_eigs_at_2c", m["eig_err"], 0.05,
                                  f"|eigenvalues| of A B^T: {np.round(m['eigs'], 3).tolist()}; expected d/2 at |2c|, "
                                  "rest 0"))
    checks.append(check_below("other_P_mass", m["other"], cfg.max_offdiag,
                              "||P entries other than p_cur" + (", p_prev" if cfg.family == "orthogonal" else "")
                              + "|| / ||p_cur|| over trained rows"))
    np.savez(f"{out_dir}/params.npz", A=a, B=b, P=p, losses=losses)
    return Outcome(checks, [_plot_fig3(a, b, p, losses, cfg.family, out_dir)])


def _plot_fig3(a, b, p, losses, family, out_dir) -> str:
    fig, axes = new_figure(5, size=(3.4, 3.0))
    cividis(axes[0, 0], a, "A", ylabel="Heads")
    cividis(axes[0, 1], b, "B")
    cividis(axes[0, 2], b.T @ a, "$B^T A$")
    shown = np.triu(np.ones_like(p[:-1, :-1]), 2) == 0
    cividis(axes[0, 3], np.where(shown, p[:-1, :-1], 0.0), "P (above 1st superdiag. zeroed)")
    axes[0, 4].semilogy(np.maximum(losses, 1e-16))
    axes[0, 4].set(xlabel="GD step", ylabel="population loss", title=f"{family}: loss")
    return save_figure(fig, out_dir, f"fig3_{family}")


def sequence_loss(graphdef, width: int | None = None, coords: str = "sum"):
    """(params, batch) -> (loss, {}): squared next-state error over every position of a Prompt batch.

    The model maps inputs [T, D] to outputs [T, >= d]; the prediction is outputs[:, :width] (all when None).
    coords="sum" sums |error|^2 over the d coordinates (the theory's loss), "mean" averages them (MSELoss).
    """
    reduce = jnp.sum if coords == "sum" else jnp.mean

    def loss_fn(params, batch):
        model = lambda x: nnx.merge(graphdef, params)(x)  # noqa: E731
        pred = jax.vmap(model)(batch.inputs)
        pred = pred if width is None else pred[..., :width]
        per_position = reduce(jnp.abs(pred - batch.targets) ** 2, axis=-1)  # [B, T]
        return jnp.mean(per_position), {}

    return loss_fn


def per_position_loss(graphdef, params, batch, width: int | None = None, coords: str = "sum") -> np.ndarray:
    """[T] loss per position on a batch (same conventions as sequence_loss)."""
    return np.asarray(_per_position_loss(graphdef, params, batch.inputs, batch.targets, width, coords))


@partial(jax.jit, static_argnums=(0, 4, 5))
def _per_position_loss(graphdef, params, inputs, targets, width, coords):
    pred = jax.vmap(nnx.merge(graphdef, params))(inputs)
    pred = pred if width is None else pred[..., :width]
    err = jnp.abs(pred - targets) ** 2
    return jnp.mean(err.sum(-1) if coords == "sum" else err.mean(-1), axis=0)


TEST_SEED = 0x7E57  # test sets: fresh sequences from this key (training sets are fixed pools)


def haar_task(fmt: str, dim: int = 5, seq_len: int = 50, n_sequences: int = 16384) -> ar.Autoregressive:
    """The official Figs. 5/7 data: Haar O(d) W, fixed s_0 = 1/sqrt(d), a fixed training set of n_sequences."""
    return ar.Autoregressive(family="haar", dim=dim, seq_len=seq_len, init="fixed", init_scale=dim ** -0.5,
                             format=fmt, tile=2, n_sequences=n_sequences)


def held_out_set(task: ar.Autoregressive, n: int):
    """n fresh sequences of the task's distribution (independent of its fixed training pool)."""
    return sample_batch(ar.sample, dataclasses.replace(task, n_sequences=0), jax.random.key(TEST_SEED), n)
