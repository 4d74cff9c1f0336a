"""Where arrays typed with one mesh meet arrays on another: the params train() returns carry its mesh with Auto axes
(jaxicl.train.portable), and a batch drawn under jax.set_mesh is typed with that mesh's Explicit axes, inside the mesh
and after leaving it. JAX refuses the two in one computation, and refuses to vmap such a batch, split over "data",
together with per-prompt arrays made unsharded. The forward pass (jaxicl.models.functional.apply) puts params on the
tokens' mesh when it is traced (on_mesh_of); the analyses (clustering and the convergence measures included),
per_position_loss and the positional fits of jaxicl.theory.autoregressive replicate all their inputs on one mesh
before they run (replicated_inputs); equivalence_metrics, which differentiates eagerly, runs in the batch's mesh
(inside_inputs_mesh); the baselines' predictors, vmapped over such a batch, are traced in its mesh (in_tokens_mesh).
"""

from collections.abc import Callable, Iterator
from functools import wraps

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def on_mesh_of(tokens: jax.Array, params):
    """params with each array typed with a mesh other than the one tokens are computed on (their own, else the
    current jax.set_mesh's) replicated on that one, where there is one: the params train() returns carry its mesh
    with Auto axes (jaxicl.train.portable), and JAX refuses them in one computation with a batch drawn under
    jax.set_mesh (Explicit axes), inside the mesh and after it. Done when the forward pass is traced (a jitted
    caller keeps the replicated copy in its program); traced params (arguments of a jitted program: the engine's
    steps, the analyses) stay as they are. Params on other devices than that mesh's: jax.device_put them onto it."""
    mesh = jax.typeof(tokens).sharding.mesh
    mesh = jax.sharding.get_abstract_mesh() if mesh.empty else mesh
    if mesh.empty or not any(on_another_mesh(x, mesh) for x in jax.tree.leaves(params)):
        return params
    with jax.sharding.use_abstract_mesh(mesh):  # jax.reshard to P() replicates on this mesh, also outside set_mesh
        return jax.tree.map(lambda x: jax.reshard(x, P()) if on_another_mesh(x, mesh) else x, params)


def on_another_mesh(x, mesh: jax.sharding.AbstractMesh) -> bool:
    """Whether x is an array typed with a mesh other than `mesh` (axis types count: the same devices with Auto axes
    are another mesh than with Explicit ones); never for a traced array, typed already in its program."""
    sharding = getattr(x, "sharding", None)  # None for a traced array
    return isinstance(sharding, NamedSharding) and sharding.mesh.abstract_mesh != mesh


def explicitly_sharded(x) -> bool:
    """Whether x is an array split over an Explicit mesh axis (a batch drawn by sample_batch under jax.set_mesh)."""
    return _explicit_mesh(x) is not None and any(s is not None for s in x.sharding.spec)


def replicated_inputs(fn: Callable) -> Callable:
    """fn with the arrays of its arguments (any pytree leaf: the batch, the params) replicated on one mesh first,
    where one is in play: the current one under jax.set_mesh, else that of an argument typed with an Explicit mesh
    (a batch drawn under jax.set_mesh, after leaving it). An array split over the mesh (such a batch) is replicated:
    an analysis vmaps the batch together with per-prompt arrays it makes unsharded (zero values, masks, picks), which
    JAX refuses for a batch sharded over "data". An array typed with another mesh is put on this one (no copy where
    the devices are the same): the params train() returns carry its mesh with Auto axes (jaxicl.train.portable),
    which JAX refuses in one program with a batch on the Explicit mesh, inside the mesh and after it. Replicated,
    every device runs the whole analysis, with the results of one device. Arrays on no mesh stay as they are."""

    @wraps(fn)
    def wrapped(*args, **kwargs):
        mesh, onto = _replication_mesh((args, kwargs))
        if mesh is None:
            return fn(*args, **kwargs)

        def elsewhere(x) -> bool:
            return on_another_mesh(x, mesh) or explicitly_sharded(x)

        def each(arg):  # an argument holding no such array stays the object it was (a dict keeps its order)
            if not any(map(elsewhere, jax.tree.leaves(arg, is_leaf=_unread))):
                return arg
            return jax.tree.map(lambda x: jax.device_put(x, onto) if elsewhere(x) else x, arg, is_leaf=_unread)

        return fn(*map(each, args), **{k: each(v) for k, v in kwargs.items()})

    return wrapped


