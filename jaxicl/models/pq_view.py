"""The (P, Q) view of linear self-attention (von Oswald et al. 2023; Ahn et al. 2023).

In that notation head h of a layer updates token e_j by P_h (sum_i e_i e_i^T) Q_h e_j / (T - 1),
with P_h = (wv_h wo_h)^T and Q_h = wk_h wq_h^T in the row-vector weights of SelfAttention.
`from_pq` builds weights with key_size = D, wq = Q^T, wk = I, wv = P^T, wo = I, so
`to_pq(from_pq(P, Q)) == (P, Q)` and `from_pq(*to_pq(m), residual=m.residual, mask=m.mask)` computes the same
function as m (P and Q hold neither: from_pq's defaults, residual=True and mask="none", are another model otherwise).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicl.models.attention import SelfAttention
from jaxicl.prng import seed_key


def to_pq(model: SelfAttention) -> tuple[jax.Array, jax.Array]:
    """P, Q: [L, H, D, D] of a linear SelfAttention."""
    if model.kind != "linear":
        raise ValueError(f"the (P, Q) view needs kind='linear', got kind={model.kind!r}")
    p = jnp.stack([jnp.einsum("hdk,hke->hed", l.wv[...], l.wo[...]) for l in model.layers])
    q = jnp.stack([jnp.einsum("hdk,hek->hde", l.wk[...], l.wq[...]) for l in model.layers])
    return p, q


def from_pq(p: jax.Array, q: jax.Array, *, residual: bool = True, mask: str = "none") -> SelfAttention:
    """A linear SelfAttention with the given P, Q: [L, H, D, D], its parameters in their (promoted) dtype."""
    if p.shape != q.shape or p.ndim != 4 or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"P and Q must both be [L, H, D, D]; got {p.shape} and {q.shape}")
    num_layers, num_heads, dim, _ = p.shape
    model = SelfAttention(dim, num_layers=num_layers, num_heads=num_heads, kind="linear",
                          residual=residual, mask=mask, rngs=nnx.Rngs(seed_key(0)))
    dtype = jnp.result_type(p, q)
    eye = jnp.broadcast_to(jnp.eye(dim, dtype=dtype), (num_heads, dim, dim))
    for layer, p_l, q_l in zip(model.layers, jnp.asarray(p, dtype), jnp.asarray(q, dtype)):
        # new Params: writing into the initial ones ([...] =) would cast to their dtype (the default float type)
        layer.wq = nnx.Param(jnp.swapaxes(q_l, -1, -2))
        layer.wk = nnx.Param(eye)
        layer.wv = nnx.Param(jnp.swapaxes(p_l, -1, -2))
        layer.wo = nnx.Param(eye)
    return model
