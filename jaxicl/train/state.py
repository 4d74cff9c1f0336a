"""TrainState (everything a run needs to continue exactly) and the key streams of a run."""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxicl.prng import PRNG_IMPLS, seed_key

DATA_STREAM = 0xDA7A  # folded into the seed for the data key, so data and init keys differ
EVAL_STREAM = 0xE7A1  # folded into the seed for evaluation prompts, never used for training batches


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """params and opt_state are pytrees; step is a scalar int32; key is the run's typed base key; buffers: state
    the loss updates and the optimiser never sees (e.g. a vector quantiser's EMA codebook), None for most models.

    The batch of step s is sampled from fold_in(key, s), so the state at step s determines the
    rest of the run.
    """

    params: object
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array
    buffers: object = None

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)


def data_key(seed, prng_impl: str = PRNG_IMPLS[0]) -> jax.Array:
    """The base key of a run's training batches, of JAX's PRNG implementation prng_impl (seed may be traced, e.g.
    per sweep member; jaxicl.prng.seed_key)."""
    return jax.random.fold_in(seed_key(seed, prng_impl), DATA_STREAM)


def eval_key(seed) -> jax.Array:
    """The key of a run's held-out evaluation prompts (differs from data_key(seed) and the init key); threefry2x32
    (JAX's default) whatever the run's prng_impl, so runs that draw their batches differently share a test set, and
    whatever jax_default_prng_impl says (jaxicl.prng.seed_key)."""
    return jax.random.fold_in(seed_key(seed), EVAL_STREAM)


def init_state(params, seed, tx: optax.GradientTransformation, buffers=None,
               prng_impl: str = PRNG_IMPLS[0]) -> TrainState:
    """The state at step 0 of a run with this seed (seed may be traced, e.g. per sweep member), its batches drawn
    by the PRNG implementation prng_impl."""
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), data_key(seed, prng_impl), buffers)
