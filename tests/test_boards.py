"""Ferry et al.'s board generator against the notes' counts and a numpy renderer, its masking and curricula, and the
factorised-position transformer (parameter count, positions outside the residual, bidirectional attention, edits)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxicl.models import apply
from jaxicl.models.factor_transformer import FactorTransformer
from jaxicl.sites import Patch
from jaxicl.tasks import boards as bd
from jaxicl.validation import ConfigError

CFG = bd.Boards()


@pytest.fixture(scope="module")
def data():
    return bd.build(CFG)


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
    counts = {s: {t: len(v) for t, v in by.items()} for s, by in data.tuples.items()}
    assert counts == {"train": {"single": 3560, "double": 899600, "composition": 180},
                      "test": {"single": 40, "double": 400, "composition": 20}}
    for t in bd.TYPES:
        train, test = (np.ascontiguousarray(data.tuples[s][t]) for s in ("train", "test"))
        as_rows = lambda a: set(map(bytes, a.view(np.uint8).reshape(len(a), -1)))  # noqa: E731
        assert not as_rows(train) & as_rows(test)
        # four test tuples per group: per root, per ordered root pair, per composite
        groups = bd.group_of(t, test, CFG.n_roots)
        assert set(np.bincount(groups)[np.unique(groups)]) == {4}
    x1, y1, x2, y2 = (data.tuples["train"]["double"][:, i] for i in (1, 2, 4, 5))
    assert np.all(x1 != x2) and np.all(y1 != y2)


def test_the_blueprint_has_distinct_roots_and_composites(data):
    assert data.roots.shape == (10, 3, 3) and data.composites.shape == (5, 2, 2)
    assert len({r.tobytes() for r in data.roots}) == 10 and len({c.tobytes() for c in data.composites}) == 5
    assert data.roots.min() >= 0 and data.roots.max() < 10 and data.composites.max() < 10


def test_rendering_matches_a_numpy_renderer_and_later_objects_win_on_overlaps(data):
    rng = np.random.default_rng(0)
    for kind in bd.TYPES:
        tuples = data.tuples["train"][kind]
        rows = rng.choice(len(tuples), 64, replace=False)
        out = jax.vmap(data.render)(data.tables["train"][kind][rows])
        want = np.stack([_numpy_board(data.roots, data.composites, kind, tuples[i]) for i in rows])
        np.testing.assert_array_equal(np.asarray(out["board"]), want)
        np.testing.assert_array_equal(np.asarray(out["root"]) >= 0, want >= 10)
    # an overlapping double board: root 2 at (2, 2) over root 1 at (1, 1); the cell annotations follow the winner
    t = np.array([[3, 1, 1, 7, 2, 2, 5]], np.int32)
    out = data.render(jnp.asarray(bd.placements("double", t, data.composites))[0])
    board, root, cell = (np.asarray(out[k]).reshape(8, 8) for k in ("board", "root", "cell"))
    np.testing.assert_array_equal(board[2:5, 2:5], 10 + data.roots[7])
    assert board[1, 1] == 10 + data.roots[3][0, 0] and root[2, 2] == 7 and root[1, 1] == 3
    assert cell[2, 2] == 0 and cell[4, 4] == 8 and cell[1, 3] == 2 and board[0, 0] == 5 and root[0, 0] == -1


def test_composites_cover_their_footprint_with_a_one_cell_margin(data):
    t = data.tuples["train"]["composition"]
    out = jax.vmap(data.render)(data.tables["train"]["composition"])
    objects = np.asarray(out["root"]).reshape(-1, 8, 8) >= 0
    for i in range(len(t)):
        x, y = t[i, 1], t[i, 2]
        want = np.zeros((8, 8), bool)
        for a in range(2):
            for b in range(2):
                want[x + 4 * a:x + 4 * a + 3, y + 4 * b:y + 4 * b + 3] = True
        np.testing.assert_array_equal(objects[i], want)


def test_masks_have_the_scheduled_rate_and_patches_come_late(data):
    sample = data.sampler("train")
    keys = jax.random.split(jax.random.key(1), 4096)
    for epoch in (0, 300, 740, 2000):
        b = jax.vmap(sample, in_axes=(0, None))(keys, epoch)
        p = float(bd.mask_probability(CFG, epoch))
        want = p + (CFG.patch_p * 9 / 64 * (1 - p) if epoch >= CFG.patch_from else 0.0)
        # 4096 x 64 cells: the fraction's standard deviation is below 2e-3 here (patches included)
        assert float(jnp.mean(b["mask"])) == pytest.approx(want, abs=6e-3), epoch
        np.testing.assert_array_equal(np.where(b["mask"], 20, b["board"]), b["masked"])
    np.testing.assert_allclose([bd.mask_probability(CFG, e) for e in (0, 375, 750, 3000)], [0.01, 0.125, 0.25, 0.25],
                               rtol=1e-6)  # float32


def test_the_type_curriculum_ramps_linearly_and_the_sampler_follows_it(data):
    np.testing.assert_allclose(bd.type_probabilities(CFG, 100), [0.8, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(bd.type_probabilities(CFG, 625), [(0.8 + 1 / 3) / 2, (0.1 + 1 / 3) / 2,
                                                                 (0.1 + 1 / 3) / 2], rtol=1e-6)
    np.testing.assert_allclose(bd.type_probabilities(CFG, 5000), [1 / 3] * 3, rtol=1e-6)
    b = jax.vmap(data.sampler("train"), in_axes=(0, None))(jax.random.split(jax.random.key(2), 8000), 0)
    freq = np.bincount(np.asarray(b["type"]), minlength=3) / 8000
    np.testing.assert_allclose(freq, [0.8, 0.1, 0.1], atol=0.02)  # binomial sd <= 0.0045
    objects = np.asarray(b["root"] >= 0).sum(1)
    np.testing.assert_array_equal(objects[np.asarray(b["type"]) == 2], 36)  # composites: 4 roots, 36 cells
    assert set(objects[np.asarray(b["type"]) == 0]) == {9}


@pytest.mark.parametrize("field,value,message", [
    ("mask_max", 1.5, "mask_max must be in"), ("patch_p", -0.1, "patch_p must be in"),
    ("types_start", (0.5, 0.5), "types_start must be 3"), ("types_ramp", (500, 100), "types_ramp must be"),
    ("test_per_group", 0, "test_per_group must be in"), ("test_per_group", 40, "test_per_group must be in"),
])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(CFG, **{field: value})


@pytest.fixture(scope="module")
def model():
    m = FactorTransformer(rngs=nnx.Rngs(0))
    m.pos_table[...] = jax.random.normal(jax.random.key(3), m.pos_table.shape)  # as if trained: positions matter
    return m


def test_parameter_count_matches_the_notes(model):
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 197_824


def test_positions_never_enter_the_residual_stream(model, data):
    board = data.render(data.tables["train"]["single"][0])["board"]
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
    board = data.render(data.tables["train"]["single"][0])["board"]
    graphdef, params = nnx.split(model)
    before = apply(graphdef, params, board)[0]
    after = apply(graphdef, params, board.at[63].set(20))[0]
    assert float(jnp.abs(after[0] - before[0]).max()) > 1e-4  # a later cell moves the first cell's logits


def test_site_edits_replace_add_and_transplant_only_the_named_cells(model, data):
    graphdef, params = nnx.split(model)
    boards = jax.vmap(data.render)(data.tables["train"]["double"][:2])["board"]
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
