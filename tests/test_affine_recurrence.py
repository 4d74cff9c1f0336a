"""Affine-recurrence prompts and their baselines against numpy."""

import re

import jax
import numpy as np
import pytest

from jaxicl.baselines import affine_recurrence as base
from jaxicl.config_paths import apply_overrides
from jaxicl.tasks import affine_recurrence as ar
from jaxicl.tasks import sample_batch
from jaxicl.validation import ConfigError


def test_scalar_prompts_follow_the_recurrence_and_the_distributions():
    cfg = ar.AffineRecurrence(seq_len=8, loss_from=2)
    b = sample_batch(ar.sample, cfg, jax.random.key(0), 4000)
    s = np.asarray(b.info["states"], np.float64)[..., 0]  # [B, T + 1]
    a, off = np.asarray(b.info["A"])[:, 0, 0], np.asarray(b.info["b"])[:, 0]
    np.testing.assert_allclose(s[:, 1:], a[:, None] * s[:, :-1] + off[:, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b.inputs[..., 0], s[:, :-1])  # copies of the materialised states
    np.testing.assert_array_equal(b.targets, s[:, 1:])
    np.testing.assert_array_equal(b.mask[0], [0, 0, 1, 1, 1, 1, 1, 1])
    for v in (a, off, s[:, 0]):  # U[-1, 1]: mean 0, variance 1/3, within 5 standard errors
        assert abs(v.mean()) < 5 * np.sqrt(1 / 3 / v.size) and abs(v.var() - 1 / 3) < 0.02


def test_vector_recurrence_rescaling_and_other_distributions():
    cfg = ar.AffineRecurrence(dim=3, seq_len=6, a=ar.Distribution("normal", mean=0.0, std=1.0), rescale=True,
                              b=ar.Distribution("fixed", mean=0.5))
    b = sample_batch(ar.sample, cfg, jax.random.key(1), 64)
    s, a, off = (np.asarray(b.info[k], np.float64) for k in ("states", "A", "b"))
    np.testing.assert_allclose(s[:, 1:], np.einsum("bij,btj->bti", a, s[:, :-1]) + off[:, None], rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(np.abs(s).max((1, 2)), 1.0, rtol=1e-6)  # each sequence divided by its max |x|
    np.testing.assert_allclose(off * np.asarray(b.info["scale"])[:, None], 0.5, rtol=1e-6)
    np.testing.assert_array_equal(b.info["x0"], s[:, 0])  # the rescaled x_0, the start of the states
    assert b.targets.shape == (64, 6, 3) and b.inputs.shape == (64, 6, 3)
    fixed = ar.AffineRecurrence(dim=4, seq_len=2, a=ar.Distribution("fixed", mean=1.0))
    a = ar.sample(fixed, jax.random.key(0)).info["A"]
    np.testing.assert_allclose(a, np.full((4, 4), 0.5), rtol=1e-6)  # entries of 1 divided by sqrt(dim) = 2
    with pytest.raises(ConfigError, match="loss_from"):
        ar.AffineRecurrence(seq_len=4, loss_from=4)


@pytest.mark.parametrize("kwargs,message", [
    ({"a": ar.Distribution("cauchy")}, "a.kind must be one of ('uniform', 'normal', 'fixed'), got 'cauchy'"),
    ({"b": ar.Distribution(low=-np.inf)}, "b.low must be a finite number, got -inf"),
    ({"x0": ar.Distribution("normal", mean=np.nan)}, "x0.mean must be a finite number, got nan"),
    ({"a": ar.Distribution("normal", std=np.inf)}, "a.std must be a finite number, got inf"),
    ({"x0": ar.Distribution("normal", std=-1.0)}, "x0.std must be >= 0, got -1.0"),
    ({"b": ar.Distribution(low=1.0, high=1.0)}, "b.low must be < b.high for kind='uniform', got low=1.0, high=1.0"),
    ({"a": {"kind": "normal"}}, "a must be a Distribution (jaxicl.tasks.affine_recurrence), e.g. "
                                "Distribution('normal', std=0.5), got {'kind': 'normal'}"),
    ({"x0": "normal"}, "x0 must be a Distribution (jaxicl.tasks.affine_recurrence), e.g. "
                       "Distribution('normal', std=0.5), got 'normal'")])
def test_bad_distributions_are_refused_naming_their_field(kwargs, message):
    """Infinite or NaN settings were accepted (and sampled inf or NaN), errors named no field (std of a, b or x0?),
    and a dict or a string failed only at sampling, with AttributeError."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        ar.AffineRecurrence(**kwargs)


def test_command_line_overrides_of_a_distribution_are_checked_naming_the_path():
    cfg = apply_overrides(ar.AffineRecurrence(), ["a.kind=normal", "a.std=0.5", "x0.low=-0.5", "x0.high=0.5"])
    assert (cfg.a, cfg.x0) == (ar.Distribution("normal", std=0.5), ar.Distribution(low=-0.5, high=0.5))
    for override, message in [("a.std=-1", "a.std=-1: a.std must be >= 0, got -1.0"),
                              ("b.low=-inf", "b.low=-inf: b.low expects a finite number, got '-inf'")]:
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            apply_overrides(ar.AffineRecurrence(), [override])


def test_baselines_against_numpy_and_the_three_term_solver_is_exact_on_noise_free_sequences(x64):
    cfg = ar.AffineRecurrence(seq_len=10, a=ar.Distribution(low=-0.9, high=0.9))
    b = sample_batch(ar.sample, cfg, jax.random.key(2), 256, axis=None)
    x = np.asarray(b.inputs[..., 0])
    np.testing.assert_array_equal(jax.vmap(base.copy)(b.inputs), x)
    lin = np.concatenate([x[:, :1], 2 * x[:, 1:] - x[:, :-1]], 1)
    np.testing.assert_allclose(jax.vmap(base.linear_extrapolation)(b.inputs), lin, rtol=1e-12)
    three = np.asarray(jax.vmap(base.three_term)(b.inputs))
    np.testing.assert_allclose(three[:, 2:], np.asarray(b.targets)[:, 2:], rtol=1e-8, atol=1e-10)  # exact from n = 2
    np.testing.assert_array_equal(three[:, :2], x[:, :2])  # copy before three terms exist
    ls = np.asarray(jax.vmap(base.least_squares)(b.inputs))
    np.testing.assert_allclose(ls[:, 2:], np.asarray(b.targets)[:, 2:], rtol=1e-6, atol=1e-8)  # two pairs identify
    for p in range(3):  # position 1 from one pair: the minimum-norm [a b] of one equation, by numpy
        feats = np.array([[x[p, 0], 1.0]])
        w = np.linalg.pinv(feats) @ np.array([x[p, 1]])
        np.testing.assert_allclose(ls[p, 1], np.array([x[p, 1], 1.0]) @ w, rtol=1e-8)
    vec = sample_batch(ar.sample, ar.AffineRecurrence(dim=2, seq_len=8), jax.random.key(3), 16, axis=None)
    np.testing.assert_allclose(jax.vmap(base.least_squares)(vec.inputs)[:, 3:], vec.targets[:, 3:], rtol=1e-6,
                               atol=1e-8)  # three pairs identify the 2 x 2 A and b
    with pytest.raises(ValueError, match="scalar recurrences"):
        base.three_term(vec.inputs[0])


@pytest.mark.parametrize("name", ["copy", "linear_extrapolation", "three_term", "least_squares"])
def test_a_baseline_given_a_batch_instead_of_one_prompt_says_so(name):
    """A batch [B, T, 1] was read as one prompt: copy / linear_extrapolation returned [B, T, 1] (the latter shifted
    along the batch axis), three_term called T the token dim, least_squares failed to unpack the shape."""
    b = sample_batch(ar.sample, ar.AffineRecurrence(seq_len=16), jax.random.key(0), 4)
    predictor = getattr(base, name)
    with pytest.raises(ValueError, match=re.escape(f"{name} takes one prompt, tokens [T, D], got shape (4, 16, 1): "
                                                   "jax.vmap it over a batch [B, T, D]")):
        predictor(b.inputs)
    assert jax.vmap(predictor)(b.inputs).shape == (4, 16)


def test_linear_filter_is_per_position_least_squares_on_the_last_taps_terms():
    # float32 prompts as in the experiments, against numpy's float64 lstsq: the late terms are nearly collinear
    cfg = ar.AffineRecurrence(seq_len=16)
    train = sample_batch(ar.sample, cfg, jax.random.key(4), 4000, axis=None)
    test = sample_batch(ar.sample, cfg, jax.random.key(5), 20, axis=None)
    x, y, xt = (np.asarray(v, np.float64) for v in (train.inputs[..., 0], train.targets, test.inputs[..., 0]))
    for taps in (1, 3, None):
        pred = np.asarray(jax.vmap(base.fit_linear_filter(train.inputs, train.targets, taps))(test.inputs))
        for n in range(16):  # lstsq over the available terms x_max(0, n-taps+1)..x_n and a constant
            lo = 0 if taps is None else max(0, n - taps + 1)
            w = np.linalg.lstsq(np.c_[x[:, lo:n + 1], np.ones(len(x))], y[:, n], rcond=None)[0]
            # float32 rounding of up to 17 products of weights <~ 6 and |x| <~ 4: ~2e-5 at worst (measured 5e-6)
            np.testing.assert_allclose(pred[:, n], np.c_[xt[:, lo:n + 1], np.ones(len(xt))] @ w, rtol=0, atol=1e-4)


def test_linear_filter_is_exact_when_every_prompt_shares_a_and_b_and_cannot_be_without_them(x64):
    fixed = ar.AffineRecurrence(seq_len=6, a=ar.Distribution("fixed", mean=0.7), b=ar.Distribution("fixed", mean=-0.2))
    train = sample_batch(ar.sample, fixed, jax.random.key(6), 64, axis=None)
    test = sample_batch(ar.sample, fixed, jax.random.key(7), 16, axis=None)
    pred = jax.vmap(base.fit_linear_filter(train.inputs, train.targets, taps=1))(test.inputs)
    np.testing.assert_allclose(pred, test.targets, rtol=1e-10, atol=1e-12)  # one term and the constant: 0.7 x - 0.2
    cfg = ar.AffineRecurrence(seq_len=6)  # (a, b) per prompt: a fixed filter is far from the three-term solver
    train = sample_batch(ar.sample, cfg, jax.random.key(6), 4000, axis=None)
    test = sample_batch(ar.sample, cfg, jax.random.key(7), 4000, axis=None)
    err = np.mean((np.asarray(jax.vmap(base.fit_linear_filter(train.inputs, train.targets))(test.inputs))
                   - np.asarray(test.targets))[:, 2:] ** 2)
    assert err > 0.01  # measured 0.020 (copy 0.128); the three-term solver is exact from n = 2 (the test above)
    with pytest.raises(ValueError, match="taps"):
        base.fit_linear_filter(train.inputs, train.targets, taps=0)
    with pytest.raises(ValueError, match="inputs"):
        base.fit_linear_filter(train.inputs[..., 0], train.targets)


def test_a_second_eager_sample_with_another_key_compiles_nothing(backend_compiles):
    """The recurrence's lax.scan, its step a closure over A and b made afresh at each call, compiled again at every
    eager call: its step is a module-level function, found in JAX's cache of traced scan bodies."""
    cfg = ar.AffineRecurrence(dim=2, seq_len=5)
    jax.block_until_ready(ar.sample(cfg, jax.random.key(0)).inputs)
    assert backend_compiles  # the counter sees the first call's compilations
    backend_compiles.clear()
    jax.block_until_ready(ar.sample(cfg, jax.random.key(1)).inputs)
    assert backend_compiles == []
