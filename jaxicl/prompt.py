"""The Prompt pytree every task sampler returns."""

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt (or a batch of them, with a leading batch axis on every leaf).

    inputs:  [T, D] tokens fed to the model.
    targets: [T] (or [T, K]) what the model should predict at each position.
    mask:    [T] loss weights; 1 where a position's prediction counts.
    info:    dict of task metadata (e.g. the task vector `w`), never fed to the model.
    """

    inputs: jax.Array
    targets: jax.Array
    mask: jax.Array
    info: dict = dataclasses.field(default_factory=dict)
