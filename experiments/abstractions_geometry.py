"""Ferry et al. 2023, geometry: object cells converge onto low-dimensional abstractions that encode every feature.

On the training run's model (experiments/common/abstractions.py; trained first if missing), at every [T, D]
site in depth order (the residual stream, the LayerNorm outputs z and mlp_in, the attention and MLP updates):

- convergence: the official cross-board unit distance C (one root at one position on every background, each
  board with its own token mask; the 9 cells' mean, averaged over roots and positions, and the official code's
  3 x 3 map of it per object cell at the embedding, the convergence site and the output) and the within-board
  ratio R = W / OB (the object's cells among themselves vs against the background cells);
- dimensionality: the participation ratio of one root's object cells (over cells, positions, backgrounds,
  masks), averaged over roots, and of every root's cells pooled;
- ridge probes on single cells (features standardised over the training rows, as the notes ask, so the fixed
  penalty bites alike at every site and in the untrained model), scored on held-out board positions: root id (all
  object cells, and masked object cells only, which are UNK at the embedding), cell index in the 3x3 pattern,
  background, the object's position (R^2 of its top-left row and column) and, on composite boards (a composite
  position held out), the composite id and the root id;
- a PCA scatter of the object cells coloured by root at the embedding, the convergence site and the output;
- the attractor test: noise of norm alpha |x| on the object cells at the embedding, followed through the sites,
  and the object cells still drawn right as the noise grows until reconstruction breaks down;
- context independence: the cosine between a root's centroid from single boards and from double and composite
  boards pooled (against different roots' centroids), and the single-board root probe applied to double and
  composite boards.

The probe protocols are the notes' reconstructions ([R] in shared/papers/abstractions_ferry2023.md, Section 6);
the probe set's size, mask rate, held-out positions and ridge penalty are ours (Config). Everything runs twice: on
masked probe boards (token mask mask_p), then on the notes' unmasked variant (the same boards without masks; its
checks and figures are named unmasked_...; unmasked=False skips it). Without masks every board of one root at one
position holds the same tokens, so C is 0 at the embedding, the scale C's check divides by: the unmasked variant has
no C check and takes R's minimum as its convergence site (for the participation ratio and context independence),
and it has no masked-root probe.

Every check but the participation ratio's (which the untrained model fails at every inner site) compares the
trained model with the same run's initial parameters, measured the same way: a random
transformer already decodes most features far above chance (random features mix the board), so "decodable" shows
nothing about learning. Probes: trained minus untrained best held-out score over sites, > 0.05; convergence:
(inner-site minimum of C, and of R, over the ends) trained over untrained, < 0.8, layer0.z (the embedding's
LayerNorm, no mixing across cells) excluded; context independence: the cosine gap at the convergence site minus the
untrained model's largest at any inner site, > 0.1; attractor: the noise left at the output, trained over
untrained, < 0.8 (an untrained residual stream shrinks it too, since later layers add to the stream; the bound
mirrors the convergence checks').

What the quick preset shows (the quick training run's model before its type curriculum ended at the official 0.33
each, stop 45; the retrained model's numbers are in the report, and there root from masked cells gains 0.042,
0.92 vs 0.88, and fails its 0.05 check; about 30 s for both variants): transient convergence.
The cross-board distance is 0.54 at the embedding (the masks differ), 0.55 at the output, and falls to 0.30 at the
second block's attention output (layer1.attn.out), where the within-board ratio R is 0.19 (0.87 at the
embedding, 0.82 at the output): the object's 9 cells are written alike there; C-minimum over the ends 0.55 against
1.99 untrained (ratio 0.28), R's 0.23 against 0.99 (untrained R stays at 0.91-1.09 everywhere). One root's
participation ratio is lowest there too (2.4, against 4.7 at the embedding and 7.4 at the output, of 64
dimensions). Probes on held-out positions, trained vs untrained best: cell index 0.83 vs 0.29,
position R^2 0.98 vs -0.52 and a composite's roots 0.99 vs 0.50 are learned; root from masked cells passes
(0.96 vs 0.88, a gain of 0.082 against the check's 0.05: the untrained attention already averages the visible cells
into the masked ones); root (0.95 vs 0.92), background (0.75 vs 1.00) and composite id (0.75 vs 0.92) are not
learned: the untrained model decodes them as well or better, and these three checks fail (unstandardised, as before
the notes' protocol was followed, the same verdicts: 0.96 vs 0.90, 0.95 vs 0.92, 0.66 vs 1.00, 0.76 vs 0.90). Context
independence: at layer1.attn.out a root's single-board centroid has cosine 0.82 with its centroid on double and
composite boards (0.16 with other roots'): gap 0.66 against at most 0.19 untrained; the single-board root probe
reads double boards at 0.81 and composites at 0.90. Noise of 0.5 |x| on the object cells at the embedding shrinks
to 0.13-0.19 at every site from the first block's MLP on, 0.17 at the output, where the untrained model leaves
0.30 (ratio 0.58; its residual stream holds 0.29-0.38 after the embedding). The object is still drawn from noise
as large as the embedding itself, then reconstruction breaks down: the object cells are drawn right at 0.985 clean,
0.98, 0.94, 0.72, 0.39 and 0.22 with noise of 0.5, 1, 2, 4 and 8 |x| (reconstruction_alphas).
The unmasked variant shows the same picture: R falls from 0.81 at the embedding to 0.17 at layer1.attn.out and
rises to 0.78 at the output (ratio 0.22 against 0.99 untrained), where one root's participation ratio is 2.2
(4.1 at the embedding, 5.3 at the output); C, 0 at the embedding, stays at most 0.11 (these boards differ only in
the background). Cell index (0.88 vs 0.34), position (0.98 vs -0.52) and a composite's roots (1.00 vs 0.58) are
learned, root (0.98 vs 1.00), background (0.86 vs 1.00) and composite id (0.86 vs 1.00) are not, and fail as in
the masked variant; the context-independence gap is 0.68 at layer1.attn.out against 0.35 untrained; the noise left
at the output is 0.19 against 0.27 untrained (ratio 0.72).
"""

