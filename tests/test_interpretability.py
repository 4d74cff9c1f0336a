"""The compiled interpretability toolkit: caches, patching grids, attribution, ablation, direct attribution, probes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxicl.analysis.ablation import ablate_heads
from jaxicl.analysis.attention_patterns import mass_at_offset, mass_profile
from jaxicl.analysis.cache import run_with_cache, site_info
from jaxicl.analysis.direct_attribution import direct_attribution, ov_circuit, ov_gain, qk_circuit
from jaxicl.analysis.patching import (activation_patching, attribution_patching, direct_effect_patching, grid_memory,
                                      patched_predictions, resolve_chunk_size)
from jaxicl.analysis.perturbation import perturbation_distances, perturbed_outputs
from jaxicl.analysis.probes import probe, ridge_fit, ridge_predict
from jaxicl.analysis.steering import edit_each_site
from jaxicl.models import SelfAttention, apply, predictor
from jaxicl.models.ar_transformer import PositionalTransformer
from jaxicl.models.base import Model
from jaxicl.models.gpt import GPT
from jaxicl.prompt import Prompt
from jaxicl.sites import Patch, null_sites
from jaxicl.tasks import affine_recurrence as ar
from jaxicl.tasks import sample_batch
from jaxicl.train import TrainConfig, per_position_loss, regression_loss, train
from jaxicl.train.mesh import data_mesh

B, T = 4, 5


def _setup(final_norm=True, d_mlp=None):
    g, p = nnx.split(GPT(d_model=8, n_layers=2, n_heads=2, d_mlp=d_mlp, max_len=T, input_dim=1, final_norm=final_norm,
                         init_std=0.4, rngs=nnx.Rngs(0)))
    clean = jax.random.normal(jax.random.key(1), (B, T, 1))
    corrupted = jax.random.normal(jax.random.key(2), (B, T, 1))
    return g, p, clean, corrupted


def mean_prediction(pred):
    return jnp.mean(pred)


def last_sq(pred):
    return jnp.mean(pred[:, -1] ** 2)


def test_cache_keeps_only_the_requested_sites_and_the_predictions():
    g, p, clean, _ = _setup()
    pred, cache = run_with_cache(g, p, clean, ["layer1.attn.z", "layer0.resid_post"])
    assert set(cache) == {"layer1.attn.z", "layer0.resid_post"} and cache["layer1.attn.z"].shape == (B, T, 2, 4)
    np.testing.assert_allclose(pred, jax.vmap(predictor(g, p))(clean), rtol=1e-5, atol=2e-6)  # float32: ulps of O(1) terms
    with pytest.raises(ValueError, match=r"names: unknown site name\(s\) \['layer1.attn.pattern'\]"):
        run_with_cache(g, p, clean, ["layer1.attn.pattern"])


def test_cache_and_site_info_keep_the_forward_order_of_the_sites():
    """As TransformerLens's cache: embed first, layer2 before layer10, unembed.in last (jit's output dict sorted them,
    so layer10 came before layer2 and embed after attn)."""
    model = GPT(d_model=4, n_layers=11, n_heads=1, max_len=T, input_dim=1, rngs=nnx.Rngs(0))
    g, p = nnx.split(model)
    clean = jnp.ones((2, T, 1))
    _, cache = run_with_cache(g, p, clean, "all")
    order = list(cache)
    assert order[:3] == ["embed", "pos_embed", "layer0.resid_pre"] and order[-1] == "unembed.in"
    layers = [int(n.split(".")[0][5:]) for n in order if n.startswith("layer")]
    assert layers == sorted(layers) and layers[-1] == 10
    block = [n.split(".", 1)[1] for n in order if n.startswith("layer3.")]
    assert block.index("resid_pre") < block.index("attn.q") < block.index("attn.out") < block.index("resid_mid")
    assert block.index("resid_mid") < block.index("mlp.pre") < block.index("mlp.out") < block.index("resid_post")
    assert list(site_info(g, p, clean[0])) == order
    _, some = run_with_cache(g, p, clean, ["layer10.resid_post", "layer2.resid_post", "embed"])
    assert list(some) == ["embed", "layer2.resid_post", "layer10.resid_post"]


def test_cache_of_sites_named_by_a_generator_keeps_them_all():
    """A generator of names is read once: checked and cached alike (the check used to spend it, leaving {})."""
    g, p, clean, _ = _setup()
    sites = ["layer1.attn.z", "layer0.resid_post"]
    _, want = run_with_cache(g, p, clean, sites)
    _, cache = run_with_cache(g, p, clean, (s for s in sites))
    assert set(cache) == set(sites)
    for s in sites:  # the same compiled program on the same prompts
        np.testing.assert_allclose(cache[s], want[s], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="names: give a list of site names, got the string 'layer1.attn.z'"):
        run_with_cache(g, p, clean, "layer1.attn.z")


def test_heads_and_sites_given_by_a_generator_give_what_the_list_gives():
    """Each analysis reads its heads or sites once. A generator used to be spent by the first pass: ablate_heads
    ablated every head of the named layers (no masks) and checked no head, the grids failed with KeyError 'head',
    direct_effect_patching, edit_each_site and perturbation_distances found no heads or sites."""
    g, p, clean, corrupted = _setup()
    heads, sites = [(0, 1), (1, 0)], ["layer0.resid_post", "layer1.resid_post"]
    cells = np.zeros((B, T), bool)
    cells[:, 2] = True
    analyses = {
        "ablate_heads": lambda h, s: ablate_heads(g, p, clean, h, kind="mean"),
        "direct_effect_patching": lambda h, s: direct_effect_patching(g, p, clean, corrupted, last_sq, h),
        "activation_patching": lambda h, s: activation_patching(g, p, clean, corrupted, last_sq, s, by="pos"),
        "attribution_patching": lambda h, s: attribution_patching(g, p, clean, corrupted, last_sq, s, by="pos"),
        "grid_memory": lambda h, s: grid_memory(g, p, clean, corrupted, last_sq, s, "pos"),
        "edit_each_site": lambda h, s: edit_each_site(g, p, clean, s, cells, deltas=np.ones((2, B, T, 8))),
        "perturbation_distances": lambda h, s: perturbation_distances(g, p, clean, "layer0.resid_pre", cells, 0.5,
                                                                      jax.random.key(3), s),
    }
    for name, f in analyses.items():
        # the same compiled program on the same inputs: exactly equal; grid_memory's bytes are integers
        np.testing.assert_array_equal(f((h for h in heads), (s for s in sites)), f(heads, sites), err_msg=name)
    with pytest.raises(ValueError, match=re.escape("heads: head index 5 of layer 0 is out of range; allowed 0..1")):
        ablate_heads(g, p, clean, ((0, h) for h in [5]))
    with pytest.raises(ValueError, match=re.escape("heads: give at least one (layer, head) pair")):
        ablate_heads(g, p, clean, [])  # an empty patch: the unablated predictions, as if a head had been ablated


def test_patching_clean_into_clean_changes_nothing_and_every_site_into_corrupted_gives_the_clean_output():
    g, p, clean, corrupted = _setup()
    base = float(last_sq(run_with_cache(g, p, clean, [])[0]))
    same = activation_patching(g, p, clean, clean, last_sq, ["layer0.resid_pre", "layer1.attn.z"], by="pos")
    np.testing.assert_allclose(same, base, rtol=1e-5)  # the patch writes the values the run computes anyway
    _, cache = run_with_cache(g, p, clean, ["layer1.resid_post"])
    full = patched_predictions(g, p, corrupted, Patch(values={"layer1.resid_post": cache["layer1.resid_post"]}))
    np.testing.assert_allclose(full, run_with_cache(g, p, clean, [])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sites,by,shape,chunk", [(["layer0.resid_pre", "layer1.resid_pre"], "pos", (2, T), 3),
                                                  (["layer0.attn.z", "layer1.attn.z"], "pos_head", (2, T, 2), 3),
                                                  (["layer1.attn.z", "layer0.attn.z"], "pos_head", (2, T, 2), None),
                                                  (["layer0.attn.z", "layer1.attn.z"], "head", (2, 2), "auto"),
                                                  (["layer1.mlp.out", "unembed.in"], "site", (2,), 3)])
def test_the_vmapped_grid_equals_a_loop_of_single_patches(sites, by, shape, chunk):
    g, p, clean, corrupted = _setup()
    grid = activation_patching(g, p, clean, corrupted, last_sq, sites, by=by, chunk_size=chunk)
    assert grid.shape == shape
    _, cache = run_with_cache(g, p, clean, sites)
    loop = np.zeros(shape)
    for index in np.ndindex(*shape):  # one patch, one forward pass at a time, by hand
        s = sites[index[0]]
        value = np.asarray(cache[s])
        patched = value.copy()
        corrupt = np.asarray(run_with_cache(g, p, corrupted, [s])[1][s])
        keep = np.zeros(value.shape[1:], bool)
        pos, head = (index[1] if "pos" in by else slice(None)), (index[-1] if "head" in by else slice(None))
        keep[(pos, head) if value.ndim == 4 else (pos,)] = True
        patched = np.where(keep, value, corrupt)
        loop[index] = float(last_sq(patched_predictions(g, p, corrupted, Patch(values={s: jnp.asarray(patched)}))))
    np.testing.assert_allclose(grid, loop, rtol=1e-5, atol=1e-7)  # vmapped vs one program per patch


def test_a_metric_reading_a_reassigned_global_is_scored_with_its_value_at_each_call():
    """The metric was a static argument of the compiled grid, so a metric reading a global (an answer position, a
    target array) replayed its first call's values after the global changed, with no error."""
    from jaxicl.analysis import patching

    g, p, clean, corrupted = _setup()
    state = {"pos": 1, "target": jnp.zeros(B)}

    def metric(pred):  # reads state at trace time, as a notebook metric reads its globals
        return jnp.mean((pred[:, state["pos"]] - state["target"]) ** 2)

    tools = [lambda m: activation_patching(g, p, clean, corrupted, m, ["layer0.attn.z"], by="head"),
             lambda m: attribution_patching(g, p, clean, corrupted, m, ["layer0.attn.z"], by="head"),
             lambda m: direct_effect_patching(g, p, clean, corrupted, m, [(0, 1), (1, 0)])]
    for tool in tools:
        state.update(pos=1, target=jnp.zeros(B))
        first = tool(metric)
        for pos, target in [(3, jnp.zeros(B)), (3, jnp.full(B, 2.0))]:  # a new index, then a new closed-over array
            state.update(pos=pos, target=target)
            fresh = tool(lambda pred, pos=pos, target=target: jnp.mean((pred[:, pos] - target) ** 2))
            np.testing.assert_array_equal(tool(metric), fresh)  # the same traced metric: the same program
            assert np.abs(fresh - first).max() > 1e-3  # and the values did change
    # a metric traced to the same program is compiled once, whatever the function object or the array it reads
    before = patching._grid_metric._cache_size()
    for target in (jnp.ones(B), 5 * jnp.ones(B)):
        activation_patching(g, p, clean, corrupted, lambda pred, t=target: jnp.mean((pred[:, -1] - t) ** 2),
                            ["layer1.attn.z"], by="pos")
    assert patching._grid_metric._cache_size() == before + 1


