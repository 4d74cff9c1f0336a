"""The three abstractions experiments (Ferry et al. 2023): one shared training run, every check and figure written;
edits at each site against one patch per site; the probe-set helpers against the renderer."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.common import abstractions as ab
from experiments.common.runner import run_experiment
from jaxicl.analysis.steering import edit_each_site
from jaxicl.models import apply
from jaxicl.models.factor_transformer import FactorTransformer
from jaxicl.sites import Patch
from jaxicl.tasks import boards as bd


@pytest.fixture(scope="module")
def model():
    m = FactorTransformer(rngs=nnx.Rngs(0))
    m.pos_table[...] = jax.random.normal(jax.random.key(1), m.pos_table.shape)
    return nnx.split(m, nnx.Param)


def test_edit_each_site_equals_one_patch_per_site(model):
    graphdef, params = model
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 21, (3, 64)))
    sites = ["embed", "layer0.resid_mid", "layer2.mlp.out"]
    masks = rng.random((3, 64)) < 0.2
    values = rng.normal(size=(3, 3, 64, 64)).astype(np.float32)
    deltas = rng.normal(size=(3, 3, 64, 64)).astype(np.float32)
    for kw in ({"values": values}, {"deltas": deltas}, {"values": values, "deltas": deltas}):
        got = np.asarray(edit_each_site(graphdef, params, tokens, sites, masks, **kw))
        assert got.shape == (3, 3, 64, 21)
        for i, s in enumerate(sites):
            for b in range(3):
                m = jnp.asarray(masks[b])[:, None]
                patch = Patch(values={s: values[i, b]} if "values" in kw else {},
                              masks={s: m} if "values" in kw else {},
                              deltas={s: jnp.where(m, deltas[i, b], 0.0)} if "deltas" in kw else {})
                want = apply(graphdef, params, tokens[b], patch=patch)[0]
                np.testing.assert_allclose(got[i, b], want, rtol=1e-4, atol=1e-4)
    # zero deltas, and a site replaced by its own values, leave the logits as they are
    clean, cache = jax.vmap(lambda t: apply(graphdef, params, t, capture=sites))(tokens)
    own = np.stack([cache[s] for s in sites])
    for kw in ({"deltas": np.zeros_like(deltas)}, {"values": own}):
        got = np.asarray(edit_each_site(graphdef, params, tokens, sites, masks, **kw))
        np.testing.assert_allclose(got, np.broadcast_to(clean, got.shape), rtol=1e-5, atol=1e-5)


def test_edit_each_site_rejects_bad_input_naming_it(model):
    graphdef, params = model
    tokens = jnp.zeros((2, 64), jnp.int32)
    masks = np.zeros((2, 64), bool)
    with pytest.raises(ValueError, match="unknown site name"):
        edit_each_site(graphdef, params, tokens, ["layer7.z"], masks, deltas=np.zeros((1, 2, 64, 64)))
    with pytest.raises(ValueError, match="one \\[T, D\\] shape"):
        edit_each_site(graphdef, params, tokens, ["embed", "layer0.attn.q"], masks, deltas=np.zeros((2, 2, 64, 64)))
    with pytest.raises(ValueError, match="needs values, deltas or both"):
        edit_each_site(graphdef, params, tokens, ["embed"], masks)
    with pytest.raises(ValueError, match="deltas must have shape"):
        edit_each_site(graphdef, params, tokens, ["embed"], masks, deltas=np.zeros((2, 64, 64)))
    with pytest.raises(ValueError, match="masks must have shape"):
        edit_each_site(graphdef, params, tokens, ["embed"], masks[:, :8], deltas=np.zeros((1, 2, 64, 64)))


def test_probe_sets_follow_the_renderer():
    data = bd.build(bd.Boards())
    single = ab.single_probe_set(data, 4, 0.25, jax.random.key(0))
    assert single["tokens"].shape == (10 * 4 * 10, 64)
    cells = ab.footprint(single["x"], single["y"])
    rows = np.arange(len(cells))[:, None]
    # the footprint is exactly the object's cells, in cell-index order, and the mask has the asked rate
    np.testing.assert_array_equal(np.sort(cells, 1), np.stack([np.flatnonzero(r >= 0) for r in single["root"]]))
    np.testing.assert_array_equal(single["cell"][rows, cells], np.broadcast_to(np.arange(9), cells.shape))
    root = single["root"][rows[:, 0], cells[:, 0]]
    np.testing.assert_array_equal(single["board"][rows, cells], 10 + data.roots.reshape(10, 9)[root])
    assert abs(single["masked"].mean() - 0.25) < 0.02  # 25,600 cells: 4 standard errors
    np.testing.assert_array_equal(single["tokens"], np.where(single["masked"], 20, single["board"]))
    x = np.random.default_rng(0).normal(size=(50, 3))
    labels = np.arange(50) % 4
    np.testing.assert_allclose(ab.centroids(x, labels, 5)[:4], [x[labels == k].mean(0) for k in range(4)])
    assert np.isnan(ab.centroids(x, labels, 5)[4]).all()


def test_a_drawn_board_gives_each_token_its_own_colour_and_unk_grey():
    """draw_board (example boards, steering examples): imshow(cmap="tab20b", vmin=0, vmax=20) drew UNK (20) in the
    colour of object colour 9 (token 19), so masked cells looked like visible ones."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    board = np.arange(64) % bd.Boards().vocab_size  # every token, 0..20
    image = ab.draw_board(ax, board)
    plt.close(fig)
    np.testing.assert_array_equal(image.get_array(), board.reshape(8, 8))
    rgba = image.to_rgba(np.arange(bd.Boards().vocab_size))
    assert len(np.unique(rgba, axis=0)) == 21  # 21 tokens, 21 colours: UNK differs from every colour token
    np.testing.assert_array_equal(rgba[bd.Boards().unk], [0.5, 0.5, 0.5, 1.0])  # grey


