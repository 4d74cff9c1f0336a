"""Ferry et al.'s LEA: the EMA vector quantiser against numpy, the model's streams and sizes, an exact resume with
the codebook, the message analysis against independent computations, bad messages, and the experiment's smoke run."""

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import mutual_info_score

from numpy_forward import attend, f64, gelu, layer_norm, linear, with_random_params

from experiments.common.runner import run_experiment
from jaxicl.analysis import language as lang
from jaxicl.analysis.cache import run_with_cache
from jaxicl.models import lea
from jaxicl.models import vector_quantizer as vq
from jaxicl.prompt import Prompt
from jaxicl.sites import run_with_sites
from jaxicl.tasks import boards as bd
from jaxicl.train import TrainConfig, train
from jaxicl.train.losses import lea_loss
from jaxicl.train.mesh import data_mesh
from jaxicl.train.metrics import read_metrics
from jaxicl.validation import ConfigError

TINY = dict(d_model=16, d_pos=8, n_layers=1, n_heads=2, n_words=12, message_len=4)


def test_nearest_codes_straight_through_and_usage_against_brute_force():
    rng = np.random.default_rng(0)
    codebook, x = rng.normal(size=(20, 5)).astype(np.float32), rng.normal(size=(7, 9, 5)).astype(np.float32)
    codes = np.asarray(vq.nearest_codes(jnp.asarray(codebook), jnp.asarray(x)))
    brute = np.array([[np.argmin([np.linalg.norm(v - c) for c in codebook]) for v in row] for row in x])
    np.testing.assert_array_equal(codes, brute)
    # straight-through: the forward value is the code, the gradient is the identity on x
    w = rng.normal(size=x.shape).astype(np.float32)
    q = jnp.asarray(codebook[codes])
    # x + (q - x) in float32: equal to q up to two roundings (|values| < 8, so within 2 ulp of 8 = 2e-6)
    np.testing.assert_allclose(vq.straight_through(jnp.asarray(x), q), q, rtol=0, atol=2e-6)
    grad = jax.grad(lambda v: jnp.sum(jnp.asarray(w) * vq.straight_through(v, q)))(jnp.asarray(x))
    np.testing.assert_array_equal(grad, w)
    u = np.asarray(vq.usage(jnp.asarray(codes), 20))
    np.testing.assert_allclose(u, np.bincount(codes.ravel(), minlength=20) / codes.size, rtol=1e-6)
    assert u.sum() == pytest.approx(1.0, abs=1e-6)
    # the VQ loss: commitment on the distance to the (fixed) code, the usage penalty; no gradient to the codebook
    want = 0.25 * np.mean((x - codebook[codes]) ** 2) + 0.25 * np.mean((u - 1 / 20) ** 2)
    got = vq.vq_loss(jnp.asarray(x), q, jnp.asarray(codes), 20)
    assert float(got) == pytest.approx(want, rel=1e-5)
    g_code = jax.grad(lambda c: vq.vq_loss(jnp.asarray(x), c[codes], jnp.asarray(codes), 20))(jnp.asarray(codebook))
    assert not np.any(np.asarray(g_code))


def test_usage_and_the_vq_loss_are_float64_under_x64(x64):
    """usage was float32 in a float64 run, so the usage penalty of vq_loss carried float32 rounding (1e-8 relative)."""
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 20, size=(7, 9))  # 63 vectors: fractions k / 63 are not exact in binary
    fractions = np.bincount(codes.ravel(), minlength=20) / codes.size
    u = vq.usage(jnp.asarray(codes), 20)
    assert u.dtype == jnp.float64
    np.testing.assert_array_equal(u, fractions)  # a sum of ones (exact) over 63: one correctly rounded division in both
    x, q = rng.normal(size=(7, 9, 5)), rng.normal(size=(7, 9, 5))
    want = 0.25 * np.mean((x - q) ** 2) + 0.25 * np.mean((fractions - 1 / 20) ** 2)
    # float64 sums in another order than numpy's: a few ulp
    np.testing.assert_allclose(vq.vq_loss(jnp.asarray(x), jnp.asarray(q), jnp.asarray(codes), 20), want, rtol=1e-13)