def inside_inputs_mesh(fn: Callable) -> Callable:
    """fn run under jax.set_mesh of the mesh its arguments' arrays are typed with (the first with an Explicit axis: a
    batch drawn under jax.set_mesh, after leaving it), where no mesh is current and an argument has one. Outside that
    mesh, JAX refuses to differentiate eagerly (not jitted) a function of such an array, split or replicated (a
    ValueError asking for jax.set_mesh); inside it, fn runs as in the mesh the batch was drawn in. Such an array closed
    over by a function the user jits has to be inside the mesh already: a ValueError says how (jax.set_mesh is refused
    inside jax.jit)."""

    @wraps(fn)
    def wrapped(*args, **kwargs):
        mesh = _inputs_mesh((args, kwargs)) if jax.sharding.get_abstract_mesh().empty else None
        if mesh is None:
            return fn(*args, **kwargs)
        if isinstance(jnp.zeros(()), jax.core.Tracer):  # being traced: a concrete array here is a jitted closure's
            raise ValueError(f"{fn.__name__}: an array on a mesh with Explicit axes (a batch drawn under "
                             f"jax.set_mesh) is closed over by a jitted function called outside that mesh, where JAX "
                             f"cannot place the program; call the jitted function inside `with jax.set_mesh(mesh)`, "
                             f"or pass the array to it as an argument")
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def in_tokens_mesh(fn: Callable) -> Callable:
    """fn(tokens) of one prompt traced in the mesh tokens are typed with, where that mesh has an Explicit axis
    and no mesh is current: a prompt of a batch drawn under jax.set_mesh, vmapped after leaving the mesh, carries it,
    and JAX refuses the operations whose output sharding it cannot tell without one (an array made in fn updated or
    carried with the prompt's values: "Resource axis: data ... is not found in mesh", "Use .at[...].set(out_sharding=)
    ..."). There fn runs jitted, as the mesh it is traced in names no devices an eager operation could run on. The
    baselines' predictors take their prompts through it, as the model's forward pass does (on_mesh_of)."""
    jitted = jax.jit(fn)

    @wraps(fn)
    def wrapped(tokens):
        mesh = jax.typeof(tokens).sharding.mesh
        if AxisType.Explicit not in mesh.axis_types or not jax.sharding.get_abstract_mesh().empty:
            return fn(tokens)
        with jax.sharding.use_abstract_mesh(mesh):
            return jitted(tokens)

    return wrapped


def _unread(x) -> bool:
    """Whether x is an iterator (names given by a generator): a leaf for replicated_inputs, not read, where JAX warns
    that it will refuse one."""
    return isinstance(x, Iterator)


def _replication_mesh(tree) -> tuple[jax.sharding.AbstractMesh | None, P | NamedSharding | None]:
    """(mesh, the replicated sharding on it) for replicated_inputs: the current mesh (jax.set_mesh; a bare
    PartitionSpec names it, also while tracing, where its devices cannot be asked for), else _inputs_mesh(tree), else
    (None, None)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh, P()
    explicit = _inputs_mesh(tree)
    return (None, None) if explicit is None else (explicit.abstract_mesh, NamedSharding(explicit, P()))


def _inputs_mesh(tree) -> jax.sharding.Mesh | None:
    """The first mesh with an Explicit axis that an array of tree is typed with, else None."""
    for x in jax.tree.leaves(tree, is_leaf=_unread):
        if (mesh := _explicit_mesh(x)) is not None:
            return mesh
    return None


def _explicit_mesh(x) -> jax.sharding.Mesh | None:
    """The mesh x is typed with, where it has an Explicit axis (a batch drawn under jax.set_mesh); else None, also
    for a traced array."""
    sharding = getattr(x, "sharding", None)  # None for a traced array
    if isinstance(sharding, NamedSharding) and AxisType.Explicit in sharding.mesh.axis_types:
        return sharding.mesh
    return None
