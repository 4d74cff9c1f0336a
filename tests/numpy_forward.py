"""float64 numpy pieces of the models' forward passes, for tests that check a model against its docstring."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.special import erf


def f64(v) -> np.ndarray:
    """A parameter (or array) as float64 numpy."""
    return np.asarray(v[...], np.float64)


def layer_norm(x: np.ndarray, norm) -> np.ndarray:
    """LayerNorm over the last axis with the module norm's scale and bias (eps 1e-5)."""
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * f64(norm.scale) + f64(norm.bias)


def linear(x: np.ndarray, layer) -> np.ndarray:
    """x [..., in] @ layer.w (+ layer.bias where it has one)."""
    return x @ f64(layer.w) + (0.0 if layer.bias is None else f64(layer.bias))


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    """Unmasked softmax attention: q [Tq, H * dh], k, v [Tk, H * dh] -> [Tq, H * dh], scores / sqrt(dh)."""
    q, k, v = (y.reshape(len(y), heads, -1) for y in (q, k, v))
    s = np.einsum("qhe,khe->hqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hqk,khe->qhe", w / w.sum(-1, keepdims=True), v).reshape(len(q), -1)


def gelu(u: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU."""
    return 0.5 * u * (1 + erf(u / np.sqrt(2)))


def with_random_params(model, key: jax.Array):
    """model with every nnx.Param redrawn N(0, 1) in float64 (other state kept), so that every bias, LayerNorm scale
    and position table matters to the output."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape, jnp.float64)
                                                            for k, p in zip(keys, leaves)]), rest)
