"""The language-enhanced architecture (LEA) of Ferry et al. 2023: a picture stream that reconstructs boards and a
speech stream that describes them in a short discrete message (shared/papers/abstractions_ferry2023.md, Section 5).

Both streams are stacks of factorised decoder blocks (pre-LN; LayerNorm over [x ; pos], positions never enter the
residual stream; bidirectional attention; exact GELU):

  x = x + SelfAttn(LN_self([x ; pos_x]))
  x = x + CrossAttn(q = LN_cross([x ; pos_x]), kv = LN_context([c ; pos_c]))     c: the other stream's sequence
  x = x + W2 gelu(W1 LN_mlp([x ; pos_x]) + b1) + b2                               W1: D + P -> 4D

- Picture stream (the inference network, IN): token embedding [V, D] and picture positions [64, P]; its blocks
  cross-attend to a message of L word vectors; LN_f; head D -> V (no bias). Its LN_f output is the "abstract
  representation" the speech stream reads.
- Speech stream (the auxiliary language network, ALN): L learned initial vectors [L, D] and speech positions [L, P];
  its blocks cross-attend to the picture stream's LN_f output; LN_f; then each of the L vectors is quantised to its
  nearest code in a codebook of K words (jaxicl.models.vector_quantizer).
- Without a message (reconstruction from a board), the picture stream reads L copies of the blank word (K - 1), so
  K >= 2: the blank and at least one word.

The codebook and its EMA state are VQBuffer variables: nnx.split(model, nnx.Param, VQBuffer) gives (graphdef,
params, buffers); the training step updates the buffers (jaxicl.train.losses.lea_loss), the optimiser never sees them.
Entry points on the merged state (nnx.merge_state(params, buffers)): reconstruct_from_board, message_of,
reconstruct_from_speech (a board redrawn from its own words, or from its continuous speech), reconstruct_from_message
(the steering interface: edit words, watch the board).

Named sites (per board; the picture stream's in reconstruct-from-board and message_of, the speech stream's in
message_of):
  picture.embed [64, D]   speech.embed [L, D] (the learned initial vectors)
  {stream}.layer{l}.self_attn.q/.k/.v [T, H, dh], .weights [H, T, T], .out [T, D]; {stream}.layer{l}.resid_mid
  {stream}.layer{l}.cross_attn.q [T, H, dh], .k/.v [T_other, H, dh], .weights [H, T, T_other], .out [T, D];
  {stream}.layer{l}.resid_cross
  {stream}.layer{l}.mlp.out [T, D]; {stream}.layer{l}.resid_post [T, D]
  picture.unembed.in [64, D] (LN_f: the abstract representation)   speech.out [L, D] (before quantisation)

jaxicl.analysis (run_with_cache, site_info, patching, ablation) traces LEA.__call__, the reconstruction from the board,
so it reaches the picture.* sites only. The speech.* sites (with the picture stream's that feed them) are captured
per board by tracing message: run_with_sites(nnx.merge(graphdef, state).message, board, capture=[...]) from
jaxicl.sites, vmapped over boards [B, 64], as experiments/abstractions_lea.py's representation_probes does.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxicl.models.base import Model, check_prompt, check_prompt_length
from jaxicl.models.factor_transformer import Linear, attend, attention_site_axes
from jaxicl.models.gpt import LayerNorm, NormalWeights, lookup
from jaxicl.models.vector_quantizer import nearest_codes
from jaxicl.sites import null_sites
from jaxicl.validation import check_choice, check_integer, check_range, check_size

EMA_INITS = ("normal", "codebook")  # ema_w's start: N(0, 1) (the official code) or the codebook itself


class VQBuffer(nnx.Variable):
    """A vector quantiser's state (codebook, EMA numerator, cluster sizes): moved by the EMA, never by the optimiser."""


class DecoderBlock(nnx.Module):
    def __init__(self, d_model: int, d_pos: int, n_heads: int, *, normal: NormalWeights):
        width = d_model + d_pos
        self.n_heads = n_heads
        self.ln_self, self.ln_cross, self.ln_context, self.ln_mlp = (LayerNorm(width) for _ in range(4))
        self.self_q, self.self_k, self.self_v = (Linear(width, d_model, normal=normal) for _ in range(3))
        self.self_proj = Linear(d_model, d_model, normal=normal)
        self.cross_q, self.cross_k, self.cross_v = (Linear(width, d_model, normal=normal) for _ in range(3))
        self.cross_proj = Linear(d_model, d_model, normal=normal)
        self.mlp_in = Linear(width, 4 * d_model, normal=normal)
        self.mlp_out = Linear(4 * d_model, d_model, normal=normal)

    def __call__(self, x, pos, context, context_pos, sites, name: str) -> jax.Array:
        """x [T, D] (positions pos [T, P]) cross-attending to context [Tc, D] (context_pos [Tc, P]) -> [T, D]."""
        h = self.ln_self(jnp.concatenate([x, pos], -1))
        a = attend(self.self_q(h), self.self_k(h), self.self_v(h), self.n_heads, sites, f"{name}.self_attn")
        x = sites(f"{name}.resid_mid", x + sites(f"{name}.self_attn.out", self.self_proj(a)))
        h = self.ln_cross(jnp.concatenate([x, pos], -1))
        c = self.ln_context(jnp.concatenate([context, context_pos], -1))
        a = attend(self.cross_q(h), self.cross_k(c), self.cross_v(c), self.n_heads, sites, f"{name}.cross_attn")
        x = sites(f"{name}.resid_cross", x + sites(f"{name}.cross_attn.out", self.cross_proj(a)))
        h = jax.nn.gelu(self.mlp_in(self.ln_mlp(jnp.concatenate([x, pos], -1))), approximate=False)
        return sites(f"{name}.resid_post", x + sites(f"{name}.mlp.out", self.mlp_out(h)))


