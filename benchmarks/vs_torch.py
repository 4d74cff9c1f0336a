"""Training steps/s of jaxicl against plain eager PyTorch on the same workloads, in one invocation, as a ratio.

python -m benchmarks.vs_torch [--smoke | --gpu] [--workloads lsa gpt_small gpt_large] [--repeats 3] [--out DIR]

Workloads (fresh Gaussian linear-regression prompts every step, Adam lr 1e-3):
  lsa        the gd_equivalence model: 1 linear self-attention layer, d = 10, N = 10 (paired tokens), batch 256,
             loss at the query
  gpt_small  the GPT decoder (jaxicl.models.gpt), 2 layers, 4 heads, width 64, d = 20, 41 points interleaved
             (81 tokens), batch 64, loss at every x token (Garg et al. 2022's setting at a small size)
  gpt_large  the same at Garg et al.'s size: 12 layers, 8 heads, width 256
jaxicl is timed as one compiled chunk of training steps (the engine's lax.scan, sampling on device) on one device,
as PyTorch runs on one, whatever the host has (the matmul peak below is one device's too); PyTorch
(benchmarks/torch_reference.py, in benchmarks/.venv-torch; `make benchmarks/.venv-torch`) as an eager loop over
the same number of steps with torch.randn prompts. The two sides' timed runs alternate (--repeats + 1 of each, the
first a warm-up; the best of the rest counts), so a drift in the machine's speed during the run reaches both. Before
timing, the PyTorch model gets jaxicl's initial weights and both compute loss and gradients on one batch, there and
at weights moved off the initialisation (probe_weights: at init the lsa attention and the GPT's GELU barely touch
the outputs): they must agree to float32 tolerance, with equal parameter counts and equal matmul FLOPs per step (the
analytic count, PyTorch's FlopCounterMode), or nothing is timed.
PyTorch's GPT trains with F.scaled_dot_product_attention; its FLOPs are counted with the attention written out,
and both attentions' losses must agree with jaxicl's. Matmuls are float32 on both sides (no TF32 on a GPU).
Also reported: XLA's FLOP count of the forward and backward pass (matmuls plus elementwise work) over the
analytic matmul count (below 1 for lsa: jaxicl's SelfAttention multiplies through Wq Wk^T and Wv Wo, and its
unmasked linear layer forms no [T, T] scores); like run.json's flops_per_step it counts the program as lowered, before
the backend's optimisations (the compiled program's count has missed the products XLA hands to cuBLAS on GPUs), and
is empty where the backend gives none; and the achieved matmul FLOP/s as a fraction of a 2048 x 2048
matmul's, measured in the same run. That rate counts the model's matmul FLOPs (the analytic count above, the one
PyTorch runs), not the ones jaxicl performs: at 81 positions jaxicl's GPT skips the hidden first-half scores
(gpt.split_causal_attention), 4.3% of the small GPT's matmul FLOPs and 1.3% of the 12-layer one's, and still
counts them, as a model-FLOPs utilisation does; the memory of one compiled step and the largest batch that fits
--memory-budget-mb. Where the PyTorch environment is missing, jaxicl alone is timed and the table says why.

With --gpu the reference runs on CUDA in this Python's torch and must run: a workload where it does not is a failure
(jaxicl is still timed). With --gpu --smoke (the GPU check's rehearsal) it runs in benchmarks/.venv-torch where that
exists (else this Python), on CUDA only where that torch sees a GPU, and must run wherever a torch is found. Each
workload's row is written (JSON and table) as soon as it is done; a workload that fails (a disagreement, a reference
that does not run where it must, an error) gets the reason in its row's `failed` column, the others still run, and the
exit status is non-zero.
"""

import contextlib
import dataclasses
import functools
import os
import subprocess
import sys
import tempfile
import traceback

import jax
import numpy as np
from flax import nnx

from benchmarks import argument_parser
from benchmarks.output import OUT_HELP, results_dir, write_results
from benchmarks.timing import best_seconds, compiled_chunk, matmul_peak_gflops
from jaxicl.models import SelfAttention
from jaxicl.models.gpt import GPT
from jaxicl.prng import unrolled_threefry
from jaxicl.tasks import linear_regression as lr
from jaxicl.tasks import sample_batch
from jaxicl.train import TrainConfig, regression_loss
from jaxicl.train.chunks import lowered_flops
from jaxicl.train.cpu_matmuls import CPU_MATMULS, compile_chunk, uses_onednn
from jaxicl.train.optim import make_optimizer, path_names
from jaxicl.train.state import init_state
from jaxicl.train.step import train_step
from jaxicl.train.sweep_memory import largest_in_budget

