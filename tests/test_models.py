import importlib
import pkgutil
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxicl.models
from jaxicl.analysis.cache import site_info
from jaxicl.models import Model, SelfAttention, apply
from jaxicl.models.ar_linear_attention import (AugmentedLinearAttention, DiagonalPositionalAttention,
                                               PositionalOnlyAttention)
from jaxicl.models.ar_transformer import AugmentedTransformer, PositionalTransformer
from jaxicl.models.factor_transformer import FactorTransformer
from jaxicl.models.gpt import GPT, SPLIT_FROM
from jaxicl.models.lea import LEA
from jaxicl.models.nearest_neighbor_attention import NearestNeighborAttention
from jaxicl.models.pq_view import from_pq, to_pq
from jaxicl.sites import Patch, Sites, null_sites


def _numpy_linear_attention(model: SelfAttention, tokens: np.ndarray) -> np.ndarray:
    """Brute-force loop over layers, heads, queries and keys."""
    x = np.asarray(tokens, np.float64)
    t = x.shape[0]
    for layer in model.layers:
        wq, wk, wv, wo = (np.asarray(w[...], np.float64) for w in (layer.wq, layer.wk, layer.wv, layer.wo))
        out = np.zeros_like(x)
        for h in range(wq.shape[0]):
            for j in range(t):
                for i in range(t):
                    if (model.mask == "causal" and i > j) or (model.mask == "context" and i == t - 1):
                        continue
                    out[j] += (x[j] @ wq[h]) @ (x[i] @ wk[h]) * (x[i] @ wv[h] @ wo[h]) / (t - 1)
        x = x + out if model.residual else out
    return x


@pytest.mark.parametrize("capture", [(), ("layer0.attn.scores", "layer1.attn.heads")])
@pytest.mark.parametrize("mask,residual", [("none", True), ("context", True), ("causal", False)])
def test_linear_attention_matches_a_brute_force_loop(x64, mask, residual, capture):
    """Without the [T, T] scores (masks none and context: x Wqk (x_S^T x_S) Wov) and with them (a site reads them)."""
    model = SelfAttention(4, num_layers=2, num_heads=3, key_size=2, mask=mask, residual=residual,
                          init_scale=0.5, rngs=nnx.Rngs(0))
    model = jax.tree.map(lambda a: a.astype(jnp.float64), model)
    tokens = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)
    out, _ = apply(*nnx.split(model), tokens, capture=capture)
    np.testing.assert_allclose(out, _numpy_linear_attention(model, tokens), rtol=1e-10)


def test_softmax_attention_rows_sum_to_one_and_causal_means_no_future(x64):
    model = SelfAttention(4, num_heads=2, kind="softmax", mask="causal", init_scale=1.0, rngs=nnx.Rngs(2))
    g, p = nnx.split(model)
    tokens = jax.random.normal(jax.random.key(3), (5, 4))
    out, rec = apply(g, p, tokens, capture=["layer0.attn.weights"])
    np.testing.assert_allclose(rec["layer0.attn.weights"].sum(-1), 1.0, rtol=1e-12)
    assert np.all(np.triu(rec["layer0.attn.weights"], 1) == 0.0)
    changed = tokens.at[-1].set(100.0)  # the last token must not affect earlier outputs
    np.testing.assert_allclose(apply(g, p, changed)[0][:-1], out[:-1], rtol=1e-12)