class LEA(Model):
    """Board tokens [64] -> logits [64, vocab_size] reconstructed with the blank message (see the module docstring)."""

    def __init__(self, *, vocab_size: int = 21, d_model: int = 32, d_pos: int = 16, n_layers: int = 3,
                 n_heads: int = 2, board_len: int = 64, n_words: int = 128, message_len: int = 16,
                 init_std: float = 0.02, ema_init: str = "normal", rngs: nnx.Rngs):
        for name, v in (("vocab_size", vocab_size), ("d_model", d_model), ("d_pos", d_pos), ("n_layers", n_layers),
                        ("n_heads", n_heads), ("board_len", board_len), ("message_len", message_len)):
            check_size(name, v)
        check_integer("n_words", n_words)
        check_range("n_words", n_words, 2)  # the blank (the last word) and at least one word to speak
        check_choice("ema_init", ema_init, EMA_INITS)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.vocab_size, self.n_words, self.message_len = vocab_size, n_words, message_len
        normal = NormalWeights(init_std)
        normal.request(self, "embed", (vocab_size, d_model))
        normal.request(self, "picture_pos", (board_len, d_pos))
        normal.request(self, "speech_embed", (message_len, d_model))
        normal.request(self, "speech_pos", (message_len, d_pos))
        self.picture_blocks = nnx.List([DecoderBlock(d_model, d_pos, n_heads, normal=normal) for _ in range(n_layers)])
        self.speech_blocks = nnx.List([DecoderBlock(d_model, d_pos, n_heads, normal=normal) for _ in range(n_layers)])
        self.picture_ln, self.speech_ln = LayerNorm(d_model), LayerNorm(d_model)
        self.head = Linear(d_model, vocab_size, normal=normal, bias=False)
        normal.fill(rngs.params())
        # the official init: the codebook is an Embedding (N(0, init_std^2) like every embedding), ema_w N(0, 1);
        # ema_init="codebook" starts ema_w at the codebook instead (Sonnet's VQ-VAE EMA)
        k_code, k_ema = jax.random.split(rngs.params())
        codebook = init_std * jax.random.normal(k_code, (n_words, d_model))
        self.codebook = VQBuffer(codebook)
        self.ema_w = VQBuffer(jax.random.normal(k_ema, (n_words, d_model)) if ema_init == "normal" else codebook)
        self.cluster_size = VQBuffer(jnp.zeros((n_words,)))

    @property
    def blank(self) -> int:
        return self.n_words - 1

    def __call__(self, tokens: jax.Array, sites=null_sites) -> jax.Array:
        return self.picture(tokens, self.words(jnp.full(self.message_len, self.blank)), sites)[0]

    def words(self, ids: jax.Array) -> jax.Array:
        """[L, D] the codebook vectors of word ids [L]."""
        return lookup(self.codebook[...], ids)

    def picture(self, tokens: jax.Array, message: jax.Array, sites=null_sites) -> tuple[jax.Array, jax.Array]:
        """(logits [64, V], the LN_f output [64, D]) of board tokens [64] reading message vectors [L, D]."""
        check_prompt(tokens, None, "board token ids")
        check_prompt_length(tokens.shape[0], self.picture_pos.shape[0], "board_len")
        if message.shape != self.speech_embed.shape:
            raise ValueError(f"message: the picture stream reads [message_len, d_model] = {self.speech_embed.shape} "
                             f"vectors, got shape {message.shape}")
        pos, message_pos = self.picture_pos[...][: tokens.shape[0]], self.speech_pos[...]
        x = sites("picture.embed", lookup(self.embed[...], tokens))
        for l, block in enumerate(self.picture_blocks):
            x = block(x, pos, message, message_pos, sites, f"picture.layer{l}")
        z = sites("picture.unembed.in", self.picture_ln(x))
        return self.head(z), z

    def speech(self, picture_z: jax.Array, sites=null_sites) -> jax.Array:
        """[L, D] the speech stream's output (before quantisation), reading the picture stream's LN_f output."""
        pos, picture_pos = self.speech_pos[...], self.picture_pos[...][: picture_z.shape[0]]
        x = sites("speech.embed", self.speech_embed[...])
        for l, block in enumerate(self.speech_blocks):
            x = block(x, pos, picture_z, picture_pos, sites, f"speech.layer{l}")
        return sites("speech.out", self.speech_ln(x))

    def speech_of(self, tokens: jax.Array, sites=null_sites) -> jax.Array:
        """[L, D] the speech stream's continuous output about board tokens [64] (read with the blank message)."""
        z = self.picture(tokens, self.words(jnp.full(self.message_len, self.blank)), sites)[1]
        return self.speech(z, sites)

    def message(self, tokens: jax.Array, sites=null_sites) -> jax.Array:
        """int32 [L] the words the model says about board tokens [64]."""
        return nearest_codes(self.codebook[...], self.speech_of(tokens, sites))

    def from_vectors(self, message: jax.Array, sites=null_sites) -> jax.Array:
        """logits [64, V] of the all-UNK board reading message vectors [L, D] (reconstruction from speech)."""
        unk = jnp.full(self.picture_pos.shape[0], self.vocab_size - 1)
        return self.picture(unk, message, sites)[0]

    def from_message(self, ids: jax.Array, sites=null_sites) -> jax.Array:
        """logits [64, V] of the all-UNK board reading the words ids [L]."""
        return self.from_vectors(self.words(ids), sites)

    def site_axes(self, name: str, ndim: int) -> tuple[str, ...]:
        if ".cross_attn." in name and name.rsplit(".", 1)[-1] in ("k", "v"):
            return ("key", "head", "d_head")  # over the other stream's positions, not this stream's
        return attention_site_axes(name) or super().site_axes(name, ndim)


