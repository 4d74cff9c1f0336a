"""The optimiser builder: weight decay masked by parameter path, one schedule for plain and swept warmups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxicl.models.ar_linear_attention import AugmentedLinearAttention, DiagonalPositionalAttention
from jaxicl.models.ar_transformer import PositionalTransformer
from jaxicl.models.gpt import GPT
from jaxicl.train import TrainConfig
from jaxicl.train.optim import decay_mask, make_optimizer, path_names, scheduled_lr, unit_schedule


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


def test_adamw_decays_exactly_the_masked_parameters():
    cfg = TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.5, no_decay=("bias",))
    params = {"w": jnp.ones(3), "bias": jnp.ones(2)}
    tx = make_optimizer(cfg)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # zero gradients: the Adam part is 0, so the update is -lr * weight_decay * param where decayed
    np.testing.assert_allclose(updates["w"], -0.05 * np.ones(3), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)  # masked out: no term at all


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
