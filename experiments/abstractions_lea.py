"""Ferry et al. 2023, the language-enhanced architecture (LEA): boards described in 16 words and redrawn from them.

A network that must describe each board in 16 discrete words, from which its own picture stream redraws the board.

Training (jaxicl.train.losses.lea_loss through the engine; the EMA codebook is the run's buffers): the notes'
three passes per step (masked board -> board; the picture stream's abstract representation -> speech stream ->
16 quantised words; the all-UNK board plus the words -> board), the reconstruction-from-speech weight ramping
0 -> 1 over epochs 250-1000, single and double boards only ([0.95, 0.05, 0] ramping to [0.6, 0.4, 0] over
epochs 1000-2000), token masking ramping 0.01 -> 0.25 over the whole run, no patches; evaluation masks with
p = 0.2 (shared/papers/abstractions_ferry2023.md, Section 5).

Analyses (Section 6.6, reconstructed):
- reconstruction from speech (the board's own message, the picture stream given nothing else) beside
  reconstruction from the board, on the test split; control: each board reconstructed from another board's message.
  The check scores object cells: a language of the background alone redraws most tokens (0.77) and no object cell;
- the messages of every clean single-root board (every root, position and background): word usage per slot
  against root, position and background, and each slot's mutual information with each attribute against the
  same statistic with shuffled labels;
- steering by words: for a board (A, x, y, bck), the root slots (the slots whose mutual information with the root is
  at least half the largest) get the words root B uses most there at (x, y) (the usage table against root and
  position: the words name root and position jointly, see below; the table against the root alone is reported beside
  it); the board is redrawn from the edited message. Success: the drawn board shows B at (x, y) on bck
  (experiments.common.abstractions.shown_root: every cell off the footprint is bck, and B's pattern agrees with the
  drawn footprint on more cells than any other root's, and on at least 5 of the 9; ours, since an exact copy is
  bounded by how exactly words redraw any board). Reported beside it: exact copies, and the target board's own
  message (the ceiling of any edit). Three checks: root B's words over all positions draw B at (x, y)
  (steer_root_words_shows_b: the paper's steering, a word for the root that leaves the place alone); B's words at
  (x, y) draw B there (steer_place_words_shows_b: where the slots name root and place together these words are close
  to the target board's own, so this shows the words are read, not that the root can be steered apart from the
  place); and B's words at (x, y) draw B more often than another root C's words at (x, y) do
  (steer_place_words_b_over_c: the success is about B's words, not the edited slots). Reported beside them: as many
  slots edited with random words (uniform over the words each slot uses).

What the quick preset showed in its best run (seed 0 on a 2-core Intel Xeon, in an earlier session, before the
attention softmax's derivative was written out; 5.5-5.9 minutes; the latest runs are below and mostly show less), with
a curriculum of ours (continuous_until=3000:
for its first 3000 steps pass 3 reads the speech stream's continuous output, then every word but the blank is refit
to a batch of speech vectors by k-means and 3000 steps read words; the masking ramp ends at step 2999): the paper's
claims at small scale, with a language that names the object and its place together. The words carry the root:
the best slot's mutual information with the root is 1.73 bits (shuffled labels 0.14), and 85 words are in use.
The 16 slots split into two kinds: five name the background (3.32 bits each, all of it, and nothing else), eleven
name the object where it stands (1.55-1.73 bits of root and 4.1-4.3 of the position's 5.17 each, no background).
Reconstruction from speech draws objects (test token accuracy 0.864, object cells 0.48, 6.4% of masked test boards
exact; another board's message 0.05 of the tokens), where the continuous channel had reached object cells 0.60 at the switch;
20% of clean single boards are redrawn exactly from their words. Steering works with the words root B has at the
board's position: the eleven object slots given them, 600 boards are drawn as B at (x, y) on bck for 0.52 of them
(still A 0.02, exact copies 0.21), which is the ceiling: the target board's own message gives 0.52 (exact 0.21).
Root B's words taken over all positions (the table against the root alone) steer nothing (0.00; the root-words
check fails): they replace the position too, since no slot has a word for "root B" apart from its place. Random words in eleven random slots draw
no board (0.00). How well the words redraw a board bounds every edit, and it grows with the word phase: 2000 steps
of words (5000 in all, the previous quick) steer 0.34 (ceiling 0.45, 9% of clean boards exact); 1500 words after a
4000-step continuous phase (continuous object cells 0.90 at the switch) 0.33; 3500 words (6500 in all, 6.1 min)
0.525; 5000 words (8000 in all, 6.9 min) 0.47 (exact 0.23). A cosine-decayed lr over the 5000-step version
(`train.schedule=warmup_cosine train.warmup_steps=100`) gives more root (2.03 bits) and a worse reconstruction
(object cells 0.31, no board exact). Without the curriculum the continuous phase is what is missing
(see below: at quick the words never leave the background). Measured on the way to this design: refitting on 32,768
speech vectors (2048 boards) instead of one batch gave the same picture (root 2.16 bits, steering 0.00); letting the
EMA (with dead-code restarts) follow the speech during the continuous phase instead of a refit kept the blank word
moving, delayed the objects in the continuous channel, and the words then carried the position (2.1-2.9 bits) but no
root (0.02-0.10 bits, shuffled 0.14-0.15). Steering in these trials, and in the paragraphs below, was
measured before the reading above, with root B's words over all positions and exact copies; a run whose words draw
no object shows no root under either.

That result is one run's, and the run depends on the machine: the same code, seed and preset on a 2-core AMD EPYC
(Zen 4; 6.7-7.4 min) gives a language without the root (best slot 0.08 bits, shuffled 0.12; the words carry the
position, 3.68 bits, and the background, while a linear probe still reads the root from the continuous speech at
0.79, with the float32 normal-equation probe that understated such features): the root and steering checks fail
there (steering 0.03). The chaotic training amplifies the CPUs' different
float rounding (other kernels, other summation orders). Two more seeds there: seed 1 names the root in two slots
(1.80 bits) and steers 0.298 (ceiling 0.567), seed 2 spreads it over twelve slots (1.52 bits; reconstruction from
words 0.931, ceiling 0.807) and steers 0.07, because each root slot gets the word root B uses most at (x, y) over
every background, and there those words also depend on the background. On a 2-core AMD EPYC without AVX-512 (Zen 3),
seed 0, after the attention softmax's derivative was written out (jaxicl.models.softmax: the same function, other
float rounding in training), four slots name the root (best 1.77 bits, shuffled 0.11) and steering reaches 0.17
(random words 0.007). The same Zen 3 run read with today's checks (1607 s on 2 heavily shared cores): object cells
from the words 0.289 against 0.028 from another board's message (gain 0.260, passes 0.2; tokens 0.820), B's words at
(x, y) draw B 0.173 (ceiling 0.182) where C's words there draw B 0.027 and C 0.210 (gain 0.147, fails 0.25), B's
words over all positions draw B 0.015 (fails 0.3). The latest run, seed 0 with today's code on a 2-core Intel Xeon
of another generation (Emerald Rapids; 4.8-6.5 min), has no root in its words either (best slot 0.08 bits, shuffled
0.08; position 3.57 bits, background 3.32; 93 words in use): only the speech check passes (object cells from the
words 0.234 against 0.031 from another board's message; tokens 0.812, no board exact), and B's words at (x, y) draw
B for 0.030 of boards (ceiling 0.078, C's words 0.020). A later run there, after float-level changes to the step
(its losses equal that run's for 250 steps, then drift apart), has a root slot again (1.36 bits, shuffled 0.11; 63
words in use), but steers little: B's words at (x, y) draw B for 0.093 of boards (ceiling 0.115, C's words 0.040;
object cells from the words 0.237 against 0.027). So at quick the root check passed in 5 of 7 runs and the steering
check (B's words at (x, y)) in 1 of 7 (the 0.30 threshold missed by 0.002 once): steering by B's words, as read
here, is not a robust property of the quick preset, and whether the words name the root at all depends on the
machine and on float-level rounding.

The notes' recipe at quick length (`continuous_until=0 train.steps=1250 task.mask_ramp_end=1249 eval_every=250`;
81 s on a 2-core Intel Xeon, about 4 minutes on a 2-core AMD EPYC) shows only the background. The messages become a
language about the background: reconstruction from speech redraws the background (test token accuracy 0.77, every
object cell wrong, so the speech check, which scores object cells, fails) where another board's message gives
0.05; the best slot carries 2.2 of the background's 3.32 bits
(3.1-3.3 after 2000-5000 steps), while no slot carries the root or the position (MI <= 0.02 bits here, <= 0.12 after
5000 steps: the shuffled-label level), so steering by words cannot succeed (0.00): the checks on root words and
steering fail. What was measured on the way (batch 32, lr 3e-3, 1 step an epoch unless said): the EMA codebook
collapses to 1-3 live words before the speech loss is switched on, and the language stays at 7-13 words; 5000 steps
(10.6 min) end the same (root MI 0.04 bits, objects never drawn from speech); ema_init="codebook" keeps 24 words at
step 250 and then collapses to 10; a Laplace epsilon of 1 revives 82 words, then collapses to 8 with a growing
commitment loss; the official lr 1e-3 at batch 64 is slower on the same path; two backgrounds instead of ten make
the language a single background bit (2 words). The picture stream itself has not reached the completion jump either
(masked object cells at chance; board accuracy 0.03-0.33 at 1250-5000 steps).

Where the notes' recipe stops (measured in earlier sessions, at its quick length unless said): the number of live
words is not the bottleneck. With vq_restart_below=1 (dead codes restarted on the batch's worst-quantised speech
vectors; ours) all 128 words stay in use until the speech loss starts, the background language appears by step 400
instead of 900, and it is still a background language (root MI 0.12 bits, 10-13 words). With no quantisation at all
in pass 3 until epoch 600 (the continuous speech vectors redraw the board, then a ramp to the quantised words,
without a refit; a scratch test before continuous_until), reconstruction from speech still stops at the background
(train token accuracy 0.855, the background's share of the cells). Probes on held-out clean single boards (ridge,
reported in the root check's note) say where the root is lost. For the notes' recipe at 1250 steps (above; rerun
after the probes' solve was fixed: the float32 normal equations had understated these 2048-wide features, 0.13-0.55
where the fit gives 0.88-1.00), the picture stream's abstract representation gives root 1.00, position 1.00,
background 1.00 (chance 0.10 / 0.03 / 0.10; the colours of the cells alone identify a root, so this is no evidence
of abstraction); the speech stream's continuous output, before quantisation, 0.88 / 0.04 / 1.00; the 7 words in use
carry none of the root (MI 0.00 bits). So the speech stream reads the root and the background but not the position,
and quantisation keeps only the background; with the dead-code
restart a logistic probe of the continuous output read the root at chance (0.11). The picture stream, given only
words, never starts drawing an object, so nothing rewards words that name one.

The discreteness is (continuous_until past the run's end, an ablation: pass 3 and the speech reconstruction read the
speech stream's continuous output; no VQ loss, no codebook updates). At 1250 steps the continuous channel also
redraws only the background (test token accuracy 0.768, object cells 0.00), but run longer (`abstractions_lea
--preset quick train.steps=3000`: the quick preset's first 3000 steps, 2.5 min) it starts drawing objects at step
2250 and reaches test object-cell accuracy 0.60 (tokens 0.897) at step 3000, while every run of the notes' recipe
(5000 steps at quick, 32,000 and 48,000 at the official settings) drew no object from its words. In a scratch test
on the 3600 clean single boards with the speech weight at 1 from the first step (batch 64, lr 1e-3), the continuous
channel redraws every board exactly by step 1750; the official EMA quantiser in the same test (and with decay 0.9,
with no commitment loss, or with dead-code restarts) ends its 2000-3000 steps on 8-10 words that redraw at most the
background (token accuracy 0.60-0.86, object cells 0.00). So the architecture and the picture stream can carry a
board through 16 speech vectors; the straight-through quantised channel, as the official code trains it, does not
get past the background here, unless its words are fitted to a speech that already carries the board (the quick
preset's curriculum, above).

A relaxed quantiser was tried in a scratch test and not taken (ours; not an option here): pass 3 reads the
straight-through Gumbel-softmax word (the one-hot of the noisy argmax forward, the softmax's gradient backward, over
the cosine similarities of s to the codebook at temperature 0.1; the EMA codebook updates and the VQ loss kept). Its
noise keeps 100-126 words in use and lifts the root to 0.20-0.26 bits in the best slot (shuffled 0.04), but after
3000 and 6000 steps (`train.steps=6000 task.mask_ramp_end=5999`, 4.5 min) it still redraws only the background (test
token accuracy 0.768, object cells 0.00, steering 0.00; the test reads Euclidean nearest words, and the training
batches' own noisy words give the same, token accuracy 0.79-0.85). Without the noise it keeps 8-9 words and no root
(0.00 bits); over negative squared distances at temperature 1 (a nearly hard softmax) the codebook collapses to one
word before the speech loss starts and speech draws nothing (token accuracy 0.06).

The official recipe at the full preset (32,000 steps of 64 boards, lr 1e-3, the notes' schedules; 88 minutes on
2 CPU cores, shared with other work) goes further, and not all the way: the picture stream reaches test board
accuracy 0.83 (object cells 0.99), and the words carry the background (3.31 of 3.32 bits in the best slot) and
now the position too (2.53 of 5.17 bits), but not the root (0.03 bits, shuffled 0.02); reconstruction from
speech draws the background and, from step 30,000, the first object cells (0.7% -> 3.2% of them), so steering by
root words still fails (0.00). The official code's schedules run to epoch 3000 (48,000 steps), past our full
preset's 2000 epochs. Run there too (train.steps=48000 task.mask_ramp_end=2999, interrupted at step 34,700 and
resumed from the step-32,000 checkpoint; 2 CPU cores): the picture stream reaches test board accuracy 0.91 (0.94
at step 44,000), while reconstruction from speech draws no object cell at any evaluation up to the end (token
accuracy 0.768, the background's share, from step 28,000 on); the final language is 10 words about the
background (3.32 bits) with no position (0.00 bits) and no root (0.00, shuffled 0.02), and steering fails
(0.00). So the longer run did not bring roots into the language: by the official schedule's end the
language is still background-only.

Settings ours: the total length (the notes do not record it; full = 2000 epochs, past the end of the type ramp),
the VQ's Laplace epsilon (1e-5 instead of the official 1e-20: in float32 a never-used code would sit at
~1e20, whose squared norm overflows; the official code runs in float64), and quick's compression
(task.steps_per_epoch, lr, batch 32 instead of the official 64) in PRESETS. The official initialisation is kept: the
codebook starts at N(0, 0.02^2) like every embedding, ema_w at N(0, 1).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.common import abstractions as ab
from experiments.common.figures import heatmap, new_figure, save_figure
from experiments.common.result import Outcome, check_above
from experiments.common.run_config import run_config
from jaxicl.analysis import language as lang
from jaxicl.analysis.probes import probe
from jaxicl.models import lea
from jaxicl.prng import seed_key
from jaxicl.sites import run_with_sites
from jaxicl.tasks import boards as bd
from jaxicl.train import TrainConfig, train
from jaxicl.train.losses import lea_loss
from jaxicl.validation import ConfigError, check_choice, check_positive, check_range

ATTRIBUTES = ("root", "position", "background")


@dataclasses.dataclass(frozen=True)
class LeaModel:
    """The official LEA sizes (Section 5)."""

    d_model: int = 32
    d_pos: int = 16
    n_layers: int = 3
    n_heads: int = 2
    n_words: int = 128
    message_len: int = 16
    ema_init: str = "normal"  # the official N(0, 1) start of the EMA numerator, or "codebook" (see jaxicl.models.lea)

    def __post_init__(self):  # the other fields are checked where the model is built; a bad choice fails before
        check_choice("ema_init", self.ema_init, lea.EMA_INITS)


LEA_TASK = bd.Boards(types_start=(0.95, 0.05, 0.0), types_end=(0.6, 0.4, 0.0), types_ramp=(1000, 2000),
                     mask_ramp_end=2000, patch_p=0.0)


@dataclasses.dataclass(frozen=True)
class Config:
    task: bd.Boards = LEA_TASK  # mask_ramp_end: the run's last epoch (the masking ramp spans the whole run)
    model: LeaModel = LeaModel()
    train: TrainConfig = TrainConfig(steps=32_000, batch_size=64, optimizer="adamw", lr=1e-3, betas=(0.9, 0.95),
                                     weight_decay=0.01, steps_per_call=250, log_every=50, checkpoint_every=4000)
    rfs_ramp: tuple[int, int] = (250, 1000)  # epochs over which the reconstruction-from-speech weight ramps 0 -> 1
    vq_decay: float = 0.99
    vq_epsilon: float = 1e-5
    vq_restart_below: float = 0.0  # restart codes whose EMA cluster size falls below this (0: never, the notes')
    continuous_until: int = 0  # ours: pass 3 reads the continuous speech before this epoch (lea_loss), words after
    eval_every: int = 2000
    # single, double, composite test tuples, each masked eval_rounds times: the official LEA test call scores every test
    # tuple twice (40, 400, 20; composites too, which LEA never trains on)
    eval_per_type: tuple[int, int, int] = (40, 400, 20)
    eval_rounds: int = 2
    eval_mask: float = 0.2
    steer_boards: int = 600
    min_speech_gain: float = 0.2  # speech object-cell accuracy minus the other-board-message control's
    min_mi_gain: float = 0.5  # bits: the best slot's MI with the root minus its MI with shuffled roots
    min_steer_success: float = 0.3  # boards drawn as B at (x, y) on bck after an edit
    min_steer_gain: float = 0.25  # B's words at (x, y) minus another root C's words there (drawn as B)

    @property
    def ends_quantised(self) -> bool:
        """Whether the run's last steps read words (False: the continuous-speech ablation)."""
        return (self.train.steps - 1) // self.task.steps_per_epoch >= self.continuous_until

    def __post_init__(self):
        for name in ("eval_every", "steer_boards"):
            check_positive(name, getattr(self, name))
        check_range("eval_mask", self.eval_mask, 0.0, 1.0)
        check_range("vq_decay", self.vq_decay, 0.0, 1.0)
        check_positive("vq_epsilon", self.vq_epsilon)
        check_range("vq_restart_below", self.vq_restart_below, 0.0)
        check_range("continuous_until", self.continuous_until, 0)
        # the blank (the last word) and at least one more; lea.LEA refuses it too, naming n_words, at build_model
        check_range("model.n_words", self.model.n_words, 2)
        vectors, words = self.train.batch_size * self.model.message_len, self.model.n_words - 1
        if self.continuous_until and vectors < words:  # the refit's k-means is compiled into every step
            raise ConfigError(f"continuous_until={self.continuous_until} refits the model.n_words - 1 = {words} words "
                              f"by k-means on a batch's speech vectors, train.batch_size * model.message_len = "
                              f"{self.train.batch_size} * {self.model.message_len} = {vectors}: it needs at least "
                              f"{words}; raise train.batch_size or model.message_len, lower model.n_words, or set "
                              "continuous_until=0 (no refit)")
        if self.eval_every % self.train.steps_per_call:
            raise ConfigError(f"eval_every={self.eval_every} must be a multiple of train.steps_per_call="
                              f"{self.train.steps_per_call}")
        check_range("task.n_roots", self.task.n_roots, 3)  # steering's control draws a root C that is neither A nor B
        ab.check_eval_set(self.eval_per_type, self.eval_rounds)


