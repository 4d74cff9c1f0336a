"""Clustering analysis: ARI and NMI against scikit-learn and brute-force pair / contingency counts, k-means against
planted clusters and scikit-learn's KMeans, Hungarian matching, sequence features."""

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from jaxicl.analysis.clustering import (adjusted_rand_index, cluster_scores, kmeans, kmeans_plus_plus, lloyd,
                                        match_clusters, normalized_mutual_info, sequence_features)


def _labelings(rng, n, k):
    a = rng.integers(0, k, n)
    yield a, rng.integers(0, k, n)  # independent
    yield a, np.where(rng.random(n) < 0.6, a, rng.integers(0, k, n))  # partly planted
    yield a, rng.permutation(k)[a]  # the same partition, relabelled
    yield a, np.zeros(n, int)  # one cluster
    yield a, (a >= k - 2).astype(int)  # a coarsening: entropies far apart (arithmetic vs geometric NMI)


def _pair_counting_ari(a, b):
    """ARI from the four pair counts, by a loop over every pair of points (an independent route)."""
    n11 = n10 = n01 = n00 = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        same_a, same_b = a[i] == a[j], b[i] == b[j]
        n11 += same_a and same_b
        n10 += same_a and not same_b
        n01 += same_b and not same_a
        n00 += not same_a and not same_b
    return 2 * (n11 * n00 - n01 * n10) / ((n11 + n01) * (n01 + n00) + (n11 + n10) * (n10 + n00))


def _loop_nmi(a, b):
    pa = {x: np.mean(a == x) for x in set(a)}
    pb = {y: np.mean(b == y) for y in set(b)}
    mi = sum(np.mean((a == x) & (b == y)) * math.log(np.mean((a == x) & (b == y)) / (pa[x] * pb[y]))
             for x in pa for y in pb if np.any((a == x) & (b == y)))
    h = lambda p: -sum(v * math.log(v) for v in p.values())  # noqa: E731
    return mi / ((h(pa) + h(pb)) / 2) if h(pa) + h(pb) > 0 else 1.0


def test_ari_and_nmi_match_scikit_learn_and_brute_force_counts():
    rng = np.random.default_rng(0)
    for a, b in _labelings(rng, 400, 5):
        ari = float(adjusted_rand_index(jnp.asarray(a), jnp.asarray(b), 5, 5))
        nmi = float(normalized_mutual_info(jnp.asarray(a), jnp.asarray(b), 5, 5))
        # float32 pair counts (at most 8e4, exact) and their float32 products: about 1e-7 relative
        assert ari == pytest.approx(adjusted_rand_score(a, b), abs=1e-5)
        assert nmi == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-5)
    small = list(_labelings(rng, 60, 4))
    for a, b in small[:3]:
        assert float(adjusted_rand_index(jnp.asarray(a), jnp.asarray(b), 4, 4)) == pytest.approx(
            _pair_counting_ari(a, b), abs=1e-5)
        assert float(normalized_mutual_info(jnp.asarray(a), jnp.asarray(b), 4, 4)) == pytest.approx(
            _loop_nmi(a, b), abs=1e-5)


def test_ari_and_nmi_of_independent_labelings_match_scikit_learn_in_float64_under_x64(x64):
    # the contingency table was float32 in every mode: ARI subtracts nearly equal sums of pair-count products, and
    # float32 left 2e-6 relative error here (1e-2 at 400 000 points), NMI 1e-5
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 2000), rng.integers(0, 5, 2000)
    ari = adjusted_rand_index(jnp.asarray(a), jnp.asarray(b), 5, 5)
    nmi = normalized_mutual_info(jnp.asarray(a), jnp.asarray(b), 5, 5)
    assert ari.dtype == nmi.dtype == jnp.float64
    # float64 on both sides: the cancellation costs about three digits of the ~1e-16 rounding (1.6e-14 measured)
    np.testing.assert_allclose(ari, adjusted_rand_score(a, b), rtol=1e-11)
    np.testing.assert_allclose(nmi, normalized_mutual_info_score(a, b), rtol=1e-11)


def test_ari_is_one_for_a_relabelled_partition_and_near_zero_for_independent_ones():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, 5000)
    assert float(adjusted_rand_index(jnp.asarray(a), jnp.asarray(rng.permutation(6)[a]), 6, 6)) == pytest.approx(1.0)
    assert float(normalized_mutual_info(jnp.asarray(a), jnp.asarray(rng.permutation(6)[a]), 6, 6)) == pytest.approx(
        1.0, abs=1e-6)
    # independent labelings of 5000 points: the ARI's standard deviation is about 1e-4 here
    assert abs(float(adjusted_rand_index(jnp.asarray(a), jnp.asarray(rng.integers(0, 6, 5000)), 6, 6))) < 2e-3
    one = jnp.zeros(10, int)
    assert float(adjusted_rand_index(one, one, 1, 1)) == 1.0 == adjusted_rand_score(one, one)