def test_metrics_that_differ_only_in_a_host_callback_or_a_custom_derivative_rule_get_their_own_numbers():
    """The metric's program was keyed by its printed jaxpr, in which JAX masks the address of a host callback's
    function and prints no custom_jvp / custom_vjp rule: a second metric differing only there was scored with the
    first one's compiled program."""
    from jaxicl.analysis import patching

    g, p, clean, corrupted = _setup()
    args = (g, p, clean, corrupted)

    def host_metric(weight):  # a metric computed on the host, its weight in the callback's closure
        def on_host(pred):  # [B, T] -> scalar
            return np.float32(weight * np.mean(pred[:, -1]))

        return lambda pred: jax.pure_callback(on_host, jax.ShapeDtypeStruct((), jnp.float32), pred,
                                              vmap_method="sequential")

    one, minus_ten = (activation_patching(*args, host_metric(w), ["layer0.attn.z"], by="head") for w in (1.0, -10.0))
    # float32: -10 times the same mean, rounded once either way (equal here; a rounding's room for two programs)
    np.testing.assert_allclose(minus_ten, -10 * one, rtol=1e-6)

    def scaled_vjp(scale):  # the mean prediction at the last position, its gradient scaled by a custom_vjp
        @jax.custom_vjp
        def f(x):
            return x

        f.defvjp(lambda x: (x, None), lambda _, ct: (scale * ct,))
        return lambda pred: jnp.mean(f(pred[:, -1]))

    def scaled_jvp(scale):  # the same through a custom_jvp
        @jax.custom_jvp
        def f(x):
            return x

        f.defjvp(lambda primals, tangents: (primals[0], scale * tangents[0]))
        return lambda pred: jnp.mean(f(pred[:, -1]))

    for scaled in (scaled_vjp, scaled_jvp):
        # attribution is the corrupted run's metric (the same for every scale) plus its gradient times the patch
        base, one, five = (attribution_patching(*args, scaled(s), ["layer0.attn.z"], by="head") for s in (0., 1., 5.))
        assert np.abs(one - base).min() > 0.1
        # float32: sums of products, then differences of values of like size: a few float32 roundings (3e-7 seen)
        np.testing.assert_allclose(five - base, 5 * (one - base), rtol=1e-5)
    # a custom_jvp's rule is traced and compared: jax.nn.relu's programs, from two function objects, compiled once
    before = patching._attribution._cache_size()
    for shift in (jnp.ones(B), 2 * jnp.ones(B)):  # arrays the metric closes over: arguments of its program
        attribution_patching(*args, lambda pred, shift=shift: jnp.mean(jax.nn.relu(pred[:, -1] + shift)),
                             ["layer0.attn.z"], by="head")
    assert patching._attribution._cache_size() == before + 1

def test_attribution_patching_is_exact_where_the_metric_is_linear_in_the_patched_activation():
    g, p, clean, corrupted = _setup(final_norm=False)
    # without a final norm the output is affine in unembed.in; mean_prediction is linear in the output
    args = (g, p, clean, corrupted, mean_prediction, ["unembed.in"])
    np.testing.assert_allclose(attribution_patching(*args, by="pos"), activation_patching(*args, by="pos"),
                               rtol=1e-5, atol=1e-6)
    # through attention and MLPs it is only a first-order estimate
    nonlinear = (g, p, clean, corrupted, last_sq, ["layer0.resid_pre"])
    gap = np.abs(attribution_patching(*nonlinear, by="pos") - activation_patching(*nonlinear, by="pos"))
    assert gap.max() > 1e-3


def test_attribution_patching_of_a_complex_site_is_real_and_exact_where_the_metric_is_linear():
    """For a complex site JAX's gradient of a real metric is df/dRe - i df/dIm: the first-order change of the metric
    is the real part of grad * delta, a real number."""
    from jaxicl.models.ar_linear_attention import DiagonalPositionalAttention

    g, p = nnx.split(DiagonalPositionalAttention(2, 2, 4, init_scale=0.5, rngs=nnx.Rngs(0)))
    clean, corrupted = (jax.lax.complex(*jax.random.normal(jax.random.key(k), (2, 2, 4, 2))) for k in (1, 2))

    def metric(predictions):  # linear in attn.heads (the output is the sum of the heads)
        return jnp.mean(jnp.real(predictions[:, -1, 0]))

    args = (g, p, clean, corrupted, metric, ["attn.heads"])
    attribution = attribution_patching(*args, by="head")
    assert not np.iscomplexobj(attribution)
    np.testing.assert_allclose(attribution, activation_patching(*args, by="head"), rtol=1e-5, atol=1e-6)