def test_softmax_attention_matches_a_brute_force_loop(x64):
    """The model multiplies through Wq Wk^T and Wv Wo; the loop projects to q, k, v per head as the papers write it."""
    model = SelfAttention(4, num_layers=2, num_heads=3, key_size=2, kind="softmax", mask="causal", init_scale=0.7,
                          rngs=nnx.Rngs(5))
    model = jax.tree.map(lambda a: a.astype(jnp.float64), model)
    tokens = np.asarray(jax.random.normal(jax.random.key(6), (6, 4), jnp.float64))
    x = tokens.copy()
    for layer in model.layers:
        wq, wk, wv, wo = (np.asarray(w[...], np.float64) for w in (layer.wq, layer.wk, layer.wv, layer.wo))
        out = np.zeros_like(x)
        for h in range(3):
            for j in range(6):
                scores = np.array([(x[j] @ wq[h]) @ (x[i] @ wk[h]) / np.sqrt(2) for i in range(j + 1)])
                weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
                out[j] += sum(weights[i] * (x[i] @ wv[h]) @ wo[h] for i in range(j + 1))
        x = x + out
    np.testing.assert_allclose(model(jnp.asarray(tokens)), x, rtol=1e-10)


def test_context_mask_hides_the_query_from_every_token(x64):
    model = SelfAttention(3, mask="context", residual=False, init_scale=1.0, rngs=nnx.Rngs(4))
    tokens = jax.random.normal(jax.random.key(5), (4, 3))
    moved = tokens.at[-1].set(tokens[-1] * 3.0)
    # with the query hidden as a key, only the query row itself may change
    np.testing.assert_allclose(model(moved)[:-1], model(tokens)[:-1], rtol=1e-12)
    # a one-token prompt has no context: it sees itself (softmax weight 1), not nothing (a NaN softmax)
    soft = SelfAttention(3, kind="softmax", mask="context", residual=False, init_scale=1.0, rngs=nnx.Rngs(4))
    layer = soft.layers[0]
    own = np.einsum("d,hde,hef->f", tokens[0], layer.wv[...], layer.wo[...])
    np.testing.assert_allclose(soft(tokens[:1])[0], own, rtol=1e-12)


def test_pq_view_round_trips(x64):
    p = jax.random.normal(jax.random.key(6), (2, 3, 5, 5))
    q = jax.random.normal(jax.random.key(7), (2, 3, 5, 5))
    p2, q2 = to_pq(from_pq(p, q))  # products with identity matrices: exact in IEEE arithmetic
    np.testing.assert_array_equal(p2, p)
    np.testing.assert_array_equal(q2, q)
    model = SelfAttention(5, num_layers=2, num_heads=3, key_size=2, init_scale=0.3, rngs=nnx.Rngs(8))
    model = jax.tree.map(lambda a: a.astype(jnp.float64), model)
    tokens = jax.random.normal(jax.random.key(9), (7, 5))
    np.testing.assert_allclose(from_pq(*to_pq(model))(tokens), model(tokens), rtol=1e-10)
    model = SelfAttention(5, num_heads=3, residual=False, mask="causal", init_scale=0.3, rngs=nnx.Rngs(8))
    model = jax.tree.map(lambda a: a.astype(jnp.float64), model)
    view = from_pq(*to_pq(model), residual=model.residual, mask=model.mask)  # as the module docstring says
    np.testing.assert_allclose(view(tokens), model(tokens), rtol=1e-10)


def test_capture_and_identity_edit_leave_outputs_unchanged():
    model = SelfAttention(4, num_layers=2, num_heads=2, init_scale=0.3, rngs=nnx.Rngs(10))
    g, p = nnx.split(model)
    tokens = jax.random.normal(jax.random.key(11), (8, 6, 4))
    identity = {"layer0.attn.out": lambda a: a, "layer1.resid_post": lambda a: a}
    plain = jax.jit(jax.vmap(lambda t: apply(g, p, t)[0]))(tokens)
    # identity edits add no operation: the same jaxpr, so the same compiled program and the same bits
    edited = jax.jit(jax.vmap(lambda t: apply(g, p, t, edits=identity)[0]))(tokens)
    np.testing.assert_array_equal(edited, plain)
    captured, rec = jax.jit(jax.vmap(lambda t: apply(g, p, t, capture="all", edits=identity)))(tokens)
    np.testing.assert_array_equal(rec["layer1.resid_post"], captured)  # one traced value, returned twice
    # another program, and the plain one forms no [T, T] scores (x Wqk (x^T x) Wov): the same function summed in
    # another order (equal to 1e-10 in float64, test_linear_attention_matches_a_brute_force_loop), so float32
    # rounding of O(1) outputs: a few 1e-7
    np.testing.assert_allclose(captured, plain, rtol=1e-5, atol=1e-6)
    assert rec["layer0.attn.scores"].shape == (8, 2, 6, 6)
    np.testing.assert_allclose(rec["layer0.resid_post"], tokens + rec["layer0.attn.out"], rtol=1e-6)
    np.testing.assert_allclose(rec["layer0.attn.heads"].sum(1), rec["layer0.attn.out"], rtol=1e-5, atol=1e-7)