def _preset(steps: int, steps_per_epoch: int, mask_ramp_end: int | None = None, **kw) -> Config:
    """A config of `steps` steps whose masking ramp ends at mask_ramp_end (default: the run's last epoch)."""
    last_epoch = (steps - 1) // steps_per_epoch
    task = dataclasses.replace(LEA_TASK, steps_per_epoch=steps_per_epoch,
                               mask_ramp_end=max(last_epoch, 1) if mask_ramp_end is None else mask_ramp_end)
    return Config(task=task, **kw)


SMOKE = _preset(20, 1, model=LeaModel(d_model=16, d_pos=8, n_layers=1, n_heads=2, n_words=16, message_len=4),
                train=TrainConfig(steps=20, batch_size=16, optimizer="adamw", lr=1e-3, betas=(0.9, 0.95),
                                  weight_decay=0.01, steps_per_call=10, log_every=5),
                rfs_ramp=(2, 10), continuous_until=10, eval_every=10, eval_per_type=(8, 8, 0), eval_rounds=1,
                steer_boards=20)
# quick: continuous speech for 3000 steps (the masking ramp ends there), then 3000 steps of words (see the docstring)
QUICK = _preset(6000, 1, mask_ramp_end=2999, continuous_until=3000,
                train=TrainConfig(steps=6000, batch_size=32, optimizer="adamw", lr=3e-3, betas=(0.9, 0.95),
                                  weight_decay=0.01, steps_per_call=250, log_every=50, checkpoint_every=1000),
                eval_every=1000, eval_per_type=(40, 100, 0), eval_rounds=1)  # ours: a smaller test set, no composites