def test_direct_effect_of_a_head_is_its_output_difference_sent_straight_to_the_output():
    g, p, clean, corrupted = _setup(final_norm=False)
    effect = direct_effect_patching(g, p, clean, corrupted, mean_prediction, [(0, 1), (1, 0)])
    model = nnx.merge(g, p)
    for (layer, h), got in zip([(0, 1), (1, 0)], effect):
        heads = [run_with_cache(g, p, x, [f"layer{layer}.attn.heads"])[1][f"layer{layer}.attn.heads"][:, :, h]
                 for x in (clean, corrupted)]
        # no final norm: the output moves by (clean - corrupted head output) W_U
        expected = float(mean_prediction(run_with_cache(g, p, corrupted, [])[0]) +
                         jnp.mean((heads[0] - heads[1]) @ model.unembed[...]))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"head index 2 of layer 0 is out of range; allowed 0..1"):
        direct_effect_patching(g, p, clean, corrupted, mean_prediction, [(0, 2)])


def test_without_a_residual_stream_only_the_last_layers_heads_have_a_direct_effect():
    g, p = nnx.split(SelfAttention(4, num_layers=2, num_heads=2, residual=False, init_scale=0.3, rngs=nnx.Rngs(0)))
    clean, corrupted = (jax.random.normal(jax.random.key(k), (B, T, 4)) for k in (1, 2))
    with pytest.raises(ValueError, match=r"no residual stream \(residual=False\).*layer\(s\) \[0\]"):
        direct_effect_patching(g, p, clean, corrupted, last_sq, [(0, 1), (1, 0)])
    # the last layer's output is the sum of its heads: patching a head there is its direct effect
    direct = direct_effect_patching(g, p, clean, corrupted, last_sq, [(1, 0), (1, 1)])
    patched = activation_patching(g, p, clean, corrupted, last_sq, ["layer1.attn.heads"], by="head")[0]
    np.testing.assert_allclose(direct, patched, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("final_norm", [False, True])
def test_direct_attributions_add_up_to_the_prediction(final_norm, backend_compiles):
    g, p, clean, _ = _setup(final_norm=final_norm)
    if final_norm:  # not the init's scale 1 and bias 0, which a part that leaves them out would match
        for k, name in enumerate(("scale", "bias")):
            p["ln_final"][name][...] = 1.0 + jax.random.normal(jax.random.key(10 + k), (8,))
    prompt = clean[0]
    before = len(backend_compiles)
    parts = direct_attribution(g, p, prompt)
    assert len(backend_compiles) - before == 1  # one program; op by op, 45 compilations at the first call
    batch = jax.vmap(lambda t: direct_attribution(g, p, t))(clean)  # float32 products batched: another program
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6), batch, parts)
    total = parts["embed"] + parts["pos_embed"] + parts["heads"].sum((0, 1)) + parts["mlp"].sum(0) + parts["bias"]
    np.testing.assert_allclose(total, nnx.merge(g, p)(clean[0]), rtol=1e-5, atol=1e-6)  # float32 sums in two orders
    assert parts["heads"].shape == (2, 2, T, 1)
    # each part on its own (the sum holds for any split, e.g. heads indexed [H, L]): the component through the final
    # LayerNorm with its scale frozen at the prompt's value, in float64 (TransformerLens's decompose_resid, apply_ln)
    model = nnx.merge(g, p)
    sites = ["layer0.attn.heads", "layer1.mlp.out", "final_norm.scale"]
    _, cache = apply(g, p, clean[0], capture=sites[:2 + final_norm])
    w_u = np.asarray(model.unembed[...], np.float64)

    def direct(c):
        c = np.asarray(c, np.float64)
        if not final_norm:
            return c @ w_u
        c = (c - c.mean(-1, keepdims=True)) / np.asarray(cache["final_norm.scale"]) * np.asarray(model.ln_final.scale)
        return c @ w_u

    np.testing.assert_allclose(parts["heads"][0, 1], direct(cache["layer0.attn.heads"][:, 1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts["mlp"][1], direct(cache["layer1.mlp.out"]), rtol=1e-5, atol=1e-6)


def test_ablation_of_a_head_with_zero_ov_weights_changes_nothing_and_zero_ablation_matches_a_hand_patch():
    g, p, clean, _ = _setup()
    p["blocks"][1]["attn"]["wo"][...] = p["blocks"][1]["attn"]["wo"][...].at[0].set(0.0)  # head (1, 0) writes nothing
    plain = run_with_cache(g, p, clean, [])[0]
    for kind in ("zero", "mean", "resample"):
        ablated = ablate_heads(g, p, clean, [(1, 0)], kind=kind, key=jax.random.key(0))
        np.testing.assert_allclose(ablated, plain, rtol=1e-6, atol=1e-7)
    hand = run_with_cache(g, p, clean, ["layer0.attn.z"])[1]["layer0.attn.z"].at[:, :, 1].set(0.0)
    np.testing.assert_allclose(ablate_heads(g, p, clean, [(0, 1)], kind="zero"),
                               patched_predictions(g, p, clean, Patch(values={"layer0.attn.z": hand})),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="kind must be one of"):
        ablate_heads(g, p, clean, [(0, 1)], kind="noise")


def test_mean_and_resample_ablation_of_a_writing_head_match_hand_patches():
    """Head (0, 1) has nonzero W_O. mean: its z replaced by the batch mean over prompts, per position; resample on the
    batch itself: by z of prompt (b + offset) % B with offset uniform in 1..B-1 (never the prompt itself);
    resample from a separate reference: by z of a uniform reference prompt. Same key, so the picks are reproduced."""
    g, p, clean, corrupted = _setup()
    key = jax.random.key(7)

    def hand(z_head):  # the predictions with head 1's z [B, T, dh] at layer 0 replaced
        z = run_with_cache(g, p, clean, ["layer0.attn.z"])[1]["layer0.attn.z"].at[:, :, 1].set(z_head)
        return patched_predictions(g, p, clean, Patch(values={"layer0.attn.z": z}))

    z_clean, z_corrupted = (run_with_cache(g, p, x, ["layer0.attn.z"])[1]["layer0.attn.z"][:, :, 1]
                            for x in (clean, corrupted))
    own = (np.arange(B) + np.asarray(jax.random.randint(key, (B,), 1, B))) % B
    assert np.all(own != np.arange(B))
    other = np.asarray(jax.random.randint(key, (B,), 0, B))
    expected = {"mean": hand(jnp.broadcast_to(z_clean.mean(0), z_clean.shape)), "resample": hand(z_clean[own])}
    plain = run_with_cache(g, p, clean, [])[0]
    for kind, want in expected.items():
        got = ablate_heads(g, p, clean, [(0, 1)], kind=kind, key=key)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # the same patch through two compiled programs
        # the batch passed as its own reference is the same ablation (resample: never a prompt's own z)
        np.testing.assert_allclose(ablate_heads(g, p, clean, [(0, 1)], kind=kind, reference=clean, key=key), want,
                                   rtol=1e-6, atol=1e-7)
        # so is a copy of it (resample: it drew some prompts' own z, which left them unablated)
        copy = jnp.array(np.asarray(clean))
        np.testing.assert_allclose(ablate_heads(g, p, clean, [(0, 1)], kind=kind, reference=copy, key=key), want,
                                   rtol=1e-6, atol=1e-7)
        assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-3  # the head matters: ablation moves the output
    np.testing.assert_allclose(ablate_heads(g, p, clean, [(0, 1)], kind="resample", reference=corrupted, key=key),
                               hand(z_corrupted[other]), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="tokens of at least 2 prompts"):
        ablate_heads(g, p, clean[:1], [(0, 1)], kind="resample", key=key)
    # the value is per position: a one-position reference was broadcast over every position (position 0's z)
    for kind in ("mean", "resample"):
        with pytest.raises(ValueError, match=r"reference: prompts of the shape .*got \(4, 1, 1\) float32"):
            ablate_heads(g, p, clean, [(0, 1)], kind=kind, reference=corrupted[:, :1], key=key)


def test_bad_grids_fail_before_compiling_with_the_argument_named():
    g, p, clean, corrupted = _setup()
    with pytest.raises(ValueError, match="unknown site name"):
        activation_patching(g, p, clean, corrupted, last_sq, ["layer5.attn.z"])
    with pytest.raises(ValueError, match="clean and corrupted must have the same shape"):
        activation_patching(g, p, clean, corrupted[:, :3], last_sq, ["layer0.attn.z"])
    with pytest.raises(ValueError, match=r"site 'layer0.resid_pre' has no 'head' axis"):
        activation_patching(g, p, clean, corrupted, last_sq, ["layer0.resid_pre"], by="head")
    with pytest.raises(ValueError, match="by must be one of"):
        activation_patching(g, p, clean, corrupted, last_sq, ["layer0.resid_pre"], by="neuron")
    with pytest.raises(ValueError, match="sites: give at least one site name"):
        activation_patching(g, p, clean, corrupted, last_sq, [], by="pos")
    for grid in (activation_patching, attribution_patching):  # a repeated name would lose its first row block
        with pytest.raises(ValueError, match=r"sites: \['layer0.attn.z'\] named more than once"):
            grid(g, p, clean, corrupted, last_sq, ["layer0.attn.z", "layer1.attn.z", "layer0.attn.z"])
    with pytest.raises(ValueError, match=r"names: give a list of site names, got the string 'layer0.resid_pre'"):
        run_with_cache(g, p, clean, "layer0.resid_pre")
    with pytest.raises(ValueError, match=r"capture: give a list of site names or 'all'"):
        apply(g, p, clean[0], capture="layer0.resid_pre")
    with pytest.raises(ValueError, match=r"heads: site 'layer0.resid_post' has no 'head' axis.*'layer0.attn.z'"):
        ablate_heads(g, p, clean, [(0, 1)], site="layer{layer}.resid_post")
    with pytest.raises(ValueError, match=r"heads / head_site: head index 2 of layer 1 is out of range; allowed 0..1"):
        direct_effect_patching(g, p, clean, corrupted, last_sq, [(1, 2)])
    # a one-layer model's head site has no {layer}: any layer named head 1 of its one layer, (5, 1) ablated head 1
    g1, p1 = nnx.split(PositionalTransformer(2, 2, num_heads=3, max_len=T, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=re.escape("heads: site 'attn.heads' has no '{layer}' field, so it names the "
                                                   "heads of one layer: valid layers [0], got layer 5")):
        ablate_heads(g1, p1, jnp.ones((B, T, 2)), [(0, 2), (5, 1)], site="attn.heads")
    per_prompt = lambda pred: pred[:, -1] ** 2  # noqa: E731  [B], not a scalar
    for grid in (activation_patching, attribution_patching):  # one failed to reshape its grid, one to take a gradient
        with pytest.raises(ValueError, match=r"metric must return a scalar .*got shape \(4,\)"):
            grid(g, p, clean, corrupted, per_prompt, ["layer0.attn.z"])
    with pytest.raises(ValueError, match=r"metric must return a scalar"):  # it returned [len(heads), B]
        direct_effect_patching(g, p, clean, corrupted, per_prompt, [(1, 1)])
    # a stream site before the head: the "direct effect" ran the delta through the head's own and later layers
    with pytest.raises(ValueError, match=r"stream_site: 'layer1.resid_pre' is not after \['layer1.attn.heads'\]"):
        direct_effect_patching(g, p, clean, corrupted, last_sq, [(0, 1), (1, 1)], stream_site="layer1.resid_pre")
    with pytest.raises(ValueError, match=r"stream_site: 'layer1.attn.heads' is not after \['layer1.attn.heads'\]"):
        direct_effect_patching(g, p, clean, corrupted, last_sq, [(1, 1)], stream_site="layer1.attn.heads")
    # a site of another shape: the head's [T, D] output was broadcast into it and the metric came back as a number
    with pytest.raises(ValueError, match=r"stream_site: 'final_norm.scale' has shape \(5, 1\), but a head's output"):
        direct_effect_patching(g, p, clean, corrupted, last_sq, [(1, 1)], stream_site="final_norm.scale")
    with pytest.raises(ValueError, match=r"heads: give at least one \(layer, head\) pair"):
        direct_effect_patching(g, p, clean, corrupted, last_sq, [])


class Custom(Model):
    """A user's model on prompts [T, 3]: per layer head-first attention weights [H, T, T] and per-head outputs
    [T, H, 3], then a pooled [3] site, a scalar "layernorm.scale" and a final "layernorm.out" [T, 3]; site_axes names
    only the heads' axes."""

    def __init__(self, rngs: nnx.Rngs, n_heads: int = 2, n_layers: int = 2):
        def normal(*shape):
            return nnx.Param(0.5 * jax.random.normal(rngs.params(), shape))

        self.wqk = nnx.List([normal(n_heads, 3, 3) for _ in range(n_layers)])
        self.wov = nnx.List([normal(n_heads, 3, 3) for _ in range(n_layers)])
        self.u = normal(3)

    def __call__(self, tokens, sites=null_sites):
        x, causal = tokens, jnp.tril(jnp.ones((tokens.shape[0],) * 2, bool))
        for l, (wqk, wov) in enumerate(zip(self.wqk, self.wov)):
            scores = jnp.where(causal, jnp.einsum("qd,hde,ke->hqk", x, wqk[...], x), -jnp.inf)
            weights = sites(f"layer{l}.attn.weights", jax.nn.softmax(scores, axis=-1))
            heads = sites(f"layer{l}.attn.heads", jnp.einsum("hqk,kd,hde->qhe", weights, x, wov[...]))
            x = sites(f"layer{l}.resid_post", x + heads.sum(1))
        x = x - sites("pooled", x.mean(0))
        return sites("layernorm.out", x / sites("layernorm.scale", jnp.linalg.norm(x)))

    def site_axes(self, name, ndim):
        return ("pos", "head", "dim") if name.endswith(".heads") else super().site_axes(name, ndim)

    def readout(self, outputs):
        return outputs @ self.u[...]


class Misnamed(Custom):
    def site_axes(self, name, ndim):  # the order of the weights' axes mistaken: its "pos" axis is the heads'
        return ("pos", "head", "key") if name.endswith(".weights") else super().site_axes(name, ndim)


class Named(Custom):
    def site_axes(self, name, ndim):
        return ("head", "pos", "key") if name.endswith(".weights") else super().site_axes(name, ndim)


def _custom_setup(cls=Custom):
    g, p = nnx.split(cls(nnx.Rngs(0)))
    clean, corrupted = (jax.random.normal(jax.random.key(k), (B, T, 3)) for k in (1, 2))
    return g, p, clean, corrupted


def test_the_default_axes_name_pos_only_a_first_axis_as_long_as_the_prompt_and_pos_grids_need_one():
    """The default site_axes named the first axis of every site "pos": by="pos" patched the heads of a head-first
    [H, T, T] site and the features of a pooled [D] one, a grid of the wrong size with no error."""
    g, p, clean, corrupted = _custom_setup()
    info = site_info(g, p, clean[0])
    layer = {"attn.weights": ("dim0", "dim1", "dim2"), "attn.heads": ("pos", "head", "dim"),
             "resid_post": ("pos", "dim1")}
    assert {n: axes for n, (_, axes) in info.items()} == {
        **{f"layer{l}.{n}": axes for l in range(2) for n, axes in layer.items()},
        "pooled": ("dim0",), "layernorm.scale": (), "layernorm.out": ("pos", "dim1")}
    hint = "a model names the axes of its sites in its site_axes method (override jaxicl.models.base.Model.site_axes)"
    with_pos = [n for n, (_, axes) in info.items() if "pos" in axes]
    for site in ("layer0.attn.weights", "pooled"):
        with pytest.raises(ValueError, match=re.escape(f"by='pos': site {site!r} has no 'pos' axis (its axes are "
                                                       f"{info[site][1]}); sites with one: {with_pos}; {hint}")):
            activation_patching(g, p, clean, corrupted, last_sq, [site], by="pos")
    g, p, clean, corrupted = _custom_setup(Misnamed)  # a declared "pos" axis that is not the prompt's
    with pytest.raises(ValueError, match=re.escape(f"by='pos_head': site 'layer0.attn.weights' of shape (2, {T}, {T}) "
                                                   f"has a 'pos' axis of length 2 (its axes are ('pos', 'head', "
                                                   f"'key')), but the prompts have {T} positions; {hint}")):
        attribution_patching(g, p, clean, corrupted, last_sq, ["layer0.attn.weights"], by="pos_head")
    # named, the weights are patched by query position: row i of every head's [T, T] weights
    g, p, clean, corrupted = _custom_setup(Named)
    grid = activation_patching(g, p, clean, corrupted, last_sq, ["layer0.attn.weights"], by="pos")
    assert grid.shape == (1, T)
    _, cache = run_with_cache(g, p, clean, ["layer0.attn.weights"])
    for i in range(T):
        row = jnp.zeros((1, T, 1), bool).at[:, i].set(True)  # query i of every head, over every key
        patch = Patch(values={"layer0.attn.weights": cache["layer0.attn.weights"]}, masks={"layer0.attn.weights": row})
        # the vmapped grid against one program per patch: float32 rounding of O(1) metrics
        np.testing.assert_allclose(grid[0, i], last_sq(patched_predictions(g, p, corrupted, patch)), rtol=1e-5,
                                   atol=1e-7)


def test_direct_effect_patching_of_a_model_with_a_site_named_layer_something_else():
    """int("norm") of the site "layernorm.scale" crashed the search for the default stream site, even with
    stream_site given."""
    g, p, clean, corrupted = _custom_setup()
    heads = [(0, 1), (1, 0)]
    effect = direct_effect_patching(g, p, clean, corrupted, last_sq, heads, stream_site="layer1.resid_post")
    _, clean_cache = run_with_cache(g, p, clean, ["layer0.attn.heads", "layer1.attn.heads"])
    _, corrupted_cache = run_with_cache(g, p, corrupted, ["layer0.attn.heads", "layer1.attn.heads"])
    for (layer, h), got in zip(heads, effect):
        site = f"layer{layer}.attn.heads"
        delta = clean_cache[site][:, :, h] - corrupted_cache[site][:, :, h]  # [B, T, 3]
        expected = last_sq(patched_predictions(g, p, corrupted, Patch(deltas={"layer1.resid_post": delta})))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)  # the same sum, batched by lax.map or not
    with pytest.raises(ValueError, match=re.escape("stream_site: the model's site 'layernorm.scale' begins with "
                                                   "'layer' but is not named layer{l}.<site>, so its last layer is "
                                                   "unknown; name the site the output reads from, one of ['layer0.")):
        direct_effect_patching(g, p, clean, corrupted, last_sq, heads)


def test_the_analyses_of_a_plain_nnx_module_ask_for_a_jaxicl_model():
    """apply and training take any NNX module with a readout; the analyses raised AttributeError 'site_shapes'."""

    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 3, rngs=rngs)

        def __call__(self, tokens, sites=null_sites):
            return sites("hidden", self.linear(tokens))

        def readout(self, outputs):
            return outputs.sum(-1)

    g, p = nnx.split(Plain(nnx.Rngs(0)))
    tokens = jnp.ones((B, T, 3))
    assert apply(g, p, tokens[0], capture=["hidden"])[1]["hidden"].shape == (T, 3)
    message = re.escape("Plain is not a jaxicl.models.base.Model: the analyses (caches, patching, ablation, ...) read "
                        "the shapes and axes of its sites through Model.site_shapes and Model.site_axes; subclass "
                        "jaxicl.models.base.Model instead of nnx.Module")
    with pytest.raises(TypeError, match=message):
        run_with_cache(g, p, tokens, ["hidden"])
    with pytest.raises(TypeError, match=message):
        activation_patching(g, p, tokens, tokens, last_sq, ["hidden"])


def test_probe_recovers_a_planted_feature_and_scores_chance_on_a_shuffled_one():
    key = jax.random.key(4)
    x = jax.random.normal(key, (2000, 6))
    y = x @ jnp.array([1.0, -2.0, 0.0, 0.5, 0.0, 0.0]) + 3.0
    planted = probe(x, y)
    assert planted["metric"] == "r2" and planted["score"] > 1 - 1e-6  # noise-free and linear: R^2 = 1
    shuffled = probe(x, jax.random.permutation(jax.random.key(5), y))
    assert abs(shuffled["score"]) < 0.03  # held-out R^2 of a label with no relation to the features: about 0
    classes = (x[:, 0] > 0).astype(jnp.int32)
    assert probe(x, classes)["score"] > 0.95 and probe(x, jax.random.permutation(key, classes))["score"] < 0.6
    with pytest.raises(ValueError, match="targets: class labels must be integers 0, 1, ..., got -1"):
        probe(x, 2 * classes - 1)  # one_hot(-1) is a zero row: class -1 could never be predicted
    few = probe(x[:2], classes[:2], test_fraction=0.75)  # the split keeps one row on each side
    assert np.isfinite(few["score"]) and np.isfinite(few["weights"]).all()
    with pytest.raises(ValueError, match="features: a probe needs at least 2 rows"):
        probe(x[:1], classes[:1])
    # a yes/no target is two classes (it was fitted as a regression on 0 and 1 and scored by R^2)
    as_bool = probe(x, x[:, 0] > 0)
    assert as_bool["metric"] == "accuracy" and as_bool["score"] == probe(x, classes)["score"]
    with pytest.raises(ValueError, match=r"features must be \[N, F\] .*got shape \(2000, 3, 2\)"):
        probe(x.reshape(2000, 3, 2), classes)  # a forgotten position axis failed inside a matmul
    with pytest.raises(ValueError, match=r"targets must be \[N\] class labels .*got shape \(2000, 2\) int32"):
        probe(x, jnp.stack([classes, classes], 1))


@pytest.mark.parametrize("standardise", [False, True])
def test_ridge_fit_of_targets_n_gives_weights_f_plus_1_and_predictions_n(x64, standardise):
    """y [N] (one quantity, as ridge_solve takes it): the weights [F + 1] and predictions [N] of y [N, 1]'s column.
    The per-feature rescale [F] / [F, 1] had broadcast them to [F + 1, F] weights and [N, F] predictions."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 3)) * np.array([1.0, 100.0, 0.01]) + 5.0
    y = x @ np.array([1.0, -0.02, 50.0]) + 3.0 + 0.1 * rng.normal(size=40)
    w = np.asarray(ridge_fit(jnp.asarray(x), jnp.asarray(y), 0.0, standardise=standardise))
    assert w.shape == (4,)
    # lam 0: least squares with an unpenalised bias column; float64 solves of a 40 x 4 system (condition ~1e4)
    np.testing.assert_allclose(w, np.linalg.lstsq(np.c_[x, np.ones(40)], y, rcond=None)[0], rtol=1e-9)
    pred = np.asarray(ridge_predict(jnp.asarray(w), jnp.asarray(x)))
    assert pred.shape == (40,)
    np.testing.assert_allclose(pred, x @ w[:-1] + w[-1], rtol=1e-12)  # the same float64 products
    penalised = np.asarray(ridge_fit(jnp.asarray(x), jnp.asarray(y), 5.0, standardise=standardise))
    column = np.asarray(ridge_fit(jnp.asarray(x), jnp.asarray(y[:, None]), 5.0, standardise=standardise))
    np.testing.assert_allclose(penalised, column[:, 0], rtol=1e-12)  # the same solve, with or without the K axis


def test_standardised_ridge_is_scikit_learns_ridge_on_standard_scaled_features(x64):
    """standardise=True: the penalty on unit-variance features (scikit-learn's StandardScaler then Ridge, float64),
    weights mapped back to the raw features; so a probe's scores no longer depend on each feature's scale, where the
    plain fit's do (the penalty bites hardest on the smallest features)."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(7)
    scales = np.array([1e-3, 1e-2, 1.0, 10.0, 0.0])  # the last feature constant: left unscaled, weight 0
    x = rng.normal(size=(300, 5)) * scales + 2.0
    y = np.stack([x @ np.array([3e3, -50.0, 0.5, 0.01, 0.0]), rng.normal(size=300)], 1)
    lam = 30.0
    w = np.asarray(ridge_fit(jnp.asarray(x), jnp.asarray(y), lam, standardise=True))
    scaler = StandardScaler().fit(x)
    ref = Ridge(alpha=lam).fit(scaler.transform(x), y)
    coef = ref.coef_.T / np.where(scaler.scale_ > 0, scaler.scale_, 1.0)[:, None]
    np.testing.assert_allclose(w[:-1], coef, rtol=1e-9, atol=1e-12)  # float64 solves of the same 5 x 5 system
    np.testing.assert_allclose(w[-1], ref.intercept_ - scaler.mean_ @ coef, rtol=1e-9)
    labels = (x[:, 0] > 2.0).astype(np.int32)  # carried by the smallest feature alone
    rescaled = x * np.array([1e4, 1.0, 1.0, 1.0, 1.0])
    held = np.arange(300) % 4 == 0
    scores = [[probe(f, labels, lam=lam, held_out=held, standardise=st)["score"] for f in (x, rescaled)]
              for st in (True, False)]
    assert scores[0][0] == pytest.approx(scores[0][1], abs=1e-9) and scores[0][0] > 0.95  # scale-free
    assert scores[1][0] < 0.75 < scores[1][1]  # raw: the penalty drowns the 1e-3-scale feature until it is rescaled


def test_float32_ridge_on_wide_correlated_features_is_scikit_learns_float64_ridge():
    """400 rows of 512 features driven by 8 latent factors, scale 30 (as a model's flattened activations): the
    normal equations in float32 (condition number squared, ~1e13 here) gave weights far from the minimiser (the
    LEA probes scored 0.13 where the float64 fit scores 1.0). The QR solve's predictions are scikit-learn's float64
    ridge's to 1e-3 of the targets' range (float32 on a system of condition number ~3e6: about 3e6 x 6e-8)."""
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 8))
    x = (z @ rng.normal(size=(8, 512)) + 0.01 * rng.normal(size=(400, 512))) * 30 + 5
    y = np.stack([z[:, 0] - 2 * z[:, 1] + 0.1 * rng.normal(size=400), z[:, 2] ** 2], 1)
    w = np.asarray(ridge_fit(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), 1e-3))
    assert w.dtype == np.float32
    ref = Ridge(alpha=1e-3, solver="svd").fit(x, y)
    np.testing.assert_allclose(x @ w[:-1] + w[-1], ref.predict(x), atol=1e-3 * np.ptp(y))
    held = np.arange(400) % 4 == 0
    fit = probe(jnp.asarray(x, jnp.float32), jnp.asarray(y[:, 0], jnp.float32), held_out=held)
    ref_r2 = Ridge(alpha=1e-3, solver="svd").fit(x[~held], y[~held, 0]).score(x[held], y[held, 0])
    assert fit["score"] == pytest.approx(ref_r2, abs=1e-3)