import dataclasses
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.abstractions_training import PRESETS as TRAINING_PRESETS
from experiments.common import abstractions as ab
from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Outcome, check_above, check_below
from jaxicl.analysis.convergence import cross_board_distance, participation_ratio, unit, within_board_ratio
from jaxicl.analysis.perturbation import perturbation_distances, perturbed_outputs
from jaxicl.analysis.probes import probe, ridge_fit, ridge_predict
from jaxicl.prng import seed_key
from jaxicl.tasks import boards as bd
from jaxicl.validation import ConfigError, check_distinct, check_positive, check_range

VARIANTS = ("masked", "unmasked")


def majority_share(labels: np.ndarray, held: np.ndarray) -> float:
    """A class probe's chance accuracy: the share of the held-out rows (held [N] bool) whose label (labels [N]) is
    the most frequent one of the other rows, i.e. the score of the constant predictor fit on the training rows, with
    a tie for the most frequent broken uniformly (the mean share of the tied labels: balanced training labels give
    1 / classes, not the share of label 0). Not 1 / classes in general: composites draw their roots with
    replacement from a few composites, so their root labels are far from balanced."""
    counts = np.bincount(labels[~held])
    return float(np.mean([np.mean(labels[held] == k) for k in np.flatnonzero(counts == counts.max())]))


@dataclasses.dataclass(frozen=True)
class Config:
    training: ab.Training = TRAINING_PRESETS["quick"].training
    probe_positions: int = 12  # top-left positions of the single-board probe set (evenly spaced over the 36)
    held_out_positions: int = 3  # of those, the ones the probes are scored on
    mask_p: float = 0.25  # token mask of the masked variant's probe boards (one fixed mask per board)
    unmasked: bool = True  # also run the notes' unmasked variant (probe boards without masks)
    double_boards: int = 600  # double boards of the context-independence analysis
    ridge_lam: float = 1.0
    standardise_probes: bool = True  # the notes' probes: ridge on features standardised over the training rows
    perturb_alpha: float = 0.5
    # the noise scales of the reconstruction sweep ("until reconstruction breaks down"), in units of |x|
    reconstruction_alphas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    perturb_boards: int = 200
    # trained minus untrained (the run's initial parameters), each at its best site: the untrained model's random
    # features already decode most features far above chance. 0.05 is 3-5 standard errors of a held-out accuracy
    # (hundreds to thousands of held-out cells)
    min_probe_gain: float = 0.05
    max_convergence_vs_untrained: float = 0.8  # trained C-ratio / untrained: at least 20% closer than at init
    max_attractor_vs_untrained: float = 0.8  # the noise left at the output, trained / untrained: 20% less, as above
    min_cosine_gap_gain: float = 0.1  # context-independence cosine gap, trained minus untrained

    def __post_init__(self):
        check_range("probe_positions", self.probe_positions, 2, bd.POSITIONS)
        check_range("held_out_positions", self.held_out_positions, 1, self.probe_positions - 1)
        check_range("mask_p", self.mask_p, 0.0, 1.0)
        if self.mask_p == 0:
            raise ConfigError("mask_p must be > 0: it is the masked variant's mask rate; the unmasked variant runs "
                              "beside it (unmasked=True)")
        for name in ("double_boards", "perturb_boards"):
            check_positive(name, getattr(self, name))
        check_positive("ridge_lam", self.ridge_lam)
        for i, alpha in enumerate(self.reconstruction_alphas):
            check_positive(f"reconstruction_alphas[{i}]", alpha)
        check_distinct("reconstruction_alphas", self.reconstruction_alphas)


