"""Device meshes for data parallelism (the modern form of pmap)."""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxicl.tasks.batching import DATA_AXIS


def data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over the first num_devices global devices (all by default), axis "data"."""
    n = jax.device_count() if num_devices is None else num_devices
    if not 1 <= n <= jax.device_count():
        raise ValueError(f"num_devices must be in [1, {jax.device_count()}], got {n}")
    return jax.make_mesh((n,), (DATA_AXIS,), devices=jax.devices()[:n])


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of the mesh (parameters, optimiser state)."""
    return NamedSharding(mesh, P())