def _blobs(rng, k, per, dim, spread):
    centres = rng.normal(0, spread, (k, dim))
    labels = np.repeat(np.arange(k), per)
    return (centres[labels] + rng.normal(size=(k * per, dim))).astype(np.float32), labels


def test_kmeans_recovers_well_separated_planted_clusters():
    x, labels = _blobs(np.random.default_rng(2), 6, 50, 8, 30.0)
    km = kmeans(jnp.asarray(x), 6, jax.random.key(0), restarts=4)
    found = np.asarray(km["labels"])
    # the same partition: each planted cluster maps to one found cluster and back (integers, exact)
    assert len(set(zip(labels, found))) == 6 == len(set(found))


def test_kmeans_inertia_is_no_worse_than_scikit_learn_with_the_same_restarts():
    rng = np.random.default_rng(3)
    for trial in range(3):
        x, _ = _blobs(rng, 8, 60, 6, 2.5)  # overlapping blobs: local optima exist
        km = kmeans(jnp.asarray(x), 8, jax.random.key(trial), restarts=8, iters=100)
        centroids = np.asarray(km["centroids"], np.float64)
        ours = np.sum(np.min(((x[:, None].astype(np.float64) - centroids[None]) ** 2).sum(-1), -1))
        theirs = KMeans(8, n_init=8, random_state=trial).fit(x.astype(np.float64)).inertia_
        # float32 centroids against float64 ones: the inertia differs by ~1e-6 relative at the same optimum
        assert ours <= theirs * (1 + 1e-4), (trial, ours, theirs)
        assert float(km["inertia"]) == pytest.approx(ours, rel=1e-4)



def test_kmeans_plus_plus_draws_by_squared_distance_and_keeps_the_better_candidate():
    """k = 2 on a = (0, 0), b = (1, 0), c = (0, 3): a start on a or b is followed by c unless both candidates
    (2 + log 2 = 2) are the other near point, drawn with probability |ab|^2 / (|ab|^2 + |ac|^2) = 1/10 from a and
    1/(1 + 10) from b, so P(start {a, b}) = (1/10^2 + 1/11^2) / 3 = 0.0061. Drawing by the distance instead of its
    square gives 0.040, keeping the first candidate 0.064: 4000 starts (standard error 0.0012) tell them apart."""
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]], np.float32)
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    starts = np.asarray(jax.vmap(lambda k: kmeans_plus_plus(jnp.asarray(x), 2, k))(keys))
    picked = np.argmax(np.all(starts[:, :, None] == x[None, None], -1), -1)  # [n, 2]: rows of x (centroids are copies)
    assert np.all(np.all(starts[:, :, None] == x[None, None], -1).any(-1)) and np.all(picked[:, 0] != picked[:, 1])
    first = np.bincount(picked[:, 0], minlength=3) / n
    assert np.all(np.abs(first - 1 / 3) < 5 * np.sqrt(2 / 9 / n)), first  # the first uniform over the rows
    p = (1 / 100 + 1 / 121) / 3
    near = np.mean(np.all(np.sort(picked, 1) == [0, 1], 1))
    assert abs(near - p) < 5 * np.sqrt(p * (1 - p) / n), near

@pytest.mark.parametrize("x64", [False, True])
def test_kmeans_of_points_sharing_a_large_offset_matches_scikit_learn_and_its_own_labels(x64):
    """4 blobs (sd 0.3 around centres ~5 apart) shifted by 3000: the expanded |x|^2 - 2 x.c + |c|^2 cancels 1e7
    against distances ~1 in float32 (ARI 0, inertia reported 8x too small). k-means is shift invariant, so the
    partition must be scikit-learn's and the planted one (ARI 1, integers), the centroids the float64 means of the
    labels and the inertia their squared distances. Float32 stores the points and centroids to ulp(3000) / 2 = 1.2e-4
    (relative ~4e-4 of the spread 0.3 per squared term, averaging out over 3200 of them): centroids to 2.5e-4,
    inertia to 1e-4 relative; under x64 the run is float64, to 1e-9."""
    rng = np.random.default_rng(0)
    planted = np.repeat(np.arange(4), 50)
    x = rng.normal(size=(4, 16))[planted] + 0.3 * rng.normal(size=(200, 16)) + 3000.0
    with jax.enable_x64(x64):
        km = kmeans(x, 4, jax.random.key(0))
    labels = np.asarray(km["labels"])
    reference = KMeans(4, n_init=8, random_state=0).fit(x).labels_
    assert adjusted_rand_score(planted, labels) == 1.0 and adjusted_rand_score(reference, labels) == 1.0
    means = np.stack([x[labels == j].mean(0) for j in range(4)])
    centroid_tol, inertia_tol = (1e-9, 1e-9) if x64 else (2.5e-4, 1e-4)
    assert km["centroids"].dtype == (jnp.float64 if x64 else jnp.float32)
    np.testing.assert_allclose(km["centroids"], means, rtol=0, atol=centroid_tol)
    assert float(km["inertia"]) == pytest.approx(np.sum((x - means[labels]) ** 2), rel=inertia_tol)