PRESETS = {"smoke": SMOKE, "quick": QUICK, "full": Config()}


def build_model(cfg: Config) -> lea.LEA:
    m = cfg.model
    return lea.LEA(d_model=m.d_model, d_pos=m.d_pos, n_layers=m.n_layers, n_heads=m.n_heads, n_words=m.n_words,
                   message_len=m.message_len, ema_init=m.ema_init, rngs=nnx.Rngs(seed_key(cfg.train.seed)))


def eval_set(cfg: Config, data: bd.BoardData, split: str, key) -> object:
    """The split's eval_per_type single, double and composite tuples, each masked eval_rounds times at eval_mask
    without patches."""
    fixed = dataclasses.replace(data, cfg=dataclasses.replace(data.cfg, mask_max=cfg.eval_mask,
                                                              mask_min=cfg.eval_mask, patch_p=0.0))
    return bd.eval_prompts(fixed, split, key, 0, cfg.eval_per_type, cfg.eval_rounds)


def object_accuracy(pred: jax.Array, batch) -> jax.Array:
    """The fraction of the batch's object cells (info["root"] >= 0) that pred [N, 64] draws right."""
    objects = batch.info["root"] >= 0
    return jnp.sum((pred == batch.targets) & objects) / jnp.sum(objects)


def reconstruction_metrics(graphdef, state, batch, quantise: bool = True) -> dict:
    """board_metrics plus the accuracy on object cells, of the reconstruction from the board ("board_") and from the
    board's speech ("speech_": its words, or its continuous speech where quantise is False)."""
    drawn = {"board": lea.reconstruct_from_board(graphdef, state, batch.inputs),
             "speech": lea.reconstruct_from_speech(graphdef, state, batch.inputs, quantise)}
    return {f"{source}_{k}": v for source, pred in drawn.items()
            for k, v in {**bd.board_metrics(pred, batch), "object_accuracy": object_accuracy(pred, batch)}.items()}


