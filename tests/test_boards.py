"""Ferry et al.'s board generator against the notes' counts and a numpy renderer, its masking and curricula, and the
factorised-position transformer (parameter count, positions outside the residual, bidirectional attention, edits)."""

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpy_forward import attend, f64, gelu, layer_norm, linear, with_random_params

from jaxicl.models import apply
from jaxicl.models.factor_transformer import FactorTransformer
from jaxicl.sites import Patch
from jaxicl.tasks import boards as bd
from jaxicl.tasks import sample_batch
from jaxicl.validation import ConfigError

CFG = bd.Boards()


@pytest.fixture(scope="module")
def data():
    return bd.build(CFG)


def _enumerate(kind):
    """Every tuple of a type, by itertools (the reference numbering)."""
    pos, bck, roots = range(6), range(10), range(10)
    if kind == "single":
        return np.array(list(itertools.product(roots, pos, pos, bck)))
    if kind == "double":
        return np.array([(k1, x1, y1, k2, x2, y2, b) for k1, k2 in itertools.product(roots, roots)
                         for x1, y1, x2, y2 in itertools.product(pos, pos, pos, pos) if x1 != x2 and y1 != y2
                         for b in bck])
    return np.array(list(itertools.product(range(5), range(2), range(2), bck)))


def _numpy_board(roots, composites, kind, t):
    """The board of one tuple, drawn cell by cell."""
    board = np.full((8, 8), t[-1])
    if kind == "composition":
        objs = [(composites[t[0], i, j], t[1] + 4 * i, t[2] + 4 * j) for i in range(2) for j in range(2)]
    elif kind == "double":
        objs = [(t[0], t[1], t[2]), (t[3], t[4], t[5])]
    else:
        objs = [(t[0], t[1], t[2])]
    for k, x, y in objs:  # later objects drawn on top
        board[x:x + 3, y:y + 3] = 10 + roots[k]
    return board.ravel()


def test_counts_per_type_and_split_match_the_notes_and_the_splits_are_disjoint(data):
    tuples = {s: {t: data.tuples(s, t) for t in bd.TYPES} for s in ("train", "test")}
    counts = {s: {t: len(v) for t, v in by.items()} for s, by in tuples.items()}
    assert counts == {"train": {"single": 3560, "double": 899600, "composition": 180},
                      "test": {"single": 40, "double": 400, "composition": 20}}
    for t in bd.TYPES:
        as_rows = lambda a: set(map(tuple, a.tolist()))  # noqa: E731
        train, test, every = as_rows(tuples["train"][t]), as_rows(tuples["test"][t]), as_rows(_enumerate(t))
        assert not train & test and train | test == every  # the arithmetic numbering covers every tuple once
        # four test tuples per group: per root, per ordered root pair, per composite
        test_arr = tuples["test"][t]
        groups = test_arr[:, 0] * 10 + test_arr[:, 3] if t == "double" else test_arr[:, 0]
        assert set(np.bincount(groups)[np.unique(groups)]) == {4}
        assert len(np.unique(groups)) == bd.sizes(CFG, t)[0]


