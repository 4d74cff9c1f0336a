"""Ferry et al. 2023, geometry: object cells converge onto low-dimensional abstractions that encode every feature.

On the training run's model (experiments/common/abstractions.py; trained first if missing), at every [T, D]
site in depth order (the residual stream, the LayerNorm outputs z and mlp_in, the attention and MLP updates):

- convergence: the official cross-board unit distance C (one root at one position on every background, each
  board with its own token mask; the 9 cells' mean, averaged over roots and positions) and the within-board
  ratio R = W / OB (the object's cells among themselves vs against the background cells);
- dimensionality: the participation ratio of one root's object cells (over cells, positions, backgrounds,
  masks), averaged over roots, and of every root's cells pooled;
- ridge probes on single cells, scored on held-out board positions: root id (all object cells, and masked
  object cells only, which are UNK at the embedding), cell index in the 3x3 pattern, background, the object's
  position (R^2 of its top-left row and column) and, on composite boards (a composite position held out),
  the composite id and the root id;
- a PCA scatter of the object cells coloured by root at the embedding, the convergence site and the output;
- the attractor test: noise of norm alpha |x| on the object cells at the embedding, followed through the sites;
- context independence: the cosine between a root's centroid from single boards and from double and composite
  boards (against different roots' centroids), and the single-board root probe applied to double and
  composite boards.

The probe protocols are the notes' reconstructions ([R] in shared/papers/abstractions_ferry2023.md, Section 6);
the probe set's size, mask rate, held-out positions and ridge penalty are ours (Config).

What the quick preset shows (the quick training run's model; under a minute): transient convergence. The
cross-board distance is 0.54 at the embedding (the masks differ), 0.57 at the output, and falls to 0.27 at the
second block's attention output (layer1.attn.out), where the within-board ratio R is 0.14 (0.86 at the
embedding): the object's 9 cells are written alike there. One root's participation ratio is lowest there too
(2.0, against 4.4 at the embedding and 7.3 at the output, of 64 dimensions). Every feature is decodable on
held-out positions somewhere: root 0.93, root from masked cells 0.95 (chance at the embedding, by
construction), cell index 0.76, background 0.49, position R^2 0.98, composite id 0.76, a composite's roots 0.99.
Context independence: at layer1.attn.out a root's single-board centroid has cosine 0.80 with its centroid on
double and composite boards (0.15 with other roots'), and the single-board root probe reads double boards at
0.86 and composites at 0.90. Noise on the object cells at the embedding shrinks from 0.5 |x| to 0.15-0.2 within
the first two blocks (the attractor test).
"""

import dataclasses
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from experiments.abstractions_training import PRESETS as TRAINING_PRESETS
from experiments.common import abstractions as ab
from experiments.common.figures import new_figure, save_figure
from experiments.common.result import Check, Outcome, check_above, check_below
from jaxicl.analysis.convergence import cross_board_distance, participation_ratio, unit, within_board_ratio
from jaxicl.analysis.perturbation import perturbation_distances
from jaxicl.analysis.probes import probe, ridge_fit, ridge_predict
from jaxicl.tasks import boards as bd
from jaxicl.validation import check_positive, check_range

CHANCE = {"root": 0.1, "masked_root": 0.1, "cell": 1 / 9, "background": 0.1, "position": 0.0, "composite": 0.2,
          "composite_root": 0.1}


@dataclasses.dataclass(frozen=True)
class Config:
    training: ab.Training = TRAINING_PRESETS["quick"].training
    probe_positions: int = 12  # top-left positions of the single-board probe set (evenly spaced over the 36)
    held_out_positions: int = 3  # of those, the ones the probes are scored on
    mask_p: float = 0.25  # token mask of the probe boards (one fixed mask per board)
    double_boards: int = 600  # double boards of the context-independence analysis
    ridge_lam: float = 1.0
    perturb_alpha: float = 0.5
    perturb_boards: int = 200
    min_probe_over_chance: float = 2.0  # best held-out accuracy / chance (position: R^2 above min_position_r2)
    min_position_r2: float = 0.5

    def __post_init__(self):
        check_range("probe_positions", self.probe_positions, 2, bd.POSITIONS)
        check_range("held_out_positions", self.held_out_positions, 1, self.probe_positions - 1)
        check_range("mask_p", self.mask_p, 0.0, 1.0)
        for name in ("double_boards", "perturb_boards"):
            check_positive(name, getattr(self, name))
        check_positive("ridge_lam", self.ridge_lam)


PRESETS = {"smoke": Config(training=TRAINING_PRESETS["smoke"].training, probe_positions=3, held_out_positions=1,
                           double_boards=40, perturb_boards=20),
           "quick": Config(),
           "full": Config(training=TRAINING_PRESETS["full"].training, probe_positions=bd.POSITIONS,
                          held_out_positions=9, double_boards=4000, perturb_boards=1000)}


