"""Convergence and dimensionality metrics against numpy loops and planted structure."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxicl.analysis.convergence import (cross_board_distance, mean_pairwise_distance, participation_ratio, unit,
                                         within_board_ratio)
from jaxicl.numeric import ratio_or_nan


def _u(v):
    return v / np.linalg.norm(v)


def test_cross_board_distance_is_the_official_unit_distance_over_board_pairs():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(5, 9, 4))
    want = [np.mean([np.linalg.norm(_u(f[a, i]) - _u(f[b, i])) for a, b in itertools.combinations(range(5), 2)])
            for i in range(9)]
    np.testing.assert_allclose(cross_board_distance(jnp.asarray(f, jnp.float32)), want, rtol=1e-5)
    # rescaled copies: distance 0. Their float32 unit vectors agree to a few ulps (6e-8) per coordinate, so the
    # distance is ~ sqrt(D) * 1e-7 < 1e-6 for D <= 64 (the Gram identity left up to ~7e-4)
    for d in (4, 64):
        base = rng.normal(size=(1, 9, d))
        same = np.broadcast_to(base, (5, 9, d)) * rng.uniform(0.5, 2, (5, 1, 1))
        np.testing.assert_allclose(cross_board_distance(jnp.asarray(same, jnp.float32)), 0.0, atol=1e-6)
    # unit rows whatever the scale (small activations too), zero rows stay zero
    x = np.array([[3e-6, 4e-6], [300.0, -400.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(unit(jnp.asarray(x)), [[0.6, 0.8], [0.6, -0.8], [0.0, 0.0]], rtol=1e-6)


def test_distances_without_a_pair_are_nan_not_perfect_convergence():
    """One board, one row or zero weights leave no pair to average: NaN (0 would read as perfect convergence). A
    single weighted pair still gives its own distance (float32 norm of O(1) differences: rtol 1e-6)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    assert np.isnan(cross_board_distance(jnp.asarray(x[None]))).all()
    assert np.isnan(mean_pairwise_distance(jnp.asarray(x[:1])))
    assert np.isnan(mean_pairwise_distance(jnp.asarray(x), jnp.zeros((3, 3))))
    one_pair = np.zeros((3, 3), np.float32)
    one_pair[0, 2] = 1.0
    np.testing.assert_allclose(mean_pairwise_distance(jnp.asarray(x), jnp.asarray(one_pair)),
                               np.linalg.norm(x[0].astype(np.float64) - x[2]), rtol=1e-6)


def test_ratio_or_nan_divides_where_the_denominator_is_positive_and_is_nan_elsewhere():
    """Broadcast num / den where den > 0 (integer counts give a float share), NaN at den 0, and a finite gradient
    there (0: the value is the constant NaN), not the 0 * inf of a bare division. 1/2, 3/4 and 1/4 are exact in
    float32."""
    got = ratio_or_nan(jnp.array([[1.0, 3.0], [2.0, 5.0]]), jnp.array([2.0, 0.0]))
    np.testing.assert_array_equal(got, [[0.5, np.nan], [1.0, np.nan]])
    share = ratio_or_nan(jnp.sum(jnp.array([True, True, True, False])), jnp.int32(4))
    assert share.dtype == jnp.float32 and share == 0.75
    grad = jax.grad(lambda n, d: ratio_or_nan(n, d), argnums=(0, 1))
    assert grad(1.0, 0.0) == (0.0, 0.0)
    assert grad(1.0, 2.0) == (0.5, -0.25)


def test_within_board_ratio_against_a_loop_and_a_planted_object():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(12, 5))
    obj = np.zeros(12, bool)
    obj[[1, 4, 5, 9]] = True
    d = lambda i, j: np.linalg.norm(_u(f[i]) - _u(f[j]))  # noqa: E731
    w = np.mean([d(i, j) for i, j in itertools.permutations(np.flatnonzero(obj), 2)])
    ob = np.mean([d(i, j) for i in np.flatnonzero(obj) for j in np.flatnonzero(~obj)])
    assert float(within_board_ratio(jnp.asarray(f, jnp.float32), jnp.asarray(obj))) == pytest.approx(w / ob, rel=1e-5)
    planted = f.copy()
    planted[obj] = f[1] + 0.01 * rng.normal(size=(4, 5))  # the object's cells converged
    assert float(within_board_ratio(jnp.asarray(planted, jnp.float32), jnp.asarray(obj))) < 0.05
    one_cell, every_cell = np.arange(12) == 3, np.ones(12, bool)  # no pair inside the object; no cell outside it
    for undefined in (one_cell, every_cell):
        assert np.isnan(float(within_board_ratio(jnp.asarray(f, jnp.float32), jnp.asarray(undefined))))


