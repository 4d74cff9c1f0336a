"""Every model used as a pure function of (graphdef, params, tokens), with captures and edits.

`apply` is the one forward pass of every jaxicl model (jaxicl.models.base.Model); `predictor` adds the
model's declared readout, giving the baselines' signature tokens [T, D] -> predictions [T] (or [T, K]).
"""

from collections.abc import Callable, Iterable

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxicl.sites import Patch, run_with_sites


def apply(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, *,
          capture: Iterable[str] | str = (), edits: dict[str, Callable] | None = None, patch: Patch | None = None):
    """Forward pass of one prompt: tokens [T, D] (or [T] token ids) -> (outputs, {site: value}).

    edits: {site: callable}; patch: edits as data (jaxicl.sites.Patch). Pure: safe under jit, vmap (over
    prompts, parameters or patches) and grad. Params on a mesh other than the tokens' are replicated on theirs first
    (on_mesh_of).
    """
    return run_with_sites(nnx.merge(graphdef, on_mesh_of(tokens, params)), tokens, capture=capture, edits=edits,
                          patch=patch)


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


def predictor(graphdef: nnx.GraphDef, params: nnx.State) -> Callable[[jax.Array], jax.Array]:
    """The model as an in-context predictor tokens [T, D] -> predictions (its readout of apply's outputs)."""
    readout = nnx.merge(graphdef, params).readout
    return lambda tokens: readout(apply(graphdef, params, tokens)[0])