def trained(cfg: Config, out_dir: str):
    """(data, graphdef, the merged params and buffers, the run), trained into out_dir/run (or loaded)."""
    data = bd.build(cfg.task)
    graphdef, params, buffers = nnx.split(build_model(cfg), nnx.Param, lea.VQBuffer)
    test = eval_set(cfg, data, "test", seed_key(cfg.train.seed, offset=11))

    def evaluate(params, buffers):
        state = nnx.merge_state(params, buffers)
        m = reconstruction_metrics(graphdef, state, test)
        continuous = lea.reconstruct_from_speech(graphdef, state, test.inputs, quantise=False)
        return {**{f"{source}_{k}": m[f"{source}_{k}"] for source in ("board", "speech")
                   for k in ("token_accuracy", "board_accuracy", "object_accuracy")},
                "continuous_token_accuracy": jnp.mean(continuous == test.targets),
                "continuous_object_accuracy": object_accuracy(continuous, test)}

    loss = lea_loss(graphdef, rfs_ramp=cfg.rfs_ramp, decay=cfg.vq_decay, epsilon=cfg.vq_epsilon,
                    restart_below=cfg.vq_restart_below, continuous_until=cfg.continuous_until)
    result = train(loss, data.sampler("train"), cfg.task, cfg.train, params, buffers=buffers,
                   out_dir=os.path.join(out_dir, "run"), evaluate=evaluate, eval_every=cfg.eval_every,
                   run_config=run_config("abstractions_lea", cfg),
                   desc="abstractions_lea")
    return data, graphdef, nnx.merge_state(result.state.params, result.state.buffers), result