def test_ema_update_follows_the_notes_formulas():
    rng = np.random.default_rng(1)
    k, d, decay, eps = 6, 3, 0.9, 1e-5
    ema_w, size = rng.normal(size=(k, d)), np.abs(rng.normal(size=k))
    x = rng.normal(size=(10, d))
    codes = np.array([0, 0, 1, 3, 3, 3, 5, 0, 1, 3])  # codes 2 and 4 unused
    # the notes' formulas, one code at a time
    want_size = np.array([decay * size[j] + (1 - decay) * np.sum(codes == j) for j in range(k)])
    n = want_size.sum()
    want_size = (want_size + eps) / (n + k * eps) * n
    want_w = np.array([decay * ema_w[j] + (1 - decay) * x[codes == j].sum(0) for j in range(k)])
    got = vq.ema_update(jnp.asarray(ema_w, jnp.float32), jnp.asarray(size, jnp.float32), jnp.asarray(x, jnp.float32),
                        jnp.asarray(codes), decay=decay, epsilon=eps)
    np.testing.assert_allclose(got[2], want_size, rtol=1e-5)
    np.testing.assert_allclose(got[1], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0], want_w / want_size[:, None], rtol=1e-5, atol=1e-6)


def test_dead_codes_restart_on_the_worst_quantised_vectors_in_index_order():
    rng = np.random.default_rng(2)
    k, d, below = 8, 3, 0.5
    codebook, ema_w = rng.normal(size=(k, d)), rng.normal(size=(k, d))
    size = np.array([2.0, 0.1, 3.0, 0.0, 0.7, 0.2, 1.0, 0.4])  # codes 1, 3, 5, 7 are dead
    x = rng.normal(size=(2, 3, d))
    codes = rng.integers(0, k, (2, 3))
    got = vq.restart_dead_codes(*(jnp.asarray(a, jnp.float32) for a in (codebook, ema_w, size, x, codebook[codes])),
                                below=below)
    flat = x.reshape(-1, d)
    error = [np.sum((v - codebook[c]) ** 2) for v, c in zip(flat, codes.ravel())]
    order = sorted(range(len(flat)), key=lambda i: -error[i])
    want_code, want_w, want_size = codebook.copy(), ema_w.copy(), size.copy()
    for rank, j in enumerate([1, 3, 5, 7]):
        want_code[j], want_w[j], want_size[j] = flat[order[rank]], below * flat[order[rank]], below
    for g, w in zip(got, (want_code, want_w, want_size)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    # more dead codes than vectors: they cycle through the vectors; nothing dead: nothing moves
    many = vq.restart_dead_codes(*(jnp.asarray(a, jnp.float32) for a in (codebook, ema_w, np.zeros(k), x[:1],
                                                                           codebook[codes[:1]])), below=below)[0]
    order1 = sorted(range(3), key=lambda i: -error[i])
    np.testing.assert_allclose(many, x[0][[order1[j % 3] for j in range(k)]], rtol=1e-6)
    same = vq.restart_dead_codes(*(jnp.asarray(a, jnp.float32) for a in (codebook, ema_w, size, x, codebook[codes])),
                                 below=0.0)
    for g, w in zip(same, (codebook, ema_w, size)):
        np.testing.assert_array_equal(g, np.asarray(w, np.float32))


def _count(d, p, layers, words_len, board=64, vocab=21):
    """LEA's parameters from the notes' sizes: per block 4 LayerNorms over d + p, self and cross attention (q, k, v:
    d + p -> d, proj d -> d, biases), MLP d + p -> 4d -> d; embeddings, position tables, final LNs, the head."""
    w = d + p
    block = 4 * 2 * w + 2 * (3 * (w * d + d) + d * d + d) + (w * 4 * d + 4 * d) + (4 * d * d + d)
    return 2 * layers * block + vocab * d + board * p + 2 * d + d * vocab + words_len * d + words_len * p + 2 * d


def test_parameter_count_and_the_streams_meet_only_through_cross_attention():
    shapes = nnx.eval_shape(lambda: lea.LEA(rngs=nnx.Rngs(0)))
    _, params, buffers = nnx.split(shapes, nnx.Param, lea.VQBuffer)
    assert sum(x.size for x in jax.tree.leaves(params)) == _count(32, 16, 3, 16) == 137_088
    assert {k: v.shape for k, v in buffers.items()} == {"codebook": (128, 32), "ema_w": (128, 32),
                                                        "cluster_size": (128,)}
    small = dict(TINY, n_layers=2, n_words=128, message_len=16)
    graphdef, params, buffers = nnx.split(lea.LEA(rngs=nnx.Rngs(0), **small), nnx.Param, lea.VQBuffer)
    assert sum(x.size for x in jax.tree.leaves(params)) == _count(16, 8, 2, 16)
    model = nnx.merge(graphdef, params, buffers)
    model.codebook[...] = jax.random.normal(jax.random.key(2), model.codebook.shape)  # distinct words
    graphdef, state = nnx.split(model)
    boards = jax.random.randint(jax.random.key(3), (4, 64), 0, 21)
    # one compiled program per entry point, for every model below (eagerly, each operation would compile alone)
    vmapped = nnx.jit(lambda m, entry, x: jax.vmap(getattr(m, entry))(x), static_argnames="entry")
    words = jax.random.randint(jax.random.key(4), (4, 16), 0, 127)
    from_board, logits = lea.reconstruct_from_board(graphdef, state, boards), vmapped(model, "__call__", boards)
    message = vmapped(model, "message", boards)
    a = vmapped(model, "from_message", words)
    b = vmapped(model, "from_message", words[::-1])
    assert np.abs(np.asarray(a - b)).max() > 1e-3  # another message, another reconstruction from speech
    # changing every word but the blank one, and the whole speech stream, leaves the reconstruction from the board
    changed = nnx.clone(model)
    changed.codebook[:-1] = -changed.codebook[:-1]
    for block in changed.speech_blocks:
        block.mlp_out.w[...] = 10 * block.mlp_out.w[...]
    np.testing.assert_array_equal(vmapped(changed, "__call__", boards), logits)
    np.testing.assert_array_equal(lea.reconstruct_from_board(*nnx.split(changed), boards), from_board)
    assert np.any(np.asarray(vmapped(changed, "message", boards)) != np.asarray(message))
    # without the picture stream's cross-attention, the words no longer reach the board
    for block in changed.picture_blocks:
        block.cross_proj.w[...] = 0.0
        block.cross_proj.bias[...] = 0.0
    np.testing.assert_array_equal(vmapped(changed, "from_message", words),
                                  vmapped(changed, "from_message", words[::-1]))


def test_both_streams_expose_every_block_through_sites():
    model = lea.LEA(rngs=nnx.Rngs(0), **dict(TINY, n_layers=2, message_len=16))
    board = jax.random.randint(jax.random.key(0), (64,), 0, 21)
    words, cache = run_with_sites(model.message, board, capture="all")
    for stream, t, other in (("picture", 64, 16), ("speech", 16, 64)):
        for l in range(2):
            name = f"{stream}.layer{l}"
            assert cache[f"{name}.self_attn.weights"].shape == (2, t, t)
            assert cache[f"{name}.cross_attn.weights"].shape == (2, t, other)
            for site in ("self_attn.out", "resid_mid", "cross_attn.out", "resid_cross", "mlp.out", "resid_post"):
                assert cache[f"{name}.{site}"].shape == (t, 16)
    # the recorded speech output is what the words are read from
    np.testing.assert_array_equal(words, vq.nearest_codes(model.codebook[...], cache["speech.out"]))
    # zeroing a site is cutting the layer that writes it: picture layer 1's cross-attention output set to zero gives
    # the speech of the model whose cross_proj there is zero (both eager: the same ops after the same zeros, so only
    # float32 rounding could differ), and changes the speech (by 0.6 of its max |value| 2.3 here)
    edited, _ = run_with_sites(model.speech_of, board, edits={"picture.layer1.cross_attn.out": jnp.zeros_like})
    cut = nnx.clone(model)
    cut.picture_blocks[1].cross_proj.w[...] = 0.0
    cut.picture_blocks[1].cross_proj.bias[...] = 0.0
    np.testing.assert_allclose(edited, cut.speech_of(board), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(edited - cache["speech.out"])).max() > 0.1
    assert model.site_axes("speech.layer0.cross_attn.weights", 3) == ("head", "pos", "key")


def test_the_analyses_reach_the_picture_stream_and_the_documented_route_reaches_the_speech_stream():
    """run_with_cache traces LEA.__call__ (reconstruction from the board): a speech.* name is refused, and the route
    the module docstring gives records the speech output the words are read from."""
    model = lea.LEA(rngs=nnx.Rngs(0), **TINY)
    graphdef, state = nnx.split(model)
    boards = jax.random.randint(jax.random.key(0), (2, 64), 0, 21)
    assert run_with_cache(graphdef, state, boards, ["picture.unembed.in"])[1]["picture.unembed.in"].shape == (2, 64, 16)
    with pytest.raises(ValueError, match=re.escape("names: unknown site name(s) ['speech.out']")):
        run_with_cache(graphdef, state, boards, ["picture.unembed.in", "speech.out"])
    speech = jax.vmap(lambda b: run_with_sites(model.message, b, capture=["speech.out"])[1]["speech.out"])(boards)
    np.testing.assert_array_equal(jax.vmap(model.message)(boards), vq.nearest_codes(model.codebook[...], speech))


def _numpy_kmeans(x, k, iters=10):
    """Lloyd's algorithm from k evenly spaced vectors of x [N, D]; an empty cluster keeps its centroid."""
    c = x[np.arange(k) * (len(x) // k)].astype(np.float64)
    for _ in range(iters):
        a = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), 1)
        c = np.array([x[a == j].mean(0) if np.any(a == j) else c[j] for j in range(k)])
    a = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), 1)
    return c, np.bincount(a, minlength=k)