def test_participation_ratio_of_planted_low_rank_sets():
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.normal(size=(16, 3)))[0]  # an isotropic 3-dimensional set in 16 dimensions
    x = rng.normal(size=(20000, 3)) @ basis.T
    assert float(participation_ratio(jnp.asarray(x, jnp.float32))) == pytest.approx(3.0, rel=0.02)
    lam = np.array([4.0, 1.0, 1.0])  # anisotropic: (sum lambda)^2 / sum lambda^2 = 36 / 18
    y = (rng.normal(size=(20000, 3)) * np.sqrt(lam)) @ basis.T
    assert float(participation_ratio(jnp.asarray(y, jnp.float32))) == pytest.approx(2.0, rel=0.03)
    # weights select rows: the PR of a selected one-dimensional subset
    line = np.outer(rng.normal(size=500), basis[:, 0])
    both = np.concatenate([x[:500], line])
    sel = np.r_[np.zeros(500), np.ones(500)]
    assert float(participation_ratio(jnp.asarray(both, jnp.float32), jnp.asarray(sel))) == pytest.approx(1.0,
                                                                                                     abs=1e-4)
    cov = np.cov(x[:2000].T, bias=True)
    ev = np.linalg.eigvalsh(cov)
    assert float(participation_ratio(jnp.asarray(x[:2000], jnp.float32))) == pytest.approx(
        ev.sum() ** 2 / np.sum(ev**2), rel=1e-4)
    # no direction to count (it was 0 before, below the documented range): one row, no row, rows all zero
    for rows in (np.eye(1000)[0], np.zeros(1000)):
        assert np.isnan(float(participation_ratio(jnp.asarray(both, jnp.float32), jnp.asarray(rows))))
    assert np.isnan(float(participation_ratio(jnp.zeros((5, 3), jnp.float32))))


def test_probe_with_held_out_rows_scores_exactly_those_rows():
    from jaxicl.analysis.probes import probe

    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    position = rng.integers(0, 8, 400)
    y = (x @ rng.normal(size=6) > 0).astype(np.int32)
    held = position >= 6  # whole positions held out
    out = probe(x, y, held_out=held)
    w = out["weights"]
    pred = np.argmax(x[held] @ w[:-1] + w[-1], -1)
    assert out["score"] == pytest.approx(np.mean(pred == y[held])) and out["score"] > 0.9
    with pytest.raises(ValueError, match="rows on both sides"):
        probe(x, y, held_out=np.ones(400, bool))


def test_probe_r2_of_a_column_constant_on_the_held_out_rows_is_0_not_a_division_by_zero():
    """scikit-learn's r2_score convention: a column without variance on the scored rows scores 1 if predicted exactly,
    else 0; the other columns keep their R^2 (numpy's, from the probe's own weights)."""
    from jaxicl.analysis.probes import probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    held = np.arange(200) >= 150
    y = np.stack([x @ [1.0, -2.0, 0.5] + 0.3 * rng.normal(size=200), np.where(held, 0.0, rng.normal(size=200))], 1)
    out = probe(x, y.astype(np.float32), held_out=held)
    pred = x[held] @ out["weights"][:-1] + out["weights"][-1]
    r2 = 1 - np.sum((pred[:, 0] - y[held, 0]) ** 2) / np.sum((y[held, 0] - y[held, 0].mean()) ** 2)
    assert out["score"] == pytest.approx((r2 + 0.0) / 2, rel=1e-5) and r2 > 0.9
    zeros = np.stack([y[:, 0], np.zeros(200)], 1).astype(np.float32)  # all-zero targets: fit and predicted exactly
    exact = probe(x, zeros, held_out=held)
    assert np.all(exact["weights"][:, 1] == 0)
    pred = x[held] @ exact["weights"][:-1, 0] + exact["weights"][-1, 0]
    r2 = 1 - np.sum((pred - y[held, 0]) ** 2) / np.sum((y[held, 0] - y[held, 0].mean()) ** 2)
    assert exact["score"] == pytest.approx((r2 + 1.0) / 2, rel=1e-5)


