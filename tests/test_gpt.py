"""The GPT-style decoder: a numpy forward pass, causal patterns, exact residual identities, site shapes, the split
attention of long prompts."""

import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxicl.analysis.cache import run_with_cache
from jaxicl.analysis.patching import attribution_patching
from jaxicl.models import apply, predictor
from jaxicl.models.gpt import GPT, SPLIT_FROM
from jaxicl.sites import Patch
from jaxicl.validation import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def _vector_model(final_norm=True, d_mlp=None, seed=0):
    return GPT(d_model=8, n_layers=2, n_heads=2, d_mlp=d_mlp, max_len=6, input_dim=1, final_norm=final_norm,
               init_std=0.3, rngs=nnx.Rngs(seed))


# the MLP activations written in numpy: GPT-2's tanh GELU, the exact one through math.erf, ReLU
NUMPY_ACTIVATIONS = {"gelu": lambda u: 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3))),
                     "gelu_exact": np.vectorize(lambda u: 0.5 * u * (1 + math.erf(u / math.sqrt(2)))),
                     "relu": lambda u: np.maximum(u, 0.0)}


def _ln(x, p):
    c = x - x.mean(-1, keepdims=True)
    return c / np.sqrt((c**2).mean(-1, keepdims=True) + 1e-5) * np.asarray(p.scale[...]) + np.asarray(p.bias[...])


def _numpy_forward(m: GPT, tokens: np.ndarray) -> np.ndarray:
    """The decoder written with plain numpy loops over heads and positions (float64)."""
    e = np.asarray(m.embed[...], np.float64)
    x = (e[tokens] if m.vocab_size else tokens @ e) + np.asarray(m.pos_embed[...])[:len(tokens)]
    t = len(tokens)
    for b in m.blocks:
        h = _ln(x, b.ln1)
        out = np.zeros_like(x)
        for k in range(m.n_heads):
            wq, wk, wv, wo = (np.asarray(w[k], np.float64) for w in (b.attn.wq, b.attn.wk, b.attn.wv, b.attn.wo))
            q, kk, v = h @ wq, h @ wk, h @ wv
            for i in range(t):
                s = np.array([q[i] @ kk[j] / np.sqrt(q.shape[1]) for j in range(i + 1)])
                p = np.exp(s - s.max())
                out[i] += (p / p.sum()) @ v[:i + 1] @ wo
        x = x + out
        if b.mlp is not None:
            pre = _ln(x, b.ln2) @ np.asarray(b.mlp.w_in[...]) + np.asarray(b.mlp.bias_in[...])
            post = NUMPY_ACTIVATIONS[m.activation](pre)
            x = x + post @ np.asarray(b.mlp.w_out[...]) + np.asarray(b.mlp.bias_out[...])
    if m.ln_final is not None:
        x = _ln(x, m.ln_final)
    return x @ np.asarray(m.unembed[...]) + np.asarray(m.unembed_bias[...])


@pytest.mark.parametrize("inputs", ["vector", "token"])
def test_forward_matches_a_numpy_loop(x64, inputs):
    if inputs == "vector":
        model = _vector_model()
        tokens = np.asarray(jax.random.normal(jax.random.key(1), (5, 1)))
    else:
        model = GPT(d_model=8, n_layers=2, n_heads=2, max_len=6, vocab_size=7, init_std=0.3, rngs=nnx.Rngs(2))
        tokens = np.asarray(jax.random.randint(jax.random.key(1), (5,), 0, 7))
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, model)
    np.testing.assert_allclose(model(jnp.asarray(tokens)), _numpy_forward(model, tokens), rtol=1e-9, atol=1e-12)
    assert model(jnp.asarray(tokens)).shape == (5, 1 if inputs == "vector" else 7)