HERE = os.path.dirname(os.path.abspath(__file__))
# Both sides multiply float32 in float32: PyTorch's default on CUDA, while JAX's default there is TF32 (which would
# fail the agreement check and time a cheaper arithmetic); on CPU both compute float32 anyway.
PRECISION = "float32"
TORCH_PYTHON = os.path.join(HERE, ".venv-torch", "bin", "python")
PROBE_KEY = jax.random.key(2)  # the agreement check's probe_weights


class Disagreement(Exception):
    """PyTorch and jaxicl compute different losses, gradients, parameter counts or FLOPs: neither is timed."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model and task size; kind "lsa" (SelfAttention, paired tokens) or "gpt" (GPT, interleaved tokens)."""

    kind: str
    dim: int
    n_context: int
    batch: int
    steps: int
    layers: int = 1
    heads: int = 1
    width: int = 0  # gpt: d_model (d_mlp = 4 width)

    @property
    def task(self) -> lr.LinearRegression:
        if self.kind == "lsa":
            return lr.LinearRegression(dim=self.dim, n_context=self.n_context)
        return lr.LinearRegression(dim=self.dim, n_context=self.n_context, format="interleaved", loss_on="all")

    def model(self):
        if self.kind == "lsa":
            return SelfAttention(self.dim + 1, num_layers=self.layers, num_heads=self.heads, init_scale=0.002,
                                 rngs=nnx.Rngs(0))
        return GPT(d_model=self.width, n_layers=self.layers, n_heads=self.heads, input_dim=self.dim + 1, out_dim=1,
                   max_len=self.task.seq_len, rngs=nnx.Rngs(0))


WORKLOADS = {"lsa": Workload("lsa", dim=10, n_context=10, batch=256, steps=200),
             "gpt_small": Workload("gpt", dim=20, n_context=40, batch=64, steps=20, layers=2, heads=4, width=64),
             "gpt_large": Workload("gpt", dim=20, n_context=40, batch=64, steps=3, layers=12, heads=8, width=256)}
GPU = {"lsa": dataclasses.replace(WORKLOADS["lsa"], batch=4096, steps=500),
       "gpt_small": dataclasses.replace(WORKLOADS["gpt_small"], batch=512, steps=100),
       "gpt_large": dataclasses.replace(WORKLOADS["gpt_large"], steps=50)}
SMOKE = {"lsa": Workload("lsa", dim=3, n_context=4, batch=8, steps=4),
         # 33 positions: the GPT's split causal attention, which the full sizes time, starts at SPLIT_FROM = 32
         "gpt_small": Workload("gpt", dim=3, n_context=16, batch=4, steps=2, layers=2, heads=2, width=8)}


def matmul_flops(w: Workload) -> int:
    """Multiply-add FLOPs (2 per product) of the matmuls of one training step: the forward pass, then twice each
    matmul backwards, less the input gradient of the first projection (the prompts need none)."""
    t, d_in = w.task.seq_len, w.dim + 1
    if w.kind == "lsa":
        proj = 3 * 2 * t * d_in * w.heads * d_in
        forward = proj + 2 * (2 * w.heads * t * t * d_in) + 2 * t * w.heads * d_in * d_in
        return w.batch * (3 * forward - proj)
    d, dh = w.width, w.width // w.heads
    embed = 2 * t * d_in * d
    block = 3 * 2 * t * d * d + 2 * (2 * w.heads * t * t * dh) + 2 * t * d * d + 2 * (2 * t * d * 4 * d)
    forward = embed + w.layers * block + 2 * t * d
    return w.batch * (3 * forward - embed)


