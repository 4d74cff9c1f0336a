"""Sander et al. 2024 Fig. 3 (left): GD on the unitary closed-form loss finds C = c I with c p_cur = 1."""

from experiments.ar_common import Fig3Config as Config
from experiments.ar_common import run_fig3 as run

PRESETS = {
    "smoke": Config(dim=4, heads=4, seq_len=6, steps=100, lr=0.01),
    "quick": Config(),  # the official recipe: d = H = 10, T = 20, lr 0.01, 100 steps
    "full": Config(),
}

__all__ = ["Config", "PRESETS", "run"]
