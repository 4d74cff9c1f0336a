"""Ferry et al. 2023, manipulation: editing the abstractions changes what the network draws (gain of function).

On the training run's model (experiments/common/abstractions.py; trained first if missing), at every [T, D]
site, one site at a time, all sites and boards in one compiled program (jaxicl.analysis.steering):

- transplant root A -> B on a single board's 9 object cells (every ordered pair A != B, boards_per_pair boards
  each at a random position and background with a token mask) by (a) activation patching from the B board with
  the same position, background and mask, and (b) adding the centroid difference mu_B - mu_A (centroids: the
  mean over a probe set's object cells of each root, per site); control: a random direction of the same norm.
  Reported: the fraction of the object's cells decoded as B's token at that cell (over cells where A's and B's
  colours differ), on every footprint cell and on the masked ones;
- mean ablation (loss of function): the object cells set to the grand mean of the root centroids; reported:
  the fraction still decoded as A's tokens;
- masked completion through an abstraction: completion_masked of the 9 cells masked, mu_B - mu_A added on those
  cells only: does the network complete B instead of A?
- part-whole: on composite boards, A -> B in one quadrant (the root there) by the centroid difference: the
  fraction of that quadrant's cells decoded as B, and of the other cells left as the unedited run draws them.

The edits are the notes' reconstructions ([R] in shared/papers/abstractions_ferry2023.md, Section 6.4-6.5);
sizes and thresholds are ours (Config).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.abstractions_training import PRESETS as TRAINING_PRESETS
from experiments.common import abstractions as ab
from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Outcome, check_above
from jaxicl.analysis.steering import edit_each_site
from jaxicl.validation import check_positive, check_range


@dataclasses.dataclass(frozen=True)
class Config:
    training: ab.Training = TRAINING_PRESETS["quick"].training
    boards_per_pair: int = 2  # single boards per ordered root pair (A, B)
    mask_p: float = 0.25  # token mask of the edited boards and of the centroid probe set
    centroid_positions: int = 12  # top-left positions of the probe set the centroids come from
    completion_masked: int = 6  # footprint cells masked in the completion test
    composite_backgrounds: int = 2  # composite boards: every composite at every position on this many backgrounds
    min_transplant_gain: float = 0.5  # best site's B fraction minus the random control's
    min_patch_transplant: float = 0.5
    min_ablation_drop: float = 0.5
    min_completion_gain: float = 0.3
    min_part_whole_kept: float = 0.9

    def __post_init__(self):
        for name in ("boards_per_pair", "centroid_positions", "composite_backgrounds"):
            check_positive(name, getattr(self, name))
        check_range("mask_p", self.mask_p, 0.0, 1.0)
        check_range("completion_masked", self.completion_masked, 1, 9)
        check_range("composite_backgrounds", self.composite_backgrounds, 1, self.training.task.n_backgrounds)


PRESETS = {"smoke": Config(training=TRAINING_PRESETS["smoke"].training, boards_per_pair=1, centroid_positions=2,
                           composite_backgrounds=1),
           "quick": Config(),
           "full": Config(training=TRAINING_PRESETS["full"].training, boards_per_pair=8, centroid_positions=36,
                          composite_backgrounds=10)}


def run(cfg: Config, out_dir: str) -> Outcome:
    data, graphdef, params, _ = ab.trained(cfg.training, os.path.dirname(out_dir))
    sites = ab.residual_sites(graphdef, params)
    k_probe, k_boards, k_mask, k_rand, k_comp, k_q = jax.random.split(jax.random.key(cfg.training.train.seed + 30), 6)
    mu = site_centroids(data, graphdef, params, sites, cfg, k_probe)  # [S, K, D]
    n_roots = data.cfg.n_roots
    colours = data.roots.reshape(n_roots, 9)

    # single boards: A at a random position and background, and the B board with the same position, background
    # and mask
    a, b = np.array([(i, j) for i in range(n_roots) for j in range(n_roots) if i != j]).T
    a, b = np.repeat(a, cfg.boards_per_pair), np.repeat(b, cfg.boards_per_pair)
    rng = np.random.default_rng(cfg.training.train.seed + 30)
    pos, bck = rng.integers(0, 36, len(a)), rng.integers(0, data.cfg.n_backgrounds, len(a))
    x, y = pos // 6, pos % 6
    boards = {r: ab.masked_set(data, data.rows("single", np.stack([k, x, y, bck], 1)), cfg.mask_p, k_mask)
              for r, k in (("a", a), ("b", b))}
    cells = ab.footprint(x, y)  # [N, 9]
    on = np.zeros((len(a), 64), bool)
    np.put_along_axis(on, cells, True, axis=1)
    tok_a, tok_b = _object_tokens(cells, colours[a]), _object_tokens(cells, colours[b])  # [N, 64], -1 off object
    differ = on & (tok_a != tok_b)
    masked = boards["a"]["masked"]
    tokens = jnp.asarray(boards["a"]["tokens"])
    delta = mu[:, b] - mu[:, a]  # [S, N, D]
    random = _random_like(delta, k_rand)
    per_cell = lambda d: np.broadcast_to(d[:, :, None], (*d.shape[:2], 64, d.shape[-1]))  # noqa: E731

    def decoded(edited, want, where):  # [S] fraction of the selected cells decoded as `want`
        pred = np.asarray(jnp.argmax(edited, -1))
        return (np.sum((pred == want) & where, (1, 2)) / np.maximum(np.sum(where), 1)).astype(float)

    donor = ab.activations(graphdef, params, boards["b"]["tokens"], sites)
    edits = {
        "patch": edit_each_site(graphdef, params, tokens, sites, on, values=np.stack([donor[s] for s in sites])),
        "centroid": edit_each_site(graphdef, params, tokens, sites, on, deltas=per_cell(delta)),
        "random": edit_each_site(graphdef, params, tokens, sites, on, deltas=per_cell(random)),
        "ablation": edit_each_site(graphdef, params, tokens, sites, on,
                                   values=per_cell(np.broadcast_to(mu.mean(1, keepdims=True), delta.shape))),
    }
    clean = np.asarray(ab.predictions(graphdef, params, tokens))
    to_b = {k: decoded(v, tok_b, differ) for k, v in edits.items() if k != "ablation"}
    to_b_masked = {k: decoded(v, tok_b, differ & masked) for k, v in edits.items() if k != "ablation"}
    kept_a = decoded(edits["ablation"], tok_a, on)
    clean_a = float(np.mean(clean[on] == tok_a[on]))
    completion = masked_completion(cfg, data, graphdef, params, sites, a, b, x, y, bck, cells, tok_a, tok_b, delta,
                                   random, k_mask)
    part_whole = part_whole_test(cfg, data, graphdef, params, sites, mu, k_comp, k_q)

    def fmt(v):
        return ", ".join(f"{s} {x:.2f}" for s, x in zip(sites, v))

    best = int(np.argmax(to_b["centroid"] - to_b["random"]))
    best_patch = int(np.argmax(to_b["patch"]))
    best_ablation = int(np.argmin(kept_a))
    best_completion = int(np.argmax(completion["centroid"] - completion["random"]))
    best_part = int(np.argmax(part_whole["quadrant_b"] - part_whole["quadrant_b_random"]))
    checks = [
        check_above("centroid_transplant_over_random", to_b["centroid"][best] - to_b["random"][best],
                    cfg.min_transplant_gain,
                    f"at {sites[best]}: adding mu_B - mu_A on A's 9 cells turns {to_b['centroid'][best]:.3f} of them "
                    f"into B's colour (masked cells only: {to_b_masked['centroid'][best]:.3f}), a random direction "
                    f"of the same norm {to_b['random'][best]:.3f}; {len(a)} boards ({n_roots * (n_roots - 1)} pairs); "
                    f"per site: {fmt(to_b['centroid'])}; random per site: {fmt(to_b['random'])}"),
        check_above("patch_transplant", to_b["patch"][best_patch], cfg.min_patch_transplant,
                    f"at {sites[best_patch]}: the B board's activations on A's cells (same position, background and "
                    f"mask) turn {to_b['patch'][best_patch]:.3f} of them into B's colour (masked cells only: "
                    f"{to_b_masked['patch'][best_patch]:.3f}); per site: {fmt(to_b['patch'])}"),
        check_above("mean_ablation_drop", clean_a - kept_a[best_ablation], cfg.min_ablation_drop,
                    f"at {sites[best_ablation]}: the object cells set to the mean root centroid keep "
                    f"{kept_a[best_ablation]:.3f} of A's colours (unedited: {clean_a:.3f}); per site: {fmt(kept_a)}"),
        check_above("masked_completion_over_random",
                    completion["centroid"][best_completion] - completion["random"][best_completion],
                    cfg.min_completion_gain,
                    f"{cfg.completion_masked} of A's 9 cells masked, mu_B - mu_A added there only: at "
                    f"{sites[best_completion]} {completion['centroid'][best_completion]:.3f} of them are completed "
                    f"as B (random direction {completion['random'][best_completion]:.3f}); unedited, "
                    f"{completion['clean_a']:.3f} are completed as A; per site: {fmt(completion['centroid'])}"),
        check_above("part_whole_other_cells_kept", part_whole["kept"][best_part], cfg.min_part_whole_kept,
                    f"composites, A -> B in one quadrant at {sites[best_part]} (the site where the quadrant turns "
                    f"most, {part_whole['quadrant_b'][best_part]:.3f} of its cells B, random "
                    f"{part_whole['quadrant_b_random'][best_part]:.3f}): {part_whole['kept'][best_part]:.3f} of the "
                    f"other cells keep their unedited prediction; quadrant B fraction per site: "
                    f"{fmt(part_whole['quadrant_b'])}"),
    ]
    figures = [_plot(sites, to_b, to_b_masked, kept_a, clean_a, completion, part_whole, out_dir)]
    return Outcome(checks, figures)


def site_centroids(data, graphdef, params, sites, cfg: Config, key) -> np.ndarray:
    """[S, K, D] per site the mean over a single-board probe set's object cells of each root."""
    single = ab.single_probe_set(data, cfg.centroid_positions, cfg.mask_p, key)
    cells = ab.footprint(single["x"], single["y"])
    roots = np.repeat(single["root"][np.arange(len(cells)), cells[:, 0]], 9)
    acts = ab.activations(graphdef, params, single["tokens"], sites)
    return np.stack([ab.centroids(acts[s][np.arange(len(cells))[:, None], cells].reshape(len(roots), -1), roots,
                                  data.cfg.n_roots) for s in sites]).astype(np.float32)