def test_kmeans_against_numpy_lloyd():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 4)) * 5
    x = (centres[rng.integers(0, 6, 300)] + rng.normal(size=(300, 4))).astype(np.float32)
    got, counts = vq.kmeans(jnp.asarray(x.reshape(30, 10, 4)), 8)
    want, want_counts = _numpy_kmeans(x, 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # float32 means of ~40 O(5) vectors
    np.testing.assert_array_equal(counts, want_counts)
    # both starts at 2 (ties go to code 0): code 1 loses every vector, stays at 2 and takes 0, 2, 2 next, by hand
    c, n = vq.kmeans(jnp.array([[2.0], [0.0], [2.0], [5.0]]), 2, iters=3)
    np.testing.assert_allclose(c, [[5.0], [4 / 3]], rtol=1e-6)
    np.testing.assert_array_equal(n, [1, 3])
    with pytest.raises(ValueError, match="at least k=8 vectors"):
        vq.kmeans(jnp.zeros((5, 4)), 8)
    # k = 0 divided by zero placing the starts; k = 1 is the mean of every vector (float32 means of 300 O(5) values)
    with pytest.raises(ConfigError, match=r"^k must be in \[1, inf\], got 0$"):
        vq.kmeans(jnp.asarray(x), 0)
    c, n = vq.kmeans(jnp.asarray(x), 1)
    np.testing.assert_allclose(c, x.mean(0, dtype=np.float64)[None], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(n, [300])


def test_the_three_pass_loss_against_the_entry_points_with_words_continuous_speech_and_the_refit():
    """lea_loss's passes recomputed from the model's entry points, at epoch 2: with continuous_until 0 (the notes'
    recipe) pass 3 reads the words; with 3, the continuous speech (no VQ loss, the buffers untouched, the speech
    stream trained by the reconstruction from speech alone); with 2, the words of a codebook refit to the batch's
    speech by k-means (numpy Lloyd here), which the EMA step then keeps."""
    graphdef, params, buffers = nnx.split(lea.LEA(rngs=nnx.Rngs(0), **TINY), nnx.Param, lea.VQBuffer)
    model = nnx.merge(graphdef, params, buffers)
    board = jax.random.randint(jax.random.key(1), (3, 64), 0, 20)
    batch = Prompt(inputs=board.at[:, ::5].set(20), targets=board, mask=jnp.ones((3, 64)),
                   info={"epoch": jnp.full(3, 2)})

    def ce(logits):  # mean cross-entropy over every cell, in numpy
        logits = np.asarray(logits, np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return float(np.mean(logz - np.take_along_axis(logits, np.asarray(board)[..., None], -1)[..., 0]))

    ce_board = ce(jax.vmap(model)(batch.inputs))
    speech = jax.vmap(model.speech_of)(batch.inputs)  # [3, 4, 16]: 12 vectors for 11 refit words
    refit, _ = _numpy_kmeans(np.asarray(speech).reshape(12, 16), TINY["n_words"] - 1)
    refit = np.concatenate([refit, np.asarray(model.codebook[...])[-1:]]).astype(np.float32)
    refit_words = refit[np.asarray(vq.nearest_codes(jnp.asarray(refit), speech))]
    cases = {0: jax.vmap(model.from_message)(jax.vmap(model.message)(batch.inputs)),
             3: jax.vmap(model.from_vectors)(speech), 2: jax.vmap(model.from_vectors)(jnp.asarray(refit_words))}
    for until, logits_speech in cases.items():
        # jitted: one compiled program a case (run eagerly, each of the loss's few hundred operations compiles alone)
        loss, (aux, new) = jax.jit(lea_loss(graphdef, rfs_ramp=(0, 4), continuous_until=until))(params, batch, buffers)
        assert float(aux["rfs_weight"]) == 0.5
        np.testing.assert_allclose([aux["ce_board"], aux["ce_speech"]], [ce_board, ce(logits_speech)], rtol=1e-4)
        np.testing.assert_allclose(loss, ce_board + 0.5 * (float(aux["vq_loss"]) + ce(logits_speech)), rtol=1e-5)
        if until == 3:
            assert float(aux["vq_loss"]) == 0.0
            for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(buffers)):
                np.testing.assert_array_equal(got, want)
            # lea._run's one jit against the eager vmaps above: argmaxes of two programs, equal while the top-2 logit
            # margins (2e-5 at least here, 3e-3 in the words case below) stay far above float32 rounding (~1e-7)
            drawn = lea.reconstruct_from_speech(graphdef, nnx.merge_state(params, buffers), batch.inputs, False)
            np.testing.assert_array_equal(drawn, np.argmax(np.asarray(logits_speech), -1))
        else:
            assert float(aux["vq_loss"]) > 0
        if until == 0:
            drawn = lea.reconstruct_from_speech(graphdef, nnx.merge_state(params, buffers), batch.inputs)
            np.testing.assert_array_equal(drawn, np.argmax(np.asarray(logits_speech), -1))
            assert np.abs(np.asarray(new["codebook"][...]) - np.asarray(buffers["codebook"][...])).max() > 1e-3
        if until == 2:  # k-means has converged, so the EMA step keeps the refit words (Laplace eps 1e-5 aside)
            np.testing.assert_allclose(new["codebook"][...][:-1], refit[:-1], atol=1e-3)
    # the reconstruction from continuous speech trains the speech stream
    grads = jax.jit(jax.grad(lambda p: lea_loss(graphdef, rfs_ramp=(0, 4), continuous_until=3)(p, batch, buffers)[1][0]
                             ["ce_speech"]))(params)
    assert np.abs(np.asarray(grads["speech_blocks"][0]["mlp_out"]["w"][...])).max() > 0



def test_the_speech_weight_ramps_linearly_from_the_ramps_first_epoch_to_its_last():
    """a(epoch) = clip((epoch - lo) / (hi - lo), 0, 1) for the notes' ramp (250, 1000): 0 up to 250, 1/2 at 625
    (the other tests ramp from lo = 0, where dividing by hi instead of hi - lo gives the same weights)."""
    graphdef, params, buffers = nnx.split(lea.LEA(rngs=nnx.Rngs(0), **TINY), nnx.Param, lea.VQBuffer)
    loss = jax.jit(lea_loss(graphdef, rfs_ramp=(250, 1000)))
    board = jax.random.randint(jax.random.key(1), (2, 64), 0, 20)
    for epoch, want in ((100, 0.0), (250, 0.0), (400, 0.2), (625, 0.5), (1000, 1.0), (1500, 1.0)):
        batch = Prompt(inputs=board, targets=board, mask=jnp.ones((2, 64)), info={"epoch": jnp.full(2, epoch)})
        total, (aux, _) = loss(params, batch, buffers)
        np.testing.assert_allclose(aux["rfs_weight"], want, rtol=1e-6, atol=1e-7)  # one float32 division
        np.testing.assert_allclose(total, aux["ce_board"] + want * (aux["vq_loss"] + aux["ce_speech"]), rtol=1e-6)

def test_a_codebook_of_the_blank_alone_is_refused_naming_n_words():
    """n_words=1 leaves the blank (word n_words - 1) and no word to speak; a model built so, outside the experiment's
    config (which refuses model.n_words=1 before anything runs), crashed in its first refit, a k-means of 0 words."""
    with pytest.raises(ConfigError, match=r"^n_words must be in \[2, inf\], got 1$"):
        lea.LEA(rngs=nnx.Rngs(0), **dict(TINY, n_words=1))
    assert lea.LEA(rngs=nnx.Rngs(0), **dict(TINY, n_words=2)).blank == 1


def test_bad_messages_name_the_argument_and_the_allowed_range():
    graphdef, state = nnx.split(lea.LEA(rngs=nnx.Rngs(0), **TINY))
    with pytest.raises(ValueError, match=r"words must have shape \[batch, 4\]"):
        lea.reconstruct_from_message(graphdef, state, np.zeros((2, 5), int))
    with pytest.raises(ValueError, match=r"word ids must be in \[0, 11\].*got values in \[0, 12\]"):
        lea.reconstruct_from_message(graphdef, state, np.array([[0, 1, 2, 12]]))
    with pytest.raises(ValueError, match=r"word ids must be in \[0, 11\]"):
        lea.reconstruct_from_message(graphdef, state, np.array([[-1, 1, 2, 3]]))
    with pytest.raises(ValueError, match="integer word ids"):
        lea.reconstruct_from_message(graphdef, state, np.zeros((1, 4)))
    assert lea.reconstruct_from_message(graphdef, state, np.zeros((3, 4), int)).shape == (3, 64)


def _random_boards(cfg, key, step):
    """Random boards, one UNK in four, epoch = step (the board sampler would double the compile time)."""
    board = jax.random.randint(key, (64,), 0, 20)
    masked = jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), (64,)) < 0.25, 20, board)
    return Prompt(inputs=masked, targets=board, mask=jnp.ones(64), info={"epoch": step})