def check_message(words, n_words: int, message_len: int, argument: str = "words") -> np.ndarray:
    """words as int32 [B, message_len]; ValueError naming the argument and the allowed shape or range otherwise."""
    w = np.asarray(words)
    if w.ndim != 2 or w.shape[1] != message_len:
        raise ValueError(f"{argument} must have shape [batch, {message_len}] (message_len={message_len}), got "
                         f"{w.shape}")
    if not np.issubdtype(w.dtype, np.integer):
        raise ValueError(f"{argument} must be integer word ids in [0, {n_words - 1}], got dtype {w.dtype}")
    if w.size and (w.min() < 0 or w.max() >= n_words):
        raise ValueError(f"{argument}: word ids must be in [0, {n_words - 1}] (n_words={n_words}), got values in "
                         f"[{w.min()}, {w.max()}]")
    return w.astype(np.int32)


def reconstruct_from_board(graphdef: nnx.GraphDef, state, boards: jax.Array) -> jax.Array:
    """int32 [B, 64] the argmax reconstruction of boards [B, 64] (the blank message; pass 1 of training)."""
    return _run(graphdef, state, jnp.asarray(boards), "board")


def message_of(graphdef: nnx.GraphDef, state, boards: jax.Array) -> jax.Array:
    """int32 [B, L] the message of each board [B, 64]."""
    return _run(graphdef, state, jnp.asarray(boards), "message")


def reconstruct_from_speech(graphdef: nnx.GraphDef, state, boards: jax.Array, quantise: bool = True) -> jax.Array:
    """int32 [B, 64] the argmax board the picture stream draws from the speech about boards [B, 64] alone: its words,
    or (quantise=False) the speech stream's continuous output, as a run trained without quantisation reads it."""
    return _run(graphdef, state, jnp.asarray(boards), "speech" if quantise else "continuous")


def reconstruct_from_message(graphdef: nnx.GraphDef, state, words) -> jax.Array:
    """int32 [B, 64] the argmax board the picture stream draws from word ids [B, L] alone (the steering interface)."""
    model = nnx.merge(graphdef, state)
    return _run(graphdef, state, jnp.asarray(check_message(words, model.n_words, model.message_len)), "words")


@partial(jax.jit, static_argnums=(0, 3))
def _run(graphdef, state, x, entry):
    """entry: "message" (boards -> words), or the logits' argmax of "board" (boards), "words" (word ids), "speech"
    (boards -> their words -> board) or "continuous" (boards -> their continuous speech -> board)."""
    model = nnx.merge(graphdef, state)
    if entry == "message":
        return jax.vmap(model.message)(x)
    fn = {"board": model, "words": model.from_message, "speech": lambda t: model.from_message(model.message(t)),
          "continuous": lambda t: model.from_vectors(model.speech_of(t))}[entry]
    return jnp.argmax(jax.vmap(fn)(x), -1).astype(jnp.int32)
