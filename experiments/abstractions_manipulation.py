"""Ferry et al. 2023, manipulation: editing the abstractions changes what the network draws (gain of function).

On the training run's model (experiments/common/abstractions.py; trained first if missing), at every [T, D]
site, one site at a time, all sites and boards in one compiled program (jaxicl.analysis.steering):

- transplant root A -> B on a single board's object (every ordered pair A != B, boards_per_pair boards each at a
  random position and background with a token mask) by (a) activation patching from the B board with the same
  position, background and mask, on A's masked object cells only (UNK at the input of both boards, so what is
  patched is what the network inferred there, while A's visible cells stay A's: the two boards differ only on the
  9 object cells, and a review found a patch of all 9 to be B's own run, passing by construction), and (b) adding
  the centroid difference mu_B - mu_A on the 9 cells (centroids: the mean over a probe set's masked object cells
  of each root and cell index, per site, so cell c of A receives mu_(B,c) - mu_(A,c); centroid="root" pools the 9
  cells, the notes' mu_k, and is measured as well); control: a random direction of the same norm.
  Reported: the fraction of the object's cells decoded as B's token at that cell and the fraction still decoded as
  A's (both over cells where A's and B's colours differ), on the masked ones (and for (b) on every footprint
  cell); the patch's ceiling: the fraction of those cells B's own run completes as B;
- mean ablation (loss of function): the object cells set to the grand mean of the root centroids; reported:
  the fraction still decoded as A's tokens;
- masked completion through an abstraction: completion_masked of the 9 cells masked, mu_B - mu_A added on those
  cells only: does the network complete B instead of A?
- part-whole: on composite boards, A -> B in one quadrant (the root there) by the centroid difference: the
  fraction of that quadrant's masked cells decoded as B, and of the other cells left as the unedited run draws them.

Every check reads the best of the sites a later attention layer reads (checked_sites): not the embedding or its
LayerNorm (layer0.z), where editing a visible cell swaps its token, and nothing after the last block's layer{L-1}.z:
from there on every operation is per cell, so an edit of the scored cells decides what they draw by construction (a
review found the patch and ablation checks able to pass that way for any model that completes boards) and, for
part-whole, no edit there can reach the other cells ("kept" would hold by construction). Every site is in the notes
and the figure.

Why masked cells (UNK at the input, so their colour is not in the residual stream at their own position): a model
that copies its visible tokens would pass on visible cells. For the same reason the centroids are means over masked
cells only: a centroid over visible cells carries the cell's own token, and adding mu_B - mu_A made from such
centroids on a masked cell writes B's colour into the stream there, which a copier redraws (a review found the
earlier all-cell centroids passing both masked-cell checks for the model with every attention output zeroed).

What the quick preset shows (about 100 s on the training run's model, on an Intel Xeon (Emerald Rapids) whose 2
cores other work shared), on masked cells: setting the object cells to the mean centroid at layer2.z leaves 0.07 of
A's colours (unedited 0.98) and passes. The B board's activations on A's masked cells turn only 0.15 of them into
B's colours at the checked sites (layer1.resid_mid; 0.58 still A's), short of the check's 0.5, although B's own run
completes 0.94 of them as B: that much only after the last attention (0.94 at layer2.resid_mid and resid_post), so
what the first two blocks infer on a hidden cell is mostly overruled by A's visible cells. Adding mu_B - mu_A turns
only 0.25 of them at the checked sites (layer1.resid_mid; random direction 0.02) and leaves 0.44 of them A's, short
of the check's 0.5 gain, against 0.93-0.96 B's (0.01 and 0.00 A's) after the last attention (layer2.resid_mid,
resid_post), where a cell moved into B's cluster is drawn as B by the readout alone; with 6 of 9 cells masked, adding
the difference on the masked cells completes B on 0.23 of them (layer1.resid_post; random 0.08; unedited the network
completes A on 0.49), short of the check's 0.3 gain, against 0.90 after the last attention. So the per-(root, cell)
abstractions of hidden cells that the last block reads are mostly made by its attention: written before it, they
move a quarter of the cells or fewer. Part-whole, short of its check as well: editing one quadrant of a composite
turns 0.15 of its masked cells (layer1.resid_mid, random 0.01), with every other cell unchanged (1.00); after the
last attention 0.88.

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
from jaxicl.prng import seed_key
from jaxicl.tasks import boards as bd
from jaxicl.validation import ConfigError, check_choice, check_positive, check_range

CENTROIDS = ("root_cell", "root")


@dataclasses.dataclass(frozen=True)
class Config:
    training: ab.Training = TRAINING_PRESETS["quick"].training
    boards_per_pair: int = 2  # single boards per ordered root pair (A, B)
    mask_p: float = 0.25  # token mask of the edited boards and of the centroid probe set
    centroid_positions: int = 36  # top-left positions of the probe set the centroids come from
    centroid: str = "root_cell"  # the checks' centroids: per (root, cell index), or "root" (every cell of a root)
    completion_masked: int = 6  # footprint cells masked in the completion test
    composite_backgrounds: int = 2  # composite boards: every composite at every position on this many backgrounds
    min_transplant_gain: float = 0.5  # best site's B fraction minus the random control's
    min_patch_transplant: float = 0.5  # best site's B fraction of A's masked object cells with B's activations there
    min_ablation_drop: float = 0.5
    min_completion_gain: float = 0.3
    min_part_whole_gain: float = 0.3
    min_part_whole_kept: float = 0.9

    def __post_init__(self):
        for name in ("boards_per_pair", "centroid_positions", "composite_backgrounds"):
            check_positive(name, getattr(self, name))
        check_range("mask_p", self.mask_p, 0.0, 1.0)
        check_range("completion_masked", self.completion_masked, 1, 9)
        check_choice("centroid", self.centroid, CENTROIDS)
        check_range("composite_backgrounds", self.composite_backgrounds, 1, self.training.task.n_backgrounds)
        # the checks read sites a later attention layer reads, past the first block's embedding LayerNorm
        check_range("training.model.n_layers", self.training.model.n_layers, 2)


PRESETS = {"smoke": Config(training=TRAINING_PRESETS["smoke"].training, boards_per_pair=1, centroid_positions=6,
                           composite_backgrounds=1),
           "quick": Config(),
           "full": Config(training=TRAINING_PRESETS["full"].training, boards_per_pair=8,
                          centroid_positions=bd.POSITIONS, composite_backgrounds=10)}
SHARES = (ab.TRAINING_DIR,)  # trains (or loads) the shared model in --out/abstractions_training/run


def run(cfg: Config, out_dir: str) -> Outcome:
    data, graphdef, params, _ = ab.trained(cfg.training, os.path.dirname(out_dir))
    sites = ab.residual_sites(graphdef, params)
    k_probe, _, k_mask, k_rand, k_comp, k_q = jax.random.split(seed_key(cfg.training.train.seed, offset=30), 6)
    mu = {by: site_centroids(data, graphdef, params, sites, cfg, k_probe, by) for by in CENTROIDS}  # [S, K, 9, D]
    n_roots = data.cfg.n_roots
    colours = data.roots.reshape(n_roots, 9)

    boards = transplant_boards(cfg, data, k_mask)  # patch [N, 64]: the masked object cells, where every check scores
    (a, b), x, y, bck, cells, patch = (boards[k] for k in ("roots", "x", "y", "background", "cells", "patch"))
    on = np.zeros((len(a), 64), bool)
    np.put_along_axis(on, cells, True, axis=1)
    tok_a, tok_b = _object_tokens(cells, colours[a]), _object_tokens(cells, colours[b])  # [N, 64], -1 off object
    differ = on & (tok_a != tok_b)
    tokens = jnp.asarray(boards["a"]["tokens"])
    delta = {by: np.stack([m[:, b, c] - m[:, a, c] for c in range(9)], 2) for by, m in mu.items()}  # [S, N, 9, D]
    random = _random_like(delta[cfg.centroid], k_rand)
    at_cells = lambda d: _on_cells(d, cells)  # noqa: E731

    donor = ab.activations(graphdef, params, boards["b"]["tokens"], sites)
    mean = mu[cfg.centroid].mean(1)  # [S, 9, D] the mean over roots of each cell's centroid
    edits = {
        "patch": edit_each_site(graphdef, params, tokens, sites, patch, values=np.stack([donor[s] for s in sites])),
        "centroid": edit_each_site(graphdef, params, tokens, sites, on, deltas=at_cells(delta[cfg.centroid])),
        "random": edit_each_site(graphdef, params, tokens, sites, on, deltas=at_cells(random)),
        "other_centroid": edit_each_site(graphdef, params, tokens, sites, on, deltas=at_cells(
            delta[next(by for by in CENTROIDS if by != cfg.centroid)])),
        "ablation": edit_each_site(graphdef, params, tokens, sites, on, values=at_cells(
            np.broadcast_to(mean[:, None], delta[cfg.centroid].shape))),
    }
    clean = np.asarray(ab.predictions(graphdef, params, tokens))
    # the patch's ceiling: B's own run completes this fraction of the patched cells as B
    clean_b = np.asarray(ab.predictions(graphdef, params, jnp.asarray(boards["b"]["tokens"])))
    patch_ceiling = float(np.mean(clean_b[differ & patch] == tok_b[differ & patch]))
    # the patch writes the masked cells only: its fractions over every footprint cell would count A's visible cells
    to_b = {k: decoded_as(edits[k], tok_b, differ) for k in ("centroid", "random")}
    to_b_masked = {k: decoded_as(v, tok_b, differ & patch) for k, v in edits.items() if k != "ablation"}
    whole_b = {k: whole_footprint_as(edits[k], tok_b, on) for k in ("centroid", "random")}
    # the notes' third transplant outcome: the cells still decoded as A (same cells as the B fractions)
    still_a = decoded_as(edits["centroid"], tok_a, differ)
    still_a_masked = {k: decoded_as(edits[k], tok_a, differ & patch) for k in ("centroid", "patch")}
    kept_a = {k: decoded_as(edits["ablation"], tok_a, w) for k, w in (("footprint", on), ("masked", patch))}
    clean_a = {k: float(np.mean(clean[w] == tok_a[w])) for k, w in (("footprint", on), ("masked", patch))}
    completion = masked_completion(cfg, data, graphdef, params, sites, a, x, y, bck, cells, tok_a, tok_b,
                                   delta[cfg.centroid], random, k_mask)
    part_whole = part_whole_test(cfg, data, graphdef, params, sites, mu[cfg.centroid], k_comp, k_q)

    def fmt(v):
        return ", ".join(f"{s} {x:.2f}" for s, x in zip(sites, v))

    # the best of the checked sites (checked_sites); the transplant and ablation checks score the masked cells
    # only: a visible cell's colour is in the residual stream at its own position, so any model that copies visible
    # tokens would pass on them
    checked = checked_sites(sites)
    best, best_patch, best_completion, best_part = (int(checked[np.argmax(v[checked])]) for v in (
        to_b_masked["centroid"] - to_b_masked["random"], to_b_masked["patch"],
        completion["centroid"] - completion["random"], part_whole["quadrant_b"] - part_whole["quadrant_b_random"]))
    best_ablation = int(checked[np.argmin(kept_a["masked"][checked])])
    checks = [
        check_above("centroid_transplant_over_random_masked",
                    to_b_masked["centroid"][best] - to_b_masked["random"][best], cfg.min_transplant_gain,
                    f"at {sites[best]}: adding mu_B - mu_A on A's 9 cells turns {to_b_masked['centroid'][best]:.3f} of "
                    f"the masked ones into B's colour and leaves {still_a_masked['centroid'][best]:.3f} of them A's, "
                    f"a random direction of the same norm {to_b_masked['random'][best]:.3f} B's (every footprint "
                    f"cell, visible ones included: {to_b['centroid'][best]:.3f} B's, {still_a[best]:.3f} "
                    f"A's, random {to_b['random'][best]:.3f} B's; the whole footprint drawn as "
                    f"B on {whole_b['centroid'][best]:.3f} of the boards, random {whole_b['random'][best]:.3f}); "
                    f"{len(a)} boards "
                    f"({n_roots * (n_roots - 1)} pairs); centroids by {cfg.centroid}; masked cells per site: "
                    f"{fmt(to_b_masked['centroid'])}; random per site: {fmt(to_b_masked['random'])}; every footprint "
                    f"cell per site: {fmt(to_b['centroid'])}; with the other centroids ("
                    f"{next(by for by in CENTROIDS if by != cfg.centroid)}), masked cells per site: "
                    f"{fmt(to_b_masked['other_centroid'])}; masked cells still A per site: "
                    f"{fmt(still_a_masked['centroid'])}"),
        check_above("patch_transplant_masked", to_b_masked["patch"][best_patch], cfg.min_patch_transplant,
                    f"at {sites[best_patch]}: the B board's activations (same position, background and mask) "
                    f"written on A's masked object cells only (UNK in both boards: what the network inferred there; "
                    f"A's visible cells keep A's run) turn {to_b_masked['patch'][best_patch]:.3f} of them into B's "
                    f"colour and leave {still_a_masked['patch'][best_patch]:.3f} of them A's; the ceiling, B's own "
                    f"run, completes {patch_ceiling:.3f} of them as B; per site: {fmt(to_b_masked['patch'])}; still A "
                    f"per site: {fmt(still_a_masked['patch'])}"),
        check_above("mean_ablation_drop_masked", clean_a["masked"] - kept_a["masked"][best_ablation],
                    cfg.min_ablation_drop,
                    f"at {sites[best_ablation]}: the object cells set to the mean root centroid keep "
                    f"{kept_a['masked'][best_ablation]:.3f} of A's colours on the masked cells (unedited: "
                    f"{clean_a['masked']:.3f}; every footprint cell {kept_a['footprint'][best_ablation]:.3f}, "
                    f"unedited {clean_a['footprint']:.3f}); masked cells per site: {fmt(kept_a['masked'])}; every "
                    f"footprint cell per site: {fmt(kept_a['footprint'])}"),
        check_above("masked_completion_over_random",
                    completion["centroid"][best_completion] - completion["random"][best_completion],
                    cfg.min_completion_gain,
                    f"{cfg.completion_masked} of A's 9 cells masked, mu_B - mu_A added there only: at "
                    f"{sites[best_completion]} {completion['centroid'][best_completion]:.3f} of them are completed "
                    f"as B (random direction {completion['random'][best_completion]:.3f}); unedited, "
                    f"{completion['clean_a']:.3f} are completed as A; per site: {fmt(completion['centroid'])}"),
        check_above("part_whole_quadrant_over_random",
                    part_whole["quadrant_b"][best_part] - part_whole["quadrant_b_random"][best_part],
                    cfg.min_part_whole_gain,
                    f"composites, mu_B - mu_A on one quadrant's root A: at {sites[best_part]} "
                    f"{part_whole['quadrant_b'][best_part]:.3f} of the quadrant's masked cells become B's colour "
                    f"(random direction {part_whole['quadrant_b_random'][best_part]:.3f}); per site: "
                    f"{fmt(part_whole['quadrant_b'])}"),
        check_above("part_whole_other_cells_kept", part_whole["kept"][best_part], cfg.min_part_whole_kept,
                    f"composites, A -> B in one quadrant at {sites[best_part]} (among the checked sites, where the "
                    f"quadrant turns most over the random direction: "
                    f"{part_whole['quadrant_b'][best_part]:.3f} of its masked "
                    f"cells B, random {part_whole['quadrant_b_random'][best_part]:.3f}): "
                    f"{part_whole['kept'][best_part]:.3f} of the other cells keep their unedited prediction; quadrant "
                    f"B fraction per site: "
                    f"{fmt(part_whole['quadrant_b'])}"),
    ]
    figures = [_plot(sites, checked, to_b, to_b_masked, patch_ceiling, kept_a, clean_a, completion, part_whole,
                     out_dir)]
    return Outcome(checks, figures)


def transplant_boards(cfg: Config, data: bd.BoardData, key) -> dict:
    """The transplant's single boards: for every ordered root pair (A, B), A != B, boards_per_pair boards of A ("a")
    at a random position and background, and of B ("b") at the same place and background with the same token mask
    (key; masked_set's entries); "roots" [2, N] (A, B), "x", "y", "background" [N], "cells" [N, 9] the object's
    cells and "patch" [N, 64] those of them masked (UNK at the input) in both boards, where the patch transplant
    writes the B board's activations: the two boards differ only on the object's cells, so a patch of all 9 (B's
    visible tokens included) would turn the run into B's own run."""
    n_roots = data.cfg.n_roots
    a, b = np.array([(i, j) for i in range(n_roots) for j in range(n_roots) if i != j]).T
    a, b = np.repeat(a, cfg.boards_per_pair), np.repeat(b, cfg.boards_per_pair)
    rng = np.random.default_rng(cfg.training.train.seed + 30)
    pos, bck = rng.integers(0, bd.POSITIONS, len(a)), rng.integers(0, data.cfg.n_backgrounds, len(a))
    x, y = bd.place_of(pos)
    boards = {r: ab.masked_set(data, data.rows("single", np.stack([k, x, y, bck], 1)), cfg.mask_p, key)
              for r, k in (("a", a), ("b", b))}
    cells = ab.footprint(x, y)
    patch = np.zeros((len(a), 64), bool)
    np.put_along_axis(patch, cells, True, axis=1)
    patch &= boards["a"]["masked"] & boards["b"]["masked"]
    return {**boards, "roots": np.stack([a, b]), "x": x, "y": y, "background": bck, "cells": cells, "patch": patch}


def checked_sites(sites: list[str]) -> np.ndarray:
    """The indices into sites (residual_sites' order) of the sites every check reads: after the embedding and its
    LayerNorm (layer0.z, a per-token rescaling), where an edit of a visible cell swaps its token, and up to the last
    block's layer{L-1}.z, the last site a later attention layer reads. After it every operation is per cell, so an
    edit of the scored cells decides what they draw by construction: patching in the B board's values draws the B
    board's prediction, the mean centroid draws one token per cell index, and adding mu_B - mu_A moves a cell into
    B's cluster, which the readout draws as B wherever the model completes B boards."""
    last_z = max(i for i, s in enumerate(sites) if s.endswith(".z"))
    return np.array([i for i, s in enumerate(sites[:last_z + 1]) if i > 0 and s != "layer0.z"])


def site_centroids(data, graphdef, params, sites, cfg: Config, key, by: str) -> np.ndarray:
    """[S, K, 9, D] per site the mean over a single-board probe set's masked object cells of each root and cell
    index (by="root_cell"), or of each root over its 9 cells, repeated on the cell axis (by="root").

    Masked cells only (UNK at the input): what the network infers about a cell it cannot see. A centroid over visible
    cells carries the cell's own token, and adding such a difference on a masked cell writes B's colour into the
    stream there, which a model that only copies visible tokens would then draw."""
    single = ab.single_probe_set(data, cfg.centroid_positions, cfg.mask_p, key)
    cells = ab.footprint(single["x"], single["y"])
    rows = np.arange(len(cells))[:, None]
    hidden = single["masked"][rows, cells].ravel()
    roots = single["root"][rows, cells].ravel()[hidden]
    labels = (roots * 9 + np.tile(np.arange(9), len(cells))[hidden]) if by == "root_cell" else roots
    n_labels = data.cfg.n_roots * 9 if by == "root_cell" else data.cfg.n_roots
    if np.bincount(labels, minlength=n_labels).min() == 0:
        raise ConfigError(f"centroid_positions={cfg.centroid_positions} with mask_p={cfg.mask_p} leaves a "
                          f"{'(root, cell)' if by == 'root_cell' else 'root'} with no masked cell in the probe set; "
                          f"raise centroid_positions or mask_p")
    acts = ab.activations(graphdef, params, single["tokens"], sites)
    k = data.cfg.n_roots
    out = []
    for s in sites:
        mu = ab.centroids(acts[s][rows, cells].reshape(len(hidden), -1)[hidden], labels, n_labels)
        out.append(mu.reshape(k, 9, -1) if by == "root_cell" else np.repeat(mu[:, None], 9, 1))
    return np.stack(out).astype(np.float32)


def _on_cells(per_cell: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """[S, N, 64, D] with per_cell [S, N, 9, D] at the board cells cells [N, 9] (zeros elsewhere)."""
    s, n, _, d = per_cell.shape
    out = np.zeros((s, n, 64, d), np.float32)
    out[:, np.arange(n)[:, None], cells] = per_cell
    return out


def masked_completion(cfg, data, graphdef, params, sites, a, x, y, bck, cells, tok_a, tok_b, delta, random,
                      key) -> dict:
    """[S] fractions of the masked footprint cells decoded as B when the centroid difference delta [S, N, 9, D]
    ("centroid") or random [S, N, 9, D] ("random") is added on them only; "clean_a": unedited, the fraction
    completed as A."""
    base = ab.masked_set(data, data.rows("single", np.stack([a, x, y, bck], 1)), cfg.mask_p, key)
    order = np.argsort(np.random.default_rng(cfg.training.train.seed + 31).random(cells.shape), axis=1)
    hidden = np.zeros_like(base["masked"])
    np.put_along_axis(hidden, np.take_along_axis(cells, order[:, :cfg.completion_masked], 1), True, axis=1)
    tokens = jnp.asarray(np.where(hidden, data.cfg.unk, base["tokens"]))
    where = hidden & (tok_a != tok_b)
    clean = np.asarray(ab.predictions(graphdef, params, tokens))
    return {"centroid": decoded_as(edit_each_site(graphdef, params, tokens, sites, hidden,
                                                  deltas=_on_cells(delta, cells)), tok_b, where),
            "random": decoded_as(edit_each_site(graphdef, params, tokens, sites, hidden,
                                                deltas=_on_cells(random, cells)), tok_b, where),
            "clean_a": float(np.mean(clean[hidden] == tok_a[hidden]))}


def part_whole_test(cfg, data, graphdef, params, sites, mu, key, k_target) -> dict:
    """[S] on composite boards, A -> B in one quadrant (every quadrant of every board, B a random other root) by
    the centroid differences of mu [S, K, 9, D] and by a random direction of their norm: "quadrant_b" /
    "quadrant_b_random", the fraction of the quadrant's masked cells (where A's and B's colours differ) decoded as
    B, and "kept", the fraction of the other cells whose prediction is the unedited one (centroid edit)."""
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
    delta = np.stack([mu[:, b, c] - mu[:, a, c] for c in range(9)], 2)  # [S, N, 9, D]
    random = _random_like(delta, key)
    clean = np.asarray(ab.predictions(graphdef, params, tokens))
    centroid = edit_each_site(graphdef, params, tokens, sites, on, deltas=_on_cells(delta, cells))
    rand = edit_each_site(graphdef, params, tokens, sites, on, deltas=_on_cells(random, cells))
    where = on & (tok_a != tok_b) & comp["masked"][board]  # a visible cell's own token is in the stream there
    return {"quadrant_b": decoded_as(centroid, tok_b, where), "quadrant_b_random": decoded_as(rand, tok_b, where),
            "kept": decoded_as(centroid, clean, ~on)}


def decoded_as(edited: jax.Array, want: np.ndarray, where: np.ndarray) -> np.ndarray:
    """[S] per site the fraction of the selected cells where [N, 64] whose argmax of edited [S, N, 64, V] is want
    [N, 64]."""
    pred = np.asarray(jnp.argmax(edited, -1))
    return (np.sum((pred == want) & where, (1, 2)) / max(np.sum(where), 1)).astype(float)


def whole_footprint_as(edited: jax.Array, want: np.ndarray, on: np.ndarray) -> np.ndarray:
    """[S] per site the fraction of boards whose every footprint cell (on [N, 64]) has argmax of edited [S, N, 64, V]
    equal to want [N, 64] (the notes' footprint_all_B)."""
    pred = np.asarray(jnp.argmax(edited, -1))
    return np.all((pred == want) | ~on, axis=2).mean(1).astype(float)


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


def _plot(sites, checked, to_b, to_b_masked, patch_ceiling, kept_a, clean_a, completion, part_whole,
          out_dir) -> str:
    """Per site (sites [S]; checked: the indices the checks read, shaded) the transplants' B fractions on the masked
    cells (what the checks score; solid) and, for the methods in to_b (not the patch, which writes the masked cells
    only), on every footprint cell (dashed), one colour a method, with the patch's ceiling (B's own run, dotted);
    the ablation, completion and part-whole curves."""
    fig, axes = new_figure(3, size=(5.5, 3.6))
    x = np.arange(len(sites))
    labels = [s.replace("layer", "L").replace(".resid_", ".").replace("unembed.in", "out") for s in sites]
    for ax in axes[0]:
        for i in checked:
            ax.axvspan(i - 0.5, i + 0.5, color="0.92", zorder=0, label="checked sites" if i == checked[0] else None)
    for color, name in zip(("C0", "C1", "C2"), ("centroid", "patch", "random")):
        axes[0, 0].plot(x, to_b_masked[name], color=color, marker=".", label=f"{name}: masked cells")
        if name in to_b:
            axes[0, 0].plot(x, to_b[name], "--", color=color, lw=0.8, label=f"{name}: every footprint cell")
    axes[0, 0].axhline(patch_ceiling, color="C1", ls=":", label="patch ceiling: B's own run")
    axes[0, 0].set(ylabel="cells decoded as B", title="transplant A -> B")
    axes[0, 1].plot(x, kept_a["masked"], marker=".", label="mean ablation: masked cells still A")
    axes[0, 1].axhline(clean_a["masked"], color="k", ls=":", label="unedited")
    axes[0, 1].plot(x, completion["centroid"], marker=".", label="completion as B (centroid)")
    axes[0, 1].plot(x, completion["random"], ":", marker=".", label="completion as B (random)")
    axes[0, 1].set(title="ablation and masked completion")
    axes[0, 2].plot(x, part_whole["quadrant_b"], marker=".", label="edited quadrant, masked cells: B")
    axes[0, 2].plot(x, part_whole["quadrant_b_random"], ":", marker=".",
                    label="edited quadrant, masked cells: B (random)")
    axes[0, 2].plot(x, part_whole["kept"], marker=".", label="other cells unchanged")
    axes[0, 2].set(title="part-whole: one quadrant of a composite")
    for ax in axes[0]:
        ax.set(ylim=(-0.05, 1.05))
        ax.set_xticks(x, labels, rotation=90, fontsize=6)
        ax.legend(fontsize=6)
    return save_figure(fig, out_dir, "manipulations")