def test_a_resumed_lea_run_equals_the_uninterrupted_run_codebook_included(tmp_path):
    """The run is cut after its step-6 checkpoint (later checkpoints deleted) and run again: it resumes there."""
    task, sample = bd.Boards(), _random_boards
    graphdef, params, buffers = nnx.split(lea.LEA(rngs=nnx.Rngs(0), **TINY), nnx.Param, lea.VQBuffer)
    loss = lea_loss(graphdef, rfs_ramp=(0, 4))
    cfg = TrainConfig(steps=12, batch_size=4, optimizer="adamw", lr=1e-3, steps_per_call=6, log_every=1,
                      checkpoint_every=6)
    kw = dict(buffers=buffers, progress=False, mesh=data_mesh(1))
    whole = train(loss, sample, task, cfg, params, out_dir=str(tmp_path / "a"), **kw)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "12")
    resumed = train(loss, sample, task, cfg, params, out_dir=str(tmp_path / "b"), **kw)
    assert read_metrics(str(tmp_path / "b" / "metrics.jsonl")) == read_metrics(str(tmp_path / "a" / "metrics.jsonl"))
    for got, want in ((resumed.state.params, whole.state.params), (resumed.state.buffers, whole.state.buffers)):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(g, w)  # the same compiled chunk of 6 steps, from the same bytes
    moved = np.abs(np.asarray(whole.state.buffers["codebook"][...]) - np.asarray(buffers["codebook"][...])).max()
    assert moved > 1e-3  # the EMA did move the codebook