def masked_completion(cfg, data, graphdef, params, sites, a, b, x, y, bck, cells, tok_a, tok_b, delta, random,
                      key) -> dict:
    """[S] fractions of the masked footprint cells decoded as B when mu_B - mu_A ("centroid") or a random
    direction of its norm ("random") is added on them only; "clean_a": unedited, the fraction completed as A."""
    base = ab.masked_set(data, data.rows("single", np.stack([a, x, y, bck], 1)), cfg.mask_p, key)
    order = np.argsort(np.random.default_rng(cfg.training.train.seed + 31).random(cells.shape), axis=1)
    hidden = np.zeros_like(base["masked"])
    np.put_along_axis(hidden, np.take_along_axis(cells, order[:, :cfg.completion_masked], 1), True, axis=1)
    tokens = jnp.asarray(np.where(hidden, data.cfg.unk, base["tokens"]))
    where = hidden & (tok_a != tok_b)

    def frac(edited):
        pred = np.asarray(jnp.argmax(edited, -1))
        return (np.sum((pred == tok_b) & where, (1, 2)) / np.maximum(where.sum(), 1)).astype(float)

    per_cell = lambda d: np.broadcast_to(d[:, :, None], (*d.shape[:2], 64, d.shape[-1]))  # noqa: E731
    clean = np.asarray(ab.predictions(graphdef, params, tokens))
    return {"centroid": frac(edit_each_site(graphdef, params, tokens, sites, hidden, deltas=per_cell(delta))),
            "random": frac(edit_each_site(graphdef, params, tokens, sites, hidden, deltas=per_cell(random))),
            "clean_a": float(np.mean(clean[hidden] == tok_a[hidden]))}


