"""The full (layer x position x head) activation-patching grid of a 3-layer GPT: one compiled jaxicl program vs
TransformerLens's patching module vs a loop of one jitted jaxicl forward pass per patch.

python -m benchmarks.patching [--smoke] [--batches 1 8 32] [--repeats 3] [--budget-mb 64]

The model is jaxicl.models.gpt.GPT with token inputs at the affine_mechanism sizes (3 layers, d_model 64,
4 heads, d_mlp 256, 16 positions, vocabulary 32), random weights; TransformerLens gets the same weights
in a HookedTransformer (attention biases 0), the same clean and corrupted batches and the same metric
(the mean logit of an answer token at the last position), and patches hook_z per (layer, position,
head) with `patching.get_act_patch_attn_head_out_by_pos`. The grids must agree to float tolerance or
nothing is timed. Every timing includes the clean run whose activations are patched in (jaxicl's
activation_patching makes it inside its call; TransformerLens's run_with_cache and the loop's run_with_cache are
timed with their grids). TransformerLens runs in the PyTorch environment benchmarks/.venv-torch (Python 3.11;
`make benchmarks/.venv-torch` installs it); where it is missing the benchmark says so and times the
jaxicl loop only. Also reported: the compiled grid's memory (XLA's analysis) by chunk size, and the
largest chunk that fits --budget-mb.
"""

import os
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import argument_parser
from benchmarks.output import OUT_HELP, results_dir, write_results
from benchmarks.timing import best_seconds
from jaxicl.analysis.cache import batch_site_info, run_with_cache
from jaxicl.analysis.patching import (activation_patching, build_grid, grid_memory, patched_predictions,
                                     resolve_chunk_size)
from jaxicl.models.gpt import GPT
from jaxicl.sites import Patch

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_PYTHON = os.path.join(HERE, ".venv-torch", "bin", "python")


def tl_weights(model: GPT) -> dict[str, np.ndarray]:
    """The GPT's parameters under TransformerLens's state_dict names and layouts."""
    w = {"embed.W_E": model.embed[...], "pos_embed.W_pos": model.pos_embed[...], "unembed.W_U": model.unembed[...],
         "unembed.b_U": model.unembed_bias[...], "ln_final.w": model.ln_final.scale[...],
         "ln_final.b": model.ln_final.bias[...]}
    for l, b in enumerate(model.blocks):
        p = f"blocks.{l}."
        w |= {p + "ln1.w": b.ln1.scale[...], p + "ln1.b": b.ln1.bias[...], p + "ln2.w": b.ln2.scale[...],
              p + "ln2.b": b.ln2.bias[...], p + "attn.W_Q": b.attn.wq[...], p + "attn.W_K": b.attn.wk[...],
              p + "attn.W_V": b.attn.wv[...], p + "attn.W_O": b.attn.wo[...], p + "mlp.W_in": b.mlp.w_in[...],
              p + "mlp.b_in": b.mlp.bias_in[...], p + "mlp.W_out": b.mlp.w_out[...], p + "mlp.b_out": b.mlp.bias_out[...]}
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def main(argv=None) -> None:
    ap = argument_parser("benchmarks.patching", __doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (the tests)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="prompts per clean/corrupted batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-mb", type=float, default=64.0)
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args(argv)
    sizes = dict(d_model=16, n_layers=2, n_heads=2, d_mlp=32, max_len=6, vocab_size=8) if args.smoke else \
        dict(d_model=64, n_layers=3, n_heads=4, d_mlp=256, max_len=16, vocab_size=32)
    model = GPT(**sizes, init_std=0.1, rngs=nnx.Rngs(0))
    rows, notes = [], [f"{jax.device_count()} {jax.default_backend()} device(s); best of {args.repeats} after a "
                       "warm-up call; first_call includes compiling"]
    for batch in [2] if args.smoke else args.batches:
        row, note = bench_batch(model, sizes, batch, args.repeats, args.budget_mb * 2**20)
        print(row, flush=True)
        rows.append(row)
        notes += [note] if note not in notes else []
    out = results_dir(args.out, args.smoke)
    print(write_results("patching", rows, "; ".join(notes), out_dir=out, smoke=args.smoke))