def run(cfg: Config, out_dir: str) -> Outcome:
    data, graphdef, params, _ = ab.trained(cfg.training, os.path.dirname(out_dir))
    sites = ab.residual_sites(graphdef, params)
    key = jax.random.key(cfg.training.train.seed + 20)
    k_probe, k_double, k_comp, k_perturb = jax.random.split(key, 4)
    single = ab.single_probe_set(data, cfg.probe_positions, cfg.mask_p, k_probe)
    n_roots, n_bck = data.cfg.n_roots, data.cfg.n_backgrounds
    n_pos = len(np.unique(bd.position_of(single["x"], single["y"])))
    cells = ab.footprint(single["x"], single["y"])  # [N, 9]
    root = np.repeat(single["root"][np.arange(len(cells)), cells[:, 0]], 9)  # [N * 9]
    acts = ab.activations(graphdef, params, single["tokens"], sites)
    obj = {s: a[np.arange(len(cells))[:, None], cells] for s, a in acts.items()}  # [N, 9, D]

    objects = jnp.asarray(single["root"] >= 0)
    measured = {s: site_geometry(jnp.asarray(acts[s]), jnp.asarray(obj[s]), objects, jnp.asarray(root), n_roots,
                                 n_bck) for s in sites}
    distance, ratio, pr_root, pr_all = ({s: float(m[i]) for s, m in measured.items()} for i in range(4))
    inner = sites[1:-1]
    best = min(inner, key=distance.get)

    comp = ab.composite_set(data, cfg.mask_p, k_comp)  # every composite, masked: the probes and context share it
    comp_acts = ab.activations(graphdef, params, comp["tokens"], sites)
    probes = probe_scores(cfg, sites, single, obj, root, comp, comp_acts)
    context = context_independence(cfg, data, graphdef, params, sites, obj, root, k_double, comp, comp_acts)
    perturb_sites = sites[1:]
    attractor = np.asarray(perturbation_distances(graphdef, params, jnp.asarray(single["tokens"][:cfg.perturb_boards]),
                                                  "embed", objects[:cfg.perturb_boards], cfg.perturb_alpha,
                                                  k_perturb, perturb_sites))

    def fmt(d):
        return ", ".join(f"{s} {d[s]:.3f}" for s in sites)

    ends = min(distance[sites[0]], distance[sites[-1]])
    checks = [
        check_below("convergence_min_over_ends", distance[best] / ends, 1.0,
                    f"cross-board unit distance C at the minimising inner site {best} ({distance[best]:.3f}) over the "
                    f"smaller of the embedding's ({distance[sites[0]]:.3f}) and the output's "
                    f"({distance[sites[-1]]:.3f}); C per site: {fmt(distance)}. Within-board ratio R per site: "
                    f"{fmt(ratio)}. Probe set: {n_roots} roots x {n_pos} positions x {n_bck} backgrounds, token "
                    f"mask {cfg.mask_p}"),
        check_below("root_pr_at_convergence_site_over_ends", pr_root[best] / min(pr_root[sites[0]],
                                                                                  pr_root[sites[-1]]), 1.0,
                    f"at {best}: one root's participation ratio {pr_root[best]:.2f} (mean over roots) over the smaller "
                    f"of the embedding's ({pr_root[sites[0]]:.2f}) and the output's ({pr_root[sites[-1]]:.2f}); "
                    f"d_model {cfg.training.model.d_model}; every root's cells pooled at {best}: {pr_all[best]:.2f}; "
                    f"one root's PR per site: {fmt(pr_root)}"),
    ]
    for name, scores in probes.items():
        top = max(scores, key=scores.get)
        note = (f"best site {top}; held-out {'R^2' if name == 'position' else 'accuracy'} per site: {fmt(scores)}"
                + (f" (held-out positions: {cfg.held_out_positions} of {n_pos})" if name == "root" else ""))
        if name == "position":
            checks.append(check_above("probe_position_r2", scores[top], cfg.min_position_r2, note))
        else:
            checks.append(check_above(f"probe_{name}_over_chance", scores[top] / CHANCE[name],
                                      cfg.min_probe_over_chance, f"chance {CHANCE[name]:.3f}; {note}"))
    gap = context["cos_same"][best] - context["cos_other"][best]
    checks.append(Check(
        "context_independence_cosine_gap", float(gap), "> 0", bool(gap > 0),
        f"at {best}: cosine of a root's single-board centroid with its double/composite-board centroid "
        f"{context['cos_same'][best]:.3f} vs with other roots' {context['cos_other'][best]:.3f}; the single-board "
        f"root probe on double boards {context['transfer_double'][best]:.3f}, on composite boards "
        f"{context['transfer_composite'][best]:.3f} (chance 0.1). Attractor test (noise {cfg.perturb_alpha} |x| "
        f"on the object cells at embed), relative distance per later site: "
        + ", ".join(f"{s} {v:.2f}" for s, v in zip(perturb_sites, attractor))))
    figures = [_plot_convergence(sites, distance, ratio, pr_root, pr_all, attractor, out_dir),
               _plot_probes(sites, probes, context, out_dir),
               _plot_pca(obj, root, [sites[0], best, sites[-1]], out_dir)]
    return Outcome(checks, figures)