def test_probe_refuses_complex_features_and_targets_and_fits_their_real_and_imaginary_parts():
    """An autoregressive model's sites are complex: cast to float, purely imaginary features became 0 and the probe
    scored R^2 -0.005 on a target exactly linear in them, with only a ComplexWarning."""
    from jaxicl.analysis.probes import probe

    z = 1j * np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    t = 2.0 * z[:, 0].imag
    for name, args in (("features", (z, t)), ("targets", (z.imag, 1j * t))):
        with pytest.raises(ValueError, match=re.escape(f"{name} must be real, got complex64: this real-valued "
                                                       f"computation would drop the imaginary part")):
            probe(*args)
    # the suggested features: t is exactly linear in them (the ridge penalty 1e-3 against 150 rows of unit variance
    # shrinks the weight by about 1e-5)
    assert probe(np.concatenate([z.real, z.imag], -1), t)["score"] > 0.999


def test_perturbation_distances_start_at_alpha_and_follow_a_two_run_computation():
    import jax
    from flax import nnx

    from jaxicl.analysis.perturbation import perturbation_distances, perturbed_outputs
    from jaxicl.models import apply
    from jaxicl.models.factor_transformer import FactorTransformer
    from jaxicl.sites import Patch

    model = FactorTransformer(d_model=16, d_pos=8, n_layers=2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (3, 64), 0, 21)
    cells = np.zeros((3, 64), bool)
    cells[:, 10:19] = True
    sites = ["layer0.resid_post", "layer1.resid_post", "unembed.in"]
    d = np.asarray(perturbation_distances(graphdef, params, tokens, "layer0.resid_post", jnp.asarray(cells), 0.3,
                                          jax.random.key(1), sites))
    assert d[0] == pytest.approx(0.3, rel=1e-5)  # at the perturbed site: alpha by construction
    with pytest.raises(ValueError, match=r"cells must be a \[B, T\] = \[3, 64\] mask"):  # [T] would broadcast
        perturbation_distances(graphdef, params, tokens, "layer0.resid_post", jnp.asarray(cells[0]), 0.3,
                               jax.random.key(1), sites)
    with pytest.raises(ValueError, match=r"must be \[T, D\] sites.*layer0.attn.weights"):
        perturbation_distances(graphdef, params, tokens, "layer0.resid_post", jnp.asarray(cells), 0.3,
                               jax.random.key(1), ["layer0.attn.weights"])
    # an independent route: the clean and the perturbed run of each board, the same noise
    x = np.stack([apply(graphdef, params, t, capture=sites)[1]["layer0.resid_post"] for t in tokens])
    noise = np.asarray(jax.random.normal(jax.random.key(1), x.shape))
    delta = np.where(cells[..., None], noise * 0.3 * np.linalg.norm(x, axis=-1, keepdims=True)
                     / np.linalg.norm(noise, axis=-1, keepdims=True), 0.0)
    run = jax.jit(lambda t, dl: [apply(graphdef, params, t, capture=sites[1:], patch=Patch(
        deltas={"layer0.resid_post": dl}))[1][s] for s in sites[1:]])
    want = []
    for i in range(len(sites) - 1):
        rel = []
        for b in range(3):
            clean = run(tokens[b], jnp.zeros_like(jnp.asarray(delta[b], jnp.float32)))[i]
            pert = run(tokens[b], jnp.asarray(delta[b], jnp.float32))[i]
            rel.append(np.linalg.norm(np.asarray(pert - clean), axis=-1)[cells[b]] /
                       np.linalg.norm(np.asarray(clean), axis=-1)[cells[b]])
        want.append(np.mean(rel))
    np.testing.assert_allclose(d[1:], want, rtol=1e-4)
    zero = perturbation_distances(graphdef, params, tokens, "layer0.resid_post", jnp.asarray(cells), 0.0,
                                  jax.random.key(1), sites)
    np.testing.assert_allclose(np.asarray(zero), 0.0, atol=1e-6)
    # the outputs under the same noise: the independent route's perturbed runs, board by board (float32, two programs)
    out = np.asarray(perturbed_outputs(graphdef, params, tokens, "layer0.resid_post", jnp.asarray(cells), 0.3,
                                       jax.random.key(1)))
    edit = jax.jit(lambda t, dl: apply(graphdef, params, t, patch=Patch(deltas={"layer0.resid_post": dl}))[0])
    want = np.stack([edit(tokens[b], jnp.asarray(delta[b], jnp.float32)) for b in range(3)])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    clean = np.stack([apply(graphdef, params, t)[0] for t in tokens])
    assert np.abs(out - clean)[~cells].max() < np.abs(out - clean)[cells].max()  # the noise moved the outputs


