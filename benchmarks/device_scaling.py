"""Data-parallel scaling: training steps/s with the batch sharded over 1, 2, 4, 8 devices, as efficiency.

python -m benchmarks.device_scaling [--smoke] [--devices 1 2 4 8] [--per-device-batch 256] [--steps 100] [--distributed]

Weak scaling of the gd_equivalence workload (1 linear self-attention layer, d = 10, N = 10, Adam, fresh prompts
sampled on every device for its own slice): each device keeps `--per-device-batch` prompts, so n devices train
n times the prompts per step; efficiency = prompts/s per device on n devices / the same on the first count run (one
device by default). On a CPU host the devices are simulated (`jax_num_cpu_devices`, set before JAX starts) and share
the host's cores, which one device already uses, so efficiency falls roughly like 1 / devices there: the script is
meant for accelerators, where it runs unchanged over the local devices. Multi-host (e.g. 2 hosts x 8 GPUs): start the
same command on every host with `--distributed` (and, where no Slurm, Kubernetes or TPU pod environment supplies them,
`--coordinator HOST:PORT --num-processes N --process-id I`: jaxicl.distributed); `jax.devices()` then spans every host
and the engine's mesh and sampling are unchanged (tests/test_multihost.py runs the engine on two processes). Each mesh
takes the same number of devices from every process (jaxicl.train.data_mesh), so there every count must be a multiple of
the process count; the default counts are 1, 2, 4 and 8 devices per process.
"""

import os

from benchmarks import argument_parser
from benchmarks.output import OUT_HELP, results_dir, write_results
from jaxicl import distributed


def efficiency(row: dict, base: dict) -> float:
    """Weak-scaling efficiency of a row ({"devices", "prompts_per_s"}): its prompts/s per device over base's."""
    return row["prompts_per_s"] / row["devices"] / (base["prompts_per_s"] / base["devices"])


def device_counts(requested: list[int] | None, processes: int, smoke: bool) -> list[int]:
    """The device counts to time: 1 and 2 per process with smoke, else `requested` (--devices), by default 1, 2, 4
    and 8 per process. ValueError naming --devices where a count is not a multiple of `processes`: a mesh takes the
    same number of devices from each process, as one that left a process out would time nothing there."""
    if smoke or requested is None:
        return [processes * k for k in ((1, 2) if smoke else (1, 2, 4, 8))]
    uneven = [n for n in requested if n % processes]
    if uneven:
        raise ValueError(f"--devices: in a run of {processes} processes each count must be a multiple of {processes} "
                         f"(every process gives the mesh the same number of devices), got {uneven}")
    return requested


def main(argv=None) -> None:
    ap = argument_parser("benchmarks.device_scaling", __doc__)
    ap.add_argument("--smoke", action="store_true", help="2 simulated devices, tiny sizes (the tests)")
    ap.add_argument("--devices", type=int, nargs="+", default=None,
                    help="device counts to time (default 1 2 4 8 per process; with --distributed multiples of the "
                         "process count)")
    ap.add_argument("--per-device-batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    distributed.add_arguments(ap)
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args(argv)
    if args.smoke:
        args.per_device_batch, args.steps, args.repeats = 4, 2, 1
    import jax

    distributed.initialize(args)
    try:  # jax.process_count() starts the backends: a single process sets its CPU device count first
        counts = device_counts(args.devices, jax.process_count() if args.distributed else 1, args.smoke)
    except ValueError as e:
        ap.error(str(e))
    if not args.distributed:
        jax.config.update("jax_num_cpu_devices", max(counts))  # only the CPU backend reads it
    from flax import nnx

    from benchmarks.timing import chunk_throughput
    from jaxicl.models import SelfAttention
    from jaxicl.tasks import linear_regression as lr
    from jaxicl.train import TrainConfig, regression_loss

    available = jax.device_count()
    task = lr.LinearRegression(dim=10, n_context=10)
    graphdef, params = nnx.split(SelfAttention(11, init_scale=0.002, rngs=nnx.Rngs(0)))
    rows = []
    for n in [d for d in counts if d <= available]:
        cfg = TrainConfig(steps=args.steps, batch_size=n * args.per_device_batch, steps_per_call=args.steps)
        out = chunk_throughput(regression_loss(graphdef), lr.sample, task, params, cfg, args.repeats, num_devices=n)
        rows.append({"devices": n, "batch": cfg.batch_size, "steps_per_s": out["steps_per_s"],
                     "prompts_per_s": out["steps_per_s"] * cfg.batch_size, "compile_s": out["compile_s"]})
        rows[-1]["efficiency"] = efficiency(rows[-1], rows[0])
        print(rows[-1], flush=True)
    skipped = [d for d in counts if d > available]
    out = results_dir(args.out, args.smoke)
    print(write_results("device_scaling", rows, f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
                        f"{os.cpu_count()} host cores; weak scaling, {args.per_device_batch} prompts per device"
                        + (f"; not run: {skipped} devices (only {available})" if skipped else ""), out_dir=out,
                        smoke=args.smoke))


if __name__ == "__main__":
    main()