PRESETS = {"smoke": Config(training=TRAINING_PRESETS["smoke"].training, probe_positions=3, held_out_positions=1,
                           double_boards=40, perturb_boards=20),
           "quick": Config(),
           "full": Config(training=TRAINING_PRESETS["full"].training, probe_positions=bd.POSITIONS,
                          held_out_positions=9, double_boards=4000, perturb_boards=1000)}
SHARES = (ab.TRAINING_DIR,)  # trains (or loads) the shared model in --out/abstractions_training/run


def run(cfg: Config, out_dir: str) -> Outcome:
    data, graphdef, params, _ = ab.trained(cfg.training, os.path.dirname(out_dir))
    init_params = nnx.split(ab.build_model(cfg.training), nnx.Param)[1]  # the run's own initial parameters
    sites = ab.residual_sites(graphdef, params)
    checks, figures = [], []
    for variant in VARIANTS if cfg.unmasked else VARIANTS[:1]:
        more_checks, more_figures = analyse(cfg, variant, data, graphdef, params, init_params, sites, out_dir)
        checks += more_checks
        figures += more_figures
    return Outcome(checks, figures)


def analyse(cfg: Config, variant: str, data, graphdef, params, init_params, sites, out_dir
            ) -> tuple[list, list[str]]:
    """The checks and figures of one variant: "masked" (probe boards with token masks of rate cfg.mask_p) or
    "unmasked" (none; its check names and figure files start with "unmasked_")."""
    masked = variant == "masked"
    mask_p, prefix = (cfg.mask_p if masked else 0.0), prefix_of(variant)
    key = seed_key(cfg.training.train.seed, offset=20)  # the same boards in both variants, only the masks differ
    k_probe, k_double, k_comp, k_perturb = jax.random.split(key, 4)
    single = ab.single_probe_set(data, cfg.probe_positions, mask_p, k_probe)
    comp = ab.composite_set(data, mask_p, k_comp)  # every composite: the probes and context share it
    n_roots, n_bck = data.cfg.n_roots, data.cfg.n_backgrounds
    n_pos = len(np.unique(bd.position_of(single["x"], single["y"])))
    trained, init = (measure(cfg, data, graphdef, p, sites, single, comp, k_double, mask_p)
                     for p in (params, init_params))
    distance, ratio, pr_root, pr_all, probes, context, obj, root = (trained[k] for k in (
        "distance", "ratio", "pr_root", "pr_all", "probes", "context", "obj", "root"))
    probe_chance = {name: majority_share(y, held)
                    for name, (_, _, y, held) in probe_problems(cfg, single, root, comp).items() if name != "position"}
    # the inner sites; layer0.z is the LayerNorm of the embedding (a per-token rescaling: no mixing across cells)
    inner = [s for s in sites[1:-1] if s != "layer0.z"]
    # the convergence site: C's minimum; without masks C is 0 at the embedding (the same tokens on every board of a
    # root at a position), so there R's
    measure_of_site = "distance" if masked else "ratio"
    best, best_init = (min(inner, key=m[measure_of_site].get) for m in (trained, init))
    best_r, best_r_init = (min(inner, key=m["ratio"].get) for m in (trained, init))
    objects = jnp.asarray(single["root"] >= 0)
    perturb_sites = sites[1:]
    # boards evenly spaced over the probe set (ordered root-major): every root, not the first few
    spread = np.unique(np.linspace(0, len(objects) - 1, cfg.perturb_boards).round().astype(int))
    attractor, attractor_init = (np.asarray(perturbation_distances(
        graphdef, p, jnp.asarray(single["tokens"][spread]), "embed", objects[spread], cfg.perturb_alpha, k_perturb,
        perturb_sites)) for p in (params, init_params))
    # how much noise the trained model absorbs: the object cells it still draws right (the clean board's token)
    drawn = {alpha: float(np.mean((np.argmax(perturbed_outputs(graphdef, params, jnp.asarray(single["tokens"][spread]),
                                                                "embed", objects[spread], alpha, k_perturb), -1)
                                   == single["board"][spread])[np.asarray(objects[spread])]))
             for alpha in (0.0, *cfg.reconstruction_alphas)}

    def fmt(d):
        return ", ".join(f"{s} {d[s]:.3f}" for s in sites)

    def min_over_ends(m, name, site):
        return m[name][site] / min(m[name][sites[0]], m[name][sites[-1]])

    board_set = f"Probe set: {n_roots} roots x {n_pos} positions x {n_bck} backgrounds, token mask {mask_p}"
    conv_r, conv_r_init = min_over_ends(trained, "ratio", best_r), min_over_ends(init, "ratio", best_r_init)
    within = check_below(
        f"{prefix}within_board_convergence_min_over_ends_vs_untrained", conv_r / conv_r_init,
        cfg.max_convergence_vs_untrained,
        f"(R = W / OB at the minimising inner site over the smaller of R at the embedding and the output), trained "
        f"over untrained: trained {conv_r:.3f} at {best_r} (R {ratio[best_r]:.3f}, embedding {ratio[sites[0]]:.3f}, "
        f"output {ratio[sites[-1]]:.3f}), untrained {conv_r_init:.3f} at {best_r_init}. R per site: {fmt(ratio)}; "
        f"untrained: {fmt(init['ratio'])}"
        + ("" if masked else f". Cross-board C per site (0 at the embedding by construction): {fmt(distance)}; "
                             f"untrained: {fmt(init['distance'])}. {board_set}"))
    if masked:
        conv, conv_init = min_over_ends(trained, "distance", best), min_over_ends(init, "distance", best_init)
        checks = [check_below(
            "convergence_min_over_ends_vs_untrained", conv / conv_init, cfg.max_convergence_vs_untrained,
            f"(C at the minimising inner site over the smaller of C at the embedding and the output), trained "
            f"over untrained: trained {conv:.3f} at {best} (C {distance[best]:.3f}, embedding "
            f"{distance[sites[0]]:.3f}, output {distance[sites[-1]]:.3f}), untrained {conv_init:.3f} at "
            f"{best_init}; inner sites exclude layer0.z (the embedding's LayerNorm). C per site: "
            f"{fmt(distance)}; untrained: {fmt(init['distance'])}. {board_set}"), within]
    else:
        checks = [within]
    checks.append(check_below(
        f"{prefix}root_pr_at_convergence_site_over_ends", pr_root[best] / min(pr_root[sites[0]], pr_root[sites[-1]]),
        1.0, f"at {best}: one root's participation ratio {pr_root[best]:.2f} (mean over roots) over the smaller "
             f"of the embedding's ({pr_root[sites[0]]:.2f}) and the output's ({pr_root[sites[-1]]:.2f}); "
             f"d_model {cfg.training.model.d_model}; every root's cells pooled at {best}: {pr_all[best]:.2f}; "
             f"one root's PR per site: {fmt(pr_root)}; untrained: {fmt(init['pr_root'])}"))
    for name, scores in probes.items():
        top, top_init = (max(m, key=m.get) for m in (scores, init["probes"][name]))
        gain = scores[top] - init["probes"][name][top_init]
        checks.append(check_above(
            f"{prefix}probe_{name}_gain_over_untrained", gain, cfg.min_probe_gain,
            f"best held-out {'R^2' if name == 'position' else 'accuracy'} over sites, trained {scores[top]:.3f} "
            f"at {top} minus untrained {init['probes'][name][top_init]:.3f} at {top_init}"
            + ("" if name == "position" else f" (chance {probe_chance[name]:.3f})") + f"; per site: {fmt(scores)}; "
            f"untrained: {fmt(init['probes'][name])}"
            + (f" (held-out positions: {cfg.held_out_positions} of {n_pos})" if name == "root" else "")))
    gap = _gap(context)[best]
    best_gap_init = max(inner, key=_gap(init["context"]).get)  # the untrained model's best inner site
    gap_init = _gap(init["context"])[best_gap_init]
    checks.append(check_above(
        f"{prefix}context_independence_cosine_gap_over_untrained", gap - gap_init, cfg.min_cosine_gap_gain,
        f"gap: cosine of a root's single-board centroid with its double/composite-board centroid minus that with "
        f"other roots' ({context['roots_compared']} of {data.cfg.n_roots} roots are on double or composite "
        f"boards); trained at {best} {gap:.3f} ({context['cos_same'][best]:.3f} vs "
        f"{context['cos_other'][best]:.3f}) minus the untrained model's largest over the inner sites, {gap_init:.3f} "
        f"at {best_gap_init}; gap per site: "
        f"{fmt(_gap(context))}; untrained: {fmt(_gap(init['context']))}. The single-board root probe on double "
        f"boards {context['transfer_double'][best]:.3f}, on composite boards {context['transfer_composite'][best]:.3f} "
        f"(chance {context['chance']['transfer_double']:.3f} and {context['chance']['transfer_composite']:.3f}; "
        f"untrained at {best_init}: {init['context']['transfer_double'][best_init]:.3f}, "
        f"{init['context']['transfer_composite'][best_init]:.3f})"))
    checks.append(check_below(
        f"{prefix}attractor_output_distance_vs_untrained", attractor[-1] / attractor_init[-1],
        cfg.max_attractor_vs_untrained,
        f"noise of norm {cfg.perturb_alpha} |x| on the object cells at embed ({len(spread)} boards): the relative "
        f"distance |perturbed - clean| / |clean| there at the output ({sites[-1]}), trained {attractor[-1]:.3f} over "
        f"untrained {attractor_init[-1]:.3f} (an untrained residual stream shrinks it too: later layers add to it); "
        f"per later site: " + ", ".join(f"{s} {v:.2f}" for s, v in zip(perturb_sites, attractor))
        + "; untrained: " + ", ".join(f"{s} {v:.2f}" for s, v in zip(perturb_sites, attractor_init))
        + ". Object cells still drawn as the clean board's tokens with noise alpha |x| there: "
        + ", ".join(f"alpha {a:g} {v:.3f}" for a, v in drawn.items())))
    figures = [_plot_convergence(sites, distance, ratio, pr_root, pr_all, (attractor, attractor_init), variant,
                                 out_dir),
               _plot_probes(sites, trained, init, variant, out_dir),
               _plot_pca(obj, root, [sites[0], best, sites[-1]], variant, out_dir),
               _plot_distance_maps(trained["distance_map"], [sites[0], best, sites[-1]], variant, out_dir)]
    return checks, figures


