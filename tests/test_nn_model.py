import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxicl.models import apply, predictor
from jaxicl.models.nearest_neighbor_attention import NearestNeighborAttention
from jaxicl.models.softmax import softmax
from jaxicl.tasks import nearest_neighbor as nn
from jaxicl.tasks import sample_batch
from jaxicl.theory.nearest_neighbor import from_reduced


def _numpy_layer(w: np.ndarray, tokens: np.ndarray, dim: int, label_dim: int) -> np.ndarray:
    """Brute force: the whole f(H) = H softmax(H^T W H) (softmax per column), then its label rows, query column."""
    h = np.asarray(tokens, np.float64).T  # [D, T]
    t = h.shape[1]
    f = np.zeros_like(h)
    for i in range(t):
        scores = np.array([h[:, j] @ w @ h[:, i] for j in range(t)])
        p = np.exp(scores - scores.max())
        f[:, i] = h @ (p / p.sum())
    return f[dim:dim + label_dim, -1]


@pytest.mark.parametrize("parametrisation,num_classes", [("merged", 2), ("separate", 2), ("separate", 3)])
def test_forward_matches_the_full_matrix_formula(x64, parametrisation, num_classes):
    cfg = nn.NearestNeighbor(dim=3, n_context=5, num_classes=num_classes)
    model = NearestNeighborAttention(3, cfg.label_dim, parametrisation=parametrisation, init="random",
                                     init_scale=0.7, key_size=4 if parametrisation == "separate" else None,
                                     rngs=nnx.Rngs(0))
    model = jax.tree.map(lambda a: a.astype(jnp.float64), model)
    b = sample_batch(nn.sample, cfg, jax.random.key(1), 6)
    w = (np.asarray(model.w[...]) if parametrisation == "merged"  # W = W_K^T W_Q, from the parameters
         else np.asarray(model.wk[...]).T @ np.asarray(model.wq[...]))
    for p in range(6):
        expected = _numpy_layer(w, b.inputs[p], 3, cfg.label_dim)
        out = np.asarray(model(b.inputs[p]))
        np.testing.assert_allclose(np.atleast_1d(out[-1]), expected, rtol=1e-10)
        np.testing.assert_array_equal(out[:-1], 0.0)  # only the query is predicted


@pytest.mark.parametrize("float64", [False, True])
def test_paper_init_in_both_parametrisations_is_diag_minus_sigma(float64):
    """To float32 rounding, and under x64 to float64 rounding (the separate init's sqrt(sigma) was float32 there)."""
    expected = np.zeros((6, 6))
    expected[-1, -1] = -3.0
    with jax.enable_x64(float64):
        for parametrisation in ("merged", "separate"):
            model = NearestNeighborAttention(4, parametrisation=parametrisation, sigma=3.0, rngs=nnx.Rngs(0))
            np.testing.assert_allclose(model.merged(), expected, rtol=1e-15 if float64 else 1e-6)


def test_huge_scores_stay_finite_and_give_hard_1nn():
    p = softmax(jnp.array([1e30, 3e4, -1e30, 1e30]))
    np.testing.assert_allclose(p, [0.5, 0.0, 0.0, 0.5])
    cfg = nn.NearestNeighbor(dim=4, n_context=8, distribution="shifted")
    model = NearestNeighborAttention(4, rngs=nnx.Rngs(0))
    g, params = nnx.split(model)
    params["w"].set_value(from_reduced(1e4, 3e4, 4))  # scores of order 1e4: exp would overflow unshifted
    b = sample_batch(nn.sample, cfg, jax.random.key(2), 64)
    pred = jax.vmap(predictor(g, params))(b.inputs)
    assert np.all(np.isfinite(pred))
    np.testing.assert_allclose(pred, b.targets, atol=1e-6)  # margin delta: the 1-NN label exactly


def test_sites_capture_scores_weights_and_out():
    model = NearestNeighborAttention(3, init="random", init_scale=0.5, rngs=nnx.Rngs(3))
    g, params = nnx.split(model)
    b = sample_batch(nn.sample, nn.NearestNeighbor(dim=3, n_context=4), jax.random.key(4), 1)
    tokens = b.inputs[0]
    pred, rec = apply(g, params, tokens, capture="all")
    assert set(rec) == {"attn.scores", "attn.weights", "attn.out"}
    assert rec["attn.scores"].shape == (5,) and rec["attn.out"].shape == (5,)
    np.testing.assert_allclose(rec["attn.weights"].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(rec["attn.out"][3], pred[-1], rtol=1e-6)
    # an edit at attn.weights (all mass on context token 0) changes the prediction to its label
    one_hot = lambda w: jnp.zeros_like(w).at[0].set(1.0)  # noqa: E731
    edited, _ = apply(g, params, tokens, edits={"attn.weights": one_hot})
    np.testing.assert_allclose(edited[-1], tokens[0, 3])
    with pytest.raises(KeyError):
        apply(g, params, tokens, capture=["attn.nope"])


@pytest.mark.parametrize("num_classes", [2, 3])
def test_the_paper_loss_is_half_the_squared_error_at_the_query(num_classes):
    from jaxicl.train import regression_loss

    cfg = nn.NearestNeighbor(dim=3, n_context=5, num_classes=num_classes)
    g, params = nnx.split(NearestNeighborAttention(3, cfg.label_dim, init="random", rngs=nnx.Rngs(5)))
    b = sample_batch(nn.sample, cfg, jax.random.key(6), 32)
    pred = np.asarray(jax.vmap(predictor(g, params))(b.inputs))[:, -1].reshape(32, -1)
    expected = 0.5 * np.mean(np.sum((pred - np.asarray(b.targets)[:, -1].reshape(32, -1)) ** 2, -1))  # Eq. 2.5
    loss, _ = regression_loss(g, coords="sum", scale=0.5)(params, b)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)  # float32 sums in two orders
