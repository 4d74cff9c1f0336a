"""Sander et al. 2024 Fig. 6: positional-only attention, early-stopped GD = regularised min-norm least squares."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Check, Outcome, check_below
from jaxicl.tasks import autoregressive as ar
from jaxicl.tasks import sample_batch
from jaxicl.theory import autoregressive as th
from jaxicl.validation import check_positive


@dataclasses.dataclass(frozen=True)
class Config:
    mus: tuple[float, ...] = (50.0, 100.0, 200.0, 300.0)
    seq_len: int = 30  # T: P is [T, T]; sequences hold T + 1 states
    n_sequences: int = 1000  # one fixed full batch per mu
    lr: float = 0.5
    stop_loss: float = 1e-3  # official rule: stop once the loss < stop_loss
    max_steps: int = 100_000
    rcond: float = 0.03  # truncated-SVD min-norm LS (the notes' effective rank for mu = 50)
    seed: int = 0
    max_ridge_dist: float = 0.2

    def __post_init__(self):
        for name in ("seq_len", "n_sequences", "lr", "stop_loss", "max_steps", "rcond"):
            check_positive(name, getattr(self, name))
        for i, mu in enumerate(self.mus):
            check_positive(f"mus[{i}]", mu)


PRESETS = {
    "smoke": Config(mus=(50.0, 300.0), seq_len=10, n_sequences=200),
    "quick": Config(),  # the official recipe
    "full": Config(),
}


@partial(jax.jit, static_argnames=("cfg", "normaliser"))
def fit(g: jax.Array, h: jax.Array, c: jax.Array, cfg: Config, normaliser: float):
    """Plain GD from P = 0 on the mean loss (exact quadratic form) until loss < stop_loss: (P, loss, steps).

    g, h, c: th.positional_quadratic; the loss is its sum over rows / normaliser. Stops at the first k with
    loss(P_k) < stop_loss, or at k = max_steps; loss is loss(P_k).
    """
    t = cfg.seq_len

    def loss(p):
        pr = p[:-1]
        return jnp.sum(jnp.einsum("rk,rkl,rl->r", pr, g, pr) - 2 * jnp.sum(h * pr, 1) + c) / normaliser

    def body(state):
        p, _, k = state
        p = p - cfg.lr * jax.grad(loss)(p)
        return p, loss(p), k + 1

    p0 = jnp.zeros((t, t))
    cond = lambda st: (st[1] >= cfg.stop_loss) & (st[2] < cfg.max_steps)  # noqa: E731
    return jax.lax.while_loop(cond, body, (p0, loss(p0), 0))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run(cfg: Config, out_dir: str) -> Outcome:
    t, n = cfg.seq_len, cfg.n_sequences
    res = {}
    with jax.enable_x64(True):
        for i, mu in enumerate(cfg.mus):
            task = ar.Autoregressive(family="complex_1d", dim=1, seq_len=t, mu=mu, format="tiled", tile=1)
            key = jax.random.fold_in(jax.random.key(cfg.seed), i)
            s = sample_batch(ar.sample, task, key, n, axis=None).info["states"][..., 0]  # [n, T + 1]
            g, h, c = th.positional_quadratic(s)
            p, loss, steps = fit(g, h, c, cfg, normaliser=n * (t - 1))
            lam = th.gd_ridge_penalty(cfg.lr, int(steps), n * (t - 1))
            res[mu] = {"P": np.asarray(p), "steps": int(steps), "loss": float(loss),
                       "ridge": np.asarray(th.ridge_positional(s, lam)),
                       "tsvd": np.asarray(th.min_norm_positional(s, cfg.rcond)),
                       "exact": np.asarray(th.min_norm_positional(s, 1e-4))}
    np.savez(f"{out_dir}/pe_only.npz", **{f"P_mu{int(mu)}": np.tril(r["P"]) for mu, r in res.items()})
    d_ridge = {mu: _rel(r["P"][:-1], r["ridge"][:-1]) for mu, r in res.items()}
    d_tsvd = {mu: _rel(r["P"][:-1], r["tsvd"][:-1]) for mu, r in res.items()}
    d_exact = {mu: _rel(r["P"][:-1], r["exact"][:-1]) for mu, r in res.items()}
    steps = [r["steps"] for r in res.values()]
    decreasing = bool(np.all(np.diff(steps) < 0))
    fmt = lambda d: ", ".join(f"mu={int(m)}: {v:.3f}" for m, v in d.items())  # noqa: E731
    checks = [
        check_below("max_rel_dist_to_ridge_min_norm_ls", max(d_ridge.values()), cfg.max_ridge_dist,
                    f"||P_GD - P_LS|| / ||P_LS|| over trained rows, LS with Tikhonov lam = 1/(alpha k) matched to the "
                    f"k GD steps (the effective-rank regularisation); {fmt(d_ridge)}. For comparison (no target): "
                    f"truncated-SVD min-norm LS at rcond={cfg.rcond}, the notes' proxy, is at {fmt(d_tsvd)}, and "
                    f"weakly regularised min-norm LS (rcond 1e-4) at {fmt(d_exact)}"),
        Check("stop_steps_decrease_with_mu", float(decreasing), "== 1", decreasing,
              f"GD steps to loss < {cfg.stop_loss}: {dict(zip([int(m) for m in cfg.mus], steps))}"),
        check_below("max_final_loss", max(r["loss"] for r in res.values()), cfg.stop_loss,
                    f"stop rule reached for every mu (max {cfg.max_steps} steps)"),
    ]
    return Outcome(checks, [_plot(res, out_dir)])


def _plot(res: dict, out_dir: str) -> str:
    k = len(res)
    fig, axes = new_figure(k + 1, size=(3.0, 3.0))
    for ax, (mu, r) in zip(axes[0], res.items()):
        saved = np.tril(r["P"])[:-1, :-1]  # the official saved P: superdiagonal (current token) removed
        ax.imshow(saved, cmap="cividis")
        ax.set_title(f"P, mu = {int(mu)} ({r['steps']} steps)", fontsize=9)
        ax.axis("off")
    ax = axes[0, k]
    for j, (mu, r) in enumerate(res.items()):
        last = len(r["P"]) - 2
        line, = ax.plot(r["P"][last, :last + 1], label=f"mu={int(mu)} GD")
        ax.plot(r["ridge"][last, :last + 1], ls="--", color=line.get_color(), lw=1)
    ax.set(xlabel="key position t", ylabel=f"P[{last}, t]", title="last row (dashed: regularised LS)")
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, "fig6_pe_only")
