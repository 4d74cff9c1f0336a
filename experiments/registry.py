"""Every registered experiment: name -> module. A module provides

  Config            a frozen dataclass (nested configs allowed)
  PRESETS           {"smoke": Config, "quick": Config, "full": Config}; smoke is the CI size,
                    quick the CPU reproduction, full the paper's scale for an accelerator
  run(cfg, out_dir) -> experiments.common.result.Outcome
  run_sweep(cfg, axes, out_dir) -> Outcome   optional: `--sweep` support (jaxicl.train.sweep_spec axes
                    resolved on Config), training the grid as one vmapped program; with it
  sweep_fields(c) -> tuple[str, ...]   with run_sweep: the dotted paths of c, the config a sweep trains (cfg, or
                    its section SWEEP_SECTION), that the sweep can vary; the CLI refuses other axes before writing
  SWEEP_SECTION     optional: the field of Config holding the config a sweep trains ("gd": axes gd.train.lr, ...);
                    every swept value is validated on that section
  SWEEP_IGNORES     optional, with run_sweep: {field or section: why} of Config that run_sweep does not read; the
                    CLI refuses an override of one (or of a field under a section) with --sweep, saying why
  SHARES            optional: the folders beside its own under --out that its run writes too (a shared training
                    run); where a run is interrupted the CLI looks for their checkpoints as for its own
"""

import importlib
from types import ModuleType

EXPERIMENTS = {
    "gd_equivalence": "experiments.gd_equivalence",
    "ar_fig3_unitary": "experiments.ar_fig3_unitary",
    "ar_fig3_orthogonal": "experiments.ar_fig3_orthogonal",
    "ar_fig5_augmented": "experiments.ar_fig5_augmented",
    "ar_fig6_pe_only": "experiments.ar_fig6_pe_only",
    "ar_fig7_non_augmented": "experiments.ar_fig7_non_augmented",
    "ar_gd_step": "experiments.ar_gd_step",
    "nn_fig2_landscape": "experiments.nn_fig2_landscape",
    "nn_fig3_training": "experiments.nn_fig3_training",
    "nn_random_init": "experiments.nn_random_init",
    "sweep_lr_seeds": "experiments.sweep_lr_seeds",
    "sweep_context_length": "experiments.sweep_context_length",
    "affine_mechanism": "experiments.affine_mechanism",
    "clustering_dynamics": "experiments.clustering_dynamics",
    "abstractions_training": "experiments.abstractions_training",  # before the two that load its checkpoint
    "abstractions_geometry": "experiments.abstractions_geometry",
    "abstractions_manipulation": "experiments.abstractions_manipulation",
    "abstractions_lea": "experiments.abstractions_lea",
}
PRESET_NAMES = ("smoke", "quick", "full")


def load(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; registered: {sorted(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])
