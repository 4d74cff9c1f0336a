"""Runs the benchmarks, each in its own process (a benchmark may set JAX flags before JAX starts).

python -m benchmarks all [--smoke] [--out DIR]      every benchmark below, at CPU sizes (or the tests' sizes)
python -m benchmarks gpu-check [--out DIR]          on one GPU, in at most 8 minutes: the GPU sizes, PyTorch on
                                                    the same GPU, the sweep against the loop, the full presets of
                                                    gd_equivalence and ar_fig7_non_augmented; every result as JSON
                                                    under DIR
python -m benchmarks gpu-check --smoke              the same steps and arguments at the tests' sizes and the smoke
                                                    presets, on any machine: a rehearsal before device time is spent
                                                    (PyTorch's side in benchmarks/.venv-torch where it exists, on
                                                    CUDA only where its torch sees a GPU)

Each benchmark writes DIR/NAME.json and DIR/NAME.md (default DIR: benchmarks/results; with --smoke a fresh temporary
directory, printed: smoke-sized numbers never replace the committed measurements). Every JAX product is
computed in float32 (JAX_DEFAULT_MATMUL_PRECISION=float32 unless set: JAX's GPU default is TF32, PyTorch's and the
experiments' is float32; each JSON records the precision). The GPU check also writes each step's output to
DIR/logs/STEP.log and, after each step, DIR/gpu_check.json: every step's command, status, wall seconds, limit and log,
and for an experiment the checks that failed (a finished run, not a failed step).
"""

import contextlib
import json
import os
import subprocess
import sys
import time

from benchmarks import argument_parser
from benchmarks.output import OUT_HELP, results_dir

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (arguments at CPU sizes, arguments of the tests); every module takes --out DIR
BENCHMARKS = {"vs_torch": ([], ["--smoke"]),
              "sampler_throughput": ([], ["--smoke"]),
              "device_scaling": ([], ["--smoke"]),
              "train_throughput": ([], ["--smoke"]),
              "patching": ([], ["--smoke"]),
              "sweep_vs_loop": ([], ["--smoke"])}

# the GPU check: (name, arguments, seconds it may take); 8 minutes in all with the experiments
GPU_CHECK = [("vs_torch", ["--gpu"], 130),
             ("sampler_throughput", ["--batch", "8192"], 30),
             ("device_scaling", ["--devices", "1", "--per-device-batch", "4096"], 30),
             ("sweep_vs_loop", ["--seeds", "16", "--lrs", "16", "--batch-size", "1024"], 70)]
# full presets: gd_equivalence (20,000 tiny steps) and Sander et al.'s Fig. 7 at the paper's scale (64 heads,
# batch 1024, 3200 steps under each of the two query conventions: 25 GFLOP a step by XLA's count, 161 TFLOP in all,
# under a minute at a fifth of an H200's float32 peak; not yet measured on one)
GPU_EXPERIMENTS = [("gd_equivalence", "full", 90), ("ar_fig7_non_augmented", "full", 130)]


def commands(names: list[str], smoke: bool, out: str) -> list[list[str]]:
    """The command line of each named benchmark."""
    return [[sys.executable, "-m", f"benchmarks.{n}", *BENCHMARKS[n][smoke], "--out", out] for n in names]


def gpu_commands(out: str, smoke: bool = False) -> list[tuple[str, list[str], int | None]]:
    """(name, command, timeout seconds) of each step of the GPU check; smoke: each benchmark also gets --smoke (its
    tests' sizes), each experiment the smoke preset, and no step a timeout (a rehearsal of the steps, not of their
    time)."""
    steps = [(n, [sys.executable, "-m", f"benchmarks.{n}", *args, *["--smoke"] * smoke, "--out", out], limit)
             for n, args, limit in GPU_CHECK]
    steps += [(name, [sys.executable, "-m", "experiments", name, "--preset", "smoke" if smoke else preset,
                      "--out", os.path.join(out, "experiments")], limit) for name, preset, limit in GPU_EXPERIMENTS]
    return [(name, command, None if smoke else limit) for name, command, limit in steps]


def run(command: list[str], timeout: int | None = None, log: str | None = None) -> dict:
    """Runs one command from the repository root (its output into the file `log` where given, unbuffered: a command
    killed at its timeout leaves all it printed); its outcome and wall seconds."""
    env = {"JAX_DEFAULT_MATMUL_PRECISION": "float32", "PYTHONUNBUFFERED": "1", **os.environ}
    start = time.perf_counter()
    with open(log, "w") if log else contextlib.nullcontext() as out:
        try:
            done = subprocess.run(command, cwd=os.path.dirname(HERE), timeout=timeout, env=env, stdout=out,
                                  stderr=subprocess.STDOUT if log else None)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout} s"
    return {"command": " ".join(command[1:]), "status": status, "wall_s": round(time.perf_counter() - start, 1)}


def gpu_check(out: str, smoke: bool) -> list[dict]:
    """Runs the GPU check's steps one after another, each one's output into out/logs/, and rewrites
    out/gpu_check.json after each step (so a check stopped from outside keeps the steps it finished)."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    outcomes, experiments = [], {name for name, _, _ in GPU_EXPERIMENTS}
    for name, command, limit in gpu_commands(out, smoke):
        log = os.path.join(out, "logs", f"{name}.log")
        start = time.time()
        outcome = run(command, limit, log) | {"limit_s": limit, "log": log}
        result = os.path.join(out, "experiments", name, "result.json")
        if name in experiments and os.path.exists(result) and os.path.getmtime(result) >= start:  # written by this run
            outcome["failed_checks"] = [c["name"] for c in json.load(open(result))["checks"] if not c["passed"]]
        if outcome["status"] != "ok":
            with open(log) as f:
                print(f"{name}: {outcome['status']}; the end of {log}:\n" + "".join(f.readlines()[-30:]), flush=True)
        outcomes.append(outcome)
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump({"smoke": smoke, "steps": outcomes}, f, indent=2)
    return outcomes


def main(argv=None) -> None:
    ap = argument_parser("benchmarks", __doc__)
    ap.add_argument("what", choices=["all", "gpu-check", *BENCHMARKS])
    ap.add_argument("--smoke", action="store_true", help="the tests' sizes (gpu-check: and the smoke presets)")
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args(argv)
    # absolute: the steps run from the repository root, the logs and gpu_check.json are written from here
    args.out = os.path.abspath(results_dir(args.out, args.smoke))
    os.makedirs(args.out, exist_ok=True)
    if args.what == "gpu-check":
        outcomes = gpu_check(args.out, args.smoke)
    else:
        names = list(BENCHMARKS) if args.what == "all" else [args.what]
        outcomes = [run(c) for c in commands(names, args.smoke, args.out)]
    for o in outcomes:
        checks = f"  (checks failed: {', '.join(o['failed_checks'])})" if o.get("failed_checks") else ""
        print(f"{o['status']:>24}  {o['wall_s']:7.1f} s  {o['command']}{checks}")
    failed = [o for o in outcomes if o["status"] != "ok"]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(outcomes)} benchmarks failed")


if __name__ == "__main__":
    main()