def flat_params(params) -> dict[str, np.ndarray]:
    """{'layers.0.wq': array, ...}: every parameter under its dotted path."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {".".join(path_names(path)): np.asarray(v) for path, v in leaves}


def jaxicl_outputs(graphdef, params, batch) -> tuple[dict[str, tuple[float, dict[str, np.ndarray]]], float | None]:
    """agreement's jaxicl side, {"": (loss, grads) at params, "probe_": the same at probe_weights} (one compiled
    program), and XLA's FLOP count of that forward and backward pass (as run.json's: None where the backend gives
    none)."""
    lowered = jax.jit(jax.value_and_grad(regression_loss(graphdef), has_aux=True)).lower(params, batch)
    compiled = lowered.compile()

    def at(p) -> tuple[float, dict[str, np.ndarray]]:
        (loss, _), grads = compiled(p, batch)
        return float(loss), flat_params(grads)
    return {"": at(params), "probe_": at(probe_weights(params, PROBE_KEY))}, lowered_flops(lowered)


def probe_weights(params, key: jax.Array):
    """The agreement check's second set of weights: each initial weight plus N(0, 0.25 / fan_in) noise (fan_in its
    second-to-last axis, 1 for a vector), where the models' attention and nonlinearities matter. At the initial
    weights they hardly do: the lsa workload's attention adds ~1e-11 to its output (init_scale 0.002), and the GPT's
    GELU inputs are too small to tell its tanh form from the erf one."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [
        v + 0.5 * jax.random.normal(k, v.shape, v.dtype) / np.sqrt(v.shape[-2] if v.ndim > 1 else 1)
        for v, k in zip(leaves, keys)])


def agreement(w: Workload, jaxicl_out: dict[str, tuple[float, dict[str, np.ndarray]]], torch_out: dict) -> dict:
    """Loss, gradients, parameter count and matmul FLOPs of the two implementations; raises if they disagree.

    jaxicl_out: {"": (loss, grads) at the initial weights, "probe_": the same at probe_weights}, compared with
    torch_out's "loss", "grad/..." and "probe_loss", "probe_grad/..." (and the initial weights' "loss_explicit": the
    PyTorch GPT with its attention written out)."""
    grads = jaxicl_out[""][1]
    n_params = sum(g.size for g in grads.values())
    # np.max, not max(): a NaN anywhere makes the maximum NaN, which no tolerance below admits
    worst = float(np.max([np.max(np.abs(torch_out[f"{p}grad/{n}"] - g)) / np.maximum(np.max(np.abs(g)), 1e-30)
                          for p, (_, gs) in jaxicl_out.items() for n, g in gs.items()]))
    loss_diff = float(np.max([np.abs(torch_out[k] - loss) / np.maximum(np.abs(loss), 1e-30)
                              for p, (loss, _) in jaxicl_out.items()
                              for k in ((f"{p}loss", "loss_explicit") if p == "" else (f"{p}loss",))]))
    problems = []
    # float32 sums in another order: relative differences of ~1e-6 expected; NaN or inf fails both comparisons
    if not (loss_diff <= 1e-4 and worst <= 1e-4):
        problems.append(f"loss differs by {loss_diff:.2g} (relative), a gradient by {worst:.2g} of its largest entry")
    if int(torch_out["n_params"]) != n_params:
        problems.append(f"parameter counts differ: torch {int(torch_out['n_params'])}, jaxicl {n_params}")
    if int(torch_out["flops_per_step"]) != matmul_flops(w):
        problems.append(f"matmul FLOPs per step differ: torch {int(torch_out['flops_per_step'])}, "
                        f"analytic {matmul_flops(w)}")
    if problems:
        raise Disagreement(f"{w.kind}: PyTorch and jaxicl disagree, not timing them: " + "; ".join(problems))
    return {"loss_rel_diff": loss_diff, "grad_rel_diff": worst}


