"""The one home of training losses (params, batch) -> (loss, aux), and their per-position form.

Every model's predictions come from its readout (jaxicl.models.functional.predictor): [B, T] or
[B, T, K] for K coordinates (complex allowed: errors are squared moduli).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxicl.mesh_placement import replicated_inputs
from jaxicl.models.functional import predictor
from jaxicl.models.gpt import lookup
from jaxicl.models.lea import VQBuffer
from jaxicl.models.vector_quantizer import (ema_update, kmeans, nearest_codes, restart_dead_codes, straight_through,
                                           vq_loss)
from jaxicl.prompt import Prompt

COORDS = ("sum", "mean")


def masked_mean(errors: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over prompts of the mask-weighted mean of per-position errors: errors, mask [B, T] -> []."""
    return jnp.mean(jnp.sum(mask * errors, -1) / jnp.maximum(jnp.sum(mask, -1), 1e-12))


def query_mse(pred: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error at the final (query) position: pred, targets [..., B, T] -> [...]."""
    return jnp.mean((pred[..., -1] - targets[..., -1]) ** 2, axis=-1)


def position_errors(pred: jax.Array, targets: jax.Array, coords: str = "sum") -> jax.Array:
    """|pred - targets|^2 per position [B, T]; over K coordinates ([B, T, K]) summed or averaged.

    Raises ValueError unless pred and targets have the same shape (a [B, T] readout against [B, T, 1] targets would
    broadcast to a wrong loss, or fail cryptically).
    """
    if pred.shape != targets.shape:
        raise ValueError(f"the model's predictions {pred.shape} and the batch's targets {targets.shape} must have the "
                         "same shape, [B, T] or [B, T, K] (predictions [B, T, K] against targets [B, T]: give the "
                         "model one output coordinate, e.g. GPT(out_dim=1), whose readout is [B, T]; predictions "
                         "[B, T] against targets [B, T, 1]: sample targets [T])")
    err = jnp.abs(pred - targets) ** 2
    if err.ndim == 3:
        err = jnp.sum(err, -1) if coords == "sum" else jnp.mean(err, -1)
    return err


def regression_loss(graphdef: nnx.GraphDef, *, coords: str = "sum", scale: float = 1.0):
    """scale * the mask-weighted squared error of the model's predictions on a Prompt batch.

    coords: over a multi-coordinate target, "sum" |error|^2 (the theory's loss) or "mean" (MSELoss).
    E.g. Li et al.'s 1/2 squared error at the query is coords="sum", scale=0.5 (the task's mask).
    """
    if coords not in COORDS:
        raise ValueError(f"coords must be one of {COORDS}, got {coords!r}")

    def loss_fn(params, batch: Prompt):
        pred = jax.vmap(predictor(graphdef, params))(batch.inputs)
        return scale * masked_mean(position_errors(pred, batch.targets, coords), batch.mask), {}

    return loss_fn


def cross_entropy_loss(graphdef: nnx.GraphDef):
    """The mask-weighted next-token cross-entropy of a model whose predictions are logits [B, T, V] over integer
    targets [B, T]; aux {"accuracy"}: the mask-weighted fraction of positions whose argmax is the target."""

    def loss_fn(params, batch: Prompt):
        logits = jax.vmap(predictor(graphdef, params))(batch.inputs)
        hits = (jnp.argmax(logits, -1) == batch.targets).astype(logits.dtype)
        return masked_mean(token_nll(logits, batch.targets), batch.mask), {"accuracy": masked_mean(hits, batch.mask)}

    return loss_fn


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target]: logits [..., V], integer targets [...] -> [...]."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]


def lea_loss(graphdef: nnx.GraphDef, *, rfs_ramp: tuple[int, int] = (250, 1000), decay: float = 0.99,
             epsilon: float = 1e-5, commitment: float = 0.25, usage_cost: float = 0.25, restart_below: float = 0.0,
             continuous_until: int = 0):
    """The three-pass loss of Ferry et al.'s LEA (jaxicl.models.lea; shared/papers/abstractions_ferry2023.md,
    Section 5) on board batches (info["epoch"] [B]: the epoch the boards were drawn for); a run with buffers.

      1. masked board -> picture stream (blank message) -> logits_board, and its LN_f output z
      2. z -> speech stream -> s [L, D] -> nearest words, quantised straight-through
      3. the all-UNK board + the quantised message -> the same picture stream -> logits_speech
      loss = CE(logits_board) + a(epoch) (VQ loss + CE(logits_speech)),  a ramping 0 -> 1 over rfs_ramp epochs

    Cross-entropies are means over every cell of every board. The new buffers are the codebook's EMA step on this
    batch's speech vectors (vector_quantizer.ema_update with decay, epsilon), then, when restart_below > 0, codes
    whose cluster size fell below it restarted on the batch's worst-quantised speech vectors
    (vector_quantizer.restart_dead_codes; ours, off in the notes' recipe); every pass reads the codebook as it was
    before the step. aux: both cross-entropies and token accuracies, the VQ loss, a(epoch), and the number of
    distinct words in the batch.

    continuous_until (ours; 0 in the notes' recipe): before this epoch pass 3 reads the speech stream's continuous
    output s instead of its words, with no VQ loss and the buffers untouched; in that epoch every word but the blank
    is refit to the batch's speech vectors (vector_quantizer.kmeans; cluster sizes: the counts, at least 1) before the
    step's codes are read, so the words take over from a codebook fitted to the speech. A value past the run's last
    epoch is the continuous-speech ablation.
    """
    def loss_fn(params, batch: Prompt, buffers):
        model = nnx.merge(graphdef, params, buffers)
        codebook, ema_w, cluster_size = model.codebook[...], model.ema_w[...], model.cluster_size[...]
        blank = model.words(jnp.full(model.message_len, model.blank))
        logits_board, z = jax.vmap(model.picture, in_axes=(0, None))(batch.inputs, blank)
        s = jax.vmap(model.speech)(z)  # [B, L, D]
        epoch = jnp.max(batch.info["epoch"])
        quantised = epoch >= continuous_until
        if continuous_until > 0:  # the words' refit, in the first epoch that reads them
            fitted, counts = kmeans(jax.lax.stop_gradient(s), model.n_words - 1)
            refit = epoch == continuous_until
            codebook = jnp.where(refit, codebook.at[:-1].set(fitted), codebook)
            cluster_size = jnp.where(refit, cluster_size.at[:-1].set(jnp.maximum(counts, 1)), cluster_size)
            ema_w = jnp.where(refit, codebook * cluster_size[:, None], ema_w)
        codes = nearest_codes(codebook, s)
        chosen = lookup(codebook, codes)
        unk = jnp.full_like(batch.inputs, model.vocab_size - 1)
        message = jnp.where(quantised, straight_through(s, chosen), s)
        logits_speech = jax.vmap(lambda t, m: model.picture(t, m)[0])(unk, message)
        ce_board = jnp.mean(token_nll(logits_board, batch.targets))
        ce_speech = jnp.mean(token_nll(logits_speech, batch.targets))
        lo, hi = rfs_ramp
        a = jnp.clip((epoch - lo) / max(hi - lo, 1), 0.0, 1.0)
        vq = jnp.where(quantised, vq_loss(s, chosen, codes, model.n_words, commitment=commitment,
                                          usage_cost=usage_cost), 0.0)
        new = ema_update(ema_w, cluster_size, jax.lax.stop_gradient(s), codes, decay=decay, epsilon=epsilon)
        if restart_below > 0:
            new = restart_dead_codes(*new, jax.lax.stop_gradient(s), chosen, below=restart_below)
        new = [jnp.where(quantised, v, old) for v, old in zip(new, (model.codebook[...], model.ema_w[...],
                                                                    model.cluster_size[...]))]
        new_buffers = nnx.State({k: VQBuffer(v) for k, v in zip(("codebook", "ema_w", "cluster_size"), new)})
        aux = {"ce_board": ce_board, "ce_speech": ce_speech, "vq_loss": vq, "rfs_weight": a,
               "accuracy_board": jnp.mean(jnp.argmax(logits_board, -1) == batch.targets),
               "accuracy_speech": jnp.mean(jnp.argmax(logits_speech, -1) == batch.targets),
               "words_used": jnp.sum(jnp.any(jax.nn.one_hot(codes.reshape(-1), model.n_words) > 0, 0))}
        return ce_board + a * (vq + ce_speech), (aux, new_buffers)

    return loss_fn


@replicated_inputs
def per_position_loss(graphdef: nnx.GraphDef, params, batch: Prompt, coords: str = "sum") -> np.ndarray:
    """[T] mean over the batch of each position's squared error (regression_loss's conventions); params and batch on
    one mesh first, as the analyses' (jaxicl.mesh_placement.replicated_inputs)."""
    return np.asarray(_per_position(graphdef, params, batch.inputs, batch.targets, coords))


@partial(jax.jit, static_argnums=(0, 4))
def _per_position(graphdef, params, inputs, targets, coords):
    return jnp.mean(position_errors(jax.vmap(predictor(graphdef, params))(inputs), targets, coords), axis=0)