@pytest.mark.parametrize("split", ["random", "held_out"])
def test_probe_fits_only_the_training_rows(split):
    """Noise targets, F = 200 features, 300 training rows: ridge (lam 1e-3, negligible here) interpolates much of the
    noise, train R^2 ~ Beta(F/2, (N_train - F - 1)/2): mean 0.67, sd 0.04, so > 0.5. On the 100 held-out rows the
    fitted noise is pure error: expected R^2 about -(F + 1)/(N_train - F - 2) = -2; a probe that had also fitted
    those rows would score them about like the training rows (0.5), so < 0.1 tells the two apart. The weights are
    a float64 numpy ridge fit on the training rows alone (the split reproduced from the same key)."""
    n, f, n_test = 400, 200, 100
    rng = np.random.default_rng(6)
    x = rng.normal(size=(n, f)).astype(np.float32)
    y = rng.normal(size=n).astype(np.float32)
    if split == "random":
        out = probe(x, y, key=jax.random.key(3))
        test = np.asarray(jax.random.permutation(jax.random.key(3), n))[:n_test]
    else:
        test = rng.choice(n, n_test, replace=False)
        out = probe(x, y, held_out=np.isin(np.arange(n), test))
    train = np.setdiff1d(np.arange(n), test)
    assert out["train_score"] > 0.5 and out["score"] < 0.1

    def ridge(rows):
        xb = np.c_[x[rows], np.ones(len(rows))].astype(np.float64)
        reg = 1e-3 * np.diag(np.r_[np.ones(f), 0.0])
        return np.linalg.solve(xb.T @ xb + reg, xb.T @ y[rows])

    def rel_err(w, want):
        return np.linalg.norm(w - want) / np.linalg.norm(want)

    # float32 normal equations with condition number ((sqrt(300) + sqrt(200)) / (sqrt(300) - sqrt(200)))^2 ~ 1e2:
    # relative error ~ 1e2 * 6e-8 * sqrt(F) ~ 1e-4; a fit that also saw the held-out rows is O(1) away
    w = out["weights"]
    assert w.shape == (f + 1,)  # as ridge_fit's for targets [N]: [F + 1, 1] broadcast a residual to [N, N]
    assert rel_err(w, ridge(train)) < 1e-3 and rel_err(ridge(np.arange(n)), ridge(train)) > 0.1
    pred = x[test] @ w[:-1] + w[-1]
    r2 = 1 - np.sum((pred - y[test]) ** 2) / np.sum((y[test] - y[test].mean()) ** 2)
    assert out["score"] == pytest.approx(r2, rel=1e-4)


