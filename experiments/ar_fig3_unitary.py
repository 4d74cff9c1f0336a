"""Sander et al. 2024 Fig. 3 (left): GD on the unitary closed-form loss finds C = c I with c p_cur = 1.

The loss is the exact population loss (jaxicl.theory.autoregressive). The official unitary.py drops p_prev^2 ||C||_F^2
from it: the minimiser (p_prev = 0) is the same, the GD path from a random P is not, so "the official recipe" below
means its settings (init scale, lr, steps), and only |c| is compared with the official parameters.
"""

import dataclasses

from experiments.common.autoregressive import Fig3Config as Config
from experiments.common.autoregressive import run_fig3 as run
from jaxicl.tasks.autoregressive import Autoregressive
from jaxicl.train import TrainConfig

PRESETS = {
    "smoke": Config(task=Autoregressive(family="unitary", dim=4, seq_len=6), heads=4,
                    train=TrainConfig(optimizer="sgd", lr=0.01, steps=100, steps_per_call=100, log_every=1)),
    "quick": Config(),  # the official recipe: d = H = 10, T = 20, lr 0.01, 100 steps
    # the same, with a checkpoint after step 50 (its two calls run the one compiled chunk: the same steps, bit for bit)
    "full": Config(train=dataclasses.replace(Config.train, checkpoint_every=50)),
}

__all__ = ["Config", "PRESETS", "run"]