def test_double_test_seen_is_whether_some_training_tuple_draws_the_same_board(data):
    """Against every training double board, rendered, of a small blueprint of 2 colours (roots often agree on the
    cells an overlap leaves visible) with 300 of the 1800 tuples of each ordered root pair held out (a swap is often
    held out too); then the count at the defaults (the official split: 255 of the 400, by the same brute force)."""
    small = bd.build(bd.Boards(n_roots=4, n_colours=2, n_backgrounds=2, test_per_group=7))
    rng = np.random.default_rng(0)
    held = np.stack([np.sort(rng.choice(1800, 300, replace=False)) for _ in range(16)])
    small = dataclasses.replace(small, test={**small.test, "double": held})
    board = lambda t: np.asarray(small.render(small.rows("double", t))["board"])  # noqa: E731
    train, test = small.tuples("train", "double"), small.tuples("test", "double")
    training_boards = {b.tobytes() for b in board(train)}
    seen = small.double_test_seen()
    np.testing.assert_array_equal(seen, [b.tobytes() in training_boards for b in board(test)])
    # every case occurs: seen through the swap (k2, x2, y2, k1, x1, y1, bck) or another tuple (other roots agreeing
    # on the visible cells), unseen although the swap trains (an overlap drawn differently) or as the swap is held out
    swap = test[:, [3, 4, 5, 0, 1, 2, 6]]
    trains = set(map(tuple, train.tolist()))
    swap_trains = np.array([t in trains for t in map(tuple, swap.tolist())])
    swap_same = np.all(board(swap) == board(test), 1)
    assert [int(np.sum(seen & swap_trains & swap_same)), int(np.sum(seen & ~(swap_trains & swap_same))),
            int(np.sum(~seen & swap_trains)), int(np.sum(~seen & ~swap_trains & swap_same))] == [2962, 87, 959, 564]
    assert int(np.sum(data.double_test_seen())) == 255 and data.double_test_seen().shape == (400,)
    # the 145 unseen ones all have overlapping roots, as have 149 of the 400
    defaults = data.tuples("test", "double")
    overlap = np.all(np.abs(defaults[:, 1:3] - defaults[:, 4:6]) < 3, 1)
    assert [int(np.sum(overlap & ~data.double_test_seen())), int(np.sum(overlap))] == [145, 149]


def test_the_blueprint_has_distinct_roots_and_composites(data):
    assert data.roots.shape == (10, 3, 3) and data.composites.shape == (5, 2, 2)
    assert len({r.tobytes() for r in data.roots}) == 10 and len({c.tobytes() for c in data.composites}) == 5
    assert data.roots.min() >= 0 and data.roots.max() < 10 and data.composites.max() < 10
    # 16 of the 81 grids of 3 roots: every root id is drawn (16 grids of only 2 roots would also fit)
    _, composites = bd.blueprint(dataclasses.replace(CFG, n_roots=3, n_composites=16), jax.random.key(0))
    assert set(composites.ravel().tolist()) == {0, 1, 2}


def test_rendering_matches_a_numpy_renderer_and_later_objects_win_on_overlaps(data):
    rng = np.random.default_rng(0)
    for kind in bd.TYPES:
        tuples = data.tuples("train", kind)
        rows = rng.choice(len(tuples), 64, replace=False)
        placements = data.rows(kind, tuples[rows])
        out = data.render(placements)  # [64, 17] rows -> [64, 64] boards; any leading axes: [2, 32, 17] -> [2, 32, 64]
        want = np.stack([_numpy_board(data.roots, data.composites, kind, tuples[i]) for i in rows])
        np.testing.assert_array_equal(np.asarray(out["board"]), want)
        np.testing.assert_array_equal(np.asarray(data.render(placements.reshape(2, 32, 17))["board"]),
                                      want.reshape(2, 32, 64))
        np.testing.assert_array_equal(np.asarray(out["root"]) >= 0, want >= 10)
    # an overlapping double board: root 2 at (2, 2) over root 1 at (1, 1); the cell annotations follow the winner
    t = np.array([[3, 1, 1, 7, 2, 2, 5]], np.int32)
    out = data.render(data.rows("double", t)[0])
    board, root, cell = (np.asarray(out[k]).reshape(8, 8) for k in ("board", "root", "cell"))
    np.testing.assert_array_equal(board[2:5, 2:5], 10 + data.roots[7])
    assert board[1, 1] == 10 + data.roots[3][0, 0] and root[2, 2] == 7 and root[1, 1] == 3
    assert cell[2, 2] == 0 and cell[4, 4] == 8 and cell[1, 3] == 2 and board[0, 0] == 5 and root[0, 0] == -1


def test_composites_cover_their_footprint_with_a_one_cell_margin(data):
    t = data.tuples("train", "composition")
    out = jax.vmap(data.render)(data.rows("composition", t))
    objects = np.asarray(out["root"]).reshape(-1, 8, 8) >= 0
    for i in range(len(t)):
        x, y = t[i, 1], t[i, 2]
        want = np.zeros((8, 8), bool)
        for a in range(2):
            for b in range(2):
                want[x + 4 * a:x + 4 * a + 3, y + 4 * b:y + 4 * b + 3] = True
        np.testing.assert_array_equal(objects[i], want)