def single_boards(data: bd.BoardData) -> dict:
    """Every clean single-root board (every root, top-left position and background): "tokens" [N, 64], "root",
    "position" (x * 6 + y), "background", "x", "y" [N]."""
    cfg = data.cfg
    k, p, b = (a.ravel() for a in np.meshgrid(np.arange(cfg.n_roots), np.arange(bd.POSITIONS),
                                              np.arange(cfg.n_backgrounds), indexing="ij"))
    tuples = np.stack([k, *bd.place_of(p), b], 1)
    boards = ab.masked_set(data, data.rows("single", tuples), 0.0, seed_key(0))["tokens"]  # no mask
    return {"tokens": boards, "root": k, "position": p, "background": b, "x": tuples[:, 1], "y": tuples[:, 2]}


def representation_probes(graphdef, state, singles: dict) -> dict[str, dict[str, float]]:
    """Held-out accuracy of ridge probes for root, position and background (single_boards' labels) from the picture
    stream's abstract representation (picture.unembed.in, every cell: [N, 64 * D]) and from the speech stream's
    continuous output before quantisation (speech.out: [N, L * D]); a quarter of the boards held out."""
    model = nnx.merge(graphdef, state)
    sites = ("picture.unembed.in", "speech.out")
    cache = jax.jit(jax.vmap(lambda t: run_with_sites(model.message, t, capture=sites)[1]))(
        jnp.asarray(singles["tokens"]))
    return {site: {a: probe(cache[site].reshape(len(singles["root"]), -1), jnp.asarray(singles[a]))["score"]
                   for a in ATTRIBUTES} for site in sites}