def test_probe_chance_is_the_training_majority_share_of_the_held_out_rows():
    """The composite boards' root labels are unbalanced (four roots drawn with replacement from a few composites), so
    the composite-root probe's chance is the constant predictor's score, not 1 / n_roots."""
    from collections import Counter

    from experiments.abstractions_geometry import Config, majority_share, probe_problems

    data = bd.build(bd.Boards())
    single = ab.single_probe_set(data, 4, 0.25, jax.random.key(0))
    cells = ab.footprint(single["x"], single["y"])
    root = np.repeat(single["root"][np.arange(len(cells)), cells[:, 0]], 9)
    problems = probe_problems(Config(), single, root, ab.composite_set(data, 0.25, jax.random.key(1)))
    for name, (_, _, y, held) in problems.items():
        if name != "position":
            counts = Counter(y[~held].tolist())
            tops = [k for k, c in counts.items() if c == max(counts.values())]  # a tie: each equally likely
            expected = np.mean([sum(v == top for v in y[held]) / held.sum() for top in tops])
            assert majority_share(y, held) == pytest.approx(expected, rel=1e-12), name
    _, rows, y, held = problems["composite_root"]
    assert len(y) == rows.sum() and 0 < held.sum() < len(y)
    assert majority_share(y, held) > 1.5 / data.cfg.n_roots  # unbalanced: far above 1 / n_roots
    assert majority_share(np.array([0, 0, 1, 0, 1, 2]), np.array([0, 0, 0, 1, 1, 1], bool)) == 1 / 3  # class 0
    # balanced training labels tie: class 0 alone (absent from the held-out rows) made the chance 0 where the
    # composites' roots left root 0 out
    assert majority_share(np.array([0, 1, 2, 1, 2, 2]), np.array([0, 0, 0, 1, 1, 1], bool)) == pytest.approx(1 / 3)


