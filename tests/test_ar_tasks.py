import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxicl.tasks import autoregressive as ar
from jaxicl.tasks import sample_batch
from jaxicl.validation import ConfigError


def _batch(cfg, n=256, seed=0, axis=None):
    return sample_batch(ar.sample, cfg, jax.random.key(seed), n, axis=axis)


@pytest.mark.parametrize("family,dim", [("unitary", 4), ("orthogonal", 6), ("haar", 5), ("complex_1d", 1)])
def test_transitions_are_unitary_and_states_follow_them(family, dim):
    cfg = ar.Autoregressive(family=family, dim=dim, seq_len=7, format="tiled", tile=1)
    b = _batch(cfg, 64, axis="data")  # sharded over the 4 simulated devices
    w = np.asarray(b.info["W"], np.complex128)
    eye = np.eye(dim)
    np.testing.assert_allclose(np.conj(np.swapaxes(w, 1, 2)) @ w, np.broadcast_to(eye, w.shape), atol=1e-5)
    s = np.asarray(b.info["states"])
    np.testing.assert_allclose(s[:, 1:], np.einsum("bij,btj->bti", w, s[:, :-1]), atol=1e-5)
    # exact by construction: tokens and targets are copies of the materialised states
    np.testing.assert_array_equal(b.inputs, s[:, :-1])
    np.testing.assert_array_equal(b.targets, s[:, 1:])
    assert np.iscomplexobj(s) == (family in ar.COMPLEX_FAMILIES)


@pytest.mark.parametrize("family,dim,random_basis", [("unitary", 4, False), ("orthogonal", 6, True)])
def test_commuting_families_commute(family, dim, random_basis):
    cfg = ar.Autoregressive(family=family, dim=dim, random_basis=random_basis)
    w = np.asarray(_batch(cfg, 16).info["W"], np.complex128)
    comm = np.einsum("aij,bjk->abik", w, w) - np.einsum("bij,ajk->abik", w, w)
    assert np.max(np.abs(comm)) < 1e-5


def test_a_random_basis_draws_the_same_batches_under_a_four_device_mesh_as_without():
    """Q was Gram-Schmidt traced into each sampler's program and rounded as that program fused it: 1 ulp apart under
    the mesh, 3e-6 in the states. Now a host constant: the batches are equal exactly, as every other family's; Q is
    haar_orthogonal's matrix for the same key (float32 rounding: another QR)."""
    from jaxicl.prng import seed_key
    from jaxicl.train import data_mesh

    cfg = ar.Autoregressive(family="orthogonal", dim=4, random_basis=True, basis_seed=3)
    plain = _batch(cfg, 8)
    with jax.set_mesh(data_mesh(4)):
        split = _batch(cfg, 8, axis="data")
    jax.tree.map(np.testing.assert_array_equal, split, plain)
    np.testing.assert_allclose(ar.basis(cfg), ar.haar_orthogonal(seed_key(3), 4), rtol=0, atol=1e-6)


def test_haar_includes_reflections_and_does_not_commute():
    w = np.asarray(_batch(ar.Autoregressive(family="haar", dim=5), 400).info["W"], np.float64)
    det = np.linalg.det(w)
    np.testing.assert_allclose(np.abs(det), 1.0, atol=1e-5)
    assert 0.4 < np.mean(det < 0) < 0.6  # Haar on O(d): each sign with probability 1/2
    assert np.max(np.abs(w[0] @ w[1] - w[1] @ w[0])) > 0.1
    # Haar moment: E[W_11^2] = 1/d
    assert abs(np.mean(w[:, 0, 0] ** 2) - 0.2) < 0.03