def test_an_unpenalised_fit_is_the_minimum_norm_least_squares_one_and_a_negative_lam_is_refused(x64):
    """lam 0 where x has rank < F (at least as many features as rows, or collinear ones) gave NaN weights and scores
    silently (a singular R), and a negative lam NaN too (its square root): lam 0 is now np.linalg.lstsq's minimum-norm
    solution, scikit-learn's LinearRegression, and a negative lam is refused."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    from jaxicl.ridge import ridge_solve

    rng = np.random.default_rng(0)
    wide = rng.normal(size=(12, 20))
    collinear = rng.normal(size=(30, 6))
    collinear[:, 5] = collinear[:, 3]
    for x in (wide, collinear):
        y = rng.normal(size=(x.shape[0], 2))
        want = np.linalg.lstsq(x, y, rcond=None)[0]
        # float64 SVD solves of matrices with condition number < 100 (on their nonzero singular values) agree to
        # ~1e-14; 1e-10 leaves room for LAPACK's and XLA's different SVD algorithms
        for solve in (ridge_solve, jax.jit(ridge_solve)):  # lam concrete, then traced
            np.testing.assert_allclose(solve(jnp.asarray(x), jnp.asarray(y), 0.0), want, rtol=1e-10, atol=1e-12)
        penalised = np.linalg.solve(x.T @ x + 0.5 * np.eye(x.shape[1]), x.T @ y)  # the QR branch, traced lam
        np.testing.assert_allclose(jax.jit(ridge_solve)(jnp.asarray(x), jnp.asarray(y), 0.5), penalised, rtol=1e-10,
                                   atol=1e-12)
    # a known lam traces only the solve it needs; a traced one both branches of a cond, one of which runs
    def primitives(lam):
        return set(re.findall(r"= (\w+)\[", str(jax.make_jaxpr(lambda a, b: ridge_solve(a, b, lam))(wide, wide[:, :2]))))

    assert ({"svd", "qr"} & primitives(0.0), {"svd", "qr"} & primitives(0.5)) == ({"svd"}, {"qr"})
    x = rng.normal(size=(40, 64))  # an unregularised probe with more features than training rows
    y = x[:, 0] + 0.1 * rng.normal(size=40)
    held = np.arange(40) < 10
    got = probe(jnp.asarray(x), jnp.asarray(y), lam=0.0, held_out=held)
    ref = LinearRegression().fit(x[~held], y[~held])  # centred, then scipy's minimum-norm lstsq
    np.testing.assert_allclose(got["weights"][:-1], ref.coef_, rtol=1e-9, atol=1e-12)  # as above, 30 x 64
    np.testing.assert_allclose(got["score"], r2_score(y[held], ref.predict(x[held])), rtol=1e-9)
    assert got["train_score"] == pytest.approx(1.0, abs=1e-12)  # 30 rows, 64 features: fitted exactly
    for fit in (lambda: ridge_solve(jnp.asarray(x), jnp.asarray(y), -1e-3), lambda: ridge_fit(x, y[:, None], -1e-3),
                lambda: probe(x, y, lam=-1e-3)):
        with pytest.raises(ValueError, match=re.escape("lam must be >= 0, got -0.001")):
            fit()


@pytest.mark.parametrize("x64", [False, True])
def test_probe_of_features_sharing_a_large_offset_matches_sklearn_ridge(x64):
    """Features z + 1000 (z standard normal), y = z.v + 0.1 noise: the uncentred normal equations cancel the unit
    spread against the 1e6 offset squared (held-out R^2 -30 in float32 where scikit-learn's Ridge, with the same
    unpenalised intercept, scores 0.998). Float32 stores x to ulp(1000) / 2 = 3e-5, so the slopes agree to 1e-4 and
    the held-out predictions, a sum of terms ~1e3 and a bias ~1e3, to 1e-3 (R^2, 1 - resid / total with
    resid / total ~ 2e-3, to 1e-5); under x64 the fit is float64 and all agree to 1e-9."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(7)
    n, f = 400, 8
    held = np.arange(n) < 100
    z = rng.normal(size=(n, f))
    x, y = z + 1000.0, z @ rng.normal(size=f) + 0.1 * rng.normal(size=n)
    with jax.enable_x64(x64):
        out = probe(x, y, held_out=held)
    ref = Ridge(alpha=1e-3).fit(x[~held], y[~held])
    w = out["weights"]
    slope_tol, pred_tol, r2_tol = (1e-9, 1e-9, 1e-9) if x64 else (1e-4, 1e-3, 1e-5)
    assert w.dtype == (np.float64 if x64 else np.float32)
    np.testing.assert_allclose(w[:-1], ref.coef_, rtol=0, atol=slope_tol)
    np.testing.assert_allclose(x[held] @ w[:-1] + w[-1], ref.predict(x[held]), rtol=0, atol=pred_tol)
    assert out["score"] == pytest.approx(r2_score(y[held], ref.predict(x[held])), abs=r2_tol)
    assert out["train_score"] == pytest.approx(r2_score(y[~held], ref.predict(x[~held])), abs=r2_tol)