def part_whole_test(cfg, data, graphdef, params, sites, mu, key, k_target) -> dict:
    """[S] on composite boards, A -> B in one quadrant (every quadrant of every board, B a random other root) by
    mu_B - mu_A and by a random direction of its norm: "quadrant_b" / "quadrant_b_random", the fraction of the
    quadrant's cells (where A's and B's colours differ) decoded as B, and "kept", the fraction of the other
    cells whose prediction is the unedited one (centroid edit)."""
    tuples = np.concatenate([data.tuples(split, "composition") for split in ("train", "test")])
    tuples = tuples[tuples[:, 3] < cfg.composite_backgrounds]
    comp = ab.masked_set(data, data.rows("composition", tuples), cfg.mask_p, key)
    n, n_roots = len(tuples), data.cfg.n_roots
    quadrant = np.tile(np.arange(4), n)  # every board once per quadrant
    board = np.repeat(np.arange(n), 4)
    qi, qj = np.divmod(quadrant, 2)
    qx, qy = tuples[board, 1] + 4 * qi, tuples[board, 2] + 4 * qj
    cells = ab.footprint(qx, qy)
    a = comp["root"][board, cells[:, 0]]
    b = (a + np.asarray(jax.random.randint(k_target, a.shape, 1, n_roots))) % n_roots
    on = np.zeros((len(a), 64), bool)
    np.put_along_axis(on, cells, True, axis=1)
    colours = data.roots.reshape(n_roots, 9)
    tok_a, tok_b = _object_tokens(cells, colours[a]), _object_tokens(cells, colours[b])
    tokens = jnp.asarray(comp["tokens"][board])
    delta = mu[:, b] - mu[:, a]
    per_cell = np.broadcast_to(delta[:, :, None], (*delta.shape[:2], 64, delta.shape[-1]))
    random = _random_like(delta, key)
    clean = np.asarray(ab.predictions(graphdef, params, tokens))
    centroid = np.asarray(jnp.argmax(edit_each_site(graphdef, params, tokens, sites, on, deltas=per_cell), -1))
    rand = np.asarray(jnp.argmax(edit_each_site(graphdef, params, tokens, sites, on, deltas=np.broadcast_to(
        random[:, :, None], per_cell.shape)), -1))
    where = on & (tok_a != tok_b)
    frac = lambda pred: (np.sum((pred == tok_b) & where, (1, 2)) / max(where.sum(), 1)).astype(float)  # noqa: E731
    return {"quadrant_b": frac(centroid), "quadrant_b_random": frac(rand),
            "kept": (np.sum((centroid == clean) & ~on, (1, 2)) / np.sum(~on)).astype(float)}