def test_centroid_cosines_skip_a_root_absent_from_one_side():
    """Roots 0, 1 and 7 are in no composite: with few double boards one of them had no centroid there, and its NaN
    column made every root count as absent (both cosines NaN, the context-independence check NaN)."""
    from experiments.abstractions_geometry import centroid_cosines

    mu = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    other = np.array([[3.0, 0.0], [1.0, 1.0], [np.nan, np.nan]])  # root 2 absent
    same, across = centroid_cosines(mu, other)
    # by hand over roots 0 and 1: cos(mu0, o0) = 1, cos(mu1, o1) = 1/sqrt(2); across: cos(mu0, o1), cos(mu1, o0)
    assert same == pytest.approx((1 + 2 ** -0.5) / 2) and across == pytest.approx((2 ** -0.5 + 0) / 2)
    assert all(np.isnan(centroid_cosines(mu, np.full_like(mu, np.nan))))
    assert np.isnan(centroid_cosines(mu[:1], other[:1])[1])  # one root: no pair of different roots


def test_unmasked_probe_boards_have_c_zero_at_the_embedding_and_no_masked_root_probe(model):
    """Why the geometry's unmasked variant checks R, not C: without masks every board of one root at one position
    holds the same object tokens, so the cross-board distance C is exactly 0 at the embedding (with masks it is
    not), while the within-board ratio R is defined there; and with no masked cell there is no masked-root probe."""
    from experiments.abstractions_geometry import Config, probe_problems, site_geometry

    graphdef, params = model
    data = bd.build(bd.Boards())
    for mask_p in (0.0, 0.25):
        single = ab.single_probe_set(data, 2, mask_p, jax.random.key(0))
        cells = ab.footprint(single["x"], single["y"])
        root = np.repeat(single["root"][np.arange(len(cells)), cells[:, 0]], 9)
        embed = ab.activations(graphdef, params, single["tokens"], ["embed"])["embed"]
        obj = embed[np.arange(len(cells))[:, None], cells]
        c, r, _, _, per_cell = site_geometry(jnp.asarray(embed), jnp.asarray(obj), jnp.asarray(single["root"] >= 0),
                                             jnp.asarray(root), data.cfg.n_roots, data.cfg.n_backgrounds)
        c, r = float(c), float(r)
        # C per object cell, brute force in float64: unit vectors of one root at one position over the backgrounds
        groups = obj.reshape(-1, data.cfg.n_backgrounds, 9, obj.shape[-1]).astype(np.float64)
        u = groups / np.linalg.norm(groups, axis=-1, keepdims=True)
        pairs = [(a, b) for a in range(groups.shape[1]) for b in range(a + 1, groups.shape[1])]
        brute = np.mean([np.linalg.norm(u[:, a] - u[:, b], axis=-1) for a, b in pairs], axis=(0, 1))  # [9]
        np.testing.assert_allclose(per_cell, brute, rtol=1e-5, atol=1e-6)  # float32 norms of 64-dim vectors
        problems = probe_problems(Config(), single, root, ab.composite_set(data, mask_p, jax.random.key(1)))
        if mask_p == 0:
            assert c < 1e-6 and 0.1 < r < 2 and "masked_root" not in problems  # identical vectors: 0 up to rounding
        else:
            assert c > 0.1 and "masked_root" in problems


def test_manipulation_checks_read_only_sites_a_later_attention_reads(model):
    """Not the embedding or its LayerNorm, nothing after the last block's z (there an edit of the scored cells decides
    what they draw by construction): for the 3-layer model, layer0's attention output up to layer2.z."""
    from experiments.abstractions_manipulation import checked_sites

    sites = ab.residual_sites(*model)
    assert sites[0] == "embed" and sites[-1] == "unembed.in" and len(sites) == 20
    block = ["attn.out", "resid_mid", "mlp_in", "mlp.out", "resid_post"]
    want = [f"layer0.{s}" for s in block] + ["layer1.z"] + [f"layer1.{s}" for s in block] + ["layer2.z"]
    assert [sites[i] for i in checked_sites(sites)] == want