@partial(jax.jit, static_argnums=(4, 5))
def site_geometry(acts, obj, objects, root, n_roots: int, n_bck: int):
    """(C, R, one root's PR averaged over roots, every root's pooled PR) at one site: acts [N, 64, D] of the probe
    boards (ordered root, position, background), obj [N, 9, D] their object cells, objects [N, 64] bool, root
    [N * 9] the root of each object cell. C compares one root at one position over the backgrounds."""
    d = obj.shape[-1]
    distance = jnp.mean(jax.vmap(cross_board_distance)(obj.reshape(-1, n_bck, 9, d)))
    ratio = jnp.mean(jax.vmap(within_board_ratio)(acts, objects))
    flat = obj.reshape(-1, d)
    pr_root = jnp.mean(jax.vmap(lambda k: participation_ratio(flat, root == k))(jnp.arange(n_roots)))
    return distance, ratio, pr_root, participation_ratio(flat)


def probe_scores(cfg, sites, single, obj, root, comp, comp_acts) -> dict[str, dict[str, float]]:
    """{feature: {site: held-out score}} for the single-board features and, on composite boards, composite id
    and root id (comp: composite_set, comp_acts its activations; composite position (1, 1) held out)."""
    pos = bd.position_of(single["x"], single["y"])
    held_positions = np.unique(pos)[np.linspace(0, len(np.unique(pos)) - 1, cfg.held_out_positions).round()
                                    .astype(int)]
    held = np.repeat(np.isin(pos, held_positions), 9)
    n = len(pos)
    cells = ab.footprint(single["x"], single["y"])
    masked = single["masked"][np.arange(n)[:, None], cells].ravel()
    targets = {"root": root, "cell": np.tile(np.arange(9), n), "background": np.repeat(single["background"], 9),
               "position": np.repeat(np.stack([single["x"], single["y"]], 1), 9, axis=0).astype(np.float32)}
    out = {name: {} for name in ("root", "masked_root", "cell", "background", "position", "composite",
                                 "composite_root")}
    on = comp["root"] >= 0  # [M, 64]
    comp_held = np.broadcast_to((comp["x"] == 1) & (comp["y"] == 1), on.T.shape).T[on]
    for s in sites:
        f = obj[s].reshape(n * 9, -1)
        for name, y in targets.items():
            if name == "position":
                out[name][s] = position_r2(f, y, held, cfg.ridge_lam)
            else:
                out[name][s] = probe(f, y, lam=cfg.ridge_lam, held_out=held)["score"]
        out["masked_root"][s] = probe(f[masked], root[masked], lam=cfg.ridge_lam, held_out=held[masked])["score"]
        fc = comp_acts[s][on]
        out["composite"][s] = probe(fc, np.broadcast_to(comp["composite"], on.T.shape).T[on], lam=cfg.ridge_lam,
                                    held_out=comp_held)["score"]
        out["composite_root"][s] = probe(fc, comp["root"][on], lam=cfg.ridge_lam, held_out=comp_held)["score"]
    return out


def position_r2(features: np.ndarray, xy: np.ndarray, held: np.ndarray, lam: float) -> float:
    """1 - the held-out rows' squared error of a ridge fit of the position xy [N, 2] on the other rows, over the
    variance of xy over every row (the held-out rows are whole positions, so their own variance can be zero)."""
    w = ridge_fit(jnp.asarray(features[~held]), jnp.asarray(xy[~held]), lam)
    err = np.sum((np.asarray(ridge_predict(w, jnp.asarray(features[held]))) - xy[held]) ** 2, 0)
    return float(np.mean(1 - err / (held.sum() * xy.var(0))))