def run(cfg: Config, out_dir: str) -> Outcome:
    data, graphdef, state, result = trained(cfg, out_dir)
    m = cfg.model
    rng = np.random.default_rng(cfg.train.seed)
    # reconstruction from the board vs from its speech, and from another board's speech
    test = eval_set(cfg, data, "test", seed_key(cfg.train.seed, offset=11))
    rec = {k: float(v) for k, v in reconstruction_metrics(graphdef, state, test, cfg.ends_quantised).items()}
    other = lea.reconstruct_from_speech(graphdef, state, test.inputs[rng.permutation(len(test.inputs))],
                                        cfg.ends_quantised)
    control = {**{k: float(v) for k, v in bd.board_metrics(other, test).items()},
               "object_accuracy": float(object_accuracy(other, test))}
    # the language of single boards
    singles = single_boards(data)
    messages = np.asarray(lea.message_of(graphdef, state, jnp.asarray(singles["tokens"])))
    mi = {a: lang.mutual_information(messages, singles[a]) for a in ATTRIBUTES}
    mi_shuffled = {a: lang.shuffled_mutual_information(messages, singles[a], rng) for a in ATTRIBUTES}
    probes = representation_probes(graphdef, state, singles)
    steer = _steer(cfg, data, graphdef, state, singles, messages, mi["root"], rng)

    gain = mi["root"] - mi_shuffled["root"]
    best = int(np.argmax(gain))
    ours = (f"settings ours: {cfg.train.steps} steps of {cfg.train.batch_size} boards at {cfg.task.steps_per_epoch} "
            f"steps an epoch, lr {cfg.train.lr}, VQ epsilon {cfg.vq_epsilon}"
            + (f", dead codes restarted below {cfg.vq_restart_below}" if cfg.vq_restart_below else "")
            + (f", continuous speech in pass 3 before epoch {cfg.continuous_until}" if cfg.continuous_until else "")
            + ("" if cfg.ends_quantised else " (past the run's end: the continuous-speech ablation)"))
    checks = [
        check_above("speech_object_accuracy_over_other_message", rec["speech_object_accuracy"]
                    - control["object_accuracy"], cfg.min_speech_gain,
                    f"object cells of test boards (p = {cfg.eval_mask} masks) redrawn from their own "
                    f"{m.message_len} words {rec['speech_object_accuracy']:.3f}, from another board's message "
                    f"{control['object_accuracy']:.3f} (a language of the background alone draws no object cell); "
                    f"token / board accuracy from the words {rec['speech_token_accuracy']:.3f} / "
                    f"{rec['speech_board_accuracy']:.3f}, from another board's message "
                    f"{control['token_accuracy']:.3f} / {control['board_accuracy']:.3f}, from the board itself "
                    f"{rec['board_token_accuracy']:.3f} / {rec['board_board_accuracy']:.3f}; {ours}"),
        check_above("root_mi_over_shuffled_bits", gain[best], cfg.min_mi_gain,
                    f"slot {best}: MI with the root {mi['root'][best]:.2f} bits (max log2 {data.cfg.n_roots} = "
                    f"{np.log2(data.cfg.n_roots):.2f}), shuffled labels {mi_shuffled['root'][best]:.3f}; per slot "
                    + ", ".join(f"{a} max {mi[a].max():.2f}" for a in ATTRIBUTES)
                    + f"; {len(messages)} clean single boards, {len(np.unique(messages))} distinct words; linear "
                    "probes (held-out boards) for root / position / background read "
                    + "; ".join(f"{site} " + " / ".join(f"{v:.2f}" for v in probes[site].values())
                                for site in probes)
                    + f" (chance {1 / data.cfg.n_roots:.2f} / {1 / bd.POSITIONS:.2f} / "
                       f"{1 / data.cfg.n_backgrounds:.2f})"),
        check_above("steer_root_words_shows_b", steer["root_only_shows_b"], cfg.min_steer_success,
                    f"{steer['boards']} boards (A, x, y, bck) whose root slots {steer['slots']} were given root B's "
                    f"words over all positions (usage table against the root alone): drawn as B at (x, y) on bck "
                    f"(ab.shown_root) {steer['root_only_shows_b']:.3f}, still A {steer['root_only_shows_a']:.3f}, "
                    f"exactly the target board {steer['exact']['root_only']:.3f}; unedited messages show A "
                    f"{steer['unedited_shows_a']:.3f}"),
        check_above("steer_place_words_shows_b", steer["steered_shows_b"], cfg.min_steer_success,
                    f"the root slots given the words root B has at (x, y) (usage table against root and position: "
                    f"where the slots name root and place together, close to the target board's own words): "
                    f"drawn as B at (x, y) on bck {steer['steered_shows_b']:.3f}, still A "
                    f"{steer['steered_shows_a']:.3f}, exactly the target board {steer['exact']['steered']:.3f}; the "
                    f"target board's own message (the ceiling) {steer['target_shows_b']:.3f} (exact "
                    f"{steer['exact']['target']:.3f})"),
        check_above("steer_place_words_b_over_c", steer["steered_shows_b"] - steer["other_root_shows_b"],
                    cfg.min_steer_gain,
                    f"the same slots given the words of another root C (not A, not B) at (x, y): drawn as B "
                    f"{steer['other_root_shows_b']:.3f}, as C {steer['other_root_shows_c']:.3f}; random words in "
                    f"{len(steer['slots'])} random slots: drawn as B {steer['control_shows_b']:.3f}"),
    ]
    figures = [_plot_training(result, out_dir), _plot_language(mi, mi_shuffled, singles, messages, data.cfg,
                                                               m.n_words, out_dir),
               _plot_steering(steer, out_dir)]
    return Outcome(checks, figures)


