"""Matplotlib (Agg) helpers: every experiment saves PNGs the same way."""

import os

import matplotlib
import numpy as np

from jaxicl import outputs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.5, 3.4)):
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


def save_figure(fig, out_dir: str, name: str) -> str:
    """Writes out_dir/name.png (process 0 only, jaxicl.outputs) and returns the file name relative to out_dir."""
    fig.tight_layout()
    path = f"{name}.png"
    outputs.write_with(os.path.join(out_dir, path), lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)
    return path


def heatmap(ax, matrix, title: str, symmetric: bool = True):
    """A matrix as an image with a colour bar; symmetric colour limits around 0 by default."""
    m = np.asarray(matrix)
    lim = float(np.abs(m).max()) or 1.0
    im = ax.imshow(m, cmap="RdBu_r" if symmetric else "viridis", vmin=-lim if symmetric else None,
                   vmax=lim if symmetric else None)
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    return im
