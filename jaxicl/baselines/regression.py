"""Classical in-context regressors with the model's call signature: tokens [T, D] -> predictions [T].

Each predictor decodes the (x, y) pairs of a linear-regression prompt and predicts pair j from
pairs 0..j-1 only, i.e. at every prefix; predictions sit at the task's prediction positions and
are 0 elsewhere. All are differentiable in the tokens, so input sensitivities can be compared, and jitted: a call
eager, vmapped or differentiated compiles once per shape, then reuses the program. One prompt each,
tokens [cfg.seq_len, cfg.dim + 1] (a batch [B, T, D] or a prompt of another shape raises ValueError; jax.vmap them
over a batch). Where the shapes agree (paired n_context 8 and interleaved n_context 4 are both [9, dim + 1]) a prompt
of the other format cannot be told apart and gives wrong predictions.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxicl.mesh_placement import in_tokens_mesh
from jaxicl.prompt import check_one_prompt
from jaxicl.ridge import ridge_solve
from jaxicl.tasks import linear_regression as lr_task
from jaxicl.validation import check_integer, check_positive

Predictor = Callable[[jax.Array], jax.Array]
Fit = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x [n, d], y [n], weights [n]) -> w [d]
PrefixFit = Callable[[jax.Array, jax.Array], jax.Array]  # (x [n, d], y [n]) -> w [n, d], row j fit on pairs i < j


def least_squares(cfg: lr_task.LinearRegression) -> Predictor:
    """Minimum-norm least squares on each prefix."""
    return _per_prefix(cfg, lambda x, y, m: jnp.linalg.pinv(x * m[:, None]) @ (y * m), "least_squares")


def ridge(cfg: lr_task.LinearRegression, lam: float) -> Predictor:
    """argmin_w sum_i (<w, x_i> - y_i)^2 + lam |w|^2 on each prefix (lam = noise_var / w_var is Bayes-optimal),
    solved by ridge_solve's QR: on prefixes shorter than d, X^T X + lam I is singular up to lam, and the normal
    equations gave NaN or wrong predictions in float32 at small lam. On a batch split over a mesh's "data" axis
    (drawn under jax.set_mesh) JAX refuses the vmapped QR, inside the mesh and after it ("select `which` must be
    scalar or have the same sharding as cases": its lowering selects between an unsplit mask and the split batch):
    vmap it over the batch replicated, jax.device_put(batch, NamedSharding(mesh, P()))."""
    check_positive("lam", lam)
    return _per_prefix(cfg, lambda x, y, m: ridge_solve(x * m[:, None], y * m, lam), "ridge")


def gradient_descent(cfg: lr_task.LinearRegression, steps: int, lr: float) -> Predictor:
    """GD-k: `steps` steps of size lr from w = 0 on (1 / 2n) sum_{i<j} (<w, x_i> - y_i)^2, n = max(j, 1): the pairs
    before position j as the prompt holds them, padding included, so on a prompt of k pairs padded to n_context the
    step is lr * k / n_context of GD-k's on the k pairs alone (experiments.common.gd_sweep.padded_gd_lr scales lr
    back)."""
    check_integer("steps", steps)  # a float 2.5 ran 2 steps, 0.5 none
    check_positive("steps", steps)
    if not isinstance(lr, jax.core.Tracer):  # a sweep member's lr is traced
        check_positive("lr", lr)

    def fit(x, y, m):
        n = jnp.maximum(m.sum(), 1.0)

        def step(w, _):
            return w - lr * ((x @ w - y) * m) @ x / n, None

        return jax.lax.scan(step, jnp.zeros(x.shape[1], x.dtype), None, length=steps)[0]

    return _per_prefix(cfg, fit, "gradient_descent")


def _per_prefix(cfg: lr_task.LinearRegression, fit: Fit, name: str) -> Predictor:
    """The predictor that fits each prefix by `fit` (name: the baseline, for errors)."""
    def fit_prefixes(x, y):
        return jax.vmap(lambda m: fit(x, y, m.astype(x.dtype)))(prefix_mask(x.shape[0]))

    return _prefix_predictor(cfg, fit_prefixes, name)


def prefix_mask(n: int) -> jax.Array:
    """[n, n] bool, [j, i]: pair i is in prefix j (i < j)."""
    return jnp.arange(n)[None, :] < jnp.arange(n)[:, None]


def _prefix_predictor(cfg: lr_task.LinearRegression, fit_prefixes: PrefixFit, name: str) -> Predictor:
    """The predictor of pair j by <w_j, x_j>, w = fit_prefixes(x, y) [n, d] (name: the baseline, for errors): the shape
    checked, then a jitted function (unjitted, GD-k's lax.scan, whose step is a new closure at each call, compiled
    again at every eager call)."""
    tokens_of = "n_context + 1" if cfg.format == "paired" else "2 n_context + 1"
    fields = (f"{tokens_of} = {cfg.seq_len} tokens of x {cfg.dim} + y 1 for format={cfg.format!r}, "
              f"n_context={cfg.n_context}, dim={cfg.dim}")

    @jax.jit
    def predictions(tokens: jax.Array) -> jax.Array:
        x, y = lr_task.decode(cfg, tokens)
        return lr_task.at_positions(cfg, jnp.einsum("jd,jd->j", fit_prefixes(x, y), x))

    @in_tokens_mesh
    def predict(tokens: jax.Array) -> jax.Array:
        check_one_prompt(name, tokens, cfg.token_dim, fields, length=cfg.seq_len)
        return predictions(tokens)

    return predict
