"""Linear probes: closed-form ridge regression from activations to a quantity, scored on a held-out split."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.mesh_placement import replicated_inputs
from jaxicl.prng import seed_key
from jaxicl.ridge import check_lam, ridge_solve
from jaxicl.validation import check_real


def ridge_fit(x: jax.Array, y: jax.Array, lam: float = 1e-3, standardise: bool = False) -> jax.Array:
    """[F + 1] or [F + 1, K] weights (bias last) of argmin |x w + b - y|^2 + lam |w|^2 for x [N, F], y [N] or [N, K]
    (the bias is not penalised). Solved (ridge_solve, through a QR factorisation; lam 0: the minimum-norm
    least-squares weights) on x and y centred on their means, with b = ybar - xbar w: the same minimiser, without
    cancellation where the features share a large offset. standardise: the penalty acts on the features scaled to
    unit standard deviation over these rows (a constant feature unscaled), so it bites alike whatever the features'
    scale; the weights returned still apply to x as given."""
    check_lam(lam)  # here: inside the compiled fit lam is traced, unchecked
    return _ridge_fit(x, y, lam, standardise)


@partial(jax.jit, static_argnames="standardise")
def _ridge_fit(x: jax.Array, y: jax.Array, lam: float, standardise: bool) -> jax.Array:
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    std = xc.std(0)
    scale = jnp.where(std > 0, std, 1.0) if standardise else jnp.ones_like(x_mean)
    xs = xc / scale
    w = ridge_solve(xs, yc, lam) / scale.reshape(-1, *[1] * (y.ndim - 1))  # per feature: a row of w [F] or [F, K]
    return jnp.concatenate([w, (y_mean - x_mean @ w)[None]])


def ridge_predict(w: jax.Array, x: jax.Array) -> jax.Array:
    """[N] or [N, K] predictions x w + b of ridge_fit's weights w [F + 1] or [F + 1, K] (bias last) for x [N, F]."""
    return x @ w[:-1] + w[-1]


@replicated_inputs
def probe(features: jax.Array, targets: jax.Array, *, lam: float = 1e-3, test_fraction: float = 0.25,
          key: jax.Array | None = None, held_out: jax.Array | None = None, standardise: bool = False) -> dict:
    """A ridge probe from features [N, F] to targets: [N] or [N, K] floats (R^2 on the held-out split, averaged
    over K; a column constant there scores 1 where predicted exactly, else 0) or [N] ints or bools (classes: one-hot
    regression, accuracy of the argmax). Returns {"score", "train_score", "weights", "metric"}: weights as ridge_fit's
    (bias last: [F + 1] for [N] floats, [F + 1, K] for [N, K] floats or K classes; ridge_predict takes them); score is
    the metric ("r2" or "accuracy") on the held-out prompts: a random split by key (default key 0), or the rows where
    held_out [N] is True (e.g. whole board positions, so the probe must generalise across them); standardise as
    ridge_fit's (on the training rows). Fits in float64 under jax x64, else float32. Complex features or targets are
    refused (the fit is real): give their real and imaginary parts as real columns."""
    check_real("features", features)
    check_real("targets", targets)
    features = jnp.asarray(features, float)
    targets = jnp.asarray(targets)
    if targets.dtype == bool:  # a yes/no feature is two classes, scored by accuracy, not a regression on 0 and 1
        targets = targets.astype(jnp.int32)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, F] (one row per example; select a position or flatten first), got "
                         f"shape {features.shape}")
    classes = bool(jnp.issubdtype(targets.dtype, jnp.integer))
    if targets.ndim not in ((1,) if classes else (1, 2)):
        raise ValueError(f"targets must be [N] class labels (ints or bools) or [N] / [N, K] floats, got shape "
                         f"{targets.shape} {targets.dtype}")
    n = features.shape[0]
    if targets.shape[0] != n:
        raise ValueError(f"features and targets need the same number of rows, got {n} and {targets.shape[0]}")
    check_lam(lam)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if held_out is not None:
        held_out = np.asarray(held_out, bool)
        if held_out.shape != (n,) or held_out.all() or not held_out.any():
            raise ValueError(f"held_out must be a [{n}] boolean mask with rows on both sides")
        test, train = np.flatnonzero(held_out), np.flatnonzero(~held_out)
    else:
        if n < 2:
            raise ValueError(f"features: a probe needs at least 2 rows (one to fit, one to score), got {n}")
        order = jax.random.permutation(seed_key(0) if key is None else key, n)
        n_test = min(max(int(round(test_fraction * n)), 1), n - 1)  # at least one row on each side
        test, train = order[:n_test], order[n_test:]
    if classes and int(targets.min()) < 0:
        raise ValueError(f"targets: class labels must be integers 0, 1, ..., got {int(targets.min())}; relabel them "
                         f"(np.unique(targets, return_inverse=True)[1])")
    n_classes = int(targets.max()) + 1 if classes else 0
    w, test_score, train_score = _fit_and_score(features, targets, jnp.asarray(train), jnp.asarray(test), lam,
                                                n_classes, standardise)
    w = w[:, 0] if targets.ndim == 1 and not classes else w  # [F + 1, 1] broadcast against targets [N] to [N, N]
    return {"score": float(test_score), "train_score": float(train_score), "weights": np.asarray(w),
            "metric": "accuracy" if classes else "r2"}


@partial(jax.jit, static_argnums=(5, 6))
def _fit_and_score(features, targets, train, test, lam, n_classes: int, standardise: bool):
    """(weights, held-out score, train score) of probe: one compiled program per shape (n_classes 0: regression)."""
    n = features.shape[0]
    y = jax.nn.one_hot(targets, n_classes, dtype=features.dtype) if n_classes else \
        targets.reshape(n, -1).astype(features.dtype)
    w = _ridge_fit(features[train], y[train], lam, standardise)

    def score(idx):
        pred = ridge_predict(w, features[idx])
        if n_classes:
            return jnp.mean(jnp.argmax(pred, -1) == targets[idx])
        resid = jnp.sum((pred - y[idx]) ** 2, 0)
        total = jnp.sum((y[idx] - y[idx].mean(0)) ** 2, 0)
        # a column constant on these rows has no variance to explain: 1 for an exact prediction, else 0 (as
        # scikit-learn's r2_score), not a division by ~0
        constant = jnp.ptp(y[idx], 0) == 0
        r2 = 1 - resid / jnp.where(constant, 1.0, total)
        return jnp.mean(jnp.where(constant, (resid == 0).astype(r2.dtype), r2))

    return w, score(test), score(train)