def _sampled_tuples(data, split: str) -> dict[str, set]:
    """The tuples of 3000 boards of the split's sampler at uniform type probabilities, read back from the render's
    annotations: a placement's top-left is a visible cell's position minus its cell offset."""
    b = sample_batch(data.sampler(split), CFG, jax.random.key(5), 3000, axis=None, step=2000 * CFG.steps_per_epoch).info
    root, cell, obj = (np.asarray(b[k]).reshape(-1, 64) for k in ("root", "cell", "object"))
    out = {t: set() for t in bd.TYPES}
    for i, kind in enumerate(np.asarray(b["type"])):
        places = []
        for q in range(4 if kind == 2 else kind + 1):
            c = np.flatnonzero(obj[i] == q)[0]  # some cell of every placement stays visible
            places.append((int(root[i, c]), c // 8 - cell[i, c] // 3, c % 8 - cell[i, c] % 3))
        bck = int(b["background"][i])
        if kind == 2:
            grid = [p[0] for p in places]
            comp = next(k for k, g in enumerate(data.composites.reshape(-1, 4).tolist()) if g == grid)
            out["composition"].add((comp, places[0][1], places[0][2], bck))
        else:
            out[bd.TYPES[kind]].add(tuple(int(v) for p in places for v in p) + (bck,))
    return out


def test_the_train_sampler_never_draws_a_held_out_tuple_and_the_test_sampler_only_those(data):
    """Against the held-out indices applied to the itertools numbering (not the sampler's arithmetic decoding)."""
    train, test = _sampled_tuples(data, "train"), _sampled_tuples(data, "test")
    for t in bd.TYPES:
        groups, per = bd.sizes(CFG, t)
        every = _enumerate(t).reshape(groups, per, -1)
        held = {tuple(r) for g in range(groups) for r in every[g, data.test[t][g]].tolist()}
        assert train[t] and not train[t] & held, t
        assert test[t] <= held, t
    # ~1000 draws per type: every held-out single (40) and composition (20) tuple appears
    assert len(test["single"]) == 40 and len(test["composition"]) == 20


def test_masks_have_the_scheduled_rate_and_patches_come_late(data):
    for epoch in (0, 300, 740, 2000):
        b = sample_batch(data.sampler("train"), CFG, jax.random.key(1), 4096, axis=None,
                         step=epoch * CFG.steps_per_epoch + 3)
        p = float(bd.mask_probability(CFG, epoch))
        want = p + (CFG.patch_p * 9 / 64 * (1 - p) if epoch >= CFG.patch_from else 0.0)
        masked = np.asarray(b.info["masked"])
        # 4096 x 64 cells: the fraction's standard deviation is below 2e-3 here (patches included)
        assert masked.mean() == pytest.approx(want, abs=6e-3), epoch
        np.testing.assert_array_equal(np.where(masked, 20, b.targets), b.inputs)
        np.testing.assert_array_equal(b.mask, 1.0)
    np.testing.assert_allclose([bd.mask_probability(CFG, e) for e in (0, 375, 750, 3000)], [0.01, 0.125, 0.25, 0.25],
                               rtol=1e-6)  # float32


def test_the_type_curriculum_ramps_linearly_and_the_sampler_follows_it(data):
    np.testing.assert_allclose(bd.type_probabilities(CFG, 100), [0.8, 0.1, 0.1], rtol=1e-6)
    half_way = np.array([0.8 + 0.33, 0.1 + 0.33, 0.1 + 0.33]) / 2  # the ramp's middle, then renormalised
    np.testing.assert_allclose(bd.type_probabilities(CFG, 625), half_way / half_way.sum(), rtol=1e-6)
    np.testing.assert_allclose(bd.type_probabilities(CFG, 5000), [1 / 3] * 3, rtol=1e-6)
    b = sample_batch(data.sampler("train"), CFG, jax.random.key(2), 4096, axis=None, step=0).info  # as above: one program
    freq = np.bincount(np.asarray(b["type"]), minlength=3) / 4096
    np.testing.assert_allclose(freq, [0.8, 0.1, 0.1], atol=0.025)  # binomial sd <= 0.0063
    objects = np.asarray(b["root"] >= 0).sum(1)
    np.testing.assert_array_equal(objects[np.asarray(b["type"]) == 2], 36)  # composites: 4 roots, 36 cells
    assert set(objects[np.asarray(b["type"]) == 0]) == {9}
    with pytest.raises(ValueError, match="takes the training step"):
        sample_batch(data.sampler("train"), CFG, jax.random.key(2), 4096, axis=None)


@pytest.mark.parametrize("field,value,message", [
    ("mask_max", 1.5, "mask_max must be in"), ("patch_p", -0.1, "patch_p must be in"),
    ("types_start", (0.5, 0.5), "types_start must be 3"), ("types_ramp", (500, 100), "types_ramp must be"),
    ("test_per_group", 0, "test_per_group must be in"), ("test_per_group", 40, "test_per_group must be in"),
])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(CFG, **{field: value})


def test_list_settings_are_held_as_the_tuples_they_stand_for():
    """The config is a static argument of the samplers' jits: lists were accepted, and the evaluation's jits failed
    on them ("Non-hashable static arguments") after training had started."""
    listed = dataclasses.replace(CFG, types_start=[0.5, 0.25, 0.25], types_end=[0.3, 0.3, 0.4], types_ramp=[250, 1000])
    as_tuples = dataclasses.replace(CFG, types_start=(0.5, 0.25, 0.25), types_end=(0.3, 0.3, 0.4),
                                    types_ramp=(250, 1000))
    assert listed == as_tuples and hash(listed) == hash(as_tuples)
    with pytest.raises(ConfigError, match="^types_ramp must be a sequence, got 5$"):
        dataclasses.replace(CFG, types_ramp=5)


@pytest.mark.parametrize("field,value,message", [
    ("types_start", (np.inf, 0.1, 0.1), "types_start[0] must be a finite number, got inf"),
    ("types_end", (0.1, np.nan, 0.1), "types_end[1] must be a finite number, got nan")])
def test_a_type_probability_that_is_not_finite_is_refused_naming_its_entry(field, value, message):
    """NaN and inf passed the non-negative and positive-sum checks, and the type probabilities came out NaN."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        dataclasses.replace(CFG, **{field: value})


@pytest.fixture(scope="module")
def model():
    m = FactorTransformer(rngs=nnx.Rngs(0))
    m.pos_table[...] = jax.random.normal(jax.random.key(3), m.pos_table.shape)  # as if trained: positions matter
    return m


def test_parameter_count_matches_the_notes(model):
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 197_824


def test_positions_never_enter_the_residual_stream(model, data):
    board = data.render(data.rows("single", data.tuples("train", "single")[:1])[0])["board"]
    sites = ["embed"] + [f"layer{l}.{s}" for l in range(3) for s in ("attn.out", "mlp.out", "resid_post")]
    _, cache = apply(*nnx.split(model), board, capture=sites)
    np.testing.assert_array_equal(cache["embed"], model.embed[...][board])  # the token embedding alone
    resid = cache["embed"]
    for l in range(3):  # the residual is the embedding plus the sub-layers' updates, nothing else
        resid = resid + cache[f"layer{l}.attn.out"] + cache[f"layer{l}.mlp.out"]
        np.testing.assert_allclose(cache[f"layer{l}.resid_post"], resid, rtol=1e-6, atol=1e-6)
    # the same token at two cells starts identical in the residual; positions only act through the sub-layers
    assert board[-1] == board[-2] and np.array_equal(cache["embed"][-1], cache["embed"][-2])
    assert not np.allclose(cache["layer0.attn.out"][-1], cache["layer0.attn.out"][-2])


def test_attention_is_bidirectional(model, data):
    board = data.render(data.rows("single", data.tuples("train", "single")[:1])[0])["board"]
    graphdef, params = nnx.split(model)
    before = apply(graphdef, params, board)[0]
    after = apply(graphdef, params, board.at[63].set(20))[0]
    assert float(jnp.abs(after[0] - before[0]).max()) > 1e-4  # a later cell moves the first cell's logits


def test_site_edits_replace_add_and_transplant_only_the_named_cells(model, data):
    graphdef, params = nnx.split(model)
    boards = jax.vmap(data.render)(data.rows("double", data.tuples("train", "double")[:2]))["board"]
    site = "layer1.resid_mid"
    base, cache = apply(graphdef, params, boards[0], capture=[site])
    same, _ = apply(graphdef, params, boards[0], patch=Patch(values={site: cache[site]}))
    np.testing.assert_allclose(same, base, rtol=1e-6, atol=1e-6)  # replacing a site with its own value
    zero, _ = apply(graphdef, params, boards[0], patch=Patch(deltas={site: jnp.zeros_like(cache[site])}))
    np.testing.assert_array_equal(zero, base)
    _, donor = apply(graphdef, params, boards[1], capture=[site])
    cells = np.zeros((64, 1), bool)
    cells[[9, 10, 17]] = True
    _, edited = apply(graphdef, params, boards[0], capture=[site],
                      patch=Patch(values={site: donor[site]}, masks={site: jnp.asarray(cells)}))
    np.testing.assert_array_equal(edited[site][cells[:, 0]], donor[site][cells[:, 0]])
    np.testing.assert_array_equal(edited[site][~cells[:, 0]], cache[site][~cells[:, 0]])
    with pytest.raises(KeyError, match="unknown site name"):
        apply(graphdef, params, boards[0], capture=["layer9.z"])


def _recipe(steps):
    """The official optimiser (AdamW, lr 1e-3 constant, betas (0.9, 0.95), decay 0.01 on linear weights)."""
    from jaxicl.train import TrainConfig

    return TrainConfig(steps=steps, batch_size=16, optimizer="adamw", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01,
                       steps_per_call=4, log_every=1, checkpoint_every=4)


def test_the_official_recipe_decays_linear_weights_only(model):
    from jaxicl.train.optim import decay_mask, path_names

    mask = decay_mask(nnx.state(model, nnx.Param), _recipe(8).no_decay)
    decayed = {"/".join(path_names(p)) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
    assert decayed == {f"blocks/{l}/{n}/w" for l in range(3) for n in ("q", "k", "v", "proj", "mlp_in", "mlp_out")} | {
        "head/w"}


def test_board_metrics_against_numpy(data):
    batch = bd.eval_prompts(data, "test", jax.random.key(4), epoch=2000, per_type=(40, 100, 20), rounds=2)
    assert batch.inputs.shape == (320, 64)
    np.testing.assert_array_equal(np.bincount(np.asarray(batch.info["type"])), [80, 200, 40])
    rng = np.random.default_rng(5)
    targets = np.asarray(batch.targets)
    pred = np.where(rng.random(targets.shape) < 0.02, 20, targets)  # 2% of cells wrong
    got = bd.board_metrics(jnp.asarray(pred), batch)
    wrong, masked = pred != targets, np.asarray(batch.info["masked"])
    np.testing.assert_allclose(float(got["token_accuracy"]), 1 - wrong.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(got["masked_error"]), wrong[masked].mean(), rtol=1e-6)
    masked_object = masked & (np.asarray(batch.info["root"]) >= 0)
    np.testing.assert_allclose(float(got["masked_object_error"]), wrong[masked_object].mean(), rtol=1e-6)
    types = np.asarray(batch.info["type"])
    objects = (np.asarray(batch.info["root"]) >= 0).sum(1)  # each prompt's type is its board's: 9, 10..18, 36 cells
    assert set(objects[types == 0]) == {9} and set(objects[types == 2]) == {36}
    assert objects[types == 1].min() >= 10 and objects[types == 1].max() <= 18
    for i, t in enumerate(bd.TYPES):
        np.testing.assert_allclose(float(got[f"board_accuracy_{t}"]), (~wrong[types == i].any(1)).mean(), rtol=1e-6)
    # 62 of the 100 double test boards (twice: 2 rounds) are training boards (a brute force over every training board)
    seen = np.asarray(batch.info["seen"])
    assert [int(np.sum(seen[types == i])) for i in range(3)] == [0, 124, 0]
    unseen_double = (types == 1) & ~seen
    np.testing.assert_allclose(float(got["board_accuracy_double_unseen"]), (~wrong[unseen_double].any(1)).mean(),
                               rtol=1e-6)  # a float32 ratio of counts
    assert np.all(np.asarray(bd.eval_prompts(data, "train", jax.random.key(4), 2000, (4, 4, 4)).info["seen"]))
    # nothing to score is NaN, not 0: unmasked single boards only (no masked cell, no double or composite board)
    singles = jax.tree.map(lambda a: a[types == 0], batch)
    singles = dataclasses.replace(singles, info={**singles.info, "masked": jnp.zeros_like(singles.info["masked"])})
    empty = bd.board_metrics(jnp.full_like(singles.targets, 20), singles)  # every cell wrong
    assert float(empty["token_accuracy"]) == 0 and float(empty["board_accuracy_single"]) == 0
    assert all(np.isnan(float(empty[k])) for k in ("masked_error", "masked_object_error", "board_accuracy_double",
                                                     "board_accuracy_composition", "board_accuracy_double_unseen"))


def test_place_numbers_and_coordinates_round_trip_over_the_6x6_top_left_places():
    p = np.arange(bd.POSITIONS)
    x, y = bd.place_of(p)
    assert set(zip(x.tolist(), y.tolist())) == {(i, j) for i in range(6) for j in range(6)}  # 3x3 roots on 8x8
    np.testing.assert_array_equal(bd.position_of(x, y), p)


def test_patches_are_a_composites_root_footprints_and_elsewhere_a_uniform_3x3_block(data):
    """Patches only (no token masking, patch_p 1): on a composite each of its four roots' footprints about a quarter
    of the time (the corners of the object cells' bounding box); on single and double boards (at most 18 object
    cells) a 3x3 block whose top-left is uniform over the 36 places."""
    cfg = dataclasses.replace(CFG, mask_max=0.0, mask_min=0.0, patch_p=1.0)
    keys = jax.random.split(jax.random.key(6), 2000)
    r, c = np.divmod(np.arange(64), 8)
    for kind, t in (("single", [3, 2, 4, 7]), ("double", [1, 0, 0, 2, 1, 1, 5]), ("composition", [2, 1, 0, 3])):
        rendered = data.render(data.rows(kind, np.array([t]))[0])
        masked = np.asarray(jax.vmap(lambda k, board=rendered: bd.mask_board(cfg, k, board, cfg.patch_from)[1])(keys))
        top, left = r[masked.argmax(1)], c[masked.argmax(1)]  # the first masked cell in raster order
        block = (r >= top[:, None]) & (r < top[:, None] + 3) & (c >= left[:, None]) & (c < left[:, None] + 3)
        np.testing.assert_array_equal(masked, block)
        counts = np.bincount(bd.position_of(top, left), minlength=bd.POSITIONS)
        if kind == "composition":
            corners = [bd.position_of(t[1] + 4 * i, t[2] + 4 * j) for i in range(2) for j in range(2)]
            assert set(np.flatnonzero(counts)) == set(corners)
            np.testing.assert_allclose(counts[corners], 500, atol=80)  # binomial(2000, 1/4): sd 19
        else:  # binomial(2000, 1/36): mean 55.6, sd 7.3
            assert counts.min() >= 20 and counts.max() <= 100, (kind, counts)


def test_type_probabilities_are_renormalised_and_spread_keeps_both_ends():
    cfg = dataclasses.replace(CFG, types_start=(8.0, 1.0, 1.0), types_end=(1.0, 1.0, 2.0))
    np.testing.assert_allclose(bd.type_probabilities(cfg, 0), [0.8, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(bd.type_probabilities(cfg, 5000), [0.25, 0.25, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(bd.spread(np.arange(10), 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(bd.spread(np.arange(3), 5), [0, 1, 2])


def test_default_type_curriculum_is_the_official_one():
    # train_model.py: board_proba_start [0.8, 0.1, 0.1], board_proba_end [0.33, 0.33, 0.33] over epochs 250..1000,
    # each step's probabilities divided by their sum; float32 against float64: rtol 1e-6
    for epoch in (0, 250, 400, 625, 999, 1000, 3000):
        t = min(max((epoch - 250) / 750, 0.0), 1.0)
        p = (1 - t) * np.array([0.8, 0.1, 0.1]) + t * np.array([0.33, 0.33, 0.33])
        np.testing.assert_allclose(bd.type_probabilities(bd.Boards(), epoch), p / p.sum(), rtol=1e-6)


def test_held_out_indices_are_distinct_within_every_group_even_when_they_are_most_of_it():
    test = bd.test_indices(dataclasses.replace(CFG, test_per_group=30), jax.random.key(0))  # 30 of 40 compositions
    for t in bd.TYPES:
        groups, per = bd.sizes(CFG, t)
        assert test[t].shape == (groups, 30) and test[t].min() >= 0 and test[t].max() < per
        assert (np.diff(test[t], axis=1) > 0).all(), t  # sorted, no index drawn twice


def test_an_unknown_split_or_kind_is_refused_by_name(data):
    """tuples read any split but "test" as train (eval_prompts(data, "validation", ...) drew 40 train boards), and
    an unknown kind ("composite") drew boards of no object (placement_row, rows), decoded as a composition (decode)
    or raised a bare KeyError (sizes, tuples)."""
    split = "split must be one of ('train', 'test'), got 'validation'"
    kind = "kind must be one of ('single', 'double', 'composition'), got 'composite'"
    calls = [(split, lambda: data.tuples("validation", "single")),
             (split, lambda: bd.eval_prompts(data, "validation", jax.random.key(0), 1000, (40, 0, 0))),
             (kind, lambda: data.tuples("test", "composite")), (kind, lambda: bd.sizes(CFG, "composite")),
             (kind, lambda: bd.decode(CFG, "composite", 0, 0)),
             (kind, lambda: bd.placement_row(CFG, "composite", jnp.zeros(4, jnp.int32), data.composites)),
             (kind, lambda: data.rows("composite", data.tuples("test", "composition")[:3]))]
    for message, call in calls:
        with pytest.raises(ConfigError) as error:
            call()
        assert str(error.value) == message


def _numpy_factor_transformer(m, tokens):
    """The forward pass of the module docstring in float64 numpy, from the parameters: pre-LN blocks with positions
    concatenated to each sub-layer's input, softmax(q k^T / sqrt(dh)) per head, exact GELU, LN_f, the head."""
    t = len(tokens)
    pos, x = f64(m.pos_table)[:t], f64(m.embed)[tokens]
    for b in m.blocks:
        h = np.concatenate([layer_norm(x, b.ln1), pos], -1)
        x = x + linear(attend(linear(h, b.q), linear(h, b.k), linear(h, b.v), b.n_heads), b.proj)
        x = x + linear(gelu(linear(np.concatenate([layer_norm(x, b.ln2), pos], -1), b.mlp_in)), b.mlp_out)
    return linear(layer_norm(x, m.ln_final), m.head)


def test_factor_transformer_forward_matches_a_numpy_forward_pass(x64):
    m = with_random_params(FactorTransformer(d_model=8, d_pos=4, n_layers=2, n_heads=2, max_len=12, rngs=nnx.Rngs(0)),
                           jax.random.key(1))
    tokens = np.random.default_rng(0).integers(0, 21, 12)
    np.testing.assert_allclose(m(jnp.asarray(tokens)), _numpy_factor_transformer(m, tokens), rtol=1e-9, atol=1e-9)