def _object_tokens(cells: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """[N, 64] the object token (10 + colour) each footprint cell of cells [N, 9] holds for patterns colours
    [N, 9]; -1 elsewhere."""
    out = np.full((len(cells), 64), -1)
    np.put_along_axis(out, cells, 10 + colours, axis=1)
    return out


def _random_like(delta: np.ndarray, key) -> np.ndarray:
    """Random directions with the norms of delta [..., D]."""
    r = np.asarray(jax.random.normal(key, delta.shape))
    return (r * np.linalg.norm(delta, axis=-1, keepdims=True) / np.linalg.norm(r, axis=-1, keepdims=True)).astype(
        np.float32)


def _plot(sites, to_b, to_b_masked, kept_a, clean_a, completion, part_whole, out_dir) -> str:
    fig, axes = new_figure(3, size=(5.5, 3.6))
    x = np.arange(len(sites))
    labels = [s.replace("layer", "L").replace(".resid_", ".").replace("unembed.in", "out") for s in sites]
    for name, style in (("centroid", "-"), ("patch", "-"), ("random", ":")):
        axes[0, 0].plot(x, to_b[name], style, marker=".", label=f"{name}: footprint")
        axes[0, 0].plot(x, to_b_masked[name], style, color="0.6", lw=0.8)
    axes[0, 0].set(ylabel="cells decoded as B", title="transplant A -> B (grey: masked cells)")
    axes[0, 1].plot(x, kept_a, marker=".", label="mean ablation: cells still A")
    axes[0, 1].axhline(clean_a, color="k", ls=":", label="unedited")
    axes[0, 1].plot(x, completion["centroid"], marker=".", label="completion as B (centroid)")
    axes[0, 1].plot(x, completion["random"], ":", marker=".", label="completion as B (random)")
    axes[0, 1].set(title="ablation and masked completion")
    axes[0, 2].plot(x, part_whole["quadrant_b"], marker=".", label="edited quadrant: B")
    axes[0, 2].plot(x, part_whole["quadrant_b_random"], ":", marker=".", label="edited quadrant: B (random)")
    axes[0, 2].plot(x, part_whole["kept"], marker=".", label="other cells unchanged")
    axes[0, 2].set(title="part-whole: one quadrant of a composite")
    for ax in axes[0]:
        ax.set(ylim=(-0.05, 1.05))
        ax.set_xticks(x, labels, rotation=90, fontsize=6)
        ax.legend(fontsize=6)
    return save_figure(fig, out_dir, "manipulations")