def _gap(context: dict) -> dict[str, float]:
    return {s: context["cos_same"][s] - context["cos_other"][s] for s in context["cos_same"]}


def measure(cfg, data, graphdef, params, sites, single, comp, k_double, mask_p: float) -> dict:
    """Every per-site quantity of the checks for one set of parameters: "distance", "ratio", "pr_root", "pr_all"
    ({site: float}), "distance_map" ({site: [3, 3]}: C per object cell), "probes" (probe_scores), "context"
    (context_independence, its double boards masked at mask_p), and "obj" ({site: [N, 9, D]}) and "root" ([N * 9])
    of the single probe boards (single_probe_set) and composite boards comp (composite_set)."""
    n_roots, n_bck = data.cfg.n_roots, data.cfg.n_backgrounds
    cells = ab.footprint(single["x"], single["y"])  # [N, 9]
    root = np.repeat(single["root"][np.arange(len(cells)), cells[:, 0]], 9)  # [N * 9]
    acts = ab.activations(graphdef, params, single["tokens"], sites)
    obj = {s: a[np.arange(len(cells))[:, None], cells] for s, a in acts.items()}  # [N, 9, D]
    objects = jnp.asarray(single["root"] >= 0)
    measured = {s: site_geometry(jnp.asarray(acts[s]), jnp.asarray(obj[s]), objects, jnp.asarray(root), n_roots,
                                 n_bck) for s in sites}
    out = {name: {s: float(m[i]) for s, m in measured.items()}
           for i, name in enumerate(("distance", "ratio", "pr_root", "pr_all"))}
    out["distance_map"] = {s: np.asarray(m[4]).reshape(3, 3) for s, m in measured.items()}
    comp_acts = ab.activations(graphdef, params, comp["tokens"], sites)
    out["probes"] = probe_scores(cfg, sites, probe_problems(cfg, single, root, comp), obj, comp_acts)
    out["context"] = context_independence(cfg, data, graphdef, params, sites, obj, root, k_double, comp, comp_acts,
                                          mask_p)
    return out | {"obj": obj, "root": root}