def test_attention_mass_at_offsets_against_planted_patterns():
    eye = jnp.eye(4)[None]  # every query on itself
    prev = jnp.eye(4, k=-1).at[0, 0].set(1.0)[None]  # every query on the previous token (the first on itself)
    np.testing.assert_allclose(mass_at_offset(eye, 0), [1.0])
    np.testing.assert_allclose(mass_at_offset(prev, 1), [1.0])
    np.testing.assert_allclose(mass_profile(jnp.concatenate([eye, prev]), 2), [[1, 0, 0], [0.25, 1, 0]])
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=rf"max_offset must be in \[0, 3\], got {bad}"):
            mass_profile(eye, bad)
    # cross-attention: keys are not the queries
    with pytest.raises(ValueError, match=r"\[\.\.\., H, T, T\].*\(1, 4, 6\)"):
        mass_at_offset(jnp.ones((1, 4, 6)) / 6, 1)
    # NearestNeighborAttention's weights [T] of a batch of B = T = 4 prompts: square, but no query axis
    with pytest.raises(ValueError, match=re.escape("weights must be self-attention weights [..., H, T, T] (a head "
                                                   "axis; queries and keys the same positions), got shape (4, 4)")):
        mass_at_offset(jnp.ones((4, 4)) / 4, 0)