def test_the_curriculum_gives_the_same_run_on_1_and_4_devices_and_the_refits_take_sharded_vectors():
    """continuous_until (the k-means refit at epoch 3) under the engine with the batch sharded over 4 devices: the
    same losses, words, parameters and codebook as on 1 device, to float32 sums taken in another order (measured
    2e-7 relative; the key biases are left out: softmax ignores them, so their gradient is float noise that Adam
    turns into steps of its own). kmeans and restart_dead_codes on vectors sharded over "data" give what they give
    unsharded: restart_dead_codes exactly (a sort and a gather of the same values), kmeans to float32 sums."""
    graphdef, params, buffers = nnx.split(lea.LEA(rngs=nnx.Rngs(0), **TINY), nnx.Param, lea.VQBuffer)
    loss = lea_loss(graphdef, rfs_ramp=(0, 2), continuous_until=3)
    cfg = TrainConfig(steps=8, batch_size=4, optimizer="adamw", lr=1e-3, steps_per_call=8, log_every=1)
    runs = [train(loss, _random_boards, bd.Boards(), cfg, params, buffers=buffers, progress=False, mesh=data_mesh(n))
            for n in (1, 4)]
    losses = [[r["loss"] for r in run.train_rows] for run in runs]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert [r["words_used"] for r in runs[1].train_rows] == [r["words_used"] for r in runs[0].train_rows]
    for got, want in ((runs[1].state.params, runs[0].state.params), (runs[1].state.buffers, runs[0].state.buffers)):
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            if not re.search(r"_k'\]\['bias", jax.tree_util.keystr(path)):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    refit = np.asarray(runs[0].state.buffers["codebook"][...])[:-1]
    assert np.abs(refit - np.asarray(buffers["codebook"][...])[:-1]).max() > 0.1  # the words were refit

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(8, 4, 3)), jnp.float32)
    codebook, ema_w = (jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) for _ in range(2))
    size = jnp.asarray([2.0, 0.1, 3.0, 0.0, 0.7, 0.2])
    quantised = codebook[vq.nearest_codes(codebook, x)]
    restart = jax.jit(lambda x, q: vq.restart_dead_codes(codebook, ema_w, size, x, q, below=0.5))
    centroids = jax.jit(lambda x: vq.kmeans(x, 5))
    want_restart, want_kmeans = restart(x, quantised), centroids(x)
    mesh = data_mesh(4)
    with jax.set_mesh(mesh):
        xs, qs = (jax.device_put(v, jax.NamedSharding(mesh, jax.P("data"))) for v in (x, quantised))
        got_restart, got_kmeans = restart(xs, qs), centroids(xs)
    for g, w in zip(got_restart, want_restart):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_allclose(got_kmeans[0], want_kmeans[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_kmeans[1], want_kmeans[1])


def test_usage_table_mutual_information_and_word_swaps_against_independent_counts():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 500)
    words = np.stack([labels * 2 + rng.integers(0, 2, 500), rng.integers(0, 8, 500), labels], 1)  # [N, 3]
    table = lang.usage_table(words, labels, 4, 8)
    for s in range(3):
        for k in range(4):
            np.testing.assert_array_equal(table[s, k], np.bincount(words[labels == k, s], minlength=8))
    mi = lang.mutual_information(words, labels)
    want = [mutual_info_score(labels, words[:, s]) / np.log(2) for s in range(3)]
    np.testing.assert_allclose(mi, want, rtol=1e-9, atol=1e-12)
    assert mi[2] == pytest.approx(-np.sum(np.bincount(labels) / 500 * np.log2(np.bincount(labels) / 500)))
    assert lang.shuffled_mutual_information(words, labels, rng).max() < 0.1 < mi[0]
    target = (labels + 1) % 4
    swapped = lang.swap_words(words, target, np.array([2]), table)
    np.testing.assert_array_equal(swapped[:, 2], target)  # slot 2's most frequent word under label k is k
    np.testing.assert_array_equal(swapped[:, :2], words[:, :2])
    control = lang.random_words(words, 1, table, rng)
    assert np.all(np.sum(control != words, 1) <= 1)
    assert all(set(control[:, s]) <= set(words[:, s]) for s in range(3))
    every = lang.random_words(words, 3, table, rng)  # every slot redrawn: 500 uniform draws reach each used word
    assert all(set(every[:, s]) == set(words[:, s]) for s in range(3))
    only7 = np.zeros((3, 4, 8), int)
    only7[..., 7] = 1  # a table where every slot uses word 7 alone: a redrawn slot is 7, an untouched one stays 0
    redrawn = lang.random_words(np.zeros((200, 3), int), 2, only7, rng) == 7
    np.testing.assert_array_equal(redrawn.sum(1), 2)  # n_slots distinct slots per row
    assert redrawn.all(0).sum() == 0 and redrawn.any(0).all()
    # a label -1 ("none") was counted as label 3, a target -1 swapped in label 3's words
    for bad_labels, bad_words, name in ((np.where(labels == 0, -1, labels), words, "labels"),
                                        (labels, words + 1, "words")):
        with pytest.raises(ValueError, match=rf"{name} must lie in \[0, \d\)"):
            lang.usage_table(bad_words, bad_labels, 4, 8)
    with pytest.raises(ValueError, match=r"target must lie in \[0, 4\), got values from -1"):
        lang.swap_words(words, target - 1, np.array([2]), table)


