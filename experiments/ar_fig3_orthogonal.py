"""Sander et al. 2024 Fig. 3 (right): GD on the orthogonal closed-form loss, H < d: the trigonometric solution."""

from experiments.ar_common import Fig3Config as Config
from experiments.ar_common import run_fig3 as run

PRESETS = {
    "smoke": Config(family="orthogonal", dim=4, heads=2, seq_len=6, lr=1e-3, steps=2000),
    # the official recipe: d = 10, H = 8, T = 20, lr 1e-3, 100k steps
    "quick": Config(family="orthogonal", dim=10, heads=8, seq_len=20, lr=1e-3, steps=100_000),
    "full": Config(family="orthogonal", dim=10, heads=8, seq_len=20, lr=1e-3, steps=100_000),
}

__all__ = ["Config", "PRESETS", "run"]