def test_zeroing_edit_changes_outputs_exactly_as_removing_the_layer():
    model = SelfAttention(4, num_layers=2, init_scale=0.5, rngs=nnx.Rngs(12))
    g, p = nnx.split(model)
    tokens = jax.random.normal(jax.random.key(13), (6, 4))
    out, _ = apply(g, p, tokens)
    ablated, _ = jax.jit(lambda t: apply(g, p, t, edits={"layer1.attn.out": jnp.zeros_like}))(tokens)
    assert np.abs(ablated - out).max() > 1e-3
    _, rec = apply(g, p, tokens, capture=["layer0.resid_post"])
    # layer 1 adds exact zeros to layer 0's output; the two are computed by different programs (jit vs eager)
    np.testing.assert_allclose(ablated, rec["layer0.resid_post"], rtol=1e-6, atol=1e-7)


def test_grad_through_an_edit_and_per_prompt_edits_under_vmap():
    model = SelfAttention(3, init_scale=0.5, rngs=nnx.Rngs(14))
    g, p = nnx.split(model)
    tokens = jax.random.normal(jax.random.key(15), (5, 3))
    scales = jnp.array([0.0, 1.0, 2.0])
    outs = jax.vmap(lambda s: apply(g, p, tokens, edits={"layer0.attn.out": lambda a: s * a})[0])(scales)
    _, rec = apply(g, p, tokens, capture=["layer0.attn.out"])
    np.testing.assert_allclose(outs[2] - outs[1], rec["layer0.attn.out"], rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda s: apply(g, p, tokens, edits={"layer0.attn.out": lambda a: s * a})[0].sum())(1.0)
    np.testing.assert_allclose(grad, rec["layer0.attn.out"].sum(), rtol=1e-5)


def test_unknown_site_names_raise():
    model = SelfAttention(3, rngs=nnx.Rngs(0))
    g, p = nnx.split(model)
    with pytest.raises(KeyError, match="layer7.attn.out"):
        apply(g, p, jnp.ones((4, 3)), capture=["layer7.attn.out"])


class Looped(Model):
    """A weight-shared block run `loops` times that names its site without the loop index."""

    def __init__(self, loops: int, rngs: nnx.Rngs):
        self.loops = loops
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 3)))

    def __call__(self, tokens, sites=null_sites):
        x = tokens
        for _ in range(self.loops):
            x = sites("block.out", x + jnp.tanh(x @ self.w[...]))
        return x


def test_a_site_visited_twice_in_one_forward_pass_is_refused():
    """The cache kept only the last visit and an edit or a patch changed every visit, silently."""
    g, p = nnx.split(Looped(3, nnx.Rngs(0)))
    message = ("site 'block.out' visited twice in one forward pass: site names must be unique per forward pass; put "
               "the loop index in the name (e.g. f\"block{i}.out\")")
    for capture in ((), ["block.out"], "all"):
        with pytest.raises(ValueError, match=re.escape(message)):
            apply(g, p, jnp.ones((4, 3)), capture=capture)
    assert apply(*nnx.split(Looped(1, nnx.Rngs(0))), jnp.ones((4, 3)), capture=["block.out"])[1]["block.out"].shape \
        == (4, 3)


