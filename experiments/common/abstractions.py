"""The trained model the three abstractions experiments share (Ferry, Ching & Kawai 2023).

abstractions_training trains it into RESULTS/abstractions_training/run; abstractions_geometry and
abstractions_manipulation load that run's final checkpoint (jaxicl.train resumes a finished run without a
step), training it there first if it is missing. Their Config.training must equal the training run's (the
checkpoint's stored config is checked, a mismatch names the differing fields).

Also here: the fixed probe sets the analyses share (single-root boards with a fixed token mask) and the
per-site activations of a batch.
"""

import dataclasses
import os
from functools import partial

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx
from matplotlib.colors import BoundaryNorm, ListedColormap

from experiments.common.run_config import run_config
from jaxicl.analysis.cache import run_with_cache, site_info
from jaxicl.models.factor_transformer import FactorTransformer
from jaxicl.prng import seed_key
from jaxicl.sites import Sites
from jaxicl.tasks import boards as bd
from jaxicl.train import TrainConfig, TrainResult, cross_entropy_loss, train
from jaxicl.validation import ConfigError, check_positive

TRAINING_DIR = "abstractions_training"
# one colour a token of the 21: tab20b's 20 for the backgrounds (0..9) and object colours (10..19), grey for UNK (20)
BOARD_COLOURS = ListedColormap([*matplotlib.colormaps["tab20b"].colors, "0.5"], name="boards")
BOARD_NORM = BoundaryNorm(np.arange(BOARD_COLOURS.N + 1) - 0.5, BOARD_COLOURS.N)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The official GPTFactor sizes (shared/papers/abstractions_ferry2023.md, Section 3)."""

    d_model: int = 64
    d_pos: int = 32
    n_layers: int = 3
    n_heads: int = 2


def check_eval_set(per_type: tuple, rounds: int) -> None:
    """Raises ConfigError unless per_type is 3 counts >= 0 (single, double, composite), not all 0, and rounds >= 1."""
    check_positive("eval_rounds", rounds)
    if len(per_type) != 3 or min(per_type) < 0 or sum(per_type) < 1:
        raise ConfigError(f"eval_per_type must be 3 counts >= 0 (single, double, composite), not all 0, got {per_type}")


@dataclasses.dataclass(frozen=True)
class Training:
    """The official recipe (AdamW lr 1e-3 constant, betas (0.9, 0.95), decay 0.01 on linear weights, batch 64,
    cross-entropy over all 64 cells) on boards whose schedules run task.steps_per_epoch steps an epoch.
    Evaluations every eval_every steps on the official test set (every test tuple, up to eval_per_type per type,
    masked eval_rounds times) and on as many training tuples, masked as at the run's last epoch (ours: the official
    loop masks each evaluation as at its own epoch and draws fresh training boards for it; one fixed set keeps the
    curve's points comparable, and early checkpoints, trained on lighter masking, score lower on it)."""

    task: bd.Boards = bd.Boards()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig(steps=16_000, batch_size=64, optimizer="adamw", lr=1e-3, betas=(0.9, 0.95),
                                     weight_decay=0.01, steps_per_call=250, log_every=50, checkpoint_every=2000)
    eval_every: int = 1000
    eval_per_type: tuple[int, int, int] = (40, 100, 20)
    eval_rounds: int = 2

    def __post_init__(self):
        check_positive("eval_every", self.eval_every)
        check_eval_set(self.eval_per_type, self.eval_rounds)
        if self.eval_every % self.train.steps_per_call:
            raise ConfigError(f"eval_every={self.eval_every} must be a multiple of train.steps_per_call="
                              f"{self.train.steps_per_call}")

    @property
    def last_epoch(self) -> int:
        return (self.train.steps - 1) // self.task.steps_per_epoch


def build_model(cfg: Training) -> FactorTransformer:
    m = cfg.model
    return FactorTransformer(d_model=m.d_model, d_pos=m.d_pos, n_layers=m.n_layers, n_heads=m.n_heads,
                             rngs=nnx.Rngs(seed_key(cfg.train.seed)))