@partial(jax.jit, static_argnums=(4, 5))
def site_geometry(acts, obj, objects, root, n_roots: int, n_bck: int):
    """(C, R, one root's PR averaged over roots, every root's pooled PR, C per object cell [9]) at one site: acts
    [N, 64, D] of the probe boards (ordered root, position, background), obj [N, 9, D] their object cells, objects
    [N, 64] bool, root [N * 9] the root of each object cell. C compares one root at one position over the
    backgrounds; per cell (the official code's 3 x 3 map), averaged over roots and positions."""
    d = obj.shape[-1]
    per_cell = jnp.mean(jax.vmap(cross_board_distance)(obj.reshape(-1, n_bck, 9, d)), 0)
    ratio = jnp.mean(jax.vmap(within_board_ratio)(acts, objects))
    flat = obj.reshape(-1, d)
    pr_root = jnp.mean(jax.vmap(lambda k: participation_ratio(flat, root == k))(jnp.arange(n_roots)))
    return jnp.mean(per_cell), ratio, pr_root, participation_ratio(flat), per_cell


def probe_problems(cfg, single, root, comp) -> dict[str, tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """{feature: (board set, rows, labels, held)}: the single-board features are read at the probe boards' object
    cells (rows of the [N * 9] cells, root [N * 9] their roots; held: the cfg.held_out_positions positions; the
    masked-root probe only where a cell is masked), composite id and root id at the composite boards' object cells
    (comp: composite_set; rows of its [M, 64] cells; held: composite position (1, 1))."""
    pos = bd.position_of(single["x"], single["y"])
    held_positions = np.unique(pos)[np.linspace(0, len(np.unique(pos)) - 1, cfg.held_out_positions).round()
                                    .astype(int)]
    held = np.repeat(np.isin(pos, held_positions), 9)
    n = len(pos)
    cells = ab.footprint(single["x"], single["y"])
    masked = single["masked"][np.arange(n)[:, None], cells].ravel()
    every = np.ones(n * 9, bool)
    on = comp["root"] >= 0  # [M, 64]
    comp_held = np.broadcast_to((comp["x"] == 1) & (comp["y"] == 1), on.T.shape).T[on]
    return {"root": ("single", every, root, held),
            **({"masked_root": ("single", masked, root[masked], held[masked])} if masked.any() else {}),
            "cell": ("single", every, np.tile(np.arange(9), n), held),
            "background": ("single", every, np.repeat(single["background"], 9), held),
            "position": ("single", every, np.repeat(np.stack([single["x"], single["y"]], 1), 9, axis=0)
                         .astype(np.float32), held),
            "composite": ("composite", on, np.broadcast_to(comp["composite"], on.T.shape).T[on], comp_held),
            "composite_root": ("composite", on, comp["root"][on], comp_held)}


def probe_scores(cfg, sites, problems, obj, comp_acts) -> dict[str, dict[str, float]]:
    """{feature: {site: held-out score}} of probe_problems' problems on the object cells obj ({site: [N, 9, D]})
    of the single probe boards and the composite boards' activations comp_acts ({site: [M, 64, D]})."""
    out = {name: {} for name in problems}
    for s in sites:
        features = {"single": obj[s].reshape(-1, obj[s].shape[-1]), "composite": comp_acts[s]}
        for name, (board_set, rows, y, held) in problems.items():
            f = features[board_set][rows]
            if name == "position":
                out[name][s] = position_r2(f, y, held, cfg.ridge_lam, cfg.standardise_probes)
            else:
                out[name][s] = probe(f, y, lam=cfg.ridge_lam, held_out=held, standardise=cfg.standardise_probes)[
                    "score"]
    return out


def position_r2(features: np.ndarray, xy: np.ndarray, held: np.ndarray, lam: float, standardise: bool) -> float:
    """1 - the held-out rows' squared error of a ridge fit (ridge_fit's standardise) of the position xy [N, 2] on the
    other rows, over the variance of xy over every row (the held-out rows are whole positions, so their own variance
    can be zero)."""
    w = ridge_fit(jnp.asarray(features[~held]), jnp.asarray(xy[~held]), lam, standardise)
    err = np.sum((np.asarray(ridge_predict(w, jnp.asarray(features[held]))) - xy[held]) ** 2, 0)
    return float(np.mean(1 - err / (held.sum() * xy.var(0))))


def centroid_cosines(mu: np.ndarray, mu_other: np.ndarray) -> tuple[float, float]:
    """(mean cosine of each root's centroid in mu with its own in mu_other, mean cosine with other roots' there) over
    the roots with both (mu, mu_other [K, D], a NaN row where a root is absent; NaN where none or one is left).
    Rows with a centroid in both: one root absent from mu_other once made every row NaN."""
    cos = np.asarray(unit(jnp.asarray(mu))) @ np.asarray(unit(jnp.asarray(mu_other))).T  # [K, K]
    present = ~np.isnan(mu).any(1) & ~np.isnan(mu_other).any(1)
    pairs = cos[present][:, present][~np.eye(present.sum(), dtype=bool)]
    return (float(np.mean(np.diag(cos)[present])) if present.any() else float("nan"),
            float(np.mean(pairs)) if pairs.size else float("nan"))


def context_independence(cfg, data, graphdef, params, sites, obj, root, k_double, comps, comp_acts,
                         mask_p: float) -> dict:
    """Per site: mean cosine of each root's single-board centroid with its centroid on double boards (masked at
    mask_p) and composite boards ("cos_same"), with other roots' centroids there ("cos_other"), and the held-out
    accuracy on double and composite boards' object cells of a root probe fit on every single-board object cell;
    "chance": the majority_share of those two transfers ({name: float}); "roots_compared": the roots on both kinds
    of board, over which the cosines are taken (a root drawn on no double board and in no composite has no centroid
    there)."""
    n_roots = data.cfg.n_roots
    rng = np.random.default_rng(int(jax.random.randint(k_double, (), 0, 2**31 - 1)))
    tuples = np.concatenate([data.tuples(split, "double") for split in ("train", "test")])
    doubles = ab.masked_set(data, data.rows("double", tuples[rng.choice(len(tuples), cfg.double_boards)]),
                            mask_p, k_double)
    others = [doubles, comps]
    acts = [ab.activations(graphdef, params, doubles["tokens"], sites), comp_acts]
    out = {k: {} for k in ("cos_same", "cos_other", "transfer_double", "transfer_composite", "chance")}
    out["roots_compared"] = int(np.isin(np.arange(n_roots), np.concatenate([o["root"] for o in others])).sum())
    for s in sites:
        d = obj[s].shape[-1]
        single_f = obj[s].reshape(-1, d)
        mu = ab.centroids(single_f, root, n_roots)
        f_other = np.concatenate([a[s][o["root"] >= 0] for a, o in zip(acts, others)])
        r_other = np.concatenate([o["root"][o["root"] >= 0] for o in others])
        mu_other = ab.centroids(f_other, r_other, n_roots)
        out["cos_same"][s], out["cos_other"][s] = centroid_cosines(mu, mu_other)
        for name, a, o in zip(("transfer_double", "transfer_composite"), acts, others):
            f = a[s][o["root"] >= 0]
            both = np.concatenate([single_f, f])
            held = np.r_[np.zeros(len(single_f), bool), np.ones(len(f), bool)]
            labels = np.concatenate([root, o["root"][o["root"] >= 0]])
            out[name][s] = probe(both, labels, lam=cfg.ridge_lam, held_out=held, standardise=cfg.standardise_probes)[
                "score"]
            out["chance"][name] = majority_share(labels, held)
    return out


def _short(site: str) -> str:
    return site.replace("layer", "L").replace(".resid_", ".").replace("unembed.in", "out")


def _plot_convergence(sites, distance, ratio, pr_root, pr_all, attractors, variant, out_dir) -> str:
    """attractors: the relative distances at sites[1:] of the trained and the untrained model."""
    fig, axes = new_figure(3, size=(5.5, 3.4))
    x = np.arange(len(sites))
    axes[0, 0].plot(x, [distance[s] for s in sites], marker="o", label="cross-board C")
    axes[0, 0].plot(x, [ratio[s] for s in sites], marker="s", label="within-board R = W / OB")
    axes[0, 0].set(ylabel="unit distance", title=f"convergence across depth ({variant} boards)")
    axes[0, 1].plot(x, [pr_root[s] for s in sites], marker="o", label="one root (mean)")
    axes[0, 1].plot(x, [pr_all[s] for s in sites], marker="s", label="every root pooled")
    axes[0, 1].set(ylabel="participation ratio", title="dimensionality of the object cells")
    for curve, style, label in zip(attractors, ("o-", "s--"), ("trained", "untrained")):
        axes[0, 2].plot(x[1:], curve, style, label=label)
    axes[0, 2].set(ylabel="|perturbed - clean| / |clean|", title="noise on the object cells at embed")
    for ax in axes[0]:
        ax.set_xticks(x, [_short(s) for s in sites], rotation=90, fontsize=6)
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir, prefix_of(variant) + "convergence")