@pytest.mark.parametrize("build,tokens,capture", [
    # from SPLIT_FROM positions GPT asks wants() for scores and weights and computes both when one is read
    (lambda: GPT(d_model=4, n_layers=1, n_heads=2, d_mlp=None, max_len=SPLIT_FROM, input_dim=1, rngs=nnx.Rngs(0)),
     jnp.ones((SPLIT_FROM, 1)), ["layer0.attn.scores"]),
    # linear attention without a mask asks for scores, then heads, and computes both when heads are read
    (lambda: SelfAttention(3, rngs=nnx.Rngs(0)), jnp.ones((4, 3)), ["layer0.attn.heads"])])
def test_a_site_skipped_through_wants_and_computed_after_all_is_visited_once(build, tokens, capture):
    model, sites = build(), Sites(capture)
    model(tokens, sites=sites)
    assert sorted(sites.seen) == sorted(model.site_shapes(jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)))


def test_bad_model_options_name_the_field():
    with pytest.raises(ValueError, match="kind"):
        SelfAttention(3, kind="relu", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mask"):
        SelfAttention(3, mask="diagonal", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_heads"):
        SelfAttention(3, num_heads=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="key_size must be > 0"):
        SelfAttention(3, key_size=0, rngs=nnx.Rngs(0))  # attention identically zero
    # constructed, then failed inside JAX naming no argument (sizes), or ran on silently (nan: every output nan;
    # residual="no": with the residual; key_size: ignored)
    for build, message in (
            (lambda: SelfAttention(4, num_heads=1.5, rngs=nnx.Rngs(0)), "num_heads must be an integer, got 1.5"),
            (lambda: SelfAttention(4, init_scale=np.nan, rngs=nnx.Rngs(0)), "init_scale must be a finite number"),
            (lambda: SelfAttention(4, residual="no", rngs=nnx.Rngs(0)), "residual must be True or False, got 'no'"),
            (lambda: FactorTransformer(n_heads=2.0, rngs=nnx.Rngs(0)), "n_heads must be an integer, got 2.0"),
            (lambda: LEA(n_words=128.0, rngs=nnx.Rngs(0)), "n_words must be an integer, got 128.0"),
            (lambda: LEA(init_std=np.inf, rngs=nnx.Rngs(0)), "init_std must be a finite number, got inf"),
            (lambda: GPT(input_dim=1, final_norm="no", rngs=nnx.Rngs(0)), "final_norm must be True or False"),
            (lambda: AugmentedTransformer(6, out_dim=1.5, rngs=nnx.Rngs(0)), "out_dim must be an integer, got 1.5"),
            (lambda: DiagonalPositionalAttention(2, 2, 5.0, rngs=nnx.Rngs(0)), "seq_len must be an integer, got 5.0"),
            (lambda: NearestNeighborAttention(3, key_size=7, rngs=nnx.Rngs(0)), "key_size=7 sizes W_K and W_Q of "
             "parametrisation='separate'; parametrisation='merged' holds W [D, D]: leave key_size=None")):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            build()


@pytest.mark.parametrize("mask,fmt", [("none", "paired"), ("causal", "paired"), ("causal", "interleaved")])
def test_linear_attention_on_a_front_padded_prompt_is_the_short_prompt_model_with_wo_scaled(x64, mask, fmt):
    """Padding to n_context leaves every real position of the k-context model unchanged once each
    layer's wo is scaled by n_context / k (the 1 / (T - 1) normalisation counts the padding)."""
    from jaxicl.tasks import linear_regression as lr

    cfg = lr.LinearRegression(dim=3, n_context=7, format=fmt)
    k = 3
    padded = lr.sample(cfg, jax.random.key(2), n_context=k).inputs.astype(jnp.float64)
    tokens_per_pair = 1 if fmt == "paired" else 2
    short = padded[tokens_per_pair * (cfg.n_context - k):]  # the k-context prompt itself
    model = SelfAttention(4, num_layers=2, num_heads=2, mask=mask, init_scale=0.4, rngs=nnx.Rngs(3))
    model = jax.tree.map(lambda a: a.astype(jnp.float64), model)
    scaled = nnx.clone(model)
    for layer in scaled.layers:
        layer.wo[...] = layer.wo[...] * cfg.n_context / k
    out_padded = scaled(padded)
    np.testing.assert_allclose(out_padded[len(padded) - len(short):], model(short), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(out_padded[:len(padded) - len(short)], 0.0)  # padding stays zero


def test_site_shapes_match_the_captured_values_without_running_the_model():
    model = SelfAttention(4, num_layers=2, num_heads=3, kind="softmax", key_size=2, rngs=nnx.Rngs(14))
    tokens = jax.random.normal(jax.random.key(15), (6, 4))
    shapes = model.site_shapes(jax.ShapeDtypeStruct(tokens.shape, tokens.dtype))
    _, rec = apply(*nnx.split(model), tokens, capture="all")
    assert {k: (v.shape, v.dtype) for k, v in shapes.items()} == {k: (v.shape, v.dtype) for k, v in rec.items()}
    assert shapes["layer1.attn.weights"].shape == (3, 6, 6)


T, H = 5, 3  # prompt length and head count, distinct from every other axis size below
AXES_CASES = {  # model class -> (model, one prompt [T, ...], head count or None)
    SelfAttention: lambda: (SelfAttention(4, num_layers=2, num_heads=H, kind="softmax", key_size=2, rngs=nnx.Rngs(0)),
                            jnp.ones((T, 4)), H),
    AugmentedLinearAttention: lambda: (AugmentedLinearAttention(2, rngs=nnx.Rngs(0)), jnp.ones((T, 6)), None),
    DiagonalPositionalAttention: lambda: (DiagonalPositionalAttention(2, H, T, rngs=nnx.Rngs(0)), jnp.ones((T, 2)), H),
    PositionalOnlyAttention: lambda: (PositionalOnlyAttention(T), jnp.ones((T, 1)), 1),
    AugmentedTransformer: lambda: (AugmentedTransformer(6, 2, out_dim=2, rngs=nnx.Rngs(0)), jnp.ones((T, 6)), None),
    PositionalTransformer: lambda: (PositionalTransformer(2, 4, num_heads=H, max_len=7, rngs=nnx.Rngs(0)),
                                    jnp.ones((T, 2)), H),
    NearestNeighborAttention: lambda: (NearestNeighborAttention(2, rngs=nnx.Rngs(0)), jnp.ones((T, 4)), None),
    GPT: lambda: (GPT(d_model=12, n_layers=1, n_heads=H, d_mlp=8, max_len=7, input_dim=2, rngs=nnx.Rngs(0)),
                  jnp.ones((T, 2)), H),
    FactorTransformer: lambda: (FactorTransformer(vocab_size=7, d_model=12, d_pos=2, n_layers=1, n_heads=H, max_len=7,
                                                  rngs=nnx.Rngs(0)), jnp.arange(T), H),
    LEA: lambda: (LEA(vocab_size=7, d_model=12, d_pos=2, n_layers=1, n_heads=H, board_len=T, n_words=8, message_len=4,
                      rngs=nnx.Rngs(0)), jnp.arange(T), H),
}


def _model_classes() -> set[type]:
    """Every Model subclass with a forward pass defined in jaxicl.models."""
    for module in pkgutil.iter_modules(jaxicl.models.__path__):
        importlib.import_module(f"jaxicl.models.{module.name}")
    found, todo = set(), [Model]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("jaxicl.models.") and any("__call__" in vars(c) for c in sub.__mro__[:-1]
                                                                   if issubclass(c, Model)):
                found.add(sub)
    return found


def test_every_model_class_is_covered_by_the_site_axes_test():
    assert _model_classes() == set(AXES_CASES)


@pytest.mark.parametrize("cls", list(AXES_CASES), ids=lambda c: c.__name__)
def test_site_axes_name_every_axis_with_pos_of_size_t_and_head_of_size_h(cls):
    """Patching selects positions and heads by these names, so a misnamed axis patches the wrong slice silently."""
    model, tokens, heads = AXES_CASES[cls]()
    _, rec = apply(*nnx.split(model), tokens, capture="all")
    info = site_info(*nnx.split(model), tokens)
    for name, value in rec.items():
        axes = model.site_axes(name, value.ndim)
        assert info[name] == (value.shape, axes)  # the analyses see the axes the model declares
        assert len(axes) == value.ndim and len(set(axes)) == len(axes), (name, value.shape, axes)
        if "pos" in axes:
            assert value.shape[axes.index("pos")] == T, (name, value.shape, axes)
        if "head" in axes:
            assert heads is not None and value.shape[axes.index("head")] == heads, (name, value.shape, axes)


@pytest.mark.parametrize("cls", list(AXES_CASES), ids=lambda c: c.__name__)
def test_a_bfloat16_model_computes_its_output_and_every_site_in_bfloat16(cls):
    """The autoregressive models masked with float32 (or default-float) 0/1 arrays: every site after the mask, and the
    output, came out float32 (the analyses' promise: a bfloat16 forward pass stays bfloat16)."""
    model, tokens, _ = AXES_CASES[cls]()
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    tokens = tokens.astype(jnp.bfloat16) if jnp.issubdtype(tokens.dtype, jnp.floating) else tokens
    out, rec = apply(graphdef, state, tokens, capture="all")
    assert {name: str(v.dtype) for name, v in {"output": out, **rec}.items() if v.dtype != jnp.bfloat16} == {}


@pytest.mark.parametrize("build,width,site", [
    (lambda: SelfAttention(4, mask="causal", init_scale=0.5, rngs=nnx.Rngs(0)), 4, "layer0.attn.scores"),
    (lambda: AugmentedTransformer(6, rngs=nnx.Rngs(0)), 6, "layer0.attn.scores"),
    (lambda: DiagonalPositionalAttention(2, H, T, rngs=nnx.Rngs(0)), 2, "attn.scores"),
], ids=["SelfAttention", "AugmentedTransformer", "DiagonalPositionalAttention"])
def test_an_edit_or_patch_of_causal_linear_scores_cannot_unmask_a_later_key(build, width, site):
    """These linear attentions masked before the scores site only: an edit (all ones) made a query read later tokens,
    and the gradient at a hidden entry (what attribution patching multiplies) was up to 4.4. The softmax models
    mask after their site already."""
    graphdef, params = nnx.split(build())
    tokens = jax.random.normal(jax.random.key(3), (T, width))
    later = tokens.at[-1].add(1.0)  # the last token: no earlier query may read it
    edit = {site: jnp.ones_like}
    np.testing.assert_array_equal(apply(graphdef, params, tokens, edits=edit)[0][:-1],
                                  apply(graphdef, params, later, edits=edit)[0][:-1])
    shape = apply(graphdef, params, tokens, capture=[site])[1][site].shape
    grad = jax.grad(lambda d: jnp.sum(apply(graphdef, params, tokens, patch=Patch(deltas={site: d}))[0]))(
        jnp.zeros(shape))
    assert not np.asarray(grad)[..., np.triu(np.ones((T, T), bool), 1)].any()


@pytest.mark.parametrize("build,tokens,match", [
    (lambda: FactorTransformer(max_len=4, rngs=nnx.Rngs(0)), jnp.zeros(5, jnp.int32), "its max_len=4 .at most"),
    (lambda: PositionalTransformer(2, 2, num_heads=2, max_len=4, rngs=nnx.Rngs(0)), jnp.zeros((5, 2)),
     "its max_len=4 .at most"),
    (lambda: DiagonalPositionalAttention(2, 2, 5, rngs=nnx.Rngs(0)), jnp.zeros((4, 2)), "its seq_len=5 .exactly"),
    (lambda: PositionalOnlyAttention(5), jnp.zeros((7, 1)), "its seq_len=5 .exactly"),
    (lambda: LEA(d_model=4, d_pos=2, n_layers=1, board_len=4, n_words=3, message_len=2, rngs=nnx.Rngs(0)),
     jnp.zeros(5, jnp.int32), "its board_len=4 .at most")])
def test_a_prompt_that_does_not_fit_the_positions_names_the_field(build, tokens, match):
    model = build()
    with pytest.raises(ValueError, match=f"a prompt of {tokens.shape[0]} positions does not fit this model: {match}"):
        model(tokens)
    model(tokens[:4] if "at most" in match else jnp.zeros((5, tokens.shape[1])))  # a prompt that fits runs


PROMPT_FORMATS = {  # model class (as built in AXES_CASES) -> (the prompt's shape, its format) as the messages name them
    SelfAttention: ("[T, 4]", "vectors (dim=4)"),
    AugmentedLinearAttention: ("[T, 6]", "augmented tokens (0, s_t, s_(t-1)) of states of dim 2"),
    DiagonalPositionalAttention: ("[T, 2]", "the states themselves (format='tiled' with tile=1) of dim 2"),
    PositionalOnlyAttention: ("[T, 1]", "the states themselves (format='tiled' with tile=1) of dim 1"),
    AugmentedTransformer: ("[T, 6]", "vectors (dim=6)"),
    PositionalTransformer: ("[T, 2]", "vectors (dim=2)"),
    NearestNeighborAttention: ("[T, 4]", "tokens [x; y; 0] (dim=2 + label_dim=1 + 1)"),
    GPT: ("[T, 2]", "vectors (input_dim=2)"),
    FactorTransformer: ("[T]", "token ids"),
    LEA: ("[T]", "board token ids"),
}


@pytest.mark.parametrize("cls", list(AXES_CASES), ids=lambda c: c.__name__)
def test_a_batch_or_tokens_of_another_width_are_refused_naming_the_prompt_the_model_takes(cls):
    """A batch [B, T, ...] given for one prompt, or vectors one wider than the model's, failed inside an einsum, a dot
    product, a concatenate or a tuple unpacking, or was read as a prompt of B positions (the positional models)."""
    assert set(PROMPT_FORMATS) == set(AXES_CASES)  # every model class
    model, tokens, _ = AXES_CASES[cls]()
    shape, what = PROMPT_FORMATS[cls]
    batch = jnp.stack([tokens, tokens])
    with pytest.raises(ValueError) as refused:
        model(batch)
    assert str(refused.value) == (f"the model takes one prompt, tokens {shape} ({what}), got shape {batch.shape}: "
                                  f"batched functions (run_with_cache, activation_patching, ...) take a batch [B, ...] "
                                  f"of such prompts")
    if tokens.ndim == 2:
        width = tokens.shape[1]
        with pytest.raises(ValueError) as refused:
            model(jnp.ones((T, width + 1)))
        assert str(refused.value) == (f"the model takes tokens {shape} ({what}), got tokens of width {width + 1} "
                                      f"(shape ({T}, {width + 1}))")
    with pytest.raises(ValueError, match="takes one prompt"):  # at trace time (shapes are static), under jit too
        jax.jit(model)(batch)


def test_an_lea_message_of_another_length_or_width_is_refused_naming_its_shape():
    """A message of 3 vectors for message_len=2 failed inside a concatenate with a TypeError."""
    model = LEA(d_model=4, d_pos=2, n_layers=1, board_len=4, n_words=3, message_len=2, rngs=nnx.Rngs(0))
    board = jnp.zeros(4, jnp.int32)
    for shape in ((3, 4), (2, 5)):
        with pytest.raises(ValueError, match=re.escape(f"[message_len, d_model] = (2, 4) vectors, got shape {shape}")):
            model.picture(board, jnp.zeros(shape))
    assert model.picture(board, jnp.zeros((2, 4)))[0].shape == (4, 21)