def predictions(graphdef, params, tokens: jax.Array) -> jax.Array:
    """argmax tokens [B, 64] of the model on boards tokens [B, 64]."""
    return jnp.argmax(run_with_cache(graphdef, params, tokens, ())[0], -1)


def eval_sets(cfg: Training, data: bd.BoardData) -> dict:
    """{"train", "test"}: fixed evaluation Prompts, masked as at the run's last epoch."""
    return {split: bd.eval_prompts(data, split, seed_key(cfg.train.seed, offset=10 + i), cfg.last_epoch,
                                   cfg.eval_per_type, cfg.eval_rounds) for i, split in enumerate(("train", "test"))}


def evaluator(cfg: Training, data: bd.BoardData, graphdef):
    """evaluate(params) -> {f"{split}_{metric}"}: boards.board_metrics on both evaluation sets."""
    sets = eval_sets(cfg, data)

    def evaluate(params):
        return {f"{split}_{k}": v for split, batch in sets.items()
                for k, v in bd.board_metrics(predictions(graphdef, params, batch.inputs), batch).items()}

    return evaluate


def trained(cfg: Training, results_dir: str, progress: bool = True) -> tuple[bd.BoardData, nnx.GraphDef, object,
                                                                              TrainResult]:
    """(data, graphdef, final params, the run) of the training run in results_dir/abstractions_training/run:
    trained there (or continued from its latest checkpoint) when it has not finished, loaded when it has. The
    checkpoint stores eval_mask_epoch (cfg.last_epoch, the epoch eval_sets masks at): a rerun with a train.steps of
    another last epoch is refused, as its evaluation rows would come from other boards than the checkpoint's."""
    data = bd.build(cfg.task)
    graphdef, params = nnx.split(build_model(cfg), nnx.Param)
    result = train(cross_entropy_loss(graphdef), data.sampler("train"), cfg.task, cfg.train, params,
                   out_dir=os.path.join(results_dir, TRAINING_DIR, "run"), evaluate=evaluator(cfg, data, graphdef),
                   eval_every=cfg.eval_every, progress=progress, desc="abstractions_training",
                   run_config=run_config("abstractions", cfg, eval_mask_epoch=cfg.last_epoch))
    return data, graphdef, result.state.params, result


def residual_sites(graphdef, params) -> list[str]:
    """The model's [T, D] sites in the order the forward pass visits them (embed, per block z, attn.out,
    resid_mid, mlp_in, mlp.out, resid_post, then unembed.in)."""
    tokens = jnp.zeros(64, jnp.int32)
    info = site_info(graphdef, params, tokens)
    visited = Sites()
    jax.eval_shape(lambda p, t: nnx.merge(graphdef, p)(t, sites=visited), params, tokens)
    return [s for s in visited.seen if len(info[s][0]) == 2]


def single_probe_set(data: bd.BoardData, positions: int, mask_p: float, key: jax.Array) -> dict:
    """Single-root boards of every root and background at `positions` top-left positions (evenly spaced over the
    36, in raster order), each with its own fixed token mask of rate mask_p (no patch). Returns render's
    annotations [N, ...] plus "tokens" [N, 64] (masked), "board" [N, 64], "masked" [N, 64], "x", "y" [N]."""
    cfg = data.cfg
    picks = np.unique(np.linspace(0, bd.POSITIONS - 1, positions).round().astype(int))
    k, p, b = np.meshgrid(np.arange(cfg.n_roots), picks, np.arange(cfg.n_backgrounds), indexing="ij")
    tuples = np.stack([k.ravel(), *bd.place_of(p.ravel()), b.ravel()], 1)
    return masked_set(data, data.rows("single", tuples), mask_p, key) | {"x": tuples[:, 1], "y": tuples[:, 2]}