@pytest.mark.parametrize("activation", ["gelu", "gelu_exact", "relu"])
def test_the_mlp_activation_is_the_numpy_formula_of_its_name(x64, activation):
    """layer0.mlp.post against the numpy formula of layer0.mlp.pre (float64): "gelu" is GPT-2's tanh approximation
    (TransformerLens gelu_new), "gelu_exact" the erf form (TransformerLens gelu), "relu" ReLU."""
    model = GPT(d_model=8, n_layers=1, n_heads=2, max_len=6, input_dim=1, activation=activation, init_std=1.0,
                rngs=nnx.Rngs(0))
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, model)
    tokens = jax.random.normal(jax.random.key(1), (6, 1), jnp.float64)
    _, cache = apply(*nnx.split(model), tokens, capture=("layer0.mlp.pre", "layer0.mlp.post"))
    pre = np.asarray(cache["layer0.mlp.pre"])
    # float64: the same formulas in XLA and numpy, and XLA's and libm's erf, agree to a few units in the last place
    np.testing.assert_allclose(cache["layer0.mlp.post"], NUMPY_ACTIVATIONS[activation](pre), rtol=1e-12, atol=1e-14)
    if activation.startswith("gelu"):  # told apart from the other GELU: they differ by up to 4.7e-4 (at |u| = 2.7)
        other = NUMPY_ACTIVATIONS["gelu_exact" if activation == "gelu" else "gelu"](pre)
        assert np.abs(np.asarray(cache["layer0.mlp.post"]) - other).max() > 1e-4