def test_smoke_run_writes_every_check_and_figure(tmp_path):
    result = run_experiment("abstractions_lea", "smoke", str(tmp_path))
    assert [c["name"] for c in result["checks"]] == ["speech_object_accuracy_over_other_message",
                                                     "root_mi_over_shuffled_bits", "steer_root_words_shows_b",
                                                     "steer_place_words_shows_b", "steer_place_words_b_over_c"]
    assert all(np.isfinite(c["value"]) for c in result["checks"])
    for fig in result["figures"]:
        assert os.path.getsize(tmp_path / "abstractions_lea" / fig) > 10_000
    metrics = tmp_path / "abstractions_lea" / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 10, 20]
    first_train = next(r for r in rows if r["split"] == "train")
    assert {"ce_board", "ce_speech", "vq_loss", "rfs_weight", "words_used"} <= set(first_train)
    final = [r for r in rows if r["split"] == "eval"][-1]
    assert 0 <= final["speech_token_accuracy"] <= 1 and 0 <= final["board_object_accuracy"] <= 1


def _numpy_stream(blocks, x, pos, context, context_pos):
    """The module docstring's decoder blocks in float64 numpy: self-attention, cross-attention to the context, MLP."""
    def cat(a, b):
        return np.concatenate([a, b], -1)

    for b in blocks:
        h = layer_norm(cat(x, pos), b.ln_self)
        x = x + linear(attend(linear(h, b.self_q), linear(h, b.self_k), linear(h, b.self_v), b.n_heads), b.self_proj)
        h, c = layer_norm(cat(x, pos), b.ln_cross), layer_norm(cat(context, context_pos), b.ln_context)
        x = x + linear(attend(linear(h, b.cross_q), linear(c, b.cross_k), linear(c, b.cross_v), b.n_heads),
                       b.cross_proj)
        x = x + linear(gelu(linear(layer_norm(cat(x, pos), b.ln_mlp), b.mlp_in)), b.mlp_out)
    return x