def composite_set(data: bd.BoardData, mask_p: float, key) -> dict:
    """Every composite tuple (both splits), masked: annotations plus "composite", "x", "y" [M]."""
    tuples = np.concatenate([data.tuples(split, "composition") for split in ("train", "test")])
    return masked_set(data, data.rows("composition", tuples), mask_p, key) | {
        "composite": tuples[:, 0], "x": tuples[:, 1], "y": tuples[:, 2]}


def masked_set(data: bd.BoardData, rows: jax.Array, mask_p: float, key: jax.Array) -> dict:
    """Boards of placement rows [N, 17] with independent token masks of rate mask_p (no patches): render's
    annotations plus "tokens" (masked) and "masked"."""
    fixed = dataclasses.replace(data.cfg, mask_max=mask_p, mask_min=mask_p, patch_p=0.0)
    out = _masked_boards(fixed, jnp.asarray(data.roots), rows, jax.random.split(key, rows.shape[0]))
    return {k: np.asarray(v) for k, v in out.items()}


@partial(jax.jit, static_argnums=0)
def _masked_boards(cfg: bd.Boards, roots, rows, keys):
    def one(row, k):
        out = bd.render(roots, row)
        tokens, masked = bd.mask_board(cfg, k, out, cfg.mask_ramp_end)
        return {**out, "tokens": tokens, "masked": masked}

    return jax.vmap(one)(rows, keys)


def activations(graphdef, params, tokens: np.ndarray, sites: list[str]) -> dict[str, np.ndarray]:
    """{site: [N, 64, D]} for boards tokens [N, 64]."""
    return {k: np.asarray(v) for k, v in run_with_cache(graphdef, params, jnp.asarray(tokens), sites)[1].items()}


def draw_board(ax, board: np.ndarray):
    """Draws board [64] tokens on ax as an 8x8 image, one colour a token (BOARD_COLOURS); returns the AxesImage."""
    return ax.imshow(np.asarray(board).reshape(8, 8), cmap=BOARD_COLOURS, norm=BOARD_NORM)


def footprint(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[N, 9] the board cells of a 3x3 object with top-left (x, y) [N], in its cell-index order."""
    i, j = np.divmod(np.arange(9), 3)
    return (x[:, None] + i) * 8 + y[:, None] + j


def shown_root(boards: np.ndarray, x: np.ndarray, y: np.ndarray, background: np.ndarray,
               roots: np.ndarray, min_agree: int = 5) -> np.ndarray:
    """[N] which root boards [N, 64] show at top-left (x, y) [N] on background [N]: the root of roots [R, 3, 3]
    (colours) whose tokens agree with the board's 3x3 footprint on the most cells, or -1 where two roots tie, the
    best agrees on fewer than min_agree of the 9 cells (default a majority: a random footprint of 10 colours agrees
    with the best of 10 roots on 2.4 cells on average, on 5 or more in 1%), or a cell off the footprint is not the
    background. A reading of "the board has B at (x, y) on bck" that tolerates a few wrong colours on the object."""
    cells = footprint(x, y)
    drawn = np.take_along_axis(boards, cells, 1)  # [N, 9]
    agree = np.sum(drawn[:, None] == 10 + roots.reshape(len(roots), 9)[None], -1)  # [N, R]
    best = np.sort(agree, 1)
    off = np.ones(boards.shape, bool)
    np.put_along_axis(off, cells, False, 1)
    clean = np.all(np.where(off, boards == background[:, None], True), 1)
    return np.where((best[:, -1] > best[:, -2]) & (best[:, -1] >= min_agree) & clean, np.argmax(agree, 1), -1)


def centroids(features: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """[n, D] the mean row of features [N, D] per label [N] in 0..n-1 (NaN where a label has no row)."""
    counts = np.bincount(labels, minlength=n)[:, None]
    sums = np.zeros((n, features.shape[1]))
    np.add.at(sums, labels, features)
    with np.errstate(invalid="ignore"):
        return sums / counts
