import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxicl.models import apply
from jaxicl.models.ar_linear_attention import (AugmentedLinearAttention, DiagonalPositionalAttention,
                                               PositionalOnlyAttention, gamma, psi)
from jaxicl.models.ar_transformer import AugmentedTransformer, PositionalTransformer, layer_norm
from jaxicl.tasks import autoregressive as ar
from jaxicl.tasks import sample_batch


def _seq(family, dim, seq_len, fmt="augmented", seed=0, **kw):
    cfg = ar.Autoregressive(family=family, dim=dim, seq_len=seq_len, format=fmt, tile=1, **kw)
    return sample_batch(ar.sample, cfg, jax.random.key(seed), 1, axis=None)


def test_augmented_model_factorises_into_gamma_and_psi(x64):
    b = _seq("unitary", 3, 6, init="random_phase")
    tokens = b.inputs[0]
    model = AugmentedLinearAttention(3, init_scale=1.0, rngs=nnx.Rngs(0))
    out, cache = apply(*nnx.split(model), tokens, capture="all")
    assert set(cache) == {"attn.gamma", "out"} and cache["attn.gamma"].shape == (6, 3, 3)
    for t in range(1, 6):
        ctx = tokens[:t + 1]
        np.testing.assert_allclose(out[t], psi(gamma(model.a[...], model.b[...], ctx), ctx[-1]), rtol=1e-12)
    # brute force: B (sum_{t'=1}^{t} s_t' s_{t'-1}^*) A s_t
    s, a, bm = np.asarray(b.info["states"][0]), np.asarray(model.a[...]), np.asarray(model.b[...])
    m = sum(np.outer(s[k], np.conj(s[k - 1])) for k in range(1, 6))
    np.testing.assert_allclose(out[5], bm @ m @ a @ s[5], rtol=1e-12)


def test_diagonal_positional_attention_matches_a_loop(x64):
    d, h, t = 3, 2, 5
    s = np.asarray(_seq("unitary", d, t, fmt="tiled").inputs[0])
    model = DiagonalPositionalAttention(d, h, t, init_scale=1.0, rngs=nnx.Rngs(1))
    a, bm, p = (np.asarray(x[...]) for x in (model.a, model.b, model.p))
    out, cache = apply(*nnx.split(model), jnp.asarray(s), capture="all")
    assert set(cache) == {"attn.scores", "attn.heads", "out"}
    ref = np.zeros((t, d), complex)
    c = bm.T @ a
    for q in range(1, t):
        for k in range(q + 1):
            for i in range(d):
                ref[q, i] += p[q - 1, k] * sum(c[i, j] * np.conj(s[q - 1, j]) * s[k, j] for j in range(d)) * s[k, i]
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    scores = np.zeros((h, t, t), complex)  # attn.scores as documented: the positional weight already multiplied in
    for q in range(1, t):
        for k in range(q + 1):
            scores[:, q, k] = p[q - 1, k] * (a * np.conj(s[q - 1]) * s[k]).sum(-1)
    np.testing.assert_allclose(cache["attn.scores"], scores, rtol=1e-12, atol=1e-14)
    pe = PositionalOnlyAttention(t)
    pe.p[...] = jnp.asarray(p)
    one = DiagonalPositionalAttention(1, 1, t, rngs=nnx.Rngs(2))
    one.a[...], one.b[...], one.p[...] = jnp.ones((1, 1)), jnp.ones((1, 1)), jnp.asarray(p)
    np.testing.assert_allclose(pe(jnp.asarray(s[:, :1])), one(jnp.asarray(s[:, :1])), rtol=1e-12)


def _np_linear(lin, x):
    return x @ np.asarray(lin.w[...]) + np.asarray(lin.bias[...])


def _np_layernorm(norm, x):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])


@pytest.mark.parametrize("make", [lambda: AugmentedTransformer(6, num_layers=2, rngs=nnx.Rngs(0)),
                                  lambda: PositionalTransformer(4, 2, num_heads=3, max_len=10, rngs=nnx.Rngs(0))],
                         ids=["augmented", "positional"])
def test_every_parameter_is_in_the_default_float_type(x64, make):
    # the LayerNorm scale and bias stayed float32 (nnx's param_dtype) in a float64 run: an SGD update below float32's
    # ulp at 1 left the scale exactly 1
    dtypes = {"/".join(map(str, path)): str(v.dtype) for path, v in nnx.to_flat_state(nnx.state(make()))}
    assert set(dtypes.values()) == {"float64"}, dtypes


def test_the_layer_norm_is_two_pass_like_pytorchs_on_a_row_of_large_mean():
    """E[x^2] - E[x]^2 (nnx's fast variance) cancelled in float32 on this row (mean 1000, standard deviation 0.013):
    3.165 instead of 0.752 for the entry 1000.01."""
    row = np.array([[1000.0, 1000.01, 999.99, 1000.02, 999.98, 1000.0]], np.float32)
    out = np.asarray(layer_norm(6, rngs=nnx.Rngs(0))(jnp.asarray(row)))  # scale 1, bias 0 at init
    x = row.astype(np.float64)
    centred = x - x.mean(-1, keepdims=True)
    # numpy in float64 on the same float32 entries; their deviations from 1000 are symmetric, so the float32 mean is
    # exactly 1000 and centring exact: what remains is a few float32 roundings (6e-8 relative each) of outputs <= 1.5
    np.testing.assert_allclose(out, centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5), rtol=0, atol=1e-6)


