"""Masked-scene boards (Ferry, Ching & Kawai 2023): 8x8 boards of 3x3 root objects and 2x2 composites of roots.

The blueprint (sampled from an explicit key): n_roots root objects, each a 3x3 pattern of object colours (all
patterns distinct), and n_composites composites, each a 2x2 grid of root ids (repeats allowed, all distinct) laid
out with a one-cell margin (a 7x7 footprint). Board types and their parameter tuples:

  single      (k, x, y, bck)                    one root with its top-left at row x, column y in 0..5
  double      (k1, x1, y1, k2, x2, y2, bck)     two roots with x1 != x2 and y1 != y2; the second wins on overlaps
  composition (c, x, y, bck)                    one composite at x, y in 0..1

Every board starts as the background token bck (0..9); object cells hold 10 + colour; UNK (20) masks. Splits
(the official "balanced" split): per group (a root for single, an ordered root pair for double, a composite
for composition) test_per_group tuples go to test, the rest to train. Single and composite test boards are new
(position, background) pairs of known objects; most double test boards are not new: the swap (k2, x2, y2, k1, x1,
y1, bck) of a test tuple lies in the group (k2, k1), split apart, so it is almost always a training tuple, and where
the two roots do not overlap it draws the same board. At the defaults 255 of the 400 double test boards (64%) are
training boards (the official code splits the same way), and the 145 others all have overlapping roots (as have 149
of the 400), so accuracy on them mixes novelty with the hardest boards. BoardData.double_test_seen flags the
training ones (eval_prompts' info "seen", board_metrics' board_accuracy_double_unseen). A tuple is addressed by
(group, index within the group) and decoded arithmetically, so sampling needs only the held-out indices [groups,
test_per_group] on device (no table of the 899,600 double tuples); tuples become placement rows [17] (four (root,
row, col, active) placements and the background), and rendering, annotation and masking run under jit/vmap on
device. Row = x, column = y is our reading of the official (x, y).

Token and patch masking and the type curriculum are pure functions of the epoch (Section 2 of
shared/papers/abstractions_ferry2023.md, exact from the official code).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.numeric import ratio_or_nan
from jaxicl.prng import seed_key
from jaxicl.prompt import Prompt
from jaxicl.validation import (ConfigError, check_choice, check_finite, check_integer, check_positive, check_range,
                               check_seed)

TYPES = ("single", "double", "composition")
POSITIONS = 36  # top-left places of a 3x3 root on the 8x8 board (6 x 6), numbered x * 6 + y
N_PLACEMENTS = 4  # a composite's four roots; single and double boards leave the rest inactive


def place_of(position):
    """A top-left place's number (0 .. POSITIONS - 1, int or int array) -> its (x, y)."""
    return position // 6, position % 6


