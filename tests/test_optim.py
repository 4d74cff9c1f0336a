"""The optimiser builder: weight decay masked by parameter path, one schedule for plain and swept warmups."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxicl.models.ar_linear_attention import (AugmentedLinearAttention, DiagonalPositionalAttention,
                                               PositionalOnlyAttention)
from jaxicl.models.ar_transformer import AugmentedTransformer, PositionalTransformer
from jaxicl.models.attention import SelfAttention
from jaxicl.models.factor_transformer import FactorTransformer
from jaxicl.models.gpt import GPT
from jaxicl.models.lea import LEA
from jaxicl.models.nearest_neighbor_attention import NearestNeighborAttention
from jaxicl.train import TrainConfig
from jaxicl.train.optim import decay_mask, make_optimizer, path_names, scheduled_lr, unit_schedule
from jaxicl.validation import ConfigError


def test_default_decay_mask_skips_biases_norm_scales_and_position_tables():
    params = nnx.state(PositionalTransformer(4, 2, num_heads=2, max_len=8, rngs=nnx.Rngs(0)), nnx.Param)
    mask = decay_mask(params, TrainConfig().no_decay)
    got = {"/".join(path_names(p)): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    # by hand: only the Linear weights w are decayed
    expected = {"k/bias": False, "k/w": True, "mix/bias": False, "mix/w": True, "norm/bias": False,
                "norm/scale": False, "positions": False, "q/bias": False, "q/w": True, "head/bias": False,
                "head/w": True, "v/bias": False, "v/w": True}
    assert got == expected
    # the continuous-input GPT's linear W_E is `embed`: undecayed like its position table (TrainConfig's NO_DECAY)
    gpt = nnx.state(GPT(d_model=4, n_layers=1, n_heads=1, d_mlp=0, max_len=3, input_dim=2, rngs=nnx.Rngs(0)), nnx.Param)
    got = {"/".join(path_names(p)): m for p, m in
           jax.tree_util.tree_flatten_with_path(decay_mask(gpt, TrainConfig().no_decay))[0]}
    assert {k for k, m in got.items() if m} == {f"blocks/0/attn/{w}" for w in ("wq", "wk", "wv", "wo")} | {"unembed"}
    # the autoregressive models' A and B (and P) are weights: all decayed
    for model, names in ((AugmentedLinearAttention(3, rngs=nnx.Rngs(0)), "ab"),
                         (DiagonalPositionalAttention(3, 2, 5, rngs=nnx.Rngs(0)), "abp")):
        mask = decay_mask(nnx.state(model, nnx.Param), TrainConfig().no_decay)
        assert {"/".join(path_names(p)): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]} == {
            n: True for n in names}


def _undecayed(model) -> set[str]:
    mask = decay_mask(nnx.state(model, nnx.Param), TrainConfig().no_decay)
    return {"/".join(path_names(p)) for p, m in jax.tree_util.tree_leaves_with_path(mask) if not m}


def _norms(*names: str) -> set[str]:
    return {f"{n}/{leaf}" for n in names for leaf in ("bias", "scale")}


def _biases(*names: str) -> set[str]:
    return {f"{n}/bias" for n in names}


_LEA_BLOCK = ("self_q", "self_k", "self_v", "self_proj", "cross_q", "cross_k", "cross_v", "cross_proj", "mlp_in",
              "mlp_out")
# every built-in model (the experiments build these) -> the paths the default no_decay leaves undecayed, as they were
# before the position patterns were narrowed from "pos*", "*_pos*": narrowing them changed no built-in model's training
BUILT_IN_UNDECAYED = {
    "AugmentedLinearAttention": (lambda: AugmentedLinearAttention(3, rngs=nnx.Rngs(0)), set()),
    "DiagonalPositionalAttention": (lambda: DiagonalPositionalAttention(3, 2, 5, rngs=nnx.Rngs(0)), set()),
    "PositionalOnlyAttention": (lambda: PositionalOnlyAttention(5), set()),
    "SelfAttention": (lambda: SelfAttention(3, num_layers=2, num_heads=2, kind="softmax", rngs=nnx.Rngs(0)), set()),
    "NearestNeighborAttention": (lambda: NearestNeighborAttention(3, rngs=nnx.Rngs(0)), set()),
    "NearestNeighborAttention separate": (
        lambda: NearestNeighborAttention(3, parametrisation="separate", init="random", rngs=nnx.Rngs(0)), set()),
    "AugmentedTransformer": (lambda: AugmentedTransformer(3, 2, out_dim=2, rngs=nnx.Rngs(0)), _biases("final") | {
        p for l in range(2) for p in _biases(*(f"layers/{l}/{n}" for n in "qkvo")) | _norms(f"layers/{l}/norm")}),
    "PositionalTransformer": (lambda: PositionalTransformer(4, 2, num_heads=2, max_len=8, rngs=nnx.Rngs(0)),
                              _biases("q", "k", "v", "mix", "head") | _norms("norm") | {"positions"}),
    "FactorTransformer": (lambda: FactorTransformer(d_model=8, d_pos=4, n_layers=2, n_heads=2, rngs=nnx.Rngs(0)),
                          {"embed", "pos_table"} | _norms("ln_final") | {
                              p for l in range(2) for p in _norms(f"blocks/{l}/ln1", f"blocks/{l}/ln2")
                              | _biases(*(f"blocks/{l}/{n}" for n in ("q", "k", "v", "proj", "mlp_in", "mlp_out")))}),
    "GPT tokens": (lambda: GPT(d_model=8, n_layers=2, n_heads=2, vocab_size=5, rngs=nnx.Rngs(0)),
                   {"embed", "pos_embed", "unembed_bias"} | _norms("ln_final") | {
                       p for l in range(2) for p in _norms(f"blocks/{l}/ln1", f"blocks/{l}/ln2")
                       | {f"blocks/{l}/mlp/bias_in", f"blocks/{l}/mlp/bias_out"}}),
    "GPT vectors, no MLP, no final norm": (
        lambda: GPT(d_model=8, n_layers=1, n_heads=2, d_mlp=0, input_dim=3, final_norm=False, rngs=nnx.Rngs(0)),
        {"embed", "pos_embed", "unembed_bias"} | _norms("blocks/0/ln1")),
    "LEA": (lambda: LEA(d_model=8, d_pos=4, n_layers=2, n_heads=2, rngs=nnx.Rngs(0)),
            {"embed", "picture_pos", "speech_embed", "speech_pos"} | _norms("picture_ln", "speech_ln") | {
                p for side in ("picture", "speech") for l in range(2)
                for p in _biases(*(f"{side}_blocks/{l}/{n}" for n in _LEA_BLOCK))
                | _norms(*(f"{side}_blocks/{l}/ln_{n}" for n in ("self", "cross", "context", "mlp")))}),
}


@pytest.mark.parametrize("name", BUILT_IN_UNDECAYED)
def test_default_no_decay_of_every_built_in_model_is_pinned(name):
    build, expected = BUILT_IN_UNDECAYED[name]
    assert _undecayed(build()) == expected


def test_default_no_decay_names_position_tables_not_every_pos_prefix():
    """"pos*" and "*_pos*" also matched post_proj, postnorm, pos_ffn, ...: those weight matrices went undecayed."""
    weights = ("post_proj", "postnorm", "pos_ffn", "positionwise_ffn", "posterior_head", "w_post", "attn_post",
               "compose", "p")
    tables = ("pos", "w_pos", "positions", "pos_table", "pos_emb", "pos_embed", "pos_embedding",
              "position_embeddings", "positional_embedding")
    params = {name: {"kernel": jnp.ones(2)} for name in weights + tables}
    mask = decay_mask(params, TrainConfig().no_decay)
    assert {name for name in params if mask[name]["kernel"]} == set(weights)


def test_adamw_decays_exactly_the_masked_parameters():
    cfg = TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.5, no_decay=("bias",))
    params = {"w": jnp.ones(3), "bias": jnp.ones(2)}
    tx = make_optimizer(cfg)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # zero gradients: the Adam part is 0, so the update is -lr * weight_decay * param where decayed
    np.testing.assert_allclose(updates["w"], -0.05 * np.ones(3), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)  # masked out: no term at all


def test_no_decay_is_a_tuple_of_patterns_a_string_is_refused_and_a_list_becomes_a_tuple():
    """A string was iterated by character: "*bias*" gave the pattern "*", which exempted every parameter."""
    expected = "no_decay must be a tuple of glob patterns (str) of parameter path names, e.g. ('*bias*', 'scale'), got "
    for bad, got in (("*bias*", "'*bias*' (a string: each of its characters would be a pattern)"),
                     (("bias", 3), "('bias', 3)"), (None, "None")):
        with pytest.raises(ConfigError, match=f"^{re.escape(expected + got)}$"):
            TrainConfig(optimizer="adamw", weight_decay=0.1, no_decay=bad)
    cfg = TrainConfig(optimizer="adamw", weight_decay=0.1, no_decay=["*bias*", "scale"])
    assert cfg.no_decay == ("*bias*", "scale")  # a tuple (a list is unequal), so the frozen config stays hashable
    mask = decay_mask({"w": jnp.ones(2), "bias": jnp.ones(2), "norm": {"scale": jnp.ones(2)}}, cfg.no_decay)
    assert mask == {"w": True, "bias": False, "norm": {"scale": False}}


def test_one_schedule_for_plain_and_traced_warmup_and_the_logged_lr():
    cfg = TrainConfig(steps=100, lr=2.0, schedule="warmup_cosine", warmup_steps=10)
    steps = np.arange(0, 120)
    expected = np.array([s / 10 if s < 10 else 0.5 * (1 + np.cos(np.pi * min(s - 10, 90) / 90)) for s in steps])
    np.testing.assert_allclose(jax.vmap(unit_schedule(cfg))(steps), expected, rtol=1e-5, atol=1e-6)
    traced = jax.vmap(lambda s: unit_schedule(cfg, jnp.float32(10))(s))(steps)
    np.testing.assert_allclose(traced, expected, rtol=1e-5, atol=1e-6)
    # the optax schedule it replaces
    ref = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100)
    np.testing.assert_allclose(jax.vmap(unit_schedule(cfg))(steps), jax.vmap(ref)(steps), rtol=1e-5, atol=1e-6)
    swept = make_optimizer(cfg, ("lr", "warmup_steps"))
    state = swept.init({"w": jnp.zeros(2)})
    state.hyperparams["lr"] = jnp.float32(4.0)
    np.testing.assert_allclose(scheduled_lr(cfg, state, 5), 4.0 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(scheduled_lr(cfg, make_optimizer(cfg).init({"w": jnp.zeros(2)}), 5), 1.0, rtol=1e-6)


def test_adamw_with_clipping_and_a_schedule_follows_a_numpy_adamw():
    """Three steps of make_optimizer against Loshchilov & Hutter's AdamW written out in numpy (optax's form: the
    decay inside the scheduled step): global-norm clipping, then Adam moments with cfg.betas (b1, b2 distinct and
    far from the defaults, so swapping them shows), bias correction, eps 1e-8, decay on the masked leaves only."""
    cfg = TrainConfig(optimizer="adamw", lr=0.1, betas=(0.5, 0.8), weight_decay=0.3, clip_norm=1.0, steps=6,
                      schedule="warmup_cosine", warmup_steps=2, no_decay=("bias",))
    params = {"w": jnp.array([1.0, -2.0, 0.5]), "bias": jnp.array([0.3, -0.1])}
    grads = [{"w": jnp.array([3.0, 0.0, -4.0]), "bias": jnp.array([0.0, 0.0])},  # norm 5: clipped to 1
             {"w": jnp.array([0.1, 0.2, 0.0]), "bias": jnp.array([-0.3, 0.1])},  # norm 0.39: kept
             {"w": jnp.array([-0.5, 0.4, 0.2]), "bias": jnp.array([0.6, 0.9])}]  # norm 1.27: clipped
    tx = make_optimizer(cfg)
    state, p = tx.init(params), params
    want = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in want.items()}
    v = {k: np.zeros_like(x) for k, x in want.items()}
    b1, b2 = cfg.betas
    for t, g in enumerate(grads):
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
        lr = 0.1 * (t / 2 if t < 2 else 0.5 * (1 + np.cos(np.pi * (t - 2) / 4)))  # warmup 2, cosine to 0 at 6
        for k in want:
            gk = g[k] * min(1.0, 1.0 / norm)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk ** 2
            adam = m[k] / (1 - b1 ** (t + 1)) / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + 1e-8)
            want[k] = want[k] - lr * (adam + (0.3 * want[k] if k == "w" else 0.0))
        for k in want:  # float32 steps of O(0.1) on O(1) parameters
            np.testing.assert_allclose(p[k], want[k], rtol=1e-6, atol=1e-6)


def test_the_logged_lr_of_a_sweep_reads_each_members_warmup():
    cfg = TrainConfig(steps=100, lr=2.0, schedule="warmup_cosine", warmup_steps=10)
    state = make_optimizer(cfg, ("warmup_steps",)).init({"w": jnp.zeros(2)})
    state.hyperparams["warmup_steps"] = jnp.float32(4.0)  # this member warms up over 4 steps, not cfg's 10
    np.testing.assert_allclose(scheduled_lr(cfg, state, 2), 2.0 * 2 / 4, rtol=1e-6)
    np.testing.assert_allclose(scheduled_lr(cfg, state, 4), 2.0 * 1.0, rtol=1e-6)  # peak at the member's warmup


class _FrozenFeatures(nnx.Module):
    """A Param head on a frozen random projection held as a plain nnx.Variable (Flax's way to keep state out of
    training), as nnx.split(model) returns it to a caller of train."""

    def __init__(self):
        self.proj = nnx.Variable(jnp.array([[1.0, -2.0], [0.5, 3.0]]))
        self.head = nnx.Param(jnp.array([0.3, -0.1]))


def test_the_optimiser_leaves_a_non_param_variable_as_it_is_and_trains_the_params_as_without_it():
    """nnx.split(model) returns every variable: a frozen projection got AdamW updates (and weight decay). Now it gets
    zero updates and no optimiser state, and the Param's updates are those of the optimiser on the Params alone:
    clipping's global norm (1 here, so it clips) and the decay count the Param only."""
    cfg = TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.3, clip_norm=1.0)
    _, params = nnx.split(_FrozenFeatures())
    _, alone = nnx.split(_FrozenFeatures(), nnx.Param, ...)[:2]
    tx = make_optimizer(cfg)
    state, state_alone, p, p_alone = tx.init(params), tx.init(alone), params, alone
    grads = [{"proj": jnp.array([[5.0, 1.0], [0.0, -2.0]]), "head": jnp.array([0.6, 0.8])},
             {"proj": jnp.array([[0.1, 0.0], [3.0, 1.0]]), "head": jnp.array([-0.2, 0.1])}]
    for g in grads:
        updates, state = tx.update(nnx.State({"proj": nnx.Variable(g["proj"]), "head": nnx.Param(g["head"])}),
                                   state, p)
        updates_alone, state_alone = tx.update(nnx.State({"head": nnx.Param(g["head"])}), state_alone, p_alone)
        p, p_alone = optax.apply_updates(p, updates), optax.apply_updates(p_alone, updates_alone)
        np.testing.assert_array_equal(updates["proj"][...], np.zeros((2, 2)))
        np.testing.assert_array_equal(updates["head"][...], updates_alone["head"][...])  # the same float32 ops
    np.testing.assert_array_equal(p["proj"][...], [[1.0, -2.0], [0.5, 3.0]])
    assert [x.shape for x in jax.tree.leaves(state)] == [x.shape for x in jax.tree.leaves(state_alone)]


def test_on_params_alone_the_optimiser_is_optax_s_with_the_same_state():
    """Parameters without a frozen variable (every built-in model's) keep the optimiser state they had before frozen
    variables were left out, so their checkpoints resume."""
    cfg = TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.3, clip_norm=1.0, no_decay=())
    _, params = nnx.split(_FrozenFeatures(), nnx.Param, ...)[:2]
    plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lambda count: 0.1, weight_decay=0.3,
                                                                   mask=lambda p: jax.tree.map(lambda _: True, p)))
    state = make_optimizer(cfg).init(params)
    assert jax.tree.structure(state) == jax.tree.structure(plain.init(params))
    grads = nnx.State({"head": nnx.Param(jnp.array([0.6, 0.8]))})
    np.testing.assert_array_equal(make_optimizer(cfg).update(grads, state, params)[0]["head"][...],
                                  plain.update(grads, plain.init(params), params)[0]["head"][...])