def _steer(cfg, data, graphdef, state, singles, messages, root_mi, rng) -> dict:
    """Root A -> B by editing the root slots' words: with root B's words at the board's position (the usage table
    against root and position) and with root B's words over all positions (the table against the root alone);
    controls: another root C's words at the board's position, and random words in as many random slots. What each
    drawn board shows: ab.shown_root."""
    n_roots, n_words = data.cfg.n_roots, cfg.model.n_words
    slots = np.flatnonzero(root_mi >= 0.5 * root_mi.max())
    pick = rng.choice(len(messages), min(cfg.steer_boards, len(messages)), replace=False)
    a, x, y, bck, pos = (singles[k][pick] for k in ("root", "x", "y", "background", "position"))
    b = (a + rng.integers(1, n_roots, len(pick))) % n_roots
    target_boards = ab.masked_set(data, data.rows("single", np.stack([b, x, y, bck], 1)), 0.0,
                                  seed_key(0))["tokens"]
    root_table = lang.usage_table(messages, singles["root"], n_roots, n_words)
    place_table = lang.usage_table(messages, singles["root"] * bd.POSITIONS + singles["position"],
                                  n_roots * bd.POSITIONS, n_words)
    control = lang.random_words(messages[pick], len(slots), root_table, rng)
    c = np.array([rng.choice(np.setdiff1d(np.arange(n_roots), [i, j])) for i, j in zip(a, b)])  # neither A nor B
    edits = {"steered": lang.swap_words(messages[pick], b * bd.POSITIONS + pos, slots, place_table),
             "root_only": lang.swap_words(messages[pick], b, slots, root_table),
             "other_root": lang.swap_words(messages[pick], c * bd.POSITIONS + pos, slots, place_table),
             "control": control, "unedited": messages[pick],
             "target": np.asarray(lea.message_of(graphdef, state, jnp.asarray(target_boards)))}
    drawn = {k: np.asarray(lea.reconstruct_from_message(graphdef, state, v)) for k, v in edits.items()}
    shown = {k: ab.shown_root(d, x, y, bck, data.roots) for k, d in drawn.items()}
    exact = {k: float(np.mean(np.all(d == target_boards, 1))) for k, d in drawn.items()}
    return {"boards": len(pick), "slots": slots.tolist(), "exact": exact,
            **{f"{k}_shows_b": float(np.mean(v == b)) for k, v in shown.items()},
            **{f"{k}_shows_a": float(np.mean(shown[k] == a)) for k in ("steered", "root_only")},
            "other_root_shows_c": float(np.mean(shown["other_root"] == c)),
            "unedited_shows_a": float(np.mean(shown["unedited"] == a)),
            "examples": {"original": singles["tokens"][pick[:4]], "target_board": target_boards[:4],
                         **{k: v[:4] for k, v in drawn.items() if k != "target"}}}