def test_patterns_are_causal_and_sum_to_one_and_the_residual_identities_hold_exactly():
    model = _vector_model()
    g, p = nnx.split(model)
    tokens = jax.random.normal(jax.random.key(3), (6, 1))
    out, c = jax.jit(lambda t: apply(g, p, t, capture="all"))(tokens)
    for l in range(2):
        w = np.asarray(c[f"layer{l}.attn.weights"])
        assert w.shape == (2, 6, 6) and np.all(np.triu(w, 1) == 0.0)  # exp(-1e9 - max) underflows to exactly 0
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
        # exact: each recorded value is the one materialised value the next operation reads (sites barrier),
        # and a float32 sum of the same two floats is the same in XLA and numpy
        np.testing.assert_array_equal(c[f"layer{l}.resid_mid"], np.asarray(c[f"layer{l}.resid_pre"])
                                      + np.asarray(c[f"layer{l}.attn.out"]))
        np.testing.assert_array_equal(c[f"layer{l}.resid_post"], np.asarray(c[f"layer{l}.resid_mid"])
                                      + np.asarray(c[f"layer{l}.mlp.out"]))
        # a sum over 2 heads: XLA's reduction order vs numpy's, so a float tolerance
        np.testing.assert_allclose(c[f"layer{l}.attn.out"], np.asarray(c[f"layer{l}.attn.heads"]).sum(1),
                                   rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(c["layer0.resid_pre"], np.asarray(c["embed"]) + np.asarray(c["pos_embed"]))
    assert np.asarray(predictor(g, p)(tokens)).shape == (6,)  # the scalar regression readout


def test_hidden_keys_score_a_finite_value_in_float16_so_attribution_patching_of_scores_stays_finite():
    # -1e9 rounded to -inf in float16: clean minus corrupted scores were -inf - (-inf) = NaN at every hidden key, and
    # the attribution grid of the scores all NaN
    g, p = nnx.split(_vector_model())
    clean, corrupted = (jax.random.normal(jax.random.key(s), (4, 6, 1)) for s in (1, 2))
    hidden = np.triu(np.ones((6, 6), bool), 1)
    grids = {}
    for dtype, masked in ((jnp.float32, -1e9), (jnp.float16, -32752.0)):  # float32's unchanged; float16's min / 2
        q = jax.tree.map(lambda a: a.astype(dtype), p)
        x, y = clean.astype(dtype), corrupted.astype(dtype)
        scores = run_with_cache(g, q, x, ["layer1.attn.scores"])[1]["layer1.attn.scores"]
        assert set(np.asarray(scores, np.float64)[:, :, hidden].ravel()) == {masked}
        grids[dtype] = attribution_patching(g, q, x, y, lambda out: jnp.mean(out[:, -1] ** 2), ["layer1.attn.scores"],
                                            by="head")
    # the same estimate: float16 rounds every operation to 11 significant bits (4.9e-4 relative), through two layers
    # 3.5e-3 here
    np.testing.assert_allclose(grids[jnp.float16], grids[jnp.float32], rtol=1e-2)


def test_an_edit_of_the_scores_cannot_unmask_a_later_key():
    # the mask was applied only before the scores site: scores * 0 (a uniform-attention ablation) gave query 0
    # weight 1/8 on each of the 8 keys, and changing the last token moved the output at position 0 by 4.8e-3
    g, p = nnx.split(GPT(d_model=16, n_layers=2, n_heads=2, max_len=8, vocab_size=11, rngs=nnx.Rngs(0)))
    tokens = jnp.arange(8) % 11
    uniform = {f"layer{l}.attn.scores": lambda s: 0 * s for l in range(2)}
    out, c = apply(g, p, tokens, capture=["layer0.attn.weights", "layer1.attn.weights"], edits=uniform)
    # query i: exp(0) = 1 on each of its i + 1 keys, exp(-1e9) = 0 after; e / sum(e) is one correctly rounded float32
    # division 1 / (i + 1), so exact
    allowed = np.tril(np.ones((8, 8), np.float32))
    for l in range(2):
        np.testing.assert_array_equal(c[f"layer{l}.attn.weights"], [allowed / allowed.sum(1, keepdims=True)] * 2)
    # the same code path with only the last token changed: earlier positions sum the same terms (0 * v for the
    # changed key), so exactly equal
    changed = apply(g, p, tokens.at[-1].set(3), edits=uniform)[0]
    np.testing.assert_array_equal(changed[:-1], out[:-1])
    assert np.abs(np.asarray(changed[-1] - out[-1])).max() > 0
    # a temperature edit: query 0 keeps all its weight on key 0 however flat its scores are made
    weights = apply(g, p, tokens, capture=["layer0.attn.weights"], edits={"layer0.attn.scores": lambda s: s / 1e9})[1]
    np.testing.assert_array_equal(np.asarray(weights["layer0.attn.weights"])[:, 0], np.eye(1, 8).repeat(2, 0))


def test_site_shapes_and_axes_are_declared_without_running_the_model():
    model = GPT(d_model=8, n_layers=1, n_heads=2, d_head=3, d_mlp=5, max_len=6, vocab_size=7, rngs=nnx.Rngs(0))
    shapes = model.site_shapes(jax.ShapeDtypeStruct((4,), jnp.int32))
    expected = {"embed": (4, 8), "pos_embed": (4, 8), "layer0.resid_pre": (4, 8), "layer0.attn.q": (4, 2, 3),
                "layer0.attn.k": (4, 2, 3), "layer0.attn.v": (4, 2, 3), "layer0.attn.scores": (2, 4, 4),
                "layer0.attn.weights": (2, 4, 4), "layer0.attn.z": (4, 2, 3), "layer0.attn.heads": (4, 2, 8),
                "layer0.attn.out": (4, 8), "layer0.resid_mid": (4, 8), "layer0.mlp.pre": (4, 5),
                "layer0.mlp.post": (4, 5), "layer0.mlp.out": (4, 8), "layer0.resid_post": (4, 8),
                "final_norm.scale": (4, 1), "unembed.in": (4, 8)}
    assert {k: v.shape for k, v in shapes.items()} == expected
    assert model.site_axes("layer0.attn.weights", 3) == ("head", "pos", "key")
    assert model.site_axes("layer0.attn.z", 3) == ("pos", "head", "d_head")
    attn_only = GPT(d_model=8, n_layers=1, n_heads=2, d_mlp=0, max_len=6, input_dim=2, final_norm=False,
                    rngs=nnx.Rngs(0))
    names = set(attn_only.site_shapes(jax.ShapeDtypeStruct((4, 2), jnp.float32)))
    assert not any("mlp" in n for n in names) and "final_norm.scale" not in names


def _final_norm_model() -> tuple[GPT, jax.Array]:
    """A float64 _vector_model whose final LayerNorm has a non-trivial affine (so the division and the affine are told
    apart), and a prompt [5, 1]."""
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, _vector_model())
    model.ln_final.scale[...] = jnp.linspace(0.5, 2.0, 8)
    model.ln_final.bias[...] = jnp.linspace(-0.3, 0.4, 8)
    return model, jax.random.normal(jax.random.key(5), (5, 1), jnp.float64)