def test_shown_root_against_a_loop_over_roots():
    data = bd.build(bd.Boards())
    single = ab.single_probe_set(data, 36, 0.0, jax.random.key(0))
    x, y, bck = single["x"], single["y"], single["background"]
    k = single["root"][np.arange(len(x)), ab.footprint(x, y)[:, 0]]
    np.testing.assert_array_equal(ab.shown_root(single["board"], x, y, bck, data.roots), k)  # clean boards
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(single["board"].shape) < 0.15, rng.integers(0, 20, single["board"].shape),
                     single["board"])  # wrong colours and wrong background cells
    scrambled = single["board"].copy()  # a random colour on every object cell, a clean background
    np.put_along_axis(scrambled, ab.footprint(x, y), rng.integers(10, 20, (len(x), 9)), 1)
    few = 0  # boards whose unique best root agrees on fewer than 5 cells
    for boards in (noisy, scrambled):
        got = ab.shown_root(boards, x, y, bck, data.roots)
        for i in range(len(boards)):
            cells = ab.footprint(x[i:i + 1], y[i:i + 1])[0]
            off = np.setdiff1d(np.arange(64), cells)
            agree = [sum(boards[i, c] == 10 + data.roots[r].ravel()[j] for j, c in enumerate(cells))
                     for r in range(10)]
            unique_best = sorted(agree)[-1] > sorted(agree)[-2]
            clean = np.all(boards[i, off] == bck[i])
            few += unique_best and clean and max(agree) < 5
            want = int(np.argmax(agree)) if unique_best and clean and max(agree) >= 5 else -1
            assert got[i] == want
        assert 0 < np.mean(got == -1)
    assert np.mean(ab.shown_root(noisy, x, y, bck, data.roots) == k) > 0 and few > 0  # every branch occurs
    # a tie of two roots on 5 cells is no reading; one more cell for root 0 makes it the reading
    roots = np.stack([np.zeros((3, 3), int), np.array([[0, 0, 0], [0, 0, 1], [1, 1, 1]])])
    board = np.full((2, 64), 3)
    board[:, ab.footprint(np.array([2]), np.array([1]))[0]] = 10 + np.array([0, 0, 0, 0, 0, 2, 2, 2, 2])
    board[1, ab.footprint(np.array([2]), np.array([1]))[0][5]] = 10
    np.testing.assert_array_equal(ab.shown_root(board, np.array([2, 2]), np.array([1, 1]), np.array([3, 3]), roots),
                                  [-1, 0])