def _plot_probes(sites, trained, init, variant, out_dir) -> str:
    """Per site the held-out probe scores and the context-independence measures (trained and init: measure's
    "probes" and "context"), the untrained model's dotted in the same colour: every check scores the trained model
    against them. The y-range reaches the lowest score (a position R^2 can be negative)."""
    fig, axes = new_figure(2, size=(5.5, 3.4))
    x = np.arange(len(sites))
    low = [0.0, 0.0]  # per panel the lowest score drawn

    def both(col, scores, untrained, label, style="-", color=None):  # scores, untrained: {site: value}
        ys = [[m[s] for s in sites] for m in (scores, untrained)]
        (line,) = axes[0, col].plot(x, ys[0], style, color=color, marker=".", label=label)
        axes[0, col].plot(x, ys[1], ":", color=line.get_color(), lw=1)
        low[col] = min(low[col], *ys[0], *ys[1])

    for name in trained["probes"]:
        if name != "position":
            both(0, trained["probes"][name], init["probes"][name], name)
    both(0, trained["probes"]["position"], init["probes"]["position"], "position (R^2)", "--", "k")
    for name in ("cos_same", "cos_other", "transfer_double", "transfer_composite"):
        both(1, trained["context"][name], init["context"][name], name)
    both(1, _gap(trained["context"]), _gap(init["context"]), "gap: cos_same - cos_other (checked)")
    axes[0, 0].set(ylabel="held-out score", title=f"linear probes ({variant} boards; dotted: untrained)")
    axes[0, 1].set(title="context independence (single vs double / composite;\ndotted: untrained)")
    for ax, bottom in zip(axes[0], low):
        ax.set(ylim=(bottom - 0.05, 1.05))
        ax.set_xticks(x, [_short(s) for s in sites], rotation=90, fontsize=6)
        ax.legend(fontsize=6)
        ax.title.set_fontsize(9)
    return save_figure(fig, out_dir, prefix_of(variant) + "probes_and_context")


