"""TrainState: everything a run needs to continue exactly."""

import dataclasses

import jax
import optax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """params and opt_state are pytrees; step is a scalar int32; key is the run's typed base key.

    The batch of step s is sampled from fold_in(key, s), so the state at step s determines the
    rest of the run.
    """

    params: object
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)
