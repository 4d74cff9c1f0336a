"""Li et al. 2024 Fig. 2: the reduced loss L(xi1, xi2) at d = N = 4 is nonconvex (heatmap and surface).

The paper fixes only d = N = 4; the xi ranges, the grid, the Monte Carlo samples and sigma = 3 are ours.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Outcome, check_below
from jaxicl.prng import seed_key
from jaxicl.theory import nearest_neighbor as theory
from jaxicl.validation import ConfigError, check_positive, check_range, check_seed


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int = 4
    n_context: int = 4
    xi1_range: tuple[float, ...] = (-5.0, 15.0)
    xi2_range: tuple[float, ...] = (-5.0, 15.0)
    grid: int = 41  # points per axis
    samples: int = 8000  # Monte Carlo x samples (the same samples at every grid point)
    sigma: float = 3.0  # the sanity value L(0, sigma) is checked against its closed form
    seed: int = 0

    def __post_init__(self):
        for name in ("dim", "n_context", "samples"):
            check_positive(name, getattr(self, name))
        check_range("grid", self.grid, 2)  # the contour plots need at least 2 x 2 points
        check_seed("seed", self.seed)
        for name in ("xi1_range", "xi2_range"):
            r = getattr(self, name)
            if len(r) != 2 or r[0] >= r[1]:
                raise ConfigError(f"{name} must be (low, high) with low < high, got {r}")


PRESETS = {
    "smoke": Config(grid=11, samples=1000),
    "quick": Config(),
    "full": Config(grid=121, samples=200_000),
}


@jax.jit
def _hessian_terms(xi: jax.Array, s: jax.Array) -> jax.Array:
    """Per-sample Hessians [M, 2, 2] of the per-sample loss at xi [2]."""
    per_sample = lambda x, si: theory.reduced_terms(x[0], x[1], si[None])[0][0]  # noqa: E731
    return jax.vmap(jax.hessian(per_sample), in_axes=(None, 0))(xi, s)


@jax.jit
def _hessian_grid(points: jax.Array, s: jax.Array) -> jax.Array:
    """Hessians [P, 2, 2] of L (Monte Carlo over s) at points [P, 2], a few points at a time."""
    hessian = jax.hessian(lambda x: theory.reduced_loss(x[0], x[1], s))
    return jax.lax.map(hessian, points, batch_size=16)


def run(cfg: Config, out_dir: str) -> Outcome:
    with jax.enable_x64(True):
        key = seed_key(cfg.seed)
        s = theory.sample_inner_products(jax.random.fold_in(key, 0), cfg.n_context, cfg.dim, cfg.samples)
        s = s.astype(jnp.float64)
        xi1 = jnp.linspace(*cfg.xi1_range, cfg.grid)
        xi2 = jnp.linspace(*cfg.xi2_range, cfg.grid)
        g1, g2 = jnp.meshgrid(xi1, xi2, indexing="xy")  # rows: xi2, columns: xi1
        loss = np.asarray(theory.reduced_loss_grid(g1, g2, s))
        hess = _hessian_grid(jnp.stack([g1.ravel(), g2.ravel()], -1), s)
        eigs = np.asarray(jnp.linalg.eigvalsh(hess))
        min_eig, max_eig = eigs[:, 0].reshape(g1.shape), eigs[:, 1].max()

        # Confirm the most negative curvature on fresh samples: v^T H v with its Monte Carlo standard error.
        worst = np.unravel_index(np.argmin(min_eig), min_eig.shape)
        point = jnp.stack([g1[worst], g2[worst]])
        v = jnp.linalg.eigh(hess.reshape(*g1.shape, 2, 2)[worst])[1][:, 0]
        fresh = theory.sample_inner_products(jax.random.fold_in(key, 1), cfg.n_context, cfg.dim,
                                             cfg.samples).astype(jnp.float64)
        curv = np.asarray(jnp.einsum("i,mij,j->m", v, _hessian_terms(point, fresh), v))
        curv_z = curv.mean() / (curv.std() / np.sqrt(len(curv)))

        # At xi1 = 0 every context weight is 1 / (N + e^-sigma) whatever x is: the Monte Carlo value is exact.
        sanity_mc = float(theory.reduced_loss(0.0, cfg.sigma, fresh))
        sanity = theory.loss_at_init(cfg.n_context, cfg.sigma)
    figures = [_plot(cfg, np.asarray(xi1), np.asarray(xi2), loss, min_eig, out_dir)]
    checks = [
        check_below("min_hessian_eigenvalue_z", curv_z, -5.0,
                    f"curvature v^T H v along the most negative eigenvector at xi=({float(point[0]):.2f}, "
                    f"{float(point[1]):.2f}) = {curv.mean():.4f}, in Monte Carlo standard errors on fresh samples "
                    f"(negative: L is not convex); grid min eigenvalue {min_eig.min():.4f}, max "
                    f"{max_eig:.4f}; d={cfg.dim}, N={cfg.n_context} (the paper's); ours: xi ranges {cfg.xi1_range} x "
                    f"{cfg.xi2_range}, a {cfg.grid}x{cfg.grid} grid, {cfg.samples} samples"),
        check_below("sanity_L0_sigma_abs_err", abs(sanity_mc - sanity), 1e-12,
                    f"L(0, {cfg.sigma}) from the reduced loss (float64) = {sanity_mc:.6f} vs the closed form "
                    f"1/2 (1 - 2/(N + e^-sigma) + N/(N + e^-sigma)^2) = {sanity:.6f}"),
    ]
    return Outcome(checks, figures)


def _plot(cfg: Config, xi1, xi2, loss, min_eig, out_dir: str) -> str:
    fig = new_figure(3, size=(4.6, 3.8))[0]
    fig.clf()
    ax = fig.add_subplot(1, 3, 1)
    # shading="nearest": each cell is centred on its grid point, where the contour lines pass through its value
    im = ax.pcolormesh(xi1, xi2, loss, shading="nearest", cmap="viridis")
    ax.contour(xi1, xi2, loss, levels=15, colors="w", linewidths=0.5)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set(xlabel="xi1", ylabel="xi2", title=f"L(xi1, xi2), d={cfg.dim}, N={cfg.n_context}")
    ax = fig.add_subplot(1, 3, 2, projection="3d")
    x, y = np.meshgrid(xi1, xi2)
    ax.plot_surface(x, y, loss, cmap="viridis", linewidth=0, antialiased=True)
    ax.set(xlabel="xi1", ylabel="xi2", zlabel="L", title="surface")
    ax.view_init(elev=30, azim=-130)
    ax = fig.add_subplot(1, 3, 3)
    lim = float(np.abs(min_eig).max())
    im = ax.pcolormesh(xi1, xi2, min_eig, shading="nearest", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.contour(xi1, xi2, min_eig, levels=[0.0], colors="k", linewidths=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set(xlabel="xi1", ylabel="xi2", title="smallest Hessian eigenvalue (blue < 0: nonconvex)")
    return save_figure(fig, out_dir, "landscape")
