"""Masked-scene boards (Ferry, Ching & Kawai 2023): 8x8 boards of 3x3 root objects and 2x2 composites of roots.

The blueprint (sampled from an explicit key): n_roots root objects, each a 3x3 pattern of object colours (all
patterns distinct), and n_composites composites, each a 2x2 grid of root ids (repeats allowed, all distinct) laid
out with a one-cell margin (a 7x7 footprint). Board types and their parameter tuples:

  single      (k, x, y, bck)                    one root with its top-left at row x, column y in 0..5
  double      (k1, x1, y1, k2, x2, y2, bck)     two roots with x1 != x2 and y1 != y2; the second wins on overlaps
  composition (c, x, y, bck)                    one composite at x, y in 0..1

Every board starts as the background token bck (0..9); object cells hold 10 + colour; UNK (20) masks. Splits
(the official "balanced" split): per group (a root for single, an ordered root pair for double, a composite
for composition) test_per_group tuples go to test, the rest to train, so test boards are new (position,
background) pairs of known objects. The tuples are enumerated once on the host and stored as placement tables
[N, 17] (four (root, row, col, active) placements and the background); rendering, annotation and masking run under
jit/vmap on device. Row = x, column = y is our reading of the official (x, y).

Token and patch masking and the type curriculum are pure functions of the epoch (Section 2 of
shared/papers/abstractions_ferry2023.md, exact from the official code).
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.models.gpt import lookup
from jaxicl.validation import ConfigError, check_positive, check_range

TYPES = ("single", "double", "composition")
N_PLACEMENTS = 4  # a composite's four roots; single and double boards leave the rest inactive


@dataclasses.dataclass(frozen=True)
class Boards:
    """The generator's configuration: the official values (shared/papers/abstractions_ferry2023.md, Section 2)."""

    n_roots: int = 10
    n_composites: int = 5
    n_colours: int = 10  # object tokens 10..19
    n_backgrounds: int = 10  # background tokens 0..9
    board_dim: int = 8
    root_dim: int = 3
    comp_margin: int = 1
    test_per_group: int = 4
    blueprint_seed: int = 0  # the key the blueprint and the split are drawn from
    types_start: tuple[float, float, float] = (0.8, 0.1, 0.1)  # type probabilities before the ramp
    types_end: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    types_ramp: tuple[int, int] = (250, 1000)  # epochs over which the type probabilities ramp linearly
    mask_max: float = 0.25  # token masking: max(mask_max * min(1, epoch / mask_ramp_end), mask_min)
    mask_min: float = 0.01
    mask_ramp_end: int = 750
    patch_from: int = 750  # from this epoch on, a board gets one 3x3 UNK patch with probability patch_p
    patch_p: float = 0.5

    def __post_init__(self):
        for name in ("n_roots", "n_composites", "n_colours", "n_backgrounds", "mask_ramp_end"):
            check_positive(name, getattr(self, name))
        check_range("n_colours", self.n_colours, 1, 10)
        check_range("n_backgrounds", self.n_backgrounds, 1, 10)
        if (self.board_dim, self.root_dim, self.comp_margin) != (8, 3, 1):
            raise ConfigError("board_dim=8, root_dim=3, comp_margin=1 are the layout the board types are defined on")
        for name in ("types_start", "types_end"):
            p = getattr(self, name)
            if len(p) != 3 or min(p) < 0 or sum(p) <= 0:
                raise ConfigError(f"{name} must be 3 non-negative type probabilities with a positive sum, got {p}")
        if not 0 <= self.types_ramp[0] <= self.types_ramp[1]:
            raise ConfigError(f"types_ramp must be (start, end) epochs with 0 <= start <= end, got {self.types_ramp}")
        check_range("mask_max", self.mask_max, 0.0, 1.0)
        check_range("mask_min", self.mask_min, 0.0, 1.0)
        check_range("patch_p", self.patch_p, 0.0, 1.0)
        check_positive("patch_from", self.patch_from, allow_zero=True)
        sizes = {"single": 36 * self.n_backgrounds, "double": 900 * self.n_backgrounds,
                 "composition": 4 * self.n_backgrounds}
        for t in TYPES:
            if not 1 <= self.test_per_group < sizes[t]:
                raise ConfigError(f"test_per_group must be in [1, {sizes[t] - 1}] so that every {t} group of "
                                  f"{sizes[t]} tuples keeps boards in both splits, got {self.test_per_group}")
        if self.n_composites > self.n_roots**4:
            raise ConfigError(f"n_composites={self.n_composites} is more than the {self.n_roots**4} distinct 2x2 "
                              f"grids of n_roots={self.n_roots} roots")
        if self.n_roots > self.n_colours**9:
            raise ConfigError(f"n_roots={self.n_roots} is more than the distinct 3x3 patterns of n_colours="
                              f"{self.n_colours} colours")

    @property
    def vocab_size(self) -> int:
        return 21

    @property
    def unk(self) -> int:
        return 20