def test_orthogonal_eigenvalues_are_conjugate_pairs_of_the_angles():
    cfg = ar.Autoregressive(family="orthogonal", dim=4, random_basis=True, basis_seed=3)
    b = _batch(cfg, 8)
    for w, th in zip(np.asarray(b.info["W"]), np.asarray(b.info["angles"])):
        lam = np.asarray(ar.eigenvalues(cfg, jnp.asarray(th)))
        got = np.sort_complex(np.linalg.eigvals(w))
        np.testing.assert_allclose(got, np.sort_complex(lam), atol=1e-5)
    # W = Q blockdiag(R(theta_k)) Q^T with R(t) = [[cos t, -sin t], [sin t, cos t]], and s_0 = Q 1 (float32 products)
    q = np.asarray(ar.basis(cfg), np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-6)
    for w, th in zip(np.asarray(b.info["W"], np.float64), np.asarray(b.info["angles"], np.float64)):
        blocks = np.zeros((4, 4))
        for k, t in enumerate(th):
            blocks[2 * k:2 * k + 2, 2 * k:2 * k + 2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
        np.testing.assert_allclose(q.T @ w @ q, blocks, atol=1e-5)
    np.testing.assert_allclose(b.info["s0"], np.broadcast_to(q @ np.ones(4), (8, 4)), atol=1e-6)


def test_complex_1d_angles_lie_in_the_range_and_initial_states():
    cfg = ar.Autoregressive(family="complex_1d", dim=1, mu=50.0, seq_len=3)
    ang = np.angle(np.asarray(_batch(cfg, 2000).info["W"])[:, 0, 0]) % (2 * np.pi)
    assert ang.max() < 2 * np.pi / 50 and ang.max() > 0.95 * 2 * np.pi / 50
    rp = _batch(ar.Autoregressive(family="unitary", dim=3, init="random_phase", init_scale=2.0), 500).info["s0"]
    np.testing.assert_allclose(np.abs(rp), 2.0, rtol=1e-5)
    assert np.std(np.angle(rp)) > 1.5  # phases spread over the circle
    s0 = _batch(ar.Autoregressive(family="haar", dim=5, init_scale=5 ** -0.5), 4).info["s0"]
    np.testing.assert_allclose(s0, 5 ** -0.5, rtol=1e-6)


def test_augmented_tokens_and_noise():
    cfg = ar.Autoregressive(family="haar", dim=3, seq_len=5, noise_std=0.1)
    b = _batch(cfg, 32)
    s = np.asarray(b.info["states"])
    x = np.asarray(b.inputs)
    assert x.shape == (32, 5, 9)
    np.testing.assert_array_equal(x[:, :, :3], 0)
    np.testing.assert_array_equal(x[:, :, 3:6], s[:, :-1])  # copies of the materialised states
    np.testing.assert_array_equal(x[:, 1:, 6:], s[:, :-2])
    np.testing.assert_array_equal(x[:, 0, 6:], 0)
    resid = s[:, 1:] - np.einsum("bij,btj->bti", np.asarray(b.info["W"]), s[:, :-1])
    assert 0.08 < resid.std() < 0.12



def test_complex_noise_is_circular_with_variance_noise_std_squared_per_coordinate():
    """s_{t+1} - W s_t for a complex family: E|eps|^2 = noise_std^2 per coordinate (the real and imaginary parts
    each noise_std^2 / 2) and E[eps^2] = 0 (circular); 3000 draws, standard errors sigma^2 / sqrt(n) and
    sqrt(2) sigma^2 / sqrt(n)."""
    sigma = 0.1
    b = _batch(ar.Autoregressive(family="unitary", dim=3, seq_len=5, init="random_phase", noise_std=sigma), 200)
    s, w = np.asarray(b.info["states"]), np.asarray(b.info["W"])
    eps = (s[:, 1:] - np.einsum("bij,btj->bti", w, s[:, :-1])).ravel()
    n = eps.size
    assert abs(np.mean(np.abs(eps) ** 2) - sigma ** 2) < 5 * sigma ** 2 / np.sqrt(n)
    assert abs(np.mean(eps ** 2)) < 5 * np.sqrt(2) * sigma ** 2 / np.sqrt(n)

def test_fixed_dataset_repeats_sequences():
    cfg = ar.Autoregressive(family="haar", dim=3, seq_len=4, n_sequences=5)
    w = np.asarray(_batch(cfg, 200).info["W"]).reshape(200, -1)
    assert len(np.unique(np.round(w, 5), axis=0)) == 5


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="family"):
        ar.Autoregressive(family="nope")
    with pytest.raises(ConfigError, match="dim must be even"):
        ar.Autoregressive(family="orthogonal", dim=5)
    with pytest.raises(ConfigError, match="random_phase"):
        ar.Autoregressive(family="haar", init="random_phase")


def test_a_second_eager_sample_with_another_key_compiles_nothing(backend_compiles):
    """The states' lax.scan, its step a closure over W made afresh at each call, compiled again at every eager call:
    its step is a module-level function, found in JAX's cache of traced scan bodies."""
    cfg = ar.Autoregressive(dim=2, seq_len=5, noise_std=0.1)
    jax.block_until_ready(ar.sample(cfg, jax.random.key(0)).inputs)
    assert backend_compiles  # the counter sees the first call's compilations
    backend_compiles.clear()
    jax.block_until_ready(ar.sample(cfg, jax.random.key(1)).inputs)
    assert backend_compiles == []
