"""Prompts/s of jaxicl's on-device samplers against a straightforward numpy sampler on the host plus the transfer.

python -m benchmarks.sampler_throughput [--smoke] [--batch 1024] [--repeats 5] [--out DIR]

One batch is one call: jaxicl's jitted `sample_batch` (the batch born on the device), against numpy drawing the
same distribution vectorised over the batch (no Python loop per prompt) and `jax.device_put` of its inputs,
targets and mask. Families at their experiments' sizes: linear_regression (d 10, N 10), nearest_neighbor (d 8,
N 16, 2 classes), autoregressive (orthogonal, d 6, T 50), affine_recurrence (d 1, T 16), instructions (rows of
the train split's table) and boards (rendered and masked; numpy draws the rows from precomputed placement tables
and masks cells only, without the patch masking that jaxicl also does, so it does less work than jaxicl).
jaxicl is timed with threefry unrolled (device_*, as the engine's training chunks draw; the ratio to numpy is of
these) and, on CPU, where the two lowerings differ, also with JAX's rolled one (rolled_*, a sampler jitted on its
own); first_call_s is the compile and first batch of each. Each other key implementation of jaxicl.prng.PRNG_IMPLS
is timed as well ({impl}_prompts_per_s; its own lowering), the measurement behind TrainConfig.prng_impl's default.
The JSON and table are rewritten after each family, so a run stopped at a time limit keeps the families it finished.
"""

import contextlib
import time

import jax
import numpy as np

from benchmarks import argument_parser
from benchmarks.output import OUT_HELP, results_dir, write_results
from benchmarks.timing import best_seconds
from jaxicl.prng import PRNG_IMPLS, seed_key, unrolled_threefry
from jaxicl.tasks import affine_recurrence as ar_task
from jaxicl.tasks import autoregressive as auto_task
from jaxicl.tasks import boards as boards_task
from jaxicl.tasks import instructions as instr_task
from jaxicl.tasks import linear_regression as lr
from jaxicl.tasks import nearest_neighbor as nn_task
from jaxicl.tasks import sample_batch
from jaxicl.tasks.batching import takes_step


def numpy_linear_regression(cfg: lr.LinearRegression, rng: np.random.Generator, b: int) -> tuple:
    n = cfg.n_context + 1
    w = rng.standard_normal((b, cfg.dim, 1), np.float32)
    x = rng.standard_normal((b, n, cfg.dim), np.float32)
    y = (x @ w)[..., 0]
    shown = np.concatenate([y[:, :-1], np.zeros((b, 1), np.float32)], 1)
    mask = np.zeros((b, n), np.float32)
    mask[:, -1] = 1
    return np.concatenate([x, shown[..., None]], -1), y, mask