def test_both_streams_match_a_numpy_forward_pass(x64):
    """The picture stream reads the message at the speech positions, the speech stream the picture's LN_f output at
    the picture positions; every parameter random and O(1), so each LayerNorm and position table matters."""
    m = with_random_params(lea.LEA(d_model=8, d_pos=4, n_layers=2, n_heads=2, board_len=10, n_words=6, message_len=3,
                                   rngs=nnx.Rngs(0)), jax.random.key(1))
    tokens = np.random.default_rng(0).integers(0, 21, 10)
    message = np.random.default_rng(1).normal(size=(3, 8))
    # both streams jitted: eagerly, each of their operations compiles alone; float64 rounding (1e-16) stays far below
    # the 1e-9 tolerances
    logits, z = nnx.jit(lambda m, t, c: m.picture(t, c))(m, jnp.asarray(tokens), jnp.asarray(message))
    x = _numpy_stream(m.picture_blocks, f64(m.embed)[tokens], f64(m.picture_pos), message, f64(m.speech_pos))
    want_z = layer_norm(x, m.picture_ln)
    np.testing.assert_allclose(z, want_z, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(logits, linear(want_z, m.head), rtol=1e-9, atol=1e-9)
    speech = _numpy_stream(m.speech_blocks, f64(m.speech_embed), f64(m.speech_pos), want_z, f64(m.picture_pos))
    np.testing.assert_allclose(nnx.jit(lambda m, z: m.speech(z))(m, z), layer_norm(speech, m.speech_ln), rtol=1e-9,
                               atol=1e-9)


def test_the_refit_needs_a_batch_of_as_many_speech_vectors_as_words_and_nothing_else_does():
    """continuous_until > 0 compiles a k-means of the n_words - 1 words on the batch's batch_size * message_len speech
    vectors into every step; the config refuses one vector fewer than words (the quick preset: 127 words, 16 per
    board), as kmeans does, and accepts as many, or any batch without the refit."""
    from experiments import abstractions_lea as exp

    quick = exp.PRESETS["quick"]
    x = jax.random.normal(jax.random.key(0), (8 * 16, 4))
    assert vq.kmeans(x, 127)[0].shape == (127, 4)  # 128 vectors, as batch_size=8 gives
    with pytest.raises(ValueError, match="kmeans needs at least k=127 vectors, got 112"):
        vq.kmeans(x[:7 * 16], 127)
    with pytest.raises(ConfigError, match=r"train.batch_size \* model.message_len = 7 \* 16 = 112: it needs at "
                                          r"least 127"):
        dataclasses.replace(quick, train=dataclasses.replace(quick.train, batch_size=7))
    dataclasses.replace(quick, train=dataclasses.replace(quick.train, batch_size=8))
    dataclasses.replace(quick, train=dataclasses.replace(quick.train, batch_size=1), continuous_until=0)
    with pytest.raises(ConfigError, match=r"model.n_words must be in \[2, inf\], got 1"):
        dataclasses.replace(quick, model=dataclasses.replace(quick.model, n_words=1), continuous_until=0)


def test_the_full_presets_test_set_is_the_official_one_and_bad_counts_are_refused():
    """The official LEA test call scores every test tuple (40 single, 400 double, 20 composite), each masked twice;
    jaxicl scored 140 tuples without composites, once, and said the official set had none."""
    from experiments import abstractions_lea as exp
    from experiments.common.abstractions import check_eval_set

    cfg = exp.PRESETS["full"]
    data = bd.build(cfg.task)
    assert [len(data.tuples("test", t)) for t in bd.TYPES] == [40, 400, 20]
    test = exp.eval_set(cfg, data, "test", jax.random.key(0))
    np.testing.assert_array_equal(np.bincount(np.asarray(test.info["type"]), minlength=3), [80, 800, 40])
    masked = np.asarray(test.info["masked"]).reshape(2, 460, 64)
    assert (masked[0] != masked[1]).any()  # two independent maskings of the same boards
    np.testing.assert_array_equal(np.asarray(test.targets).reshape(2, 460, 64)[0],
                                  np.asarray(test.targets).reshape(2, 460, 64)[1])
    for bad in ((40, 100), (40, -1, 20), (0, 0, 0)):
        with pytest.raises(ConfigError, match=rf"eval_per_type must be 3 counts >= 0 .*got {re.escape(str(bad))}"):
            check_eval_set(bad, 1)
    with pytest.raises(ConfigError, match="eval_rounds"):
        check_eval_set((1, 1, 1), 0)