def context_independence(cfg, data, graphdef, params, sites, obj, root, k_double, comps, comp_acts) -> dict:
    """Per site: mean cosine of each root's single-board centroid with its centroid on double and composite
    boards ("cos_same"), with other roots' centroids there ("cos_other"), and the held-out accuracy on double
    and composite boards' object cells of a root probe fit on every single-board object cell."""
    n_roots = data.cfg.n_roots
    rng = np.random.default_rng(int(jax.random.randint(k_double, (), 0, 2**31 - 1)))
    tuples = np.concatenate([data.tuples(split, "double") for split in ("train", "test")])
    doubles = ab.masked_set(data, data.rows("double", tuples[rng.choice(len(tuples), cfg.double_boards)]),
                            cfg.mask_p, k_double)
    others = [doubles, comps]
    acts = [ab.activations(graphdef, params, doubles["tokens"], sites), comp_acts]
    out = {k: {} for k in ("cos_same", "cos_other", "transfer_double", "transfer_composite")}
    for s in sites:
        d = obj[s].shape[-1]
        single_f = obj[s].reshape(-1, d)
        mu = ab.centroids(single_f, root, n_roots)
        f_other = np.concatenate([a[s][o["root"] >= 0] for a, o in zip(acts, others)])
        r_other = np.concatenate([o["root"][o["root"] >= 0] for o in others])
        mu_other = ab.centroids(f_other, r_other, n_roots)
        cos = np.asarray(unit(jnp.asarray(mu))) @ np.asarray(unit(jnp.asarray(mu_other))).T  # [K, K]
        present = ~np.isnan(cos).any(1)
        out["cos_same"][s] = float(np.mean(np.diag(cos)[present]))
        out["cos_other"][s] = float(np.mean(cos[present][:, present][~np.eye(present.sum(), dtype=bool)]))
        for name, a, o in zip(("transfer_double", "transfer_composite"), acts, others):
            f = a[s][o["root"] >= 0]
            both = np.concatenate([single_f, f])
            held = np.r_[np.zeros(len(single_f), bool), np.ones(len(f), bool)]
            out[name][s] = probe(both, np.concatenate([root, o["root"][o["root"] >= 0]]), lam=cfg.ridge_lam,
                                 held_out=held)["score"]
    return out


def _short(site: str) -> str:
    return site.replace("layer", "L").replace(".resid_", ".").replace("unembed.in", "out")


def _plot_convergence(sites, distance, ratio, pr_root, pr_all, attractor, out_dir) -> str:
    fig, axes = new_figure(3, size=(5.5, 3.4))
    x = np.arange(len(sites))
    axes[0, 0].plot(x, [distance[s] for s in sites], marker="o", label="cross-board C")
    axes[0, 0].plot(x, [ratio[s] for s in sites], marker="s", label="within-board R = W / OB")
    axes[0, 0].set(ylabel="unit distance", title="convergence across depth")
    axes[0, 1].plot(x, [pr_root[s] for s in sites], marker="o", label="one root (mean)")
    axes[0, 1].plot(x, [pr_all[s] for s in sites], marker="s", label="every root pooled")
    axes[0, 1].set(ylabel="participation ratio", title="dimensionality of the object cells")
    axes[0, 2].plot(x[1:], attractor, marker="o")
    axes[0, 2].set(ylabel="|perturbed - clean| / |clean|", title="noise on the object cells at embed")
    for ax in axes[0]:
        ax.set_xticks(x, [_short(s) for s in sites], rotation=90, fontsize=6)
    for ax in axes[0, :2]:
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir, "convergence")


def _plot_probes(sites, probes, context, out_dir) -> str:
    fig, axes = new_figure(2, size=(5.5, 3.4))
    x = np.arange(len(sites))
    for name, scores in probes.items():
        if name != "position":
            axes[0, 0].plot(x, [scores[s] for s in sites], marker=".", label=name)
    axes[0, 0].plot(x, [probes["position"][s] for s in sites], "k--", label="position (R^2)")
    axes[0, 0].set(ylabel="held-out score", ylim=(-0.05, 1.05), title="linear probes (held-out positions)")
    for name in ("cos_same", "cos_other", "transfer_double", "transfer_composite"):
        axes[0, 1].plot(x, [context[name][s] for s in sites], marker=".", label=name)
    axes[0, 1].set(ylim=(-0.05, 1.05), title="context independence (single vs double / composite)")
    for ax in axes[0]:
        ax.set_xticks(x, [_short(s) for s in sites], rotation=90, fontsize=6)
        ax.legend(fontsize=6)
    return save_figure(fig, out_dir, "probes_and_context")


def _plot_pca(obj, root, sites, out_dir) -> str:
    fig, axes = new_figure(len(sites), size=(3.4, 3.2))
    for ax, s in zip(axes[0], sites):
        f = obj[s].reshape(len(root), -1)
        f = f - f.mean(0)
        proj = f @ np.linalg.svd(f, full_matrices=False)[2][:2].T
        ax.scatter(proj[:, 0], proj[:, 1], c=root, cmap="tab10", s=2, alpha=0.5)
        ax.set(title=f"{s}: object cells by root", xlabel="PC1", ylabel="PC2")
        ax.title.set_fontsize(8)
    return save_figure(fig, out_dir, "pca_by_root")