def test_augmented_transformer_matches_numpy(x64):
    tokens = np.asarray(_seq("haar", 2, 5).inputs[0], np.float64)
    model = AugmentedTransformer(6, num_layers=2, rngs=nnx.Rngs(3))
    out, cache = apply(*nnx.split(model), jnp.asarray(tokens), capture="all")
    assert set(cache) == {f"layer{l}.{s}" for l in (0, 1) for s in ("attn.scores", "attn.out", "resid_post")} | {"out"}
    x = tokens
    for layer in model.layers:
        q, k, v = (_np_linear(m, x) for m in (layer.q, layer.k, layer.v))
        sc = np.tril(q @ k.T) / np.sqrt(6)
        x = x + _np_layernorm(layer.norm, _np_linear(layer.o, sc @ v))
    np.testing.assert_allclose(out, _np_linear(model.final, x), rtol=1e-10)


@pytest.mark.parametrize("query", ["current", "previous"])
def test_positional_transformer_matches_a_loop_over_positions(x64, query):
    tokens = np.asarray(_seq("haar", 2, 4, fmt="tiled").inputs[0], np.float64)
    tokens = np.tile(tokens, (1, 2))
    model = PositionalTransformer(4, 2, num_heads=3, max_len=10, query=query, rngs=nnx.Rngs(4))
    out, cache = apply(*nnx.split(model), jnp.asarray(tokens), capture="all")
    assert cache["attn.positional_weights"].shape == (3, 4, 4)
    e = np.asarray(model.positions[...])[:4]
    for t in range(4):  # row t by hand: its query token and position, keys and values 0..t
        src = t if query == "current" else t - 1
        x_q, e_q = (tokens[src], e[src]) if src >= 0 else (np.zeros(4), np.zeros(4))
        heads = np.zeros(4)
        for h in range(3):
            sl = slice(4 * h, 4 * h + 4)
            q, qp = _np_linear(model.q, x_q[None])[0, sl], _np_linear(model.q, e_q[None])[0, sl]
            k, v = _np_linear(model.k, tokens[:t + 1])[:, sl], _np_linear(model.v, tokens[:t + 1])[:, sl]
            kp = _np_linear(model.k, e[:t + 1])[:, sl]
            pos = np.exp(kp @ qp / 2 - np.max(kp @ qp / 2))
            pos /= pos.sum()
            # float64, two programs; the masked keys are exactly 0 in both
            np.testing.assert_allclose(cache["attn.positional_weights"][h, t], np.pad(pos, (0, 3 - t)), rtol=1e-12)
            heads += ((k @ q / 2) * pos) @ v
        ref = _np_linear(model.head, _np_layernorm(model.norm, _np_linear(model.mix, heads[None])))[0]
        np.testing.assert_allclose(out[t], ref, rtol=1e-10)


def test_the_query_convention_changes_only_the_query_rows():
    tokens = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)))
    cur, prev = (PositionalTransformer(4, 2, num_heads=2, max_len=5, query=q, rngs=nnx.Rngs(1))
                 for q in ("current", "previous"))
    np.testing.assert_array_equal(prev._queries(tokens)[1:], tokens[:-1])  # a copy: exact
    assert float(jnp.abs(prev._queries(tokens)[0]).max()) == 0.0
    np.testing.assert_array_equal(cur._queries(tokens), tokens)
    with pytest.raises(ValueError, match="query"):
        PositionalTransformer(4, 2, query="next", rngs=nnx.Rngs(0))


def test_tokens_of_another_format_are_refused_naming_the_one_the_model_takes():
    """Tiled tokens (tile 2 by default) given to the diagonal model, or to the augmented one, failed inside an
    einsum ("Size of label 'j' ... does not match")."""
    tiled = _seq("unitary", 4, 6, fmt="tiled").inputs[0]
    tiled2 = sample_batch(ar.sample, ar.Autoregressive(family="unitary", dim=4, seq_len=6, format="tiled"),
                          jax.random.key(0), 1, axis=None).inputs[0]  # [T, 8]
    with pytest.raises(ValueError, match=r"the model takes tokens \[T, 4\] \(the states themselves .*\), got tokens of "
                                         r"width 8"):
        DiagonalPositionalAttention(4, 4, 6, rngs=nnx.Rngs(0))(tiled2)
    with pytest.raises(ValueError, match=r"the model takes tokens \[T, 12\] \(augmented tokens .*\), got tokens of "
                                         r"width 4"):
        AugmentedLinearAttention(4, rngs=nnx.Rngs(0))(tiled)
    assert DiagonalPositionalAttention(4, 4, 6, rngs=nnx.Rngs(0))(tiled).shape == (6, 4)  # tile 1: the states
