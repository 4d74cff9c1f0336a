"""One softmax attention layer with identity value (Li et al. 2024): the model that learns 1-NN.

On tokens h_1..h_{N+1} (rows of `tokens` [T, D], T = N + 1, the query last; see
jaxicl.tasks.nearest_neighbor) the layer is f(H) = H softmax(H^T W H) with W = W_K^T W_Q, the
softmax taken over keys for each query column. Only the query column is ever read: the
prediction is its label rows, y_hat = sum_j q_j y_j with q = softmax_j(h_j^T W h_{N+1}) over all
N + 1 tokens (the query attends to itself; its label slot is 0). So the forward pass computes
that column only.

Parametrisations: "merged" holds W [D, D]; "separate" holds W_K, W_Q [key_size, D].
Initialisations: "paper" W = diag(0, ..., 0, -sigma) (separate: W_K = diag(0, .., sqrt sigma),
W_Q = diag(0, .., -sqrt sigma)); "random" i.i.d. N(0, init_scale^2) entries of W (or W_K, W_Q).

Named sites (see jaxicl.sites):
  attn.scores   [T]  h_j^T W h_query for every token j
  attn.weights  [T]  max-subtracted softmax of the scores
  attn.out      [D]  the query column of f(H), i.e. sum_j weights_j h_j
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicl.models.base import Model, check_prompt
from jaxicl.models.softmax import softmax
from jaxicl.sites import null_sites
from jaxicl.validation import ConfigError, check_choice, check_positive, check_size

PARAMETRISATIONS = ("merged", "separate")
INITS = ("paper", "random")


class NearestNeighborAttention(Model):
    """Call on tokens [T, D] -> predictions [T, L] (label_dim L; [T] when L = 1): the query's at the last
    position, 0 elsewhere (the predictor signature of jaxicl.baselines). Trained with
    regression_loss(graphdef, coords="sum", scale=0.5): the paper's 1/2 squared error at the query (Eq. 2.5)."""

    def __init__(self, dim: int, label_dim: int = 1, *, parametrisation: str = "merged", init: str = "paper",
                 sigma: float = 3.0, init_scale: float = 1.0, key_size: int | None = None, rngs: nnx.Rngs):
        check_size("dim", dim)
        check_size("label_dim", label_dim)
        check_choice("parametrisation", parametrisation, PARAMETRISATIONS)
        check_choice("init", init, INITS)
        check_positive("sigma", sigma, allow_zero=True)
        check_positive("init_scale", init_scale, allow_zero=True)
        self.dim, self.label_dim, self.parametrisation = dim, label_dim, parametrisation
        size = dim + label_dim + 1
        if key_size is not None and parametrisation == "merged":  # was ignored: W is [D, D]
            raise ConfigError(f"key_size={key_size} sizes W_K and W_Q of parametrisation='separate'; "
                              f"parametrisation='merged' holds W [D, D]: leave key_size=None")
        key_size = size if key_size is None else key_size
        check_size("key_size", key_size)
        if parametrisation == "merged":
            w = (jnp.zeros((size, size)).at[-1, -1].set(-sigma) if init == "paper"
                 else init_scale * jax.random.normal(rngs.params(), (size, size)))
            self.w = nnx.Param(w)
        elif init == "paper":
            root = jnp.sqrt(jnp.asarray(sigma, float))  # float64 under x64, like the merged W
            self.wk = nnx.Param(jnp.zeros((key_size, size)).at[-1, -1].set(root))
            self.wq = nnx.Param(jnp.zeros((key_size, size)).at[-1, -1].set(-root))
        else:
            self.wk = nnx.Param(init_scale * jax.random.normal(rngs.params(), (key_size, size)))
            self.wq = nnx.Param(init_scale * jax.random.normal(rngs.params(), (key_size, size)))

    def merged(self) -> jax.Array:
        """W = W_K^T W_Q [D, D]."""
        if self.parametrisation == "merged":
            return self.w[...]
        return self.wk[...].T @ self.wq[...]

    def site_axes(self, name: str, ndim: int) -> tuple[str, ...]:
        """Only the query column is computed, so no site has a position axis: scores and weights run over the keys,
        attn.out over the token's features."""
        return ("dim",) if name == "attn.out" else ("key",)

    def __call__(self, tokens: jax.Array, sites=null_sites) -> jax.Array:
        check_prompt(tokens, self.dim + self.label_dim + 1,
                     f"tokens [x; y; 0] (dim={self.dim} + label_dim={self.label_dim} + 1)")
        scores = sites("attn.scores", tokens @ (self.merged() @ tokens[-1]))
        weights = sites("attn.weights", softmax(scores))
        out = sites("attn.out", weights @ tokens)
        labels = out[self.dim:self.dim + self.label_dim]
        labels = labels[0] if self.label_dim == 1 else labels
        return jnp.zeros((tokens.shape[0], *labels.shape), labels.dtype).at[-1].set(labels)