def test_editing_or_patching_the_final_norm_scale_site_divides_the_normalised_output(x64):
    """final_norm.scale is sqrt(var + eps) before the division (TransformerLens's ln_final.hook_scale): doubling it
    halves the normalised output before the affine, and patching it with a constant c gives (x - mean) / c; the
    outputs follow by hand through ln_final's scale and bias and the unembedding (float64 numpy)."""
    model, tokens = _final_norm_model()
    ln = model.ln_final
    graphdef, params = nnx.split(model)
    _, cache = apply(graphdef, params, tokens, capture=("layer1.resid_post", "final_norm.scale"))
    resid = np.asarray(cache["layer1.resid_post"])
    centred = resid - resid.mean(-1, keepdims=True)
    np.testing.assert_allclose(cache["final_norm.scale"], np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5),
                               rtol=1e-12)

    def by_hand(std):
        normed = centred / std * np.asarray(ln.scale[...]) + np.asarray(ln.bias[...])
        return normed @ np.asarray(model.unembed[...]) + np.asarray(model.unembed_bias[...])

    doubled, _ = apply(graphdef, params, tokens, edits={"final_norm.scale": lambda s: 2 * s})
    patched, _ = apply(graphdef, params, tokens, patch=Patch(values={"final_norm.scale": jnp.float64(100.0)}))
    np.testing.assert_allclose(doubled, by_hand(2 * np.asarray(cache["final_norm.scale"])), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(patched, by_hand(100.0), rtol=1e-9, atol=1e-12)
    assert np.abs(np.asarray(doubled) - by_hand(np.asarray(cache["final_norm.scale"]))).max() > 1e-3


def _transformer_lens_final_hooks(resid: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
    """TransformerLens's hooks of the final LayerNorm and the unembedding as its LayerNorm.forward and Unembed.forward
    compute them (transformer_lens.components), from the residual stream resid [T, D] and ln_final's weight and
    bias [D]."""
    centred = resid - resid.mean(-1, keepdims=True)
    scale = np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)
    return {"ln_final.hook_scale": scale, "ln_final.hook_normalized": centred / scale,
            "unembed.hook_in": centred / scale * weight + bias}


def test_the_readme_maps_the_final_sites_to_the_transformer_lens_hooks_of_the_same_values(x64):
    """README's table row of the final sites against TransformerLens's hooks written in numpy: unembed.in is after
    ln_final's weight and bias (unembed.hook_in, not ln_final.hook_normalized, which README gave: 55% apart), and
    hook_normalized is (unembed.in - bias) / weight, as README says."""
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `final_norm.scale`"))
    sites, hooks = (re.findall(r"`([^`]+)`", cell) for cell in row.split("|")[1:3])
    assert sites == ["final_norm.scale", "unembed.in"]
    model, tokens = _final_norm_model()
    weight, bias = np.asarray(model.ln_final.scale[...]), np.asarray(model.ln_final.bias[...])
    _, cache = apply(*nnx.split(model), tokens, capture=("layer1.resid_post", *sites))
    hook_values = _transformer_lens_final_hooks(np.asarray(cache["layer1.resid_post"]), weight, bias)
    # float64, the same formulas; the atol for entries near 0, where the difference to the bias cancels (|bias| < 1)
    for site, hook in zip(sites, hooks, strict=True):
        np.testing.assert_allclose(cache[site], hook_values[hook], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose((np.asarray(cache["unembed.in"]) - bias) / weight,
                               hook_values["ln_final.hook_normalized"], rtol=1e-12, atol=1e-14)


def test_bad_model_configs_name_the_field():
    with pytest.raises(ConfigError, match="exactly one of vocab_size"):
        GPT(vocab_size=5, input_dim=2, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"^activation must be one of \('gelu', 'gelu_exact', 'relu'\), "
                                          r"got 'swish'$"):
        GPT(input_dim=1, activation="swish", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="a prompt of 5 positions does not fit this model: its max_len=4"):
        GPT(input_dim=1, max_len=4, rngs=nnx.Rngs(0))(jnp.zeros((5, 1)))
    with pytest.raises(ConfigError, match=r"d_model=10 must be a multiple of n_heads=4 .*d_head"):
        GPT(d_model=10, n_heads=4, input_dim=1, rngs=nnx.Rngs(0))  # heads would span 8 of the 10 dims
    assert GPT(d_model=10, n_heads=4, d_head=3, input_dim=1, rngs=nnx.Rngs(0)).blocks[0].attn.wq.shape == (4, 10, 3)


def test_a_prompt_without_its_position_axis_is_refused_not_read_as_positions():
    """One [T, 1] prompt given to run_with_cache (which maps the model over a batch's first axis) used to run as T
    one-position prompts: predictions [T, 1], each from a single vector, with no error."""
    from jaxicl.analysis.cache import run_with_cache

    g, p = nnx.split(_vector_model())
    prompt = jax.random.normal(jax.random.key(1), (5, 1))
    with pytest.raises(ValueError, match=r"^the model takes one prompt, tokens \[T, 1\] \(vectors \(input_dim=1\)\), "
                                         r"got shape \(1,\): batched "):
        run_with_cache(g, p, prompt, ["layer0.resid_pre"])
    with pytest.raises(ValueError, match=r"^the model takes tokens \[T, 1\] \(vectors \(input_dim=1\)\), got tokens "
                                         r"of width 2 \(shape \(5, 2\)\)$"):
        nnx.merge(g, p)(jnp.zeros((5, 2)))
    tokens = GPT(d_model=8, n_layers=1, n_heads=2, vocab_size=7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^the model takes one prompt, tokens \[T\] \(token ids\), got shape \(5, 1\):"
                                         r" batched "):
        tokens(jnp.zeros((5, 1), int))
    pred, _ = run_with_cache(g, p, prompt[None], [])  # the batch of one prompt
    np.testing.assert_allclose(pred[0], predictor(g, p)(prompt), rtol=1e-5, atol=1e-6)


def test_a_token_id_the_vocabulary_lacks_gives_nan_not_another_tokens_embedding():
    model = GPT(d_model=8, n_layers=1, n_heads=2, max_len=4, vocab_size=5, rngs=nnx.Rngs(0))
    assert np.isfinite(model(jnp.array([1, 4, 2]))).all()
    for bad in (5, -1):  # used to be clamped to id 4 and wrapped to id 4: the outputs of [1, 4, 2], silently
        # NaN everywhere: the earlier positions' weight 0 on the NaN value is NaN too (IEEE 0 * NaN)
        assert np.isnan(model(jnp.array([1, bad, 2]))).all()


def test_hidden_state_sites_follow_hugging_face_hidden_states():
    """Index 0 the embeddings, l the output of block l, the last after the final LayerNorm (a numpy LayerNorm of
    the last block's output)."""
    model = GPT(d_model=8, n_layers=3, n_heads=2, vocab_size=11, max_len=6, rngs=nnx.Rngs(0))
    sites = model.hidden_state_sites()
    assert sites == ["layer0.resid_pre", "layer0.resid_post", "layer1.resid_post", "unembed.in"]
    tokens = jnp.array([1, 4, 2, 9, 0])
    _, cache = apply(*nnx.split(model), tokens, capture=[*sites, "layer2.resid_post", "embed", "pos_embed"])
    np.testing.assert_array_equal(cache["layer0.resid_pre"], cache["embed"] + cache["pos_embed"])
    last = np.asarray(cache["layer2.resid_post"], np.float64)
    normed = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(cache["unembed.in"], normed, rtol=1e-5, atol=1e-5)  # LayerNorm at init: scale 1, bias 0
    no_norm = GPT(d_model=8, n_layers=2, n_heads=2, vocab_size=11, final_norm=False, rngs=nnx.Rngs(0))
    assert no_norm.hidden_state_sites()[-1] == "layer1.resid_post"


def test_attention_output_is_the_sum_of_the_heads_whether_or_not_they_are_read():
    """Unread per-head outputs are skipped (one contraction over head and d_head); reading them gives the same model."""
    model = GPT(d_model=16, n_layers=2, n_heads=4, vocab_size=8, max_len=6, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.array([1, 5, 2, 7, 0, 3])
    plain, cache = apply(graphdef, params, tokens, capture=("layer1.attn.out",))
    read, heads = apply(graphdef, params, tokens, capture=("layer1.attn.out", "layer1.attn.heads"))
    # two float32 contractions in a different order: rounding-level differences only
    np.testing.assert_allclose(read, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(heads["layer1.attn.heads"].sum(axis=1), cache["layer1.attn.out"], rtol=1e-5, atol=1e-6)


def _long_prompt_model():
    """A float64 vector GPT and a prompt of SPLIT_FROM + 5 positions (odd: halves of unequal length)."""
    t = SPLIT_FROM + 5
    model = GPT(d_model=8, n_layers=2, n_heads=2, max_len=t, input_dim=1, init_std=0.3, rngs=nnx.Rngs(3))
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, model)
    return model, jax.random.normal(jax.random.key(4), (t, 1), jnp.float64)


def test_long_prompts_skip_unread_attention_weights_and_match_a_numpy_loop(x64):
    """From SPLIT_FROM positions, unread [H, T, T] scores are formed only for the second half of the queries
    (split_causal_attention): the program holds no [H, T, T] array, and the outputs are the numpy loop's."""
    model, tokens = _long_prompt_model()
    t, heads = tokens.shape[0], model.n_heads
    np.testing.assert_allclose(model(tokens), _numpy_forward(model, np.asarray(tokens)), rtol=1e-9, atol=1e-12)

    def square_arrays(fn):
        jaxpr = jax.make_jaxpr(fn)(tokens).jaxpr
        return sum(v.aval.shape == (heads, t, t) for eqn in jaxpr.eqns for v in eqn.outvars)

    graphdef, params = nnx.split(model)
    assert square_arrays(lambda x: apply(graphdef, params, x)[0]) == 0
    assert square_arrays(lambda x: apply(graphdef, params, x, capture=("layer1.attn.weights",))[0]) > 0


def test_split_attention_gives_the_full_attentions_gradients(x64):
    """Reading every layer's weights forces the full [H, T, T] attention; outputs and parameter gradients agree with
    the split form's to float64 rounding (the two sum the same nonzero terms in a different grouping)."""
    model, tokens = _long_prompt_model()
    graphdef, params = nnx.split(model)
    every_weights = tuple(f"layer{l}.attn.weights" for l in range(len(model.blocks)))

    def loss(p, capture):
        return (apply(graphdef, p, tokens, capture=capture)[0] ** 2).sum()

    # jitted (capture static): one program each, not each operation of the gradient compiled alone
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (split, g_split), (full, g_full) = (grad(params, c) for c in ((), every_weights))
    np.testing.assert_allclose(split, full, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), g_split, g_full)


def test_a_predictor_called_outside_jit_is_one_compiled_program_shared_by_predictors_of_the_model(backend_compiles):
    """Op by op, a 4-layer GPT's predictions of 64 prompts took 67 ms a call on CPU (a compilation per operation at
    the first call); jitted, 11 ms and one compilation."""
    g, p = nnx.split(_vector_model())
    g2, p2 = nnx.split(_vector_model())  # another model object of the same architecture and init
    prompts = jax.random.normal(jax.random.key(4), (3, 5, 1))  # a shape no other test of this file draws
    before = len(backend_compiles)
    pred = jax.vmap(predictor(g, p))(prompts)
    again = jax.vmap(predictor(g2, p2))(prompts)
    assert len(backend_compiles) - before == 1
    np.testing.assert_array_equal(again, pred)  # one program, the same parameter values
    model = nnx.merge(g, p)
    np.testing.assert_allclose(pred, np.stack([model.readout(model(t)) for t in prompts]), rtol=1e-5, atol=1e-6)
