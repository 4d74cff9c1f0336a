"""Training throughput of the engine's scanned step (W-vOswald: 1-layer LSA, d = 10, N = 10).

python -m benchmarks.train_throughput [--smoke] [--steps 200] [--batch-sizes 256,2048,8192] [--layers 1,4] [--out DIR]

Reports, per (layers, batch size): compile time of one chunk, steady-state steps/s and
prompts/s (sampling on device included) of one compiled chunk, the same through the whole engine
(`train()` with 10-step chunks, every step's metrics logged: the host loop fetches chunk k's metrics
while chunk k+1 runs, so the ratio engine / chunk shows what the host costs), and the cost of
capturing every named site in a forward pass relative to capturing none. Run it on an idle machine.
"""

import time

import jax
import numpy as np
from flax import nnx

from benchmarks import argument_parser
from benchmarks.output import OUT_HELP, results_dir, write_results
from benchmarks.timing import best_seconds, chunk_throughput
from jaxicl.models import SelfAttention, apply
from jaxicl.tasks import linear_regression as lr
from jaxicl.tasks import sample_batch
from jaxicl.train import TrainConfig, regression_loss, train


def time_training(layers: int, batch_size: int, steps: int) -> dict:
    task = lr.LinearRegression(dim=10, n_context=10)
    graphdef, params = nnx.split(SelfAttention(11, num_layers=layers, init_scale=0.002, rngs=nnx.Rngs(0)))
    cfg = TrainConfig(steps=steps, batch_size=batch_size, steps_per_call=steps)
    out = chunk_throughput(regression_loss(graphdef), lr.sample, task, params, cfg)
    return {"layers": layers, "batch": batch_size, "steps": steps, "compile_s": out["compile_s"],
            "steps_per_s": out["steps_per_s"], "prompts_per_s": out["steps_per_s"] * batch_size}


def time_engine(layers: int, batch_size: int, steps: int, pairs: int = 3) -> dict:
    """Steady-state steps/s of train() with 10-step chunks: t(2 steps) - t(steps) cancels compilation; the median of
    `pairs` alternating pairs, after an untimed run (a process's first train() pays one-off costs)."""
    task = lr.LinearRegression(dim=10, n_context=10)
    graphdef, params = nnx.split(SelfAttention(11, num_layers=layers, init_scale=0.002, rngs=nnx.Rngs(0)))

    def run(n):
        cfg = TrainConfig(steps=n, batch_size=batch_size, steps_per_call=10, log_every=1)
        start = time.perf_counter()
        train(regression_loss(graphdef), lr.sample, task, cfg, params, progress=False)
        return time.perf_counter() - start

    run(steps)
    extra = float(np.median([run(2 * steps) - run(steps) for _ in range(pairs)]))
    if extra > 0:
        return {"engine_steps_per_s": steps / extra}
    # null, as JSON has no NaN: too few steps for the difference to resolve them
    return {"engine_steps_per_s": None, "engine_note": f"not resolved: t({2 * steps} steps) - t({steps}) = "
                                                      f"{extra:.3g} s <= 0; more --engine-steps"}


def time_capture(layers: int, batch_size: int, repeats: int = 20) -> dict:
    """Forward pass over a batch with no captures vs every site captured."""
    task = lr.LinearRegression(dim=10, n_context=10)
    graphdef, params = nnx.split(SelfAttention(11, num_layers=layers, rngs=nnx.Rngs(0)))
    tokens = sample_batch(lr.sample, task, jax.random.key(0), batch_size, axis=None).inputs
    times = {}
    for capture in ((), "all"):
        fwd = jax.jit(jax.vmap(lambda t, c=capture: apply(graphdef, params, t, capture=c)))
        times[capture or "none"] = best_seconds(lambda f=fwd: f(tokens), repeats + 1)
    return {"capture_all_over_none": times["all"] / times["none"]}


def main(argv=None) -> None:
    ap = argument_parser("benchmarks.train_throughput", __doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-sizes", default="256,2048,8192")
    ap.add_argument("--layers", default="1,4")
    ap.add_argument("--engine-steps", type=int, default=2000, help="steps of the engine timing (and twice that)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (the tests)")
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_sizes, args.layers, args.engine_steps = 2, "8", "1", 10
    rows = []
    for layers in map(int, args.layers.split(",")):
        for batch in map(int, args.batch_sizes.split(",")):
            row = {**time_training(layers, batch, args.steps), **time_engine(layers, batch, args.engine_steps),
                   **time_capture(layers, batch)}
            row["engine_over_chunk"] = row["engine_steps_per_s"] and row["engine_steps_per_s"] / row["steps_per_s"]
            print(row, flush=True)
            rows.append(row)
    out = results_dir(args.out, args.smoke)
    print(write_results("train_throughput", rows, f"{jax.device_count()} {jax.default_backend()} device(s); steps "
                        "include on-device sampling; compile time is separate", out_dir=out, smoke=args.smoke))


if __name__ == "__main__":
    main()
