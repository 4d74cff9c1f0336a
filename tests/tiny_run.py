"""A tiny training run used by tests that need a separate process (kill/resume, multi-host).

python tests/tiny_run.py OUT_DIR --steps N [--checkpoint-every K] [--devices D]
                                 [--process-id I --num-processes P --port PORT]
Prints one JSON line: {"losses": [...], "params": [flat params], "restored_equal": bool}.
"""

import argparse
import json
import os
import sys


def tiny_setup(steps: int, checkpoint_every: int = 0, steps_per_call: int = 5, prng_impl: str = "threefry2x32"):
    from flax import nnx

    from jaxicl.models import SelfAttention
    from jaxicl.tasks import linear_regression as lr
    from jaxicl.train import TrainConfig, regression_loss

    task = lr.LinearRegression(dim=3, n_context=5)
    model = SelfAttention(4, num_heads=2, init_scale=0.1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-2, steps_per_call=steps_per_call, log_every=1,
                      checkpoint_every=checkpoint_every, keep_checkpoints=2, prng_impl=prng_impl)
    return regression_loss(graphdef), lr.sample, task, cfg, params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--steps-per-call", type=int, default=5)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.num_processes > 1:
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                                   process_id=args.process_id)
    import numpy as np

    from jaxicl.train import CheckpointStore, data_mesh, replicated, train
    from jaxicl.train import init_state
    from jaxicl.train.optim import make_optimizer

    loss_fn, sample, task, cfg, params = tiny_setup(args.steps, args.checkpoint_every, args.steps_per_call)
    result = train(loss_fn, sample, task, cfg, params, out_dir=args.out, progress=False)
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(result.state.params)])

    mesh = data_mesh()
    with jax.set_mesh(mesh):
        like = init_state(params, cfg.seed, make_optimizer(cfg))
        store = CheckpointStore(os.path.join(args.out, "checkpoints"))
        restored = store.restore(like, replicated(mesh))
        store.close()
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(result.state.params)))
    print(json.dumps({"losses": [r["loss"] for r in result.train_rows], "params": flat.tolist(),
                      "restored_equal": same, "restored_step": int(restored.step)}))
    sys.stdout.flush()
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