def _plot_pca(obj, root, sites, variant, out_dir) -> str:
    fig, axes = new_figure(len(sites), size=(3.4, 3.2))
    for ax, s in zip(axes[0], sites):
        f = obj[s].reshape(len(root), -1)
        f = f - f.mean(0)
        proj = f @ np.linalg.svd(f, full_matrices=False)[2][:2].T
        ax.scatter(proj[:, 0], proj[:, 1], c=root, cmap="tab10", s=2, alpha=0.5)
        ax.set(title=f"{s}: object cells by root ({variant})", xlabel="PC1", ylabel="PC2")
        ax.title.set_fontsize(8)
    return save_figure(fig, out_dir, prefix_of(variant) + "pca_by_root")


def _plot_distance_maps(maps: dict[str, np.ndarray], sites, variant, out_dir) -> str:
    """The cross-board distance C of each of the 9 object cells (maps {site: [3, 3]}) at `sites`, one colour scale."""
    fig, axes = new_figure(len(sites), size=(3.0, 2.8))
    top = max(float(maps[s].max()) for s in sites) or 1.0
    for ax, s in zip(axes[0], sites):
        image = ax.imshow(maps[s], vmin=0, vmax=top, cmap="viridis")
        for (i, j), v in np.ndenumerate(maps[s]):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 * top else "k")
        ax.set(title=f"{_short(s)}: C per object cell ({variant})", xticks=[], yticks=[])
        ax.title.set_fontsize(8)
    fig.colorbar(image, ax=axes[0, -1], shrink=0.8)
    return save_figure(fig, out_dir, prefix_of(variant) + "cross_board_distance_maps")


def prefix_of(variant: str) -> str:
    """What a variant's check names and figure files start with: nothing for the masked one, "unmasked_"."""
    return "" if variant == "masked" else f"{variant}_"