def numpy_nearest_neighbor(cfg: nn_task.NearestNeighbor, rng: np.random.Generator, b: int) -> tuple:
    n = cfg.n_context
    x = rng.standard_normal((b, n + 1, cfg.dim), np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    labels = nn_task.simplex_vertices(cfg.num_classes).astype(np.float32)[rng.integers(0, cfg.num_classes, (b, n))]
    nearest = np.argmax(np.einsum("bnd,bd->bn", x[:, :-1], x[:, -1]), -1)
    targets = np.zeros((b, n + 1), np.float32)
    targets[:, -1] = labels[np.arange(b), nearest, 0]
    flag = np.zeros((b, n + 1, 1), np.float32)
    flag[:, -1] = 1
    tokens = np.concatenate([x, np.concatenate([labels, np.zeros((b, 1, 1), np.float32)], 1), flag], -1)
    return tokens, targets, (flag[..., 0] > 0).astype(np.float32)


def numpy_autoregressive(cfg: auto_task.Autoregressive, rng: np.random.Generator, b: int) -> tuple:
    """Block-diagonal 2x2 rotations with uniform angles (the orthogonal family, Q = I), s_0 = init_scale * ones."""
    theta = rng.uniform(0, 2 * np.pi / cfg.mu, (b, cfg.dim // 2)).astype(np.float32)
    cos, sin = np.cos(theta), np.sin(theta)
    w = np.zeros((b, cfg.dim, cfg.dim), np.float32)
    i = np.arange(0, cfg.dim, 2)
    w[:, i, i], w[:, i, i + 1], w[:, i + 1, i], w[:, i + 1, i + 1] = cos, -sin, sin, cos
    s = np.empty((b, cfg.seq_len + 1, cfg.dim), np.float32)
    s[:, 0] = cfg.init_scale
    for t in range(cfg.seq_len):
        s[:, t + 1] = np.einsum("bij,bj->bi", w, s[:, t])
    prev = np.concatenate([np.zeros_like(s[:, :1]), s[:, :-2]], 1)
    return np.concatenate([np.zeros_like(s[:, :-1]), s[:, :-1], prev], -1), s[:, 1:], np.ones((b, cfg.seq_len),
                                                                                               np.float32)


def numpy_affine_recurrence(cfg: ar_task.AffineRecurrence, rng: np.random.Generator, b: int) -> tuple:
    d = cfg.dim
    a = rng.uniform(-1, 1, (b, d, d)).astype(np.float32) / np.sqrt(d)
    c = rng.uniform(-1, 1, (b, d)).astype(np.float32)
    xs = np.empty((b, cfg.seq_len + 1, d), np.float32)
    xs[:, 0] = rng.uniform(-1, 1, (b, d))
    for t in range(cfg.seq_len):
        xs[:, t + 1] = np.einsum("bij,bj->bi", a, xs[:, t]) + c
    return xs[:, :-1], xs[:, 1:, 0], np.ones((b, cfg.seq_len), np.float32)


def numpy_instructions(data: instr_task.InstructionData, rng: np.random.Generator, b: int) -> tuple:
    split = data.splits["train"]
    rows = rng.integers(0, len(split), b)
    tokens, arrow = split.tokens[rows], split.arrow[rows]
    mask = (np.arange(tokens.shape[1] - 1) == arrow[:, None]).astype(np.float32)
    return tokens[:, :-1], tokens[:, 1:], mask


def numpy_boards(tables: tuple, rng: np.random.Generator, b: int) -> tuple:
    """tables: (cfg, roots [R, 3, 3], the placement rows of every type one after another [N, 17], where each type's
    rows start [3], how many each type has [3], type probabilities [3], mask rate). Each prompt draws its type, then
    a row of that type, as the device sampler draws its tuple."""
    cfg, roots, all_rows, starts, sizes, probs, rate = tables
    kinds = rng.choice(len(sizes), b, p=probs)
    rows = all_rows[starts[kinds] + rng.integers(0, sizes[kinds])]
    place = rows[:, :-1].reshape(b, boards_task.N_PLACEMENTS, 4)
    r, c = np.divmod(np.arange(64), 8)
    board = np.repeat(rows[:, -1:], 64, 1)
    flat_roots = roots.reshape(len(roots), 9)
    for q in range(boards_task.N_PLACEMENTS):
        k, x, y, active = (place[:, q, j, None] for j in range(4))
        dr, dc = r - x, c - y
        inside = (active > 0) & (dr >= 0) & (dr < 3) & (dc >= 0) & (dc < 3)
        cell = np.clip(dr, 0, 2) * 3 + np.clip(dc, 0, 2)
        board = np.where(inside, 10 + np.take_along_axis(flat_roots[k[:, 0]], cell, 1), board)
    masked = rng.random((b, 64)) < rate
    return np.where(masked, cfg.unk, board), board, np.ones((b, 64), np.float32)


def families(smoke: bool) -> dict:
    """name -> (device sampler, its cfg, numpy sampler, its argument)."""
    lr_cfg = lr.LinearRegression(dim=10, n_context=10)
    nn_cfg = nn_task.NearestNeighbor(dim=8, n_context=16)
    auto_cfg = auto_task.Autoregressive(family="orthogonal", dim=6, seq_len=50)
    ar_cfg = ar_task.AffineRecurrence(dim=1, seq_len=16)
    instr = instr_task.build(instr_task.Instructions())
    board_cfg = boards_task.Boards()
    boards = boards_task.build(board_cfg)
    epoch = 0
    rows_by_type = [np.asarray(boards.rows(t, boards.tuples("train", t)[:2000 if smoke else None]))
                    for t in boards_task.TYPES]
    sizes = np.array([len(r) for r in rows_by_type])
    tables = (board_cfg, np.asarray(boards.roots), np.concatenate(rows_by_type), np.cumsum(sizes) - sizes, sizes,
              np.asarray(boards_task.type_probabilities(board_cfg, epoch)),
              float(boards_task.mask_probability(board_cfg, epoch)))
    return {"linear_regression": (lr.sample, lr_cfg, numpy_linear_regression, lr_cfg),
            "nearest_neighbor": (nn_task.sample, nn_cfg, numpy_nearest_neighbor, nn_cfg),
            "autoregressive": (auto_task.sample, auto_cfg, numpy_autoregressive, auto_cfg),
            "affine_recurrence": (ar_task.sample, ar_cfg, numpy_affine_recurrence, ar_cfg),
            "instructions": (instr.sampler("train"), instr.cfg, numpy_instructions, instr),
            "boards": (boards.sampler("train"), board_cfg, numpy_boards, tables)}


def bench(name: str, family: tuple, batch: int, repeats: int) -> dict:
    """One row: the family's prompts/s on device (threefry unrolled, as in the engine's training chunks, and JAX's
    rolled CPU lowering, as in a sampler called on its own; jaxicl.prng; the other key implementations) and with
    numpy plus the transfer."""
    sample, cfg, host_sample, host_arg = family
    step = {"step": 0} if takes_step(sample) else {}
    # sliced into keys before any clock starts: the first slice of a key array compiles (0.6 s on the Zen 3), and
    # it fell in the first family's device_first_call_s
    keys = iter(list(jax.random.split(seed_key(0), 20 * (repeats + 1))))
    row = {"family": name, "batch": batch}

    def new_program():  # a fresh jit for each timing: the lowering context is not part of jit's cache key
        return jax.jit(lambda key: sample_batch(sample, cfg, key, batch, axis=None, **step))

    lowerings = [("device", unrolled_threefry), ("rolled", contextlib.nullcontext)]
    for label, lowering in lowerings[:2 if jax.default_backend() == "cpu" else 1]:  # elsewhere one lowering
        device = new_program()
        start = time.perf_counter()
        with lowering():
            jax.block_until_ready(device(next(keys)))
        row[f"{label}_first_call_s"] = time.perf_counter() - start
        row[f"{label}_prompts_per_s"] = batch / best_seconds(lambda: device(next(keys)), repeats)
    for impl in PRNG_IMPLS[1:]:  # the other key implementations a run may choose (TrainConfig.prng_impl)
        device = new_program()
        impl_keys = iter(list(jax.random.split(seed_key(0, impl), repeats + 1)))
        jax.block_until_ready(device(next(impl_keys)))
        row[f"{impl}_prompts_per_s"] = batch / best_seconds(lambda: device(next(impl_keys)), repeats)
    rng = np.random.default_rng(0)
    host_s = best_seconds(lambda: [jax.device_put(a) for a in host_sample(host_arg, rng, batch)], repeats)
    row["numpy_prompts_per_s"] = batch / host_s
    row["device_over_numpy"] = row["device_prompts_per_s"] * host_s / batch
    return row


def main(argv=None) -> None:
    ap = argument_parser("benchmarks.sampler_throughput", __doc__)
    ap.add_argument("--smoke", action="store_true", help="small batches, the tests")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args(argv)
    batch, repeats = (8, 1) if args.smoke else (args.batch, args.repeats)
    rows, out = [], results_dir(args.out, args.smoke)
    notes = (f"{jax.device_count()} {jax.default_backend()} device(s); best of {repeats} batches; numpy includes "
             "jax.device_put of inputs, targets, mask")
    for name, family in families(args.smoke).items():
        rows.append(bench(name, family, batch, repeats))
        print(rows[-1], flush=True)
        # what is done survives a kill
        path = write_results("sampler_throughput", rows, notes, out_dir=out, smoke=args.smoke)
    print(path)


if __name__ == "__main__":
    main()