def position_of(x, y):
    """(x, y) of a top-left place (ints or int arrays) -> its number x * 6 + y."""
    return x * 6 + y


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
    types_end: tuple[float, float, float] = (0.33, 0.33, 0.33)  # official board_proba_end (renormalised)
    types_ramp: tuple[int, int] = (250, 1000)  # epochs over which the type probabilities ramp linearly
    mask_max: float = 0.25  # token masking: max(mask_max * min(1, epoch / mask_ramp_end), mask_min)
    mask_min: float = 0.01
    mask_ramp_end: int = 750
    patch_from: int = 750  # from this epoch on, a board gets one 3x3 UNK patch with probability patch_p
    patch_p: float = 0.5
    steps_per_epoch: int = 16  # an official epoch: 1000 boards in batches of 64

    def __post_init__(self):
        for name in ("n_roots", "n_composites", "n_colours", "n_backgrounds", "board_dim", "root_dim", "comp_margin",
                     "test_per_group", "mask_ramp_end", "patch_from", "steps_per_epoch"):
            check_integer(name, getattr(self, name))
        check_seed("blueprint_seed", self.blueprint_seed)
        for name in ("n_roots", "n_composites", "n_colours", "n_backgrounds", "mask_ramp_end", "steps_per_epoch"):
            check_positive(name, getattr(self, name))
        check_range("n_colours", self.n_colours, 1, 10)
        check_range("n_backgrounds", self.n_backgrounds, 1, 10)
        if (self.board_dim, self.root_dim, self.comp_margin) != (8, 3, 1):
            raise ConfigError("board_dim=8, root_dim=3, comp_margin=1 are the layout the board types are defined on")
        for name in ("types_start", "types_end", "types_ramp"):  # a list as the hashable tuple it stands for: the
            try:  # config is a static argument of the samplers' jits, which refused a list only at evaluation
                object.__setattr__(self, name, tuple(getattr(self, name)))
            except TypeError:
                raise ConfigError(f"{name} must be a sequence, got {getattr(self, name)!r}") from None
        for name in ("types_start", "types_end"):
            p = getattr(self, name)
            for i, v in enumerate(p):  # NaN and inf passed the checks below and made the type probabilities NaN
                check_finite(f"{name}[{i}]", v)
            if len(p) != 3 or min(p) < 0 or sum(p) <= 0:
                raise ConfigError(f"{name} must be 3 non-negative type probabilities with a positive sum, got {p}")
        if len(self.types_ramp) != 2:
            raise ConfigError(f"types_ramp must be (start, end) epochs, got {self.types_ramp}")
        for i, epoch in enumerate(self.types_ramp):
            check_integer(f"types_ramp[{i}]", epoch)
        if not 0 <= self.types_ramp[0] <= self.types_ramp[1]:
            raise ConfigError(f"types_ramp must be (start, end) epochs with 0 <= start <= end, got {self.types_ramp}")
        check_range("mask_max", self.mask_max, 0.0, 1.0)
        check_range("mask_min", self.mask_min, 0.0, self.mask_max)
        check_range("patch_p", self.patch_p, 0.0, 1.0)
        check_positive("patch_from", self.patch_from, allow_zero=True)
        sizes = {"single": POSITIONS * self.n_backgrounds, "double": 900 * self.n_backgrounds,
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


def sizes(cfg: Boards, kind: str) -> tuple[int, int]:
    """(groups, tuples per group) of a type. Tuples are numbered group by group: single (k, x, y, bck), double
    ((k1, k2), (x1, y1, x2, y2), bck) and composition (c, x, y, bck), each in lexicographic order."""
    check_choice("kind", kind, TYPES)
    nb = cfg.n_backgrounds
    return {"single": (cfg.n_roots, POSITIONS * nb), "double": (cfg.n_roots**2, 900 * nb),
            "composition": (cfg.n_composites, 4 * nb)}[kind]


def decode(cfg: Boards, kind: str, group, within) -> jax.Array:
    """The tuple columns of the `within`-th tuple of a group (sizes' numbering), computed arithmetically (on
    device, no table)."""
    check_choice("kind", kind, TYPES)  # an unknown kind would decode as a composition
    nb = cfg.n_backgrounds
    bck = within % nb
    if kind == "single":
        return jnp.stack([group, within // (6 * nb), (within // nb) % 6, bck])
    if kind == "double":  # 25 second positions per first one: x2 != x1, y2 != y1 in increasing order
        pp = within // nb
        x1, y1, a, b = pp // 150, (pp // 25) % 6, (pp % 25) // 5, pp % 5
        return jnp.stack([group // cfg.n_roots, x1, y1, group % cfg.n_roots, a + (a >= x1), b + (b >= y1), bck])
    return jnp.stack([group, within // (2 * nb), (within // nb) % 2, bck])


def test_indices(cfg: Boards, key: jax.Array) -> dict[str, np.ndarray]:
    """The balanced split: per type, [groups, test_per_group] sorted within-group indices of the test tuples (drawn
    without replacement per group); every other tuple is a training tuple."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    out = {}
    for kind in TYPES:
        groups, per = sizes(cfg, kind)
        out[kind] = np.stack([np.sort(rng.choice(per, cfg.test_per_group, replace=False)) for _ in range(groups)])
    return out


def placement_row(cfg: Boards, kind: str, cols: jax.Array, composites: jax.Array) -> jax.Array:
    """[17] four (root, row, col, active) placements (later ones drawn on top) and the background, from one tuple's
    columns (composites [n_composites, 2, 2] root ids)."""
    check_choice("kind", kind, TYPES)  # an unknown kind would leave every placement inactive: a board of no object
    cols = cols.astype(jnp.int32)
    zero = 0 * cols[0]  # computed from cols (not a fresh constant), so every part shares the batch's sharding
    one = zero + 1
    place = [zero + jnp.zeros(4, jnp.int32)] * N_PLACEMENTS
    if kind in ("single", "double"):
        place[0] = jnp.stack([cols[0], cols[1], cols[2], one])
    if kind == "double":
        place[1] = jnp.stack([cols[3], cols[4], cols[5], one])
    if kind == "composition":
        roots = jax.nn.one_hot(cols[0], cfg.n_composites, dtype=jnp.int32) @ composites.reshape(-1, 4)  # [4]
        place = [jnp.stack([roots[2 * i + j], cols[1] + 4 * i, cols[2] + 4 * j, one]) for i in range(2)
                 for j in range(2)]
    return jnp.concatenate([*place, cols[-1:]])


@dataclasses.dataclass(frozen=True, eq=False)
class BoardData:
    """The blueprint and the split: test [groups, test_per_group] within-group indices per type."""

    cfg: Boards
    roots: np.ndarray
    composites: np.ndarray
    test: dict

    def tuples(self, split: str, kind: str) -> np.ndarray:
        """The split's tuples of a type [N, columns], in sizes' numbering."""
        check_choice("split", split, ("train", "test"))  # any other split would read as train
        groups, per = sizes(self.cfg, kind)
        in_test = np.zeros((groups, per), bool)
        np.put_along_axis(in_test, self.test[kind], True, axis=1)
        rows = np.flatnonzero(in_test.ravel() == (split == "test"))
        return np.asarray(_decode_all(self.cfg, kind, per, jnp.asarray(rows)))

    @functools.cache
    def double_test_seen(self) -> np.ndarray:
        """[N] bool, per double test tuple (in tuples("test", "double") order): whether a training tuple draws the
        same board (mostly its swap (k2, x2, y2, k1, x1, y1, bck), of the group (k2, k1), where the roots do not
        overlap). Exact: only double tuples draw 10..18 object cells, two 3x3 squares at different rows and
        columns, which fix the background and the two places up to their order; the root drawn second shows whole,
        so per order it is the root whose pattern the board shows there (or none), and every root drawn first is
        tried: 2 n_roots candidate tuples a test tuple, rendered and compared."""
        cfg, test = self.cfg, self.tuples("test", "double")  # [N, 7]
        own = np.asarray(self.render(self.rows("double", test))["board"])  # [N, 64]
        i, j = np.divmod(np.arange(9), 3)
        c = np.empty((len(test), 2, cfg.n_roots, 7), test.dtype)  # [N, order, root drawn first, columns]
        c[..., 0], c[..., 6] = np.arange(cfg.n_roots), test[:, None, None, 6]
        for o, (first, second) in enumerate(((test[:, 1:3], test[:, 4:6]), (test[:, 4:6], test[:, 1:3]))):
            shown = np.take_along_axis(own, (second[:, :1] + i) * 8 + second[:, 1:] + j, 1) - 10  # [N, 9]
            top = np.all(shown[:, None] == self.roots.reshape(1, -1, 9), -1)  # [N, n_roots] at most one
            c[:, o, :, 1:3], c[:, o, :, 4:6] = first[:, None], second[:, None]
            c[:, o, :, 3] = np.argmax(top, 1)[:, None]  # root 0 where none: its board differs there
        c = c.reshape(len(test), 2 * cfg.n_roots, 7)
        x1, y1, x2, y2 = c[..., 1], c[..., 2], c[..., 4], c[..., 5]
        within = (position_of(x1, y1) * 25 + (x2 - (x2 > x1)) * 5 + y2 - (y2 > y1)) * cfg.n_backgrounds + c[..., 6]
        held = np.any(self.test["double"][c[..., 0] * cfg.n_roots + c[..., 3]] == within[..., None], -1)  # decode^-1
        drawn = np.asarray(self.render(self.rows("double", c.reshape(-1, 7)))["board"]).reshape(*c.shape[:2], 64)
        return np.any(np.all(drawn == own[:, None], -1) & ~held, 1)

    def rows(self, kind: str, tuples: np.ndarray) -> jax.Array:
        """[N, 17] placement rows of tuples [N, columns] of a type."""
        return _placement_rows(self.cfg, kind, jnp.asarray(tuples, jnp.int32), jnp.asarray(self.composites))

    def render(self, rows: jax.Array) -> dict:
        """Boards and their per-cell annotations for placement rows [..., 17] (see render; every entry gains the
        leading axes of rows)."""
        rows = jnp.asarray(rows)
        one = functools.partial(render, jnp.asarray(self.roots))
        for _ in range(rows.ndim - 1):
            one = jax.vmap(one)
        return one(rows)

    @functools.cache
    def sampler(self, split: str = "train"):
        """sample(cfg, key, step) -> Prompt of one board: a type drawn with the epoch's type probabilities (epoch =
        step // cfg.steps_per_epoch), a tuple uniform over the split's tuples of that type, masked for the epoch.

        inputs [64] the masked board, targets [64] the clean board, mask [64] ones (the loss covers every cell);
        info: "masked" [64] bool (the cells set to UNK), "type" [], "epoch" [], and render's annotations "root",
        "cell", "object" [64] and "background" []. The same function object each call (jitted callers compile once).
        """
        check_choice("split", split, ("train", "test"))
        test = {k: jnp.asarray(v) for k, v in self.test.items()}
        return functools.partial(_sample_board, split, test, jnp.asarray(self.roots), jnp.asarray(self.composites))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode_all(cfg: Boards, kind: str, per: int, rows: jax.Array) -> jax.Array:
    return jax.vmap(lambda r: decode(cfg, kind, r // per, r % per))(rows)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _placement_rows(cfg: Boards, kind: str, tuples: jax.Array, composites: jax.Array) -> jax.Array:
    return jax.vmap(lambda t: placement_row(cfg, kind, t, composites))(tuples)


def uniform_int(u: jax.Array, n: int) -> jax.Array:
    """floor(u n) for uniforms u in [0, 1), as int32 in 0..n-1 (one flat uniform draw serves every random choice of
    a board: XLA compiles each random call's hash apart, so fewer calls compile much faster)."""
    return jnp.minimum((u * n).astype(jnp.int32), n - 1)


def _sample_board(split: str, test: dict, roots, composites, cfg: Boards, key: jax.Array, step) -> Prompt:
    epoch = step // cfg.steps_per_epoch
    k_board, k_mask = jax.random.split(key)
    u = jax.random.uniform(k_board, (1 + 2 * len(TYPES),))
    kind = jnp.sum(u[0] >= jnp.cumsum(type_probabilities(cfg, epoch))[:-1]).astype(jnp.int32)
    row = None
    for i, t in enumerate(TYPES):
        groups, per = sizes(cfg, t)
        g = uniform_int(u[1 + 2 * i], groups)
        held = jax.nn.one_hot(g, groups, dtype=jnp.int32) @ test[t]  # [test_per_group] sorted
        if split == "test":
            within = jax.nn.one_hot(uniform_int(u[2 + 2 * i], cfg.test_per_group), cfg.test_per_group,
                                    dtype=jnp.int32) @ held
        else:  # the j-th index of 0..per-1 without the held-out ones
            within = uniform_int(u[2 + 2 * i], per - cfg.test_per_group)
            for h in range(cfg.test_per_group):
                within = within + (within >= held[h])
        r = placement_row(cfg, t, decode(cfg, t, g, within), composites)
        row = r if row is None else jnp.where(kind == i, r, row)
    out = render(roots, row)
    inputs, masked = mask_board(cfg, k_mask, out, epoch)
    board = out.pop("board")
    return Prompt(inputs=inputs, targets=board, mask=jnp.ones(board.shape, jnp.float32),
                  info={**out, "masked": masked, "type": kind, "epoch": jnp.asarray(epoch, jnp.int32)})


def build(cfg: Boards) -> BoardData:
    """The blueprint and the balanced split, from cfg.blueprint_seed."""
    k_blue, k_split = jax.random.split(seed_key(cfg.blueprint_seed))
    roots, composites = blueprint(cfg, k_blue)
    return BoardData(cfg, roots, composites, test_indices(cfg, k_split))


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
        # one-hot contractions, not gathers: vmapped over a batch sharded on "data", a gather from the replicated
        # blueprint has no unambiguous output sharding
        pattern = jax.nn.one_hot(k, roots.shape[0], dtype=jnp.int32) @ roots.reshape(roots.shape[0], 9)
        board = jnp.where(inside, 10 + jax.nn.one_hot(index, 9, dtype=jnp.int32) @ pattern, board)
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
    u = jax.random.uniform(key, (64 + 4,))  # the cells, then patch use, row, column and corner
    mask = u[:64] < mask_probability(cfg, epoch)
    r, c = jnp.divmod(jnp.arange(64), 8)
    objects = rendered["root"] >= 0
    min_r, max_r = jnp.min(jnp.where(objects, r, 8)), jnp.max(jnp.where(objects, r, -1))
    min_c, max_c = jnp.min(jnp.where(objects, c, 8)), jnp.max(jnp.where(objects, c, -1))
    corner = uniform_int(u[67], 4)
    composite = jnp.sum(objects) > 18
    pr = jnp.where(composite, jnp.where(corner < 2, min_r, max_r - 2), uniform_int(u[65], 6))
    pc = jnp.where(composite, jnp.where(corner % 2 == 0, min_c, max_c - 2), uniform_int(u[66], 6))
    patch = (r >= pr) & (r < pr + 3) & (c >= pc) & (c < pc + 3)
    mask = mask | (patch & (epoch >= cfg.patch_from) & (u[64] < cfg.patch_p))
    return jnp.where(mask, cfg.unk, rendered["board"]), mask


def eval_prompts(data: BoardData, split: str, key: jax.Array, epoch: int, per_type: tuple[int, int, int],
                 rounds: int = 1) -> Prompt:
    """A fixed evaluation set: per type, per_type[t] of the split's tuples evenly spaced in the split's order (all of
    them when there are no more), each masked independently `rounds` times for `epoch` (the official test set:
    (40, 100, 20) tuples, 2 rounds; evenly spaced, a choice of ours, covers every group of the double test tuples).
    info as the sampler's plus "seen": whether the board is a training board (every training one; of the test ones,
    the double boards BoardData.double_test_seen flags). Every leaf has a leading [sum(per_type) * rounds] axis."""
    cfg = data.cfg
    chosen = [spread(data.tuples(split, t), n) for t, n in zip(TYPES, per_type)]
    seen = [np.full(len(c), split == "train") for c in chosen]  # a single or composite board is its tuple's alone
    if split == "test":
        seen[1] = spread(data.double_test_seen(), per_type[1])
    rows = jnp.concatenate([data.rows(t, c) for t, c in zip(TYPES, chosen)])
    kinds = jnp.concatenate([jnp.full(len(c), i) for i, c in enumerate(chosen)])
    rows, kinds, seen = jnp.tile(rows, (rounds, 1)), jnp.tile(kinds, rounds), jnp.tile(np.concatenate(seen), rounds)

    return _masked_prompts(cfg, jnp.asarray(data.roots), rows, kinds, seen, jax.random.split(key, len(kinds)), epoch)


@functools.partial(jax.jit, static_argnums=0)
def _masked_prompts(cfg: Boards, roots, rows, kinds, seen, keys, epoch) -> Prompt:
    def one(row, kind, s, k):
        out = render(roots, row)
        inputs, masked = mask_board(cfg, k, out, epoch)
        board = out.pop("board")
        return Prompt(inputs=inputs, targets=board, mask=jnp.ones(board.shape, jnp.float32),
                      info={**out, "masked": masked, "type": kind, "seen": s, "epoch": jnp.asarray(epoch, jnp.int32)})

    return jax.vmap(one)(rows, kinds, seen, keys)


def spread(rows: np.ndarray, n: int) -> np.ndarray:
    """n rows evenly spaced over rows (all of them if n >= len(rows))."""
    return rows if n >= len(rows) else rows[np.linspace(0, len(rows) - 1, n).round().astype(int)]


def board_metrics(pred: jax.Array, batch: Prompt) -> dict:
    """The notes' accuracies for predicted tokens pred [B, 64] of a batch: token accuracy over every cell, the
    error on masked cells only (the informative one) and on masked object cells (chance: about 0.9 for the ten
    colours), board accuracy (no wrong cell) overall, per type and on the double boards that are no training board
    (eval_prompts' info "seen"). NaN where there is nothing to score (no masked cell, no board of a type; no unseen
    double board in a training set): 0 would read as a perfect completion or as no board drawn right."""
    wrong = pred != batch.targets
    masked = batch.info["masked"]
    masked_object = masked & (batch.info["root"] >= 0)
    right_board = ~jnp.any(wrong, -1)
    out = {"token_accuracy": 1.0 - jnp.mean(wrong),
           "masked_error": _share(wrong, masked),
           "masked_object_error": _share(wrong, masked_object),
           "board_accuracy": jnp.mean(right_board)}
    for i, t in enumerate(TYPES):
        out[f"board_accuracy_{t}"] = _share(right_board, batch.info["type"] == i)
    out["board_accuracy_double_unseen"] = _share(right_board, (batch.info["type"] == 1) & ~batch.info["seen"])
    return out


def _share(hit: jax.Array, among: jax.Array) -> jax.Array:
    """The fraction of the `among` entries that are `hit` (bool arrays of one shape), NaN where `among` is empty."""
    return ratio_or_nan(jnp.sum(hit & among), jnp.sum(among))