def test_qk_and_ov_circuits_give_each_heads_scores_and_output_from_its_normalised_input():
    g, p, clean, _ = _setup()
    model = nnx.merge(g, p)
    _, cache = run_with_cache(g, p, clean, ["layer1.resid_pre", "layer1.attn.scores", "layer1.attn.weights",
                                            "layer1.attn.heads"])
    h = np.asarray(jax.vmap(lambda x: model.blocks[1].ln1(x))(cache["layer1.resid_pre"]), np.float64)  # [B, T, D]
    dh = model.blocks[1].attn.wq.shape[-1]
    lower = np.tril(np.ones((T, T), bool))
    for head in range(2):
        scores = np.einsum("bqd,de,bke->bqk", h, np.asarray(qk_circuit(model, 1, head), np.float64), h) / dh ** 0.5
        got = np.asarray(cache["layer1.attn.scores"][:, head])
        np.testing.assert_allclose(got[:, lower], scores[:, lower], rtol=1e-4, atol=1e-5)  # float32 products of 8
        written = np.einsum("bqk,bkd,de->bqe", np.asarray(cache["layer1.attn.weights"][:, head], np.float64), h,
                            np.asarray(ov_circuit(model, 1, head), np.float64))
        np.testing.assert_allclose(cache["layer1.attn.heads"][:, :, head], written, rtol=1e-4, atol=1e-5)
    w = {k: np.asarray(v, np.float64) for k, v in (("e", model.embed[...]), ("u", model.unembed[...]),
                                                     ("v", model.blocks[0].attn.wv[1]), ("o", model.blocks[0].attn.wo[1]))}
    np.testing.assert_allclose(ov_gain(model, 0, 1), w["e"] @ w["v"] @ w["o"] @ w["u"], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="vector-input"):
        ov_gain(GPT(d_model=4, n_layers=1, n_heads=1, vocab_size=5, rngs=nnx.Rngs(0)), 0, 0)
    # an index past the end was clamped: head 2 (or 7) of this 2-head model read head 1's weights
    for circuit in (ov_circuit, qk_circuit, ov_gain):
        for layer, head, bad in ((0, 2, r"head must be in \[0, 1\], got 2"), (1, -1, r"head must be in \[0, 1\]"),
                                 (2, 0, r"layer must be in \[0, 1\], got 2")):
            with pytest.raises(ValueError, match=bad):
                circuit(model, layer, head)


