"""Task configs reject a count that is not an integer, and malformed fields, with a ConfigError naming the field."""

import dataclasses

import numpy as np
import pytest

from jaxicl.tasks.affine_recurrence import AffineRecurrence
from jaxicl.tasks.autoregressive import Autoregressive
from jaxicl.tasks.boards import Boards
from jaxicl.tasks.instructions import Instructions
from jaxicl.tasks.linear_regression import LinearRegression
from jaxicl.tasks.nearest_neighbor import NearestNeighbor
from jaxicl.validation import ConfigError

COUNTS = {
    LinearRegression: ("dim", "n_context", "n_tasks", "pool_seed"),
    NearestNeighbor: ("dim", "n_context", "num_classes", "n_prompts", "pool_seed"),
    Autoregressive: ("dim", "seq_len", "tile", "basis_seed", "n_sequences", "pool_seed"),
    AffineRecurrence: ("dim", "seq_len", "loss_from"),
    Boards: ("n_roots", "n_composites", "n_colours", "n_backgrounds", "board_dim", "root_dim", "comp_margin",
             "test_per_group", "blueprint_seed", "mask_ramp_end", "patch_from", "steps_per_epoch"),
    Instructions: ("n_tasks", "n_families", "unseen_families", "strings_per_family", "validation_strings", "n_letters",
                   "n_inputs", "n_outputs", "min_task_distance", "max_instruction_len", "max_repeat", "keyword_len",
                   "seed"),
}
# a count half-way past its default (e.g. n_tasks=2.5 used to draw from 2 tasks, seq_len=4.5 to mismatch shapes)
NOT_INTEGER = [(cls, {f: getattr(cls(), f) + 0.5}, rf"{f} must be an integer, got {getattr(cls(), f) + 0.5}")
               for cls, fields in COUNTS.items() for f in fields]
MALFORMED = [
    (LinearRegression, {"dim": 3, "x_cov_diag": (1.0, 2.0)}, r"x_cov_diag must have dim=3 entries or be empty, got 2"),
    (Boards, {"types_ramp": (250,)}, r"types_ramp must be \(start, end\) epochs, got \(250,\)"),
    (Boards, {"types_ramp": (250, 1000, 2000)}, r"types_ramp must be \(start, end\) epochs"),
    (Boards, {"types_ramp": (250.0, 1000)}, r"types_ramp\[0\] must be an integer, got 250.0"),
    (Boards, {"mask_min": 0.5, "mask_max": 0.25}, r"mask_min must be in \[0.0, 0.25\], got 0.5"),
    (Instructions, {"seed": -1}, r"^seed must be >= 0, got -1$"),  # was accepted; numpy refused it at build
]


@pytest.mark.parametrize("cls,fields,message", NOT_INTEGER + MALFORMED,
                         ids=[f"{c.__name__}-{'-'.join(f)}" for c, f, _ in NOT_INTEGER + MALFORMED])
def test_task_configs_reject_bad_fields_naming_them(cls, fields, message):
    with pytest.raises(ConfigError, match=message):
        cls(**fields)
    # a count given as a numpy integer (as a sweep's values may be) is accepted
    counts = {f: np.int64(getattr(cls(), f)) for f in fields if f in COUNTS[cls]}
    assert dataclasses.replace(cls(), **counts) == cls()


# the seeds of JAX keys; Instructions.seed seeds numpy's default_rng on the host, which takes any integer >= 0
SEEDS = {LinearRegression: ("pool_seed",), NearestNeighbor: ("pool_seed",), Autoregressive: ("basis_seed", "pool_seed"),
         Boards: ("blueprint_seed",), AffineRecurrence: ()}


def test_task_seeds_outside_int32_are_refused_naming_the_field():
    """pool_seed=2**32 + 7 was accepted and drew the pool of pool_seed=7 (jax.random.key keeps a seed's low 32 bits
    without x64), and -1 that of 2**32 - 1, as TrainConfig.seed refuses; every seed field of a JAX-keyed task."""
    for cls, fields in SEEDS.items():
        assert {f.name for f in dataclasses.fields(cls) if "seed" in f.name} == set(fields)
        for field in fields:
            for seed in (-2**31, 2**31 - 1):
                assert getattr(cls(**{field: seed}), field) == seed
            for seed in (-2**31 - 1, 2**31, 2**32 + 7):
                with pytest.raises(ConfigError, match=rf"^{field} must be in \[-2147483648, 2147483647\], got {seed}$"):
                    cls(**{field: seed})