def test_match_clusters_undoes_a_relabelling():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 5, 300)
    perm = rng.permutation(5)
    clusters = np.where(rng.random(300) < 0.9, perm[labels], rng.integers(0, 5, 300))  # 10% noise
    mapping = match_clusters(labels, clusters, 5)
    np.testing.assert_array_equal(mapping[perm], np.arange(5))


def test_sequence_features_gather_or_average_against_numpy():
    rng = np.random.default_rng(5)
    cache = {"a": rng.normal(size=(4, 7, 3)).astype(np.float32), "b": rng.normal(size=(4, 7, 3)).astype(np.float32)}
    pos = np.array([0, 6, 2, 3])
    mask = rng.random((4, 7)) < 0.5
    mask[:, 0] = True
    got = np.asarray(sequence_features({k: jnp.asarray(v) for k, v in cache.items()}, ["b", "a"],
                                       positions=jnp.asarray(pos)))
    np.testing.assert_array_equal(got, np.stack([cache[k][np.arange(4), pos] for k in ("b", "a")]))
    np.testing.assert_array_equal(sequence_features(cache, (k for k in ("b", "a")), positions=jnp.asarray(pos)), got)
    pooled = np.asarray(sequence_features(cache, ["a"], pool_mask=jnp.asarray(mask, jnp.float32)))
    want = np.stack([cache["a"][i][mask[i]].mean(0) for i in range(4)])
    np.testing.assert_allclose(pooled[0], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(sequence_features(cache, ["a"], positions=jnp.array([-1, -7, 0, 6]))[0],
                                  cache["a"][np.arange(4), [6, 0, 0, 6]])  # from the end, as numpy
    with pytest.raises(ValueError, match="exactly one"):
        sequence_features(cache, ["a"])
    for bad in (7, -8):  # a position past either end: no NaN rows (take_along_axis's fill)
        with pytest.raises(ValueError, match=r"positions must lie in \[-7, 7\)"):
            sequence_features(cache, ["a"], positions=jnp.array([0, bad, 2, 3]))
    mask[[1, 3]] = False  # two sequences with nothing to average: no zero vector standing for them
    with pytest.raises(ValueError, match=re.escape("pool_mask: rows [1, 3] select no position to average")):
        sequence_features(cache, ["a"], pool_mask=jnp.asarray(mask, jnp.float32))
    traced = np.asarray(jax.jit(lambda m: sequence_features(cache, ["a"], pool_mask=m))(jnp.asarray(mask, jnp.float32)))
    assert np.isnan(traced[0, [1, 3]]).all()
    np.testing.assert_allclose(traced[0, [0, 2]], want[[0, 2]], rtol=1e-6, atol=1e-7)  # as above: float32 means


def test_labels_outside_their_count_fail_with_the_argument_named():
    """A label >= n (or < 0) would get an all-zero one-hot row and drop out of the scores silently."""
    good, bad = np.array([0, 1, 2, 1]), np.array([0, 1, 3, 1])
    for fn in (adjusted_rand_index, normalized_mutual_info):
        with pytest.raises(ValueError, match=r"labels a must lie in \[0, 3\)"):
            fn(jnp.asarray(bad), jnp.asarray(good), 3, 3)
        with pytest.raises(ValueError, match=r"labels b must lie in \[0, 3\)"):
            fn(jnp.asarray(good), jnp.asarray(-bad), 3, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        cluster_scores(jnp.zeros((1, 4, 2)), jnp.asarray(bad), 3, jax.random.key(0))
    with pytest.raises(ValueError, match=r"clusters must lie in \[0, 3\)"):
        match_clusters(good, bad, 3)


def test_cluster_scores_refuses_features_without_a_layer_axis():
    """[N, D] features were mapped over their rows, each clustered as a 1-D dataset: an IndexError inside k-means."""
    with pytest.raises(ValueError, match=re.escape("features must be [L, N, D] (an [N, D] set of vectors per layer; "
                                                   "for one set give features[None]), got shape (30, 4)")):
        cluster_scores(jnp.zeros((30, 4)), jnp.arange(30) % 3, 3, jax.random.key(0))


def test_kmeans_refuses_complex_points_and_separates_their_real_and_imaginary_parts():
    """An autoregressive model's sites are complex: cast to float, two clusters 10i apart became one point (inertia 0,
    the labels arbitrary), with only a ComplexWarning."""
    z = 1j * np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    z = np.concatenate([z, z + 10j])
    message = "must be real, got complex64: this real-valued computation would drop the imaginary part"
    with pytest.raises(ValueError, match=re.escape(f"x {message}")):
        kmeans(jnp.asarray(z), 2, jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape(f"features {message}")):
        cluster_scores(jnp.asarray(z[None]), jnp.arange(100) // 50, 2, jax.random.key(0))
    # the suggested features: the two clusters, 10 sqrt(3) apart, against a spread of about 1 per coordinate
    out = cluster_scores(jnp.asarray(np.concatenate([z.real, z.imag], -1)[None]), jnp.arange(100) // 50, 2,
                         jax.random.key(0), restarts=2)
    assert float(out["ari"][0]) == pytest.approx(1.0)


def test_cluster_scores_per_layer_see_structure_only_where_it_is(backend_compiles):
    """Layer 0 is noise, layer 1 holds the planted clusters: ARI about 0 and exactly 1. One compiled program (op by
    op, the scores' operations compiled one by one)."""
    rng = np.random.default_rng(6)
    x, labels = _blobs(rng, 4, 40, 5, 40.0)
    noise = rng.normal(size=x.shape).astype(np.float32)
    features, labels, key = jnp.asarray(np.stack([noise, x])), jnp.asarray(labels), jax.random.key(0)
    before = len(backend_compiles)
    out = cluster_scores(features, labels, 4, key, restarts=4)
    assert len(backend_compiles) - before == 1
    assert abs(float(out["ari"][0])) < 0.05 and float(out["ari"][1]) == pytest.approx(1.0)
    assert float(out["nmi"][1]) == pytest.approx(1.0, abs=1e-6)


def test_a_second_eager_call_of_kmeans_plus_plus_or_lloyd_on_new_points_compiles_nothing(backend_compiles):
    """Their lax.scans, each step a closure made afresh at each call, compiled again at every eager call (0.65 s and
    2 s): both are jitted, compiled once per shape (and k, iters)."""

    def calls(seed):
        x = jax.random.normal(jax.random.key(seed), (20, 2))
        return kmeans_plus_plus(x, 3, jax.random.key(seed)), lloyd(x, x[:3], 4)

    jax.block_until_ready(calls(0))
    assert backend_compiles  # the counter sees the first calls' compilations
    backend_compiles.clear()
    jax.block_until_ready(calls(1))
    assert backend_compiles == []


def test_clustering_takes_points_and_labels_split_over_a_data_mesh_inside_the_mesh_and_after_it():
    """Features of a batch drawn under jax.set_mesh (a user's own vmap of apply) are split over "data" (4 simulated
    devices), the axis k-means runs across: JAX refused it ("dynamic_slice on sharded dims ... not implemented",
    "Contracting dimensions are sharded"), inside the mesh and after it. Each now equals its result on the same
    points unsplit (replicated, the same operations); ARI and NMI took split labels already."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxicl.train import data_mesh

    rng = np.random.default_rng(0)
    points = jnp.asarray(rng.normal(size=(2, 16, 5)).astype(np.float32))  # [layers, N, D]
    labels = jnp.asarray(rng.integers(0, 3, 16))
    other = jnp.asarray(rng.integers(0, 3, 16))
    fits = {"kmeans_plus_plus": (lambda x, y: kmeans_plus_plus(x[0], 3, jax.random.key(0)), 1),
            "lloyd": (lambda x, y: lloyd(x[0], jnp.eye(3, 5), 5), 1),
            "kmeans": (lambda x, y: kmeans(x[0], 3, jax.random.key(0)), 1),
            "cluster_scores": (lambda x, y: cluster_scores(x, y, 3, jax.random.key(0)), 1),
            "adjusted_rand_index": (lambda x, y: adjusted_rand_index(y, other, 3, 3), 0),
            "normalized_mutual_info": (lambda x, y: normalized_mutual_info(y, other, 3, 3), 0)}
    mesh = data_mesh(4)
    for name, (f, axis) in fits.items():
        want = f(points, labels)
        with jax.set_mesh(mesh):
            split = (jax.device_put(points, NamedSharding(mesh, P(None, "data"))),
                     jax.device_put(labels, NamedSharding(mesh, P("data"))))
            assert split[axis].sharding.spec != P()
            inside = f(*split)
        after = f(*split)
        for got in (inside, after):
            jax.tree.map(lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7,
                                                                          err_msg=name), got, want)