def torch_device(python: str) -> str | None:
    """"cuda" where the Python at `python` has a torch that sees a GPU, "cpu" where its torch sees none, None where it
    has no torch."""
    if not os.path.exists(python):
        return None
    done = subprocess.run([python, "-c", "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def reference(gpu: bool, smoke: bool, torch_python: str | None) -> tuple[str, str, bool]:
    """The PyTorch reference's (Python, device, whether it must run) for the command line's --gpu, --smoke and
    --torch-python (see the module's docstring)."""
    if not gpu:
        return torch_python or TORCH_PYTHON, "cpu", False
    if not smoke:
        return torch_python or sys.executable, "cuda", True
    python = torch_python or (TORCH_PYTHON if os.path.exists(TORCH_PYTHON) else sys.executable)
    device = torch_device(python)
    return python, device or "cpu", device is not None


@contextlib.contextmanager
def torch_reference(w: Workload, params, batch, python: str, device: str):
    """Starts the PyTorch reference on jaxicl's weights and batch and yields (its outputs, a function that runs the
    workload's steps there once and returns their wall seconds); where it cannot run, (the reason, None)."""
    if not os.path.exists(python):
        yield f"PyTorch not timed: no environment at {python} (make benchmarks/.venv-torch)", None
        return
    with tempfile.TemporaryDirectory() as d, open(os.path.join(d, "stderr"), "w+") as err:
        src, dst = os.path.join(d, "in.npz"), os.path.join(d, "out.npz")
        np.savez(src, device=device, workload=w.kind, heads=w.heads, layers=w.layers, dim=w.dim, n_context=w.n_context,
                 batch=w.batch, steps=w.steps, threads=os.cpu_count(),
                 inputs=np.asarray(batch.inputs), targets=np.asarray(batch.targets), mask=np.asarray(batch.mask),
                 **{f"param/{n}": v for n, v in flat_params(params).items()},
                 **{f"probe/{n}": v for n, v in flat_params(probe_weights(params, PROBE_KEY)).items()})
        proc = subprocess.Popen([python, os.path.join(HERE, "torch_reference.py"), src, dst], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)

        def failure() -> str:
            proc.kill()
            proc.wait()
            err.seek(0)
            return err.read()[-800:]

        def timed() -> float:
            proc.stdin.write("run\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the PyTorch reference stopped: {failure()}")
            return float(line)

        try:
            if proc.stdout.readline().strip() != "ready":
                yield f"PyTorch not timed: its run failed: {failure()}", None
                return
            yield dict(np.load(dst)), timed
        finally:
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait()


def step_bytes(w: Workload, graphdef, params, batch: int, cpu_matmuls: str) -> int:
    """Bytes of one compiled training step at `batch` (XLA's memory analysis: arguments + outputs + temporaries -
    aliases)."""
    tx = make_optimizer(TrainConfig(batch_size=batch))
    step = jax.jit(lambda s: train_step(s, loss_fn=regression_loss(graphdef), sample=lr.sample, task_cfg=w.task,
                                        batch_size=batch, tx=tx))
    with unrolled_threefry():  # as the engine lowers and compiles its chunks
        m = compile_chunk(step.lower(init_state(params, 0, tx)), cpu_matmuls).memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def step_memory(w: Workload, graphdef, params, budget: float, cpu_matmuls: str) -> dict:
    """MB of one compiled training step at the workload's batch (step_bytes), and the largest multiple of the batch
    whose compiled step fits `budget` bytes, at most the batch where the line through batch and 2 x batch crosses
    the budget: that one where it fits, else searched below it (largest_in_budget; the line alone overshot the budget
    by 19% for lsa, whose memory per prompt falls with the batch)."""
    total = functools.cache(lambda batch: step_bytes(w, graphdef, params, batch, cpu_matmuls))
    one, two = total(w.batch), total(2 * w.batch)
    per_prompt = max((two - one) / w.batch, 1.0)
    on_line = int((budget - (one - per_prompt * w.batch)) // per_prompt) // w.batch * w.batch
    return {"step_memory_mb": one / 2**20,
            "largest_batch_in_budget": largest_in_budget(total, budget, max(on_line, w.batch), w.batch) or 0}


def bench(name: str, w: Workload, repeats: int, python: str, device: str, required: bool, budget: float, peak: float,
          cpu_matmuls: str = CPU_MATMULS[0]) -> tuple[dict, str]:
    """One row: the agreement checks, both implementations' steps/s and their ratio, FLOP counts, the fraction of the
    matmul `peak` (GFLOP/s); `failed` says why where the reference is `required` and did not run."""
    graphdef, params = nnx.split(w.model())
    batch = sample_batch(lr.sample, w.task, jax.random.key(1), w.batch, axis=None)
    jaxicl_out, xla_flops = jaxicl_outputs(graphdef, params, batch)
    grads = jaxicl_out[""][1]
    row = {"workload": name, "batch": w.batch, "tokens": w.task.seq_len, "steps": w.steps,
           "n_params": sum(g.size for g in grads.values())}
    with torch_reference(w, params, batch, python, device) as (torch_out, torch_timed):
        if torch_timed is None:
            note = torch_out
            if required:
                row["failed"] = note
        else:
            row |= agreement(w, jaxicl_out, torch_out)
            note = f"PyTorch {torch_out['torch']} eager on " + (str(torch_out["device"]) if device == "cuda" else
                                                                 f"{int(torch_out['threads'])} CPU threads")
        cfg = TrainConfig(steps=w.steps, batch_size=w.batch, steps_per_call=w.steps, cpu_matmuls=cpu_matmuls)
        run, compile_s = compiled_chunk(regression_loss(graphdef), lr.sample, w.task, params, cfg, num_devices=1)
        jaxicl_s, torch_s = [], []
        for _ in range(repeats + 1):  # alternating, so the machine's speed drifting touches both sides alike
            if torch_timed is not None:
                torch_s.append(torch_timed())
            jaxicl_s.append(best_seconds(run, 1))
    jaxicl_steps = w.steps / min(jaxicl_s[1:])  # the first run of each side is a warm-up
    flops = matmul_flops(w)
    row |= {"jaxicl_steps_per_s": jaxicl_steps, "jaxicl_compile_s": compile_s,
            "matmul_gflop_per_step": flops / 1e9, "xla_over_matmul_flops": xla_flops and xla_flops / flops,
            "jaxicl_matmul_gflop_per_s": flops * jaxicl_steps / 1e9,
            "fraction_of_matmul_peak": flops * jaxicl_steps / 1e9 / peak}
    if torch_s:
        torch_steps = w.steps / min(torch_s[1:])
        row |= {"torch_steps_per_s": torch_steps, "jaxicl_over_torch": jaxicl_steps / torch_steps}
    row["prompts_per_s"] = jaxicl_steps * w.batch
    return row | step_memory(w, graphdef, params, budget, cpu_matmuls), note


def main(argv=None) -> None:
    ap = argument_parser("benchmarks.vs_torch", __doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (the tests)")
    ap.add_argument("--workloads", nargs="+", default=None, help=f"of {list(WORKLOADS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-budget-mb", type=float, default=None,
                    help="for the largest batch that fits (default 1024; with --smoke 1, which the tests' tiny steps "
                    "fill in three compiles where 1024 took eight)")
    ap.add_argument("--gpu", action="store_true", help="GPU sizes, PyTorch on CUDA in this Python (its own torch)")
    ap.add_argument("--torch-python", default=None, help=f"the Python with torch (default {TORCH_PYTHON}; with "
                    "--gpu this one; with --gpu --smoke the default where it exists, else this one)")
    ap.add_argument("--cpu-matmuls", default=CPU_MATMULS[0], choices=CPU_MATMULS,
                    help="the library of jaxicl's products on CPU (TrainConfig.cpu_matmuls)")
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args(argv)
    table = SMOKE if args.smoke else GPU if args.gpu else WORKLOADS
    python, device, required = reference(args.gpu, args.smoke, args.torch_python)
    names = args.workloads or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; allowed: {list(table)}")
    out = results_dir(args.out, args.smoke)
    repeats, peak_size = (1, 256) if args.smoke else (args.repeats, 2048)
    budget_mb = args.memory_budget_mb if args.memory_budget_mb is not None else 1.0 if args.smoke else 1024.0
    rows, notes = [], [f"jaxicl on 1 of {jax.device_count()} {jax.default_backend()} device(s); best of {repeats} "
                       "calls of one compiled chunk after a warm-up; PyTorch: best of as many eager loops, the two "
                       "alternating"]
    with jax.default_matmul_precision(PRECISION):
        peak = matmul_peak_gflops(peak_size)
        notes.append(f"matmul peak {peak:.1f} GFLOP/s ({peak_size}^2 float32, jitted, XLA's default products, this "
                     f"run); "
                     f"jaxicl's chunks multiply with "
                     f"{'oneDNN' if uses_onednn(args.cpu_matmuls) else 'XLA defaults'} "
                     f"(TrainConfig.cpu_matmuls={args.cpu_matmuls!r}); "
                     f"matmuls computed in {PRECISION} on both sides; the largest batch in a {budget_mb:g} MB budget")
        for name in names:
            try:
                row, note = bench(name, table[name], repeats, python, device, required,
                                  budget_mb * 2**20, peak, args.cpu_matmuls)
            except Exception as e:  # noqa: BLE001 - recorded in the row; the other workloads still run
                traceback.print_exc()
                row, note = {"workload": name, "failed": f"{type(e).__name__}: {e}"}, ""
            print(row, flush=True)
            rows.append(row)
            notes += [note] if note and note not in notes else []
            # what is done survives a kill
            path = write_results("vs_torch", rows, "; ".join(notes), out_dir=out, smoke=args.smoke)
    print(path)
    failed = [r["workload"] for r in rows if "failed" in r]
    if failed:
        raise SystemExit(f"vs_torch: {failed} failed (see their rows' `failed` in {path})")


if __name__ == "__main__":
    main()