def test_chunk_size_auto_fills_a_cpu_chunk_with_about_2048_prompt_tokens_and_bad_values_fail():
    tokens = jnp.zeros((8, 16), jnp.int32)
    assert resolve_chunk_size("auto", tokens) == (16 if jax.default_backend() == "cpu" else None)
    assert resolve_chunk_size(None, tokens) is None and resolve_chunk_size(5, tokens) == 5
    for bad in (0, "all", 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be"):
            resolve_chunk_size(bad, tokens)


FEW = ("run_with_cache", "attribution_patching", "vmap(predictor)")  # a jitted pass, a gradient, the user's own vmap


@pytest.mark.parametrize("params, devices, only", [("init", 4, FEW), ("trained", 4, None), ("trained", 1, FEW)],
                         ids=["init-4", "trained-4", "trained-1"])
def test_each_analysis_takes_a_batch_drawn_under_a_data_mesh_inside_the_mesh_and_after_it(params, devices, only):
    """sample_batch under jax.set_mesh gives a batch split over "data" (4 simulated devices): taking its first prompt
    for site_info was refused by JAX, and so was vmapping it with the per-prompt arrays an analysis makes unsharded
    (zero values, edit masks). The params train() returns carry its mesh with Auto axes (jaxicl.train.portable): JAX
    refused them in one program with such a batch (Explicit axes), on 4 devices and on 1 (a batch not split, still
    typed Explicit), in every analysis and in the model's predictor vmapped by hand. Each gives what it gives for
    the same prompts and params with no mesh, in the mesh and after leaving it. only: the analyses run (all for None),
    to keep the test short where the path through the analyses' replication is the one the others take."""
    g, p = nnx.split(GPT(d_model=8, n_layers=2, n_heads=2, max_len=8, input_dim=1, init_std=0.4, rngs=nnx.Rngs(0)))
    task, batch = ar.AffineRecurrence(seq_len=8), 8
    mesh = data_mesh(devices)
    if params == "trained":
        p = train(regression_loss(g), ar.sample, task, TrainConfig(steps=1, batch_size=batch, lr=1e-2), p, mesh=mesh,
                  progress=False).state.params
        assert {x.sharding.mesh.axis_types for x in jax.tree.leaves(p)} == {(AxisType.Auto,)}
    cells = np.zeros((batch, 8), bool)
    cells[:, 3] = True
    sites = ["layer0.resid_post", "layer1.resid_post"]
    analyses = {
        "run_with_cache": lambda x, y: run_with_cache(g, p, x, ["layer1.attn.z", "layer1.resid_post"]),
        "zero ablation": lambda x, y: ablate_heads(g, p, x, [(1, 0)]),
        "resample ablation": lambda x, y: ablate_heads(g, p, x, [(1, 0)], "resample", y, jax.random.key(5)),
        "activation_patching": lambda x, y: activation_patching(g, p, x, y, last_sq, ["layer0.attn.z"], "pos_head"),
        "grid_memory": lambda x, y: grid_memory(g, p, x, y, last_sq, ["layer0.attn.z"], "pos_head"),
        "attribution_patching": lambda x, y: attribution_patching(g, p, x, y, last_sq, ["layer0.attn.z"], "pos_head"),
        "direct_effect_patching": lambda x, y: direct_effect_patching(g, p, x, y, last_sq, [(0, 0), (1, 1)]),
        "perturbation_distances": lambda x, y: perturbation_distances(g, p, x, sites[0], cells, 0.5,
                                                                      jax.random.key(3), sites[1:]),
        "perturbed_outputs": lambda x, y: perturbed_outputs(g, p, x, sites[0], cells, 0.5, jax.random.key(3)),
        "edit_each_site": lambda x, y: edit_each_site(g, p, x, sites, cells, deltas=np.ones((2, batch, 8, 8))),
        "probe": lambda x, y: probe(x[:, -1], y[:, -1, 0])["score"],
        "direct_attribution": lambda x, y: jax.vmap(lambda t: direct_attribution(g, p, t))(x),
        "per_position_loss": lambda x, y: per_position_loss(g, p, Prompt(x, y[..., 0], jnp.ones(y.shape[:2]))),
        "vmap(predictor)": lambda x, y: jax.vmap(predictor(g, p))(x),
    }
    analyses = {name: f for name, f in analyses.items() if only is None or name in only}
    want = {name: f(*(sample_batch(ar.sample, task, jax.random.key(k), batch).inputs for k in (1, 2)))
            for name, f in analyses.items()}
    with jax.set_mesh(mesh):
        split = [sample_batch(ar.sample, task, jax.random.key(k), batch).inputs for k in (1, 2)]
        assert split[0].sharding.spec == (P("data", None, None) if devices > 1 else P(None, None, None))
        inside = {name: f(*split) for name, f in analyses.items()}
    after = {name: f(*split) for name, f in analyses.items()}
    for got in (inside, after):
        for name, value in got.items():
            # replicated, every device runs the one-device program on the whole batch: the same float32 operations
            # (measured equal); 1e-6 relative leaves room only for another fusion order. grid_memory's bytes: exact.
            # What this test vmaps by hand (the predictor, direct_attribution) is not replicated: it runs split over
            # "data", another program, whose values of size ~1 differ by float32 rounding through two layers
            # (1.8e-7 and 4.5e-7 measured on jax 0.11.2)
            rtol, atol = (1e-5, 1e-6) if name in ("vmap(predictor)", "direct_attribution") else (1e-6, 1e-7)
            jax.tree.map(lambda a, b, name=name, rtol=rtol, atol=atol: np.testing.assert_allclose(
                a, b, rtol=rtol, atol=atol, err_msg=name), value, want[name])


def test_attribution_patching_of_a_metric_reading_a_split_array_names_the_fix():
    """A metric that gathers from predictions at indices split over "data" has no gradient JAX can type when the
    predictions are replicated: the error names the metric and the reshard that fixes it, which then runs."""
    g, p = nnx.split(GPT(d_model=8, n_layers=1, n_heads=2, max_len=8, input_dim=1, rngs=nnx.Rngs(0)))
    clean, corrupted = (jax.random.normal(jax.random.key(k), (8, 8, 1)) for k in (1, 2))
    with jax.set_mesh(data_mesh(4)):
        last = jax.reshard(jnp.full((8, 1), 7), P("data"))

        def at_last(pred):
            return jnp.mean(jnp.take_along_axis(pred, last, -1))

        with pytest.raises(ValueError, match=re.escape(
                "metric: it reads arrays of shapes [(8, 1)] split over a mesh axis (e.g. targets drawn under "
                "jax.set_mesh), and its gradient at the predictions, which the analysis holds replicated, cannot be "
                "split alike; replicate them first, jax.reshard(x, jax.sharding.PartitionSpec()) inside the mesh")):
            attribution_patching(g, p, clean, corrupted, at_last, ["layer0.resid_post"])
        last = jax.reshard(last, P())
        got = attribution_patching(g, p, clean, corrupted, at_last, ["layer0.resid_post"])
    want = attribution_patching(g, p, clean, corrupted, lambda pred: jnp.mean(pred[:, 7]), ["layer0.resid_post"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # the same sums: float32 rounding of another program