def _plot_training(result, out_dir) -> str:
    fig, axes = new_figure(2)
    rows = result.train_rows
    steps = np.array([r["step"] for r in rows])
    for key, label in (("ce_board", "from the board"), ("ce_speech", "from speech")):
        axes[0, 0].plot(steps, [r[key] for r in rows], label=label)
    axes[0, 0].plot(steps, [r["rfs_weight"] for r in rows], "k:", label="speech weight a(epoch)")
    axes[0, 0].set(yscale="log", xlabel="step", ylabel="cross-entropy", title="LEA training")
    axes[0, 0].legend(fontsize=7)
    ev = sorted(result.eval_rows, key=lambda r: r["step"])
    es = [r["step"] for r in ev]
    for key, label in (("board", "from the board"), ("speech", "from speech")):
        axes[0, 1].plot(es, [r[f"{key}_token_accuracy"] for r in ev], marker=".", label=f"{label}: tokens")
        axes[0, 1].plot(es, [r[f"{key}_board_accuracy"] for r in ev], "--", marker=".", label=f"{label}: boards")
    axes[0, 1].plot(es, [r["speech_object_accuracy"] for r in ev], ":", marker=".",
                    label="from speech: object cells")
    axes[0, 1].plot(es, [r["continuous_object_accuracy"] for r in ev], ":", marker="x",
                    label="from continuous speech: object cells")
    axes[0, 1].set(xlabel="step", ylabel="test accuracy", ylim=(0, 1.02), title="reconstruction")
    axes[0, 1].legend(fontsize=7)
    return save_figure(fig, out_dir, "training_curves")


def _plot_language(mi, mi_shuffled, singles, messages, task, n_words, out_dir) -> str:
    """MI per slot and attribute (shuffled-label control dotted); for each attribute, the usage of the slot that
    carries it best: P(word | attribute value) over the words that slot uses."""
    fig, axes = new_figure(1 + len(ATTRIBUTES), size=(4.6, 3.6))
    slots = np.arange(messages.shape[1])
    for i, a in enumerate(ATTRIBUTES):
        axes[0, 0].bar(slots + (i - 1) * 0.27, mi[a], width=0.27, label=a)
        axes[0, 0].plot(slots, mi_shuffled[a], ":", color=f"C{i}")
    axes[0, 0].set(xlabel="word slot", ylabel="mutual information (bits)", title="what each slot says")
    axes[0, 0].legend(fontsize=7)
    sizes = {"root": task.n_roots, "position": bd.POSITIONS, "background": task.n_backgrounds}
    for ax, a in zip(axes[0, 1:], ATTRIBUTES):
        best = int(np.argmax(mi[a]))
        table = lang.usage_table(messages, singles[a], sizes[a], n_words)[best]
        used = np.flatnonzero(table.sum(0))
        heatmap(ax, table[:, used] / np.maximum(table.sum(1, keepdims=True), 1), f"slot {best}: P(word | {a})",
                symmetric=False)
        ax.set_aspect("auto")
        ax.set(xlabel=f"word ({len(used)} used)", ylabel=a, xticks=range(len(used)), xticklabels=used)
        ax.tick_params(axis="x", labelsize=6)
    return save_figure(fig, out_dir, "language")


def _plot_steering(steer, out_dir) -> str:
    """Rows: boards; columns: the board, the target (B at its place), drawn from its message, from the messages
    edited with B's words at this position and over all positions, with C's words at this position, from random
    words."""
    ex = steer["examples"]
    cols = (("original", "board (A)"), ("target_board", "target (B)"), ("unedited", "from its words"),
            ("steered", "B's words here"), ("root_only", "B's words anywhere"), ("other_root", "C's words here"),
            ("control", "random words"))
    n = len(ex["original"])
    fig, axes = new_figure(len(cols), n, size=(1.9, 1.9))
    for r in range(n):
        for c, (key, title) in enumerate(cols):
            ab.draw_board(axes[r, c], ex[key][r])
            axes[r, c].set(xticks=[], yticks=[], title=title)
            axes[r, c].title.set_fontsize(7)
    return save_figure(fig, out_dir, "steering_examples")
