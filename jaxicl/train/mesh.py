"""Device meshes for data parallelism (the modern form of pmap) and sweeps, and handing arrays back off them."""

import math
from collections.abc import Callable

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxicl.tasks.batching import DATA_AXIS
from jaxicl.validation import ConfigError

MEMBER_AXIS = "members"  # the axis a sweep's stacked members are sharded over


def data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over num_devices global devices (all by default; spread_devices picks them), axis "data"."""
    n = jax.device_count() if num_devices is None else num_devices
    if not 1 <= n <= jax.device_count():
        raise ValueError(f"num_devices must be in [1, {jax.device_count()}], got {n}")
    return jax.make_mesh((n,), (DATA_AXIS,), devices=spread_devices(n, f"num_devices={n}"))


def spread_devices(n: int, what: str) -> list:
    """n global devices, the first n // P of each of the P processes: jax.devices() lists them process by process, so
    its first n would leave processes out of a multi-process run's mesh (see check_spans_processes). ConfigError
    naming `what` where n is not a multiple of P or exceeds P x the fewest devices a process has."""
    groups = _devices_by_process()
    per, rest = divmod(n, len(groups))
    fewest = min(map(len, groups))
    if rest or per > fewest:
        raise ConfigError(f"{what}: a mesh in a run of {len(groups)} processes takes the same number of devices "
                          f"from each, so it needs a multiple of {len(groups)} devices up to {len(groups) * fewest}, "
                          f"got {n}")
    return [d for ds in groups for d in ds[:per]]


def _devices_by_process() -> list[list]:
    """jax.devices() grouped by process: [[process 0's devices], [process 1's], ...]."""
    groups = {}
    for d in jax.devices():
        groups.setdefault(d.process_index, []).append(d)
    return [groups[p] for p in sorted(groups)]


def check_spans_processes(mesh: jax.sharding.Mesh) -> None:
    """Raises ConfigError unless `mesh` holds devices of every process: each process runs the same programs and
    gathers their results (process_allgather), and a process holding no device of the mesh takes another branch
    there than the others (an IndexError on it, a hang on them)."""
    every = [ds[0].process_index for ds in _devices_by_process()]
    held = sorted({d.process_index for d in mesh.devices.flat})
    if held != every:
        raise ConfigError(f"mesh: its devices belong to process(es) {held} of this run's {every}; every process must "
                          f"hold devices of the mesh (jaxicl.train.data_mesh and sweep_mesh take the same number from "
                          f"each)")


def check_data_mesh(mesh: jax.sharding.Mesh) -> None:
    """Raises ConfigError unless train can use `mesh`: an Explicit "data" axis and no other axis of size > 1 (train
    shards the batch over "data" and replicates the rest, so another axis would only repeat the same work)."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    others = [a for a in mesh.axis_names if a != DATA_AXIS and mesh.shape[a] > 1]
    if types.get(DATA_AXIS) != AxisType.Explicit or others:
        axes = ", ".join(f"{a!r}: {mesh.shape[a]} {t.name}" for a, t in types.items())
        raise ConfigError(f"mesh: train needs an Explicit {DATA_AXIS!r} axis (the batch is sharded over it) and no "
                          f"other axis of size > 1 (everything else is replicated), got axes {{{axes}}}; "
                          f"jaxicl.train.data_mesh(num_devices) builds one")
    check_spans_processes(mesh)


def sweep_mesh(member_devices: int | None = None, data_devices: int = 1) -> jax.sharding.Mesh:
    """A 2-D mesh (members x data) over member_devices * data_devices devices (spread_devices picks them)."""
    n = jax.device_count()
    member_devices = n // data_devices if member_devices is None else member_devices
    if member_devices < 1 or data_devices < 1 or member_devices * data_devices > n:
        raise ConfigError(f"sweep mesh {member_devices} x {data_devices} needs 1 <= devices <= {n}")
    return jax.make_mesh((member_devices, data_devices), (MEMBER_AXIS, DATA_AXIS),
                         devices=spread_devices(member_devices * data_devices,
                                                f"sweep mesh {member_devices} x {data_devices}"))


def default_sweep_mesh(stack: int) -> jax.sharding.Mesh:
    """The sweep mesh for a stack of `stack` members: P x gcd(L, ceil(stack / P)) devices on the member axis, for P
    processes of L devices each (in one process gcd(devices, stack), which divides the stack). Every process holds
    some (check_spans_processes), and the stack is padded to the fewest members that allow it: P x ceil(stack / P)."""
    groups = _devices_by_process()
    return sweep_mesh(len(groups) * math.gcd(min(map(len, groups)), -(-stack // len(groups))))


def in_auto_sharding(fn: Callable, out_sharding: P) -> Callable:
    """fn run with the current mesh's explicit axes in auto sharding (XLA's propagation), its outputs laid out by
    out_sharding (a PartitionSpec for every output leaf); fn itself outside a mesh. For a user's model inside the
    engine's explicit-sharding mesh: a gather from a table it holds (an nnx.Embed) by per-prompt token ids has no
    output sharding of its own in explicit mode, and raised there."""
    mesh = jax.sharding.get_abstract_mesh()
    explicit = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)
    return jax.sharding.auto_axes(fn, axes=explicit, out_sharding=out_sharding) if explicit else fn


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of the mesh (parameters, optimiser state)."""
    return NamedSharding(mesh, P())


def portable(tree):
    """`tree` with every array on the same devices and layout but its mesh axes Auto instead of Explicit.

    Arrays typed with an Explicit mesh (what the engine's compiled steps produce) make any jitted
    code that touches them demand `jax.set_mesh` of that mesh; with Auto axes they work in ordinary
    JAX code outside it, jitted or not, next to arrays on the default device. Nothing is copied.
    """

    def release(x):
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, NamedSharding) or AxisType.Explicit not in sharding.mesh.axis_types:
            return x
        mesh = sharding.mesh
        auto = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        target = NamedSharding(auto, sharding.spec, memory_kind=sharding.memory_kind)
        # the same per-device buffers under the new sharding (multi-host safe: only local shards are touched)
        return jax.make_array_from_single_device_arrays(x.shape, target, [s.data for s in x.addressable_shards])

    return jax.tree.map(release, tree)