def bench_batch(model: GPT, sizes: dict, batch: int, repeats: int, budget: float) -> tuple[dict, str]:
    """One row of the table: the (layer x position x head) grid of hook_z patches on `batch` prompts."""
    graphdef, params = nnx.split(model)
    t, v = sizes["max_len"], sizes["vocab_size"]
    clean = jax.random.randint(jax.random.key(batch), (batch, t), 0, v)
    corrupted = jax.random.randint(jax.random.key(batch + 1), (batch, t), 0, v)
    answer = clean[:, 0]
    prompts = jnp.arange(batch)

    def metric(logits):  # [B, T, V] -> the mean logit of each prompt's answer token at the last position
        return logits[prompts, -1, answer].mean()

    sites = [f"layer{l}.attn.z" for l in range(sizes["n_layers"])]
    grid_fn = lambda: activation_patching(graphdef, params, clean, corrupted, metric, sites, by="pos_head")  # noqa: E731
    start = time.perf_counter()
    grid = grid_fn()
    compiled_first = time.perf_counter() - start
    compiled_best = best_seconds(grid_fn, repeats)

    # the loop: one jitted forward pass per patch, a host sync after each, after the clean run (timed, as the grid's)
    plan = build_grid(batch_site_info(graphdef, params, clean), sites, "pos_head", clean.shape[1])
    step = jax.jit(lambda values, masks: metric(patched_predictions(graphdef, params, corrupted,
                                                                    Patch(values=values, masks=masks))))

    def loop():
        values = run_with_cache(graphdef, params, clean, sites)[1]
        return np.array([float(step(values, {s: m[g] for s, m in plan.masks.items()}))
                         for g in range(len(next(iter(plan.masks.values()))))]).reshape(plan.shape)

    np.testing.assert_allclose(loop(), grid, rtol=1e-5, atol=1e-6)
    loop_best = best_seconds(loop, repeats)
    chunk = resolve_chunk_size("auto", corrupted)
    row = {"batch": batch, "grid": "x".join(map(str, grid.shape)), "chunk": chunk or "all",
           "jaxicl_grid_s": compiled_best, "jaxicl_first_call_s": compiled_first, "jaxicl_loop_s": loop_best,
           "loop_over_grid": loop_best / compiled_best}
    tl = transformer_lens(model, clean, corrupted, answer, grid, repeats)
    if isinstance(tl, str):
        note = tl
    else:
        row |= {"transformer_lens_s": tl["seconds"], "tl_over_grid": tl["seconds"] / compiled_best,
                "max_abs_grid_diff": tl["max_diff"]}
        note = f"TransformerLens {tl['version']} with torch {tl['torch']}, eager, CPU"
    memory = {c: grid_memory(graphdef, params, clean, corrupted, metric, sites, "pos_head", c)
              for c in (None, 16, 1)}
    fitting = [c for c in (None, 16, 1) if memory[c] <= budget]
    row |= {"grid_memory_mb": memory[None] / 2**20, "chunk16_memory_mb": memory[16] / 2**20,
            "chunk_for_budget": "all" if fitting and fitting[0] is None else (fitting[0] if fitting else "none")}
    return row, note


def transformer_lens(model: GPT, clean, corrupted, answer, grid: np.ndarray, repeats: int) -> dict | str:
    """TransformerLens's grid and its best wall time, or why it did not run."""
    if not os.path.exists(TORCH_PYTHON):
        return f"TransformerLens not timed: no PyTorch environment at {TORCH_PYTHON} (make benchmarks/.venv-torch)"
    with tempfile.TemporaryDirectory() as d:
        cfg = {"n_layers": len(model.blocks), "n_heads": model.n_heads, "d_model": model.embed.shape[1],
               "d_head": model.blocks[0].attn.wq.shape[2], "d_mlp": model.blocks[0].mlp.w_in.shape[1],
               "n_ctx": model.max_len, "d_vocab": model.vocab_size}
        np.savez(os.path.join(d, "in.npz"), clean=np.asarray(clean), corrupted=np.asarray(corrupted),
                 answer=np.asarray(answer), **tl_weights(model), **cfg)
        done = subprocess.run([TORCH_PYTHON, os.path.join(HERE, "tl_patching.py"), os.path.join(d, "in.npz"),
                               os.path.join(d, "out.npz"), str(repeats + 1)], capture_output=True, text=True)
        if done.returncode:
            return f"TransformerLens not timed: its run failed: {done.stderr[-500:]}"
        out = np.load(os.path.join(d, "out.npz"))
        tl_grid = out["grid"]
        diff = float(np.max(np.abs(tl_grid - grid)))
        if not np.allclose(tl_grid, grid, rtol=1e-4, atol=1e-5):
            raise SystemExit(f"TransformerLens's grid differs from jaxicl's (max |diff| {diff:.3g}): not timing them")
        return {"seconds": float(np.min(out["times"][1:])), "max_diff": diff, "torch": str(out["torch"]),
                "version": str(out["version"])}


if __name__ == "__main__":
    main()