def test_a_sweep_over_alpha_compiles_each_perturbation_function_once(backend_compiles):
    """Op by op, with a cache pass and two perturbed passes, a call took 4 ms for this model and 72 ms for a 4-layer
    one on 64 boards; one program of two passes (the clean one also reads x), 1.9 and 59 ms. The outputs' program
    runs the clean pass only up to the site."""
    import jax
    from flax import nnx

    from jaxicl.analysis.perturbation import perturbation_distances, perturbed_outputs
    from jaxicl.models.factor_transformer import FactorTransformer

    graphdef, params = nnx.split(FactorTransformer(d_model=16, d_pos=8, n_layers=2, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (5, 64), 0, 21)  # 5 boards: a shape no other test draws
    cells = jnp.asarray(np.random.default_rng(0).random((5, 64)) < 0.3)
    key = jax.random.key(1)
    sites = ["layer0.resid_post", "layer1.resid_post"]
    before = len(backend_compiles)
    for alpha in (0.2, 0.4, 0.6):
        d = perturbation_distances(graphdef, params, tokens, "layer0.resid_post", cells, alpha, key, sites)
        assert np.asarray(d)[0] == pytest.approx(alpha, rel=1e-5)  # at the perturbed site: alpha by construction
        perturbed_outputs(graphdef, params, tokens, "layer0.resid_post", cells, alpha, key)
    assert len(backend_compiles) - before == 2


def test_perturbation_distances_over_no_cells_are_nan_not_a_vanished_perturbation():
    """No cell selected leaves nothing to average: NaN at every site (0 read as the noise having vanished, the best
    attractor score). One cell still gives its own distance: alpha at the perturbed site."""
    import jax
    from flax import nnx

    from jaxicl.analysis.perturbation import perturbation_distances
    from jaxicl.models.factor_transformer import FactorTransformer

    graphdef, params = nnx.split(FactorTransformer(d_model=16, d_pos=8, n_layers=2, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 21)
    sites = ["layer0.resid_post", "layer1.resid_post", "unembed.in"]
    cells = np.zeros((2, 64), bool)
    none = np.asarray(perturbation_distances(graphdef, params, tokens, "layer0.resid_post", jnp.asarray(cells), 0.3,
                                             jax.random.key(1), sites))
    assert none.shape == (3,) and np.isnan(none).all()
    cells[1, 5] = True
    one = np.asarray(perturbation_distances(graphdef, params, tokens, "layer0.resid_post", jnp.asarray(cells), 0.3,
                                            jax.random.key(1), sites))
    assert one[0] == pytest.approx(0.3, rel=1e-5)  # float32 norms of the noise and of x at that cell
    assert np.isfinite(one).all()


def test_half_precision_perturbations_and_edits_stay_in_the_models_dtype():
    """float32 deltas (the noise drawn in the default dtype, a float32 steering vector) carried a bfloat16 model's
    edited run on in float32 past the site while its clean run stayed in bfloat16: distances of 3e-3 to 5e-3 at alpha
    0, float32 outputs. Deltas are cast to the site's dtype."""
    import jax
    from flax import nnx

    from jaxicl.analysis.cache import run_with_cache
    from jaxicl.analysis.perturbation import noise_at, perturbation_distances, perturbed_outputs
    from jaxicl.analysis.steering import edit_each_site
    from jaxicl.models import apply
    from jaxicl.models.factor_transformer import FactorTransformer
    from jaxicl.sites import Patch

    graphdef, params = nnx.split(FactorTransformer(d_model=16, d_pos=8, n_layers=2, rngs=nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    tokens = jax.random.randint(jax.random.key(0), (3, 64), 0, 21)
    rng = np.random.default_rng(0)
    cells = jnp.asarray(rng.random((3, 64)) < 0.2)
    sites = ["layer0.resid_post", "layer1.resid_post", "unembed.in"]
    zero = perturbation_distances(graphdef, params, tokens, "layer0.resid_mid", cells, 0.0, jax.random.key(1), sites)
    # the clean run is the perturbed program at alpha 0, on the same (zero) noise: one program, the same inputs
    np.testing.assert_array_equal(np.asarray(zero), 0.0)
    clean, cache = run_with_cache(graphdef, params, tokens, ["layer0.resid_mid"])
    assert clean.dtype == jnp.bfloat16
    # a numpy sweep's alpha (float64) as well: it promoted the noise to float32
    assert noise_at(cache["layer0.resid_mid"], cells, np.float64(0.3), jax.random.key(1)).dtype == jnp.bfloat16
    out = perturbed_outputs(graphdef, params, tokens, "layer0.resid_mid", cells, np.float64(0.3), jax.random.key(1))
    assert out.dtype == jnp.bfloat16
    # float32 deltas of a steering edit: the outputs as one patch per site with the deltas cast to bfloat16 first
    deltas = rng.normal(size=(2, 3, 64, 16)).astype(np.float32)
    got = edit_each_site(graphdef, params, tokens, sites[:2], cells, deltas=deltas)
    assert got.dtype == jnp.bfloat16
    for i, s in enumerate(sites[:2]):
        for b in range(3):
            d = jnp.where(cells[b][:, None], deltas[i, b], 0.0).astype(jnp.bfloat16)
            want = np.asarray(apply(graphdef, params, tokens[b], patch=Patch(deltas={s: d}))[0], np.float32)
            # two programs round bfloat16 apart by an ulp or two (2^-9 = 2e-3 at these logits, |.| < 0.5); the edit
            # moves them by about 0.3
            np.testing.assert_allclose(np.asarray(got[i, b], np.float32), want, atol=1e-2)
            assert np.abs(want - np.asarray(clean[b], np.float32)).max() > 0.1


def test_perturbed_outputs_rejects_a_site_not_per_cell_and_cells_not_per_prompt():
    """As perturbation_distances: the attention weights [H, T, T] (H = B = 2) took the [B, T] cells' noise on their
    head axis, changing prompt 1's outputs with no cell of it selected; a [T] mask would broadcast over the prompts."""
    import jax
    from flax import nnx

    from jaxicl.analysis.perturbation import perturbed_outputs
    from jaxicl.models.gpt import GPT

    graphdef, params = nnx.split(GPT(d_model=8, n_layers=1, n_heads=2, max_len=8, input_dim=1, rngs=nnx.Rngs(0)))
    tokens = jax.random.normal(jax.random.key(1), (2, 5, 1))
    cells = np.array([[True] * 5, [False] * 5])
    with pytest.raises(ValueError, match=re.escape("site must be [T, D] sites (a vector per cell, T = 5), got "
                                                   "{'layer0.attn.weights': (2, 5, 5)}")):
        perturbed_outputs(graphdef, params, tokens, "layer0.attn.weights", cells, 0.5, jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape("cells must be a [B, T] = [2, 5] mask (one row per prompt), got "
                                                   "[5]")):
        perturbed_outputs(graphdef, params, tokens, "layer0.resid_mid", cells[0], 0.5, jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape("site: unknown site name(s) ['layer1.resid_mid']")):
        perturbed_outputs(graphdef, params, tokens, "layer1.resid_mid", cells, 0.5, jax.random.key(0))


def test_the_convergence_measures_take_rows_split_over_a_data_mesh_inside_the_mesh_and_after_it():
    """Rows split over "data" (features of a batch drawn under jax.set_mesh, 4 simulated devices): the pairs and the
    covariance run across that axis, and JAX refused them ("produces an illegally sharded result", "Contracting
    dimensions are sharded"), inside the mesh and after it. Each now equals its value on the same rows unsplit."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxicl.analysis.convergence import (cross_board_distance, mean_pairwise_distance, participation_ratio,
                                             within_board_ratio)
    from jaxicl.train import data_mesh

    rows = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6, 5)).astype(np.float32))  # [boards, cells, D]
    measures = {"mean_pairwise_distance": lambda x: mean_pairwise_distance(x[:, 0]),
                "cross_board_distance": cross_board_distance,
                "within_board_ratio": lambda x: within_board_ratio(x[:, 0], jnp.arange(8) < 3),
                "participation_ratio": lambda x: participation_ratio(x[:, 0])}
    mesh = data_mesh(4)
    for name, f in measures.items():
        want = np.asarray(f(rows))
        with jax.set_mesh(mesh):
            split = jax.device_put(rows, NamedSharding(mesh, P("data")))
            inside = f(split)
        after = f(split)
        for got in (inside, after):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7, err_msg=name)