def test_the_manipulation_figure_labels_the_checked_curves_and_shades_the_checked_sites(tmp_path, monkeypatch):
    """manipulations.png drew the masked-cell curves the transplant checks score unlabelled, centroid and patch in one
    grey, and did not mark the sites the checks read; now each has its method's colour and a label, and every checked
    site (only those) is shaded."""
    import matplotlib.pyplot as plt

    from experiments import abstractions_manipulation as am

    figures = []
    monkeypatch.setattr(am, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    sites = ["embed", "layer0.z", "layer0.resid_mid", "layer1.z", "layer1.resid_mid", "unembed.in"]
    checked = am.checked_sites(sites)
    v = np.linspace(0, 1, len(sites))
    methods = ("centroid", "patch", "random")
    to_b_masked = {name: v * (i + 1) / 4 for i, name in enumerate(methods)}
    am._plot(sites, checked, {"centroid": v, "random": v}, to_b_masked, 0.8, {"masked": v}, {"masked": 0.9},
             {"centroid": v, "random": v}, {"quadrant_b": v, "quadrant_b_random": v, "kept": v}, str(tmp_path))
    axes = figures[0].axes
    plt.close(figures[0])
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    for name in methods:
        np.testing.assert_array_equal(lines[f"{name}: masked cells"].get_ydata(), to_b_masked[name])
    assert len({lines[f"{name}: masked cells"].get_color() for name in methods}) == 3
    # the patch writes the masked cells only: no every-footprint curve, its ceiling (B's own run) instead
    assert "patch: every footprint cell" not in lines
    np.testing.assert_array_equal(lines["patch ceiling: B's own run"].get_ydata(), [0.8, 0.8])
    legend = [text.get_text() for text in axes[0].get_legend().get_texts()]
    assert {f"{name}: masked cells" for name in methods} <= set(legend) and "checked sites" in legend
    for ax in axes[:3]:
        # layer0.resid_mid and layer1.z: (i - 0.5) + 1 / 2 is exact in binary floating point
        assert sorted(p.get_x() + p.get_width() / 2 for p in ax.patches) == [2.0, 3.0]
    np.testing.assert_array_equal(checked, [2, 3])


def test_the_patch_transplant_writes_only_object_cells_masked_in_both_boards():
    """A and B boards share place, background and mask, so they differ only on the object's 9 cells: patching B's
    activations at all 9 (B's visible tokens included) made the run B's own run (the check passed by construction).
    The patch cells are now the object cells that are UNK at the input of both boards, the visible ones excluded."""
    from experiments import abstractions_manipulation as am

    data = bd.build(bd.Boards())
    cfg = am.PRESETS["smoke"]
    boards = am.transplant_boards(cfg, data, jax.random.key(0))
    a, b = boards["roots"]
    assert len(a) == 90 and np.all(a != b)  # 90 ordered pairs of 10 roots, one board each
    np.testing.assert_array_equal(boards["a"]["masked"], boards["b"]["masked"])
    unk = data.cfg.unk
    for n in range(len(a)):
        x, y = int(boards["x"][n]), int(boards["y"][n])
        footprint = [(x + i) * 8 + y + j for i in range(3) for j in range(3)]  # top-left (x, y), row-major
        assert set(np.flatnonzero(boards["a"]["tokens"][n] != boards["b"]["tokens"][n])) <= set(footprint)
        want = sorted(c for c in footprint if boards["a"]["tokens"][n, c] == unk == boards["b"]["tokens"][n, c])
        np.testing.assert_array_equal(np.flatnonzero(boards["patch"][n]), want)
    # mask_p 0.25: about a quarter of the 810 object cells (binomial sd 12), none of the visible ones
    assert 150 < boards["patch"].sum() < 260


def test_the_probe_figure_shows_the_untrained_baseline_and_negative_r2(tmp_path, monkeypatch):
    """probes_and_context.png showed neither the untrained scores every probe and context check subtracts nor a
    position R^2 below -0.05 (ylim (-0.05, 1.05) clipped -0.519); each curve now has its untrained twin, dotted in its
    colour, and the y-range reaches the lowest score."""
    import matplotlib.pyplot as plt

    from experiments import abstractions_geometry as ag

    figures = []
    monkeypatch.setattr(ag, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    sites = ["embed", "layer0.z", "unembed.in"]

    def measures(level):  # {"probes", "context"} of {site: value}, distinct per curve
        names = ("root", "position", "cos_same", "cos_other", "transfer_double", "transfer_composite")
        values = {n: dict(zip(sites, level + 0.1 * i + np.array([0.0, 0.01, 0.02]))) for i, n in enumerate(names)}
        return {"probes": {n: values[n] for n in names[:2]}, "context": {n: values[n] for n in names[2:]}}

    trained, init = measures(0.3), measures(-0.8)
    ag._plot_probes(sites, trained, init, "masked", str(tmp_path))
    probes_ax, context_ax = figures[0].axes
    plt.close(figures[0])
    lines = probes_ax.get_lines()
    assert [line.get_label() for line in lines[::2]] == ["root", "position (R^2)"]
    for line, untrained, name in zip(lines[1::2], lines[::2], ("root", "position")):
        np.testing.assert_array_equal(line.get_ydata(), [init["probes"][name][s] for s in sites])
        assert line.get_linestyle() == ":" and line.get_color() == untrained.get_color()
    # the lowest score drawn is the untrained root probe at embed, -0.8; bottom 0.05 below it (float sums: 1e-12)
    assert probes_ax.get_ylim() == pytest.approx((-0.85, 1.05), abs=1e-12)
    gap = context_ax.get_lines()[-2:]
    assert gap[0].get_label() == "gap: cos_same - cos_other (checked)"
    np.testing.assert_allclose(gap[1].get_ydata(), [-0.1] * 3, atol=1e-12)  # cos_same - cos_other, untrained
    assert context_ax.get_ylim()[0] == pytest.approx(-0.65, abs=1e-12)  # cos_same untrained at embed: -0.6


def test_transplant_centroids_come_from_masked_cells_so_they_carry_no_visible_token(model):
    """At the embedding every masked cell holds the UNK embedding: if the centroids are means over masked cells
    only, every (root, cell) centroid there is that one vector (exactly: float64 means of equal float32 rows), and
    mu_B - mu_A is 0. A centroid over visible cells would carry the cell's colour, which a copier redraws."""
    from experiments import abstractions_manipulation as am
    from jaxicl.validation import ConfigError

    graphdef, params = model
    data = bd.build(bd.Boards())
    sites = ab.residual_sites(graphdef, params)
    cfg = am.Config(centroid_positions=6)
    embed = np.asarray(nnx.merge(graphdef, params).embed[...])
    for by in am.CENTROIDS:
        mu = am.site_centroids(data, graphdef, params, sites[:1], cfg, jax.random.key(0), by)  # [1, K, 9, D]
        np.testing.assert_array_equal(mu[0], np.broadcast_to(embed[data.cfg.unk], mu[0].shape))
    # the same probe set's centroids over every object cell differ from root to root (they carry the colours)
    single = ab.single_probe_set(data, cfg.centroid_positions, cfg.mask_p, jax.random.key(0))
    cells = ab.footprint(single["x"], single["y"])
    rows = np.arange(len(cells))[:, None]
    every = ab.centroids(embed[single["tokens"][rows, cells]].reshape(cells.size, -1),
                         single["root"][rows, cells].ravel(), data.cfg.n_roots)
    assert np.abs(every - every.mean(0)).max() > 0.25 * embed.std()  # colour differences, on the scale of an embedding
    with pytest.raises(ConfigError, match="centroid_positions=1 with mask_p=0.01 leaves a .root, cell. with no masked"):
        am.site_centroids(data, graphdef, params, sites[:1], am.Config(centroid_positions=1, mask_p=0.01),
                          jax.random.key(0), "root_cell")


def test_smoke_runs_share_one_training_run(tmp_path):
    """Geometry first (it trains the run it needs), then training and manipulation load it without a step."""
    out = tmp_path
    geometry = run_experiment("abstractions_geometry", "smoke", str(out))
    metrics = out / "abstractions_training" / "run" / "metrics.jsonl"
    before = metrics.read_text()
    training = run_experiment("abstractions_training", "smoke", str(out))
    manipulation = run_experiment("abstractions_manipulation", "smoke", str(out))
    assert metrics.read_text() == before  # nothing retrained, nothing re-evaluated
    rows = [json.loads(line) for line in before.splitlines()]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 10, 20]
    names = {r["experiment"]: [c["name"] for c in r["checks"]] for r in (training, geometry, manipulation)}
    probes = ("cell", "background", "position", "composite", "composite_root")
    assert names == {
        "abstractions_training": ["test_token_accuracy", "test_board_accuracy", "test_masked_object_error"],
        "abstractions_geometry": [
            "convergence_min_over_ends_vs_untrained", "within_board_convergence_min_over_ends_vs_untrained",
            "root_pr_at_convergence_site_over_ends",
            *(f"probe_{n}_gain_over_untrained" for n in ("root", "masked_root", *probes)),
            "context_independence_cosine_gap_over_untrained", "attractor_output_distance_vs_untrained",
            # the unmasked variant: no C check (C is 0 at its embedding), no masked cell to probe
            "unmasked_within_board_convergence_min_over_ends_vs_untrained",
            "unmasked_root_pr_at_convergence_site_over_ends",
            *(f"unmasked_probe_{n}_gain_over_untrained" for n in ("root", *probes)),
            "unmasked_context_independence_cosine_gap_over_untrained",
            "unmasked_attractor_output_distance_vs_untrained"],
        "abstractions_manipulation": ["centroid_transplant_over_random_masked", "patch_transplant_masked",
                                      "mean_ablation_drop_masked",
                                      "masked_completion_over_random", "part_whole_quadrant_over_random",
                                      "part_whole_other_cells_kept"]}
    for r in (training, geometry, manipulation):
        assert all(np.isfinite(c["value"]) for c in r["checks"]), r["checks"]
        for fig in r["figures"]:
            assert os.path.getsize(out / r["experiment"] / fig) > 10_000
    patch = next(c["note"] for c in manipulation["checks"] if c["name"] == "patch_transplant_masked")
    assert "written on A's masked object cells only" in patch and "the ceiling, B's own run, completes " in patch
    kept = next(c["note"] for c in manipulation["checks"] if c["name"] == "part_whole_other_cells_kept")
    assert "(among the checked sites, where the quadrant turns most over the random direction: " in kept
    # the final evaluation in the run's log is the one the training checks report
    final = [r for r in rows if r["split"] == "eval"][-1]
    assert training["checks"][0]["value"] == pytest.approx(final["test_token_accuracy"])
    # and the double boards no training tuple draws: 2 of the 8 evaluated (BoardData.double_test_seen)
    assert (f"(double on the 2 of the 8 double test prompts whose board no training tuple draws "
            f"{final['test_board_accuracy_double_unseen']:.2f}; the others are training boards)"
            in training["checks"][1]["note"])


def test_lea_speech_check_scores_object_cells_so_a_background_language_fails():
    """A language of the background alone redraws every cell as the board's background: token accuracy far above
    another board's message (the old check's quantity), object-cell accuracy 0 for both (the check's)."""
    from experiments import abstractions_lea as lea_exp

    cfg = lea_exp.PRESETS["smoke"]
    data = bd.build(cfg.task)
    test = lea_exp.eval_set(cfg, data, "test", jax.random.key(0))
    targets, objects = np.asarray(test.targets), np.asarray(test.info["root"]) >= 0
    background = targets[np.arange(len(targets)), np.argmin(objects, 1)]  # a cell off every object
    drawn = jnp.asarray(np.broadcast_to(background[:, None], targets.shape))
    other = drawn[np.random.default_rng(0).permutation(len(targets))]
    own_tokens, other_tokens = (float(bd.board_metrics(d, test)["token_accuracy"]) for d in (drawn, other))
    np.testing.assert_allclose(own_tokens, 1 - objects.mean(), rtol=1e-6)  # every background cell right
    assert own_tokens - other_tokens > 0.5  # would pass a token-accuracy check
    assert float(lea_exp.object_accuracy(drawn, test)) == 0.0 == float(lea_exp.object_accuracy(other, test))
    # the object accuracy against a loop over boards and cells
    pred = np.where(np.random.default_rng(1).random(targets.shape) < 0.5, targets, 99)
    right = sum(pred[i, j] == targets[i, j] for i in range(len(targets)) for j in range(64) if objects[i, j])
    np.testing.assert_allclose(float(lea_exp.object_accuracy(jnp.asarray(pred), test)), right / objects.sum(),
                               rtol=1e-6)


def test_the_training_note_names_each_setting_that_differs_from_the_official_recipe():
    """The note said "the official recipe and model" whatever the config (a 2-layer model, another optimiser)."""
    from experiments.abstractions_training import PRESETS, recipe_differences
    from jaxicl.config_paths import apply_overrides

    assert recipe_differences(PRESETS["full"].training) == ""
    assert recipe_differences(PRESETS["quick"].training) == ("task.steps_per_epoch 2 (official 16), train.lr 0.003 "
                                                            "(official 0.001)")
    changed = apply_overrides(PRESETS["full"], ["training.model.n_layers=2", "training.train.betas=0.9,0.99",
                                                "training.train.steps=10"])
    assert recipe_differences(changed.training) == ("model.n_layers 2 (official 3), train.betas (0.9, 0.99) "
                                                    "(official (0.9, 0.95))")


def test_the_evaluation_masks_at_the_epoch_of_the_last_step():
    training = ab.Training()
    for steps, epoch in ((32, 1), (33, 2), (16_000, 999)):  # steps 0..steps-1, 16 an epoch
        assert dataclasses.replace(training, train=dataclasses.replace(training.train, steps=steps)).last_epoch == epoch


def test_decoded_as_and_whole_footprint_as_against_a_loop():
    from experiments.abstractions_manipulation import decoded_as, whole_footprint_as

    rng = np.random.default_rng(0)
    edited = rng.normal(size=(2, 5, 64, 4))  # [S, N, 64, V]
    pred = edited.argmax(-1)
    on = np.zeros((5, 64), bool)
    on[:, 10:19] = True
    want = np.where(on, pred[0], -1)  # site 0 draws every footprint cell as wanted
    want[1, 12] = (pred[0, 1, 12] + 1) % 4  # except one cell of board 1
    whole = [np.mean([all(pred[s, n, c] == want[n, c] for c in range(64) if on[n, c]) for n in range(5)])
             for s in range(2)]
    cells = [np.mean([pred[s, n, c] == want[n, c] for n in range(5) for c in range(64) if on[n, c]]) for s in range(2)]
    np.testing.assert_allclose(whole_footprint_as(edited, want, on), whole, rtol=1e-12)
    np.testing.assert_allclose(decoded_as(edited, want, on), cells, rtol=1e-12)
    assert whole[0] == 0.8 and cells[0] == 44 / 45


def test_a_longer_rerun_that_moves_the_evaluation_epoch_is_refused(tmp_path):
    """The evaluation sets are masked at the run's last epoch: extending a finished 10-step run to 30 steps (a
    constant schedule, which the engine extends) would keep eval rows measured on boards masked at epoch 9 next to
    rows on boards masked at epoch 29. Refused, naming eval_mask_epoch; the same settings still load the run."""
    from experiments.abstractions_training import SMOKE
    from jaxicl.validation import ConfigError

    def config(steps):
        return dataclasses.replace(SMOKE, train=dataclasses.replace(SMOKE.train, steps=steps))

    ab.trained(config(10), str(tmp_path), progress=False)
    metrics = tmp_path / "abstractions_training" / "run" / "metrics.jsonl"
    before = metrics.read_text()
    rerun = ab.trained(config(10), str(tmp_path), progress=False)[3]
    assert [r["step"] for r in rerun.eval_rows] == [0, 10]
    assert metrics.read_text() == before  # loaded: nothing retrained, nothing re-evaluated
    with pytest.raises(ConfigError) as refused:
        ab.trained(config(30), str(tmp_path), progress=False)
    assert str(refused.value) == (f"cannot resume from {tmp_path / 'abstractions_training' / 'run' / 'checkpoints'}: "
                                  f"the checkpoint was made with another config: eval_mask_epoch: checkpoint 9 vs now "
                                  f"29; train into a new output directory, or keep the checkpoint's config")
    assert metrics.read_text() == before