def blueprint(cfg: Boards, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """roots [n_roots, 3, 3] colours in 0..n_colours-1 (distinct patterns) and composites [n_composites, 2, 2] root ids
    (distinct grids), drawn from key."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    roots, composites = [], []
    while len(roots) < cfg.n_roots:
        r = rng.integers(0, cfg.n_colours, (3, 3))
        if not any(np.array_equal(r, o) for o in roots):
            roots.append(r)
    while len(composites) < cfg.n_composites:
        c = rng.integers(0, cfg.n_roots, (2, 2))
        if not any(np.array_equal(c, o) for o in composites):
            composites.append(c)
    return np.stack(roots), np.stack(composites)


def enumerate_tuples(cfg: Boards) -> dict[str, np.ndarray]:
    """Every parameter tuple of each type (the module docstring's columns), int32."""
    pos, bck = range(6), range(cfg.n_backgrounds)
    single = np.array(list(itertools.product(range(cfg.n_roots), pos, pos, bck)), np.int32)
    pairs = [(x1, y1, x2, y2) for x1, y1, x2, y2 in itertools.product(pos, pos, pos, pos) if x1 != x2 and y1 != y2]
    k = np.array(list(itertools.product(range(cfg.n_roots), range(cfg.n_roots))), np.int32)  # [K^2, 2]
    p = np.array(pairs, np.int32)  # [900, 4]
    b = np.arange(cfg.n_backgrounds, dtype=np.int32)
    kk, pp, bb = (a.reshape(-1) for a in np.meshgrid(np.arange(len(k)), np.arange(len(p)), b, indexing="ij"))
    double = np.stack([k[kk, 0], p[pp, 0], p[pp, 1], k[kk, 1], p[pp, 2], p[pp, 3], bb], 1).astype(np.int32)
    comp = np.array(list(itertools.product(range(cfg.n_composites), range(2), range(2), bck)), np.int32)
    return {"single": single, "double": double, "composition": comp}


def group_of(kind: str, tuples: np.ndarray, n_roots: int) -> np.ndarray:
    """[N] the split group of each tuple: its root, its ordered root pair, or its composite."""
    return tuples[:, 0] * n_roots + tuples[:, 3] if kind == "double" else tuples[:, 0]


def balanced_split(cfg: Boards, tuples: dict[str, np.ndarray], key: jax.Array) -> dict[str, dict[str, np.ndarray]]:
    """{split: {type: tuples}}: per group, test_per_group random tuples to test and the rest to train."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    out = {"train": {}, "test": {}}
    for kind, t in tuples.items():
        groups = group_of(kind, t, cfg.n_roots)
        test = np.zeros(len(t), bool)
        for g in np.unique(groups):
            members = np.flatnonzero(groups == g)
            test[rng.choice(members, cfg.test_per_group, replace=False)] = True
        out["train"][kind], out["test"][kind] = t[~test], t[test]
    return out


def placements(kind: str, tuples: np.ndarray, composites: np.ndarray) -> np.ndarray:
    """[N, 17] int8: four (root, row, col, active) placements, later ones drawn on top, then the background."""
    n = len(tuples)
    out = np.zeros((n, N_PLACEMENTS, 4), np.int8)
    if kind == "single":
        out[:, 0] = np.stack([tuples[:, 0], tuples[:, 1], tuples[:, 2], np.ones(n)], 1)
    elif kind == "double":
        out[:, 0] = np.stack([tuples[:, 0], tuples[:, 1], tuples[:, 2], np.ones(n)], 1)
        out[:, 1] = np.stack([tuples[:, 3], tuples[:, 4], tuples[:, 5], np.ones(n)], 1)
    else:
        for q, (i, j) in enumerate(itertools.product(range(2), range(2))):
            out[:, q] = np.stack([composites[tuples[:, 0], i, j], tuples[:, 1] + 4 * i, tuples[:, 2] + 4 * j,
                                  np.ones(n)], 1)
    return np.concatenate([out.reshape(n, -1), tuples[:, -1:].astype(np.int8)], 1)


@dataclasses.dataclass(frozen=True, eq=False)
class BoardData:
    """The blueprint, the split tuples {split: {type: [N, columns]}} and their placement tables (device arrays)."""

    cfg: Boards
    roots: np.ndarray
    composites: np.ndarray
    tuples: dict
    tables: dict  # {split: {type: [N, 17] int8 device array}}

    def render(self, table: jax.Array) -> dict:
        """Boards and their per-cell annotations for placement rows [..., 17] (see render)."""
        return render(jnp.asarray(self.roots), table)

    @functools.cache
    def sampler(self, split: str = "train"):
        """sample(key, epoch) -> one board of a type drawn with the epoch's type probabilities, uniform over the
        split's tuples of that type: {"board" [64], "masked" [64], "mask" [64] bool, "type" [], annotations}."""
        tables = self.tables[split]
        roots = jnp.asarray(self.roots)

        def sample(key, epoch):
            k_type, k_row, k_mask = jax.random.split(key, 3)
            kind = jax.random.categorical(k_type, jnp.log(type_probabilities(self.cfg, epoch)))
            rows = [lookup(tables[t], jax.random.randint(jax.random.fold_in(k_row, i), (1,), 0, len(tables[t])))[0]
                    for i, t in enumerate(TYPES)]
            row = jnp.select([kind == i for i in range(3)], rows)
            out = render(roots, row)
            masked, mask = mask_board(self.cfg, k_mask, out, epoch)
            return {**out, "masked": masked, "mask": mask, "type": kind}

        return sample


def build(cfg: Boards) -> BoardData:
    """The blueprint, the enumerated tuples, the balanced split and the placement tables, from cfg.blueprint_seed."""
    k_blue, k_split = jax.random.split(jax.random.key(cfg.blueprint_seed))
    roots, composites = blueprint(cfg, k_blue)
    split = balanced_split(cfg, enumerate_tuples(cfg), k_split)
    tables = {s: {t: jnp.asarray(placements(t, v, composites)) for t, v in by_type.items()}
              for s, by_type in split.items()}
    return BoardData(cfg, roots, composites, split, tables)


def render(roots: jax.Array, row: jax.Array) -> dict:
    """One board from a placement row [17]: {"board" [64] tokens, "root" [64] the root id covering each cell (-1 on
    background), "cell" [64] its cell index 0..8 inside that root's 3x3 pattern (-1), "object" [64] the placement
    index (-1), "background" []}. Later placements overwrite earlier ones."""
    place = row[:-1].reshape(N_PLACEMENTS, 4).astype(jnp.int32)
    bck = row[-1].astype(jnp.int32)
    r, c = jnp.divmod(jnp.arange(64), 8)
    board = jnp.full(64, bck)
    root = cell = obj = jnp.full(64, -1)
    for q in range(N_PLACEMENTS):
        k, x, y, active = place[q]
        dr, dc = r - x, c - y
        inside = (active > 0) & (dr >= 0) & (dr < 3) & (dc >= 0) & (dc < 3)
        index = jnp.clip(dr, 0, 2) * 3 + jnp.clip(dc, 0, 2)
        board = jnp.where(inside, 10 + roots[k].reshape(9)[index], board)
        root, cell, obj = (jnp.where(inside, v, old) for v, old in ((k, root), (index, cell), (q, obj)))
    return {"board": board, "root": root, "cell": cell, "object": obj, "background": bck}


def mask_probability(cfg: Boards, epoch) -> jax.Array:
    """Token masking probability: max(mask_max * min(1, epoch / mask_ramp_end), mask_min)."""
    return jnp.maximum(cfg.mask_max * jnp.minimum(1.0, epoch / cfg.mask_ramp_end), cfg.mask_min)


def type_probabilities(cfg: Boards, epoch) -> jax.Array:
    """[3] the linear ramp from types_start to types_end over types_ramp epochs (constant outside), renormalised."""
    lo, hi = cfg.types_ramp
    t = jnp.clip((epoch - lo) / max(hi - lo, 1), 0.0, 1.0)
    p = (1 - t) * jnp.asarray(cfg.types_start) + t * jnp.asarray(cfg.types_end)
    return p / p.sum()


def mask_board(cfg: Boards, key: jax.Array, rendered: dict, epoch) -> tuple[jax.Array, jax.Array]:
    """(masked board [64], mask [64] bool): each cell UNK with mask_probability(epoch); from patch_from on, with
    probability patch_p one 3x3 block too: on a board of more than 18 object cells (a composite) one of its four
    roots' footprints (corners of the object cells' bounding box), else a uniform top-left in 0..5."""
    k_tok, k_patch, k_where, k_corner = jax.random.split(key, 4)
    mask = jax.random.uniform(k_tok, (64,)) < mask_probability(cfg, epoch)
    r, c = jnp.divmod(jnp.arange(64), 8)
    objects = rendered["root"] >= 0
    big = 8
    min_r, max_r = jnp.min(jnp.where(objects, r, big)), jnp.max(jnp.where(objects, r, -1))
    min_c, max_c = jnp.min(jnp.where(objects, c, big)), jnp.max(jnp.where(objects, c, -1))
    corner = jax.random.randint(k_corner, (), 0, 4)
    comp_r = jnp.where(corner < 2, min_r, max_r - 2)
    comp_c = jnp.where(corner % 2 == 0, min_c, max_c - 2)
    uni_r, uni_c = jax.random.randint(k_where, (2,), 0, 6)
    composite = jnp.sum(objects) > 18
    pr, pc = jnp.where(composite, comp_r, uni_r), jnp.where(composite, comp_c, uni_c)
    patch = (r >= pr) & (r < pr + 3) & (c >= pc) & (c < pc + 3)
    use_patch = (epoch >= cfg.patch_from) & (jax.random.uniform(k_patch) < cfg.patch_p)
    mask = mask | (patch & use_patch)
    return jnp.where(mask, 20, rendered["board"]), mask
