"""A sweep trained as one vmapped program vs member by member in a Python loop (same steps, same batches).

    python -m benchmarks.sweep_vs_loop                      # 8 seeds x 8 lrs of the gd_equivalence model
    python -m benchmarks.sweep_vs_loop --seeds 2 --lrs 2 --steps 50 --train-loop-members 2   # a quick check

Three ways to train the same members (every member sees the same batches in all three):
  vmapped     train_sweep: all members stacked, one compiled program
  loop        train_sweep(chunk_size=1): one member at a time through one compiled program
              (the best a Python loop can do: no recompilation)
  train_loop  jaxicl.train.train() per member, as a shell/Python loop over runs would (each run
              compiles its own program); timed on --train-loop-members members, extrapolated
Wall times include compilation (which dominates short runs on a loaded CPU), so the steady state
is also timed: the compiled sweep program (the one train_sweep runs) on the whole stack vs on one
member at a time in a Python loop, after a warm-up call. Also reports XLA's memory estimate of the
sweep program and the largest stack that fits --memory-budget.
Writes sweep_vs_loop.json and a Markdown table sweep_vs_loop.md under --out (default benchmarks/results; with --smoke
a fresh temporary directory), rewritten after each of the stages above (so a run stopped at a time limit keeps the
stages it finished); a stage that fails is recorded under "failed", the later ones still run, and the exit status is
non-zero.

What to expect on a CPU: stacking members removes per-run compilation and per-op overhead, not
FLOPs. With a small per-member batch (overhead-bound, e.g. --batch-size 32) the stacked program
is several times faster per member-step; with a large batch (compute-bound, 256 and up) a CPU is
already saturated by one member and the steady-state ratio is about 1 or below (a larger working
set); the end-to-end win against a loop of train() runs then comes from compiling once.
"""

import argparse
import dataclasses
import json
import os
import platform
import time
import traceback

import jax
import numpy as np

from benchmarks import argument_parser
from benchmarks.output import OUT_HELP, SMOKE_NOTE, results_dir


def _args(argv=None) -> argparse.Namespace:
    ap = argument_parser("benchmarks.sweep_vs_loop", __doc__)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--lrs", type=int, default=8, help="learning rates, log-spaced in [1e-4, 1e-2]")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dim", type=int, default=10, help="task dim (gd_equivalence: 10, n_context 10)")
    ap.add_argument("--train-loop-members", type=int, default=4, help="members timed with train(); 0 = skip")
    ap.add_argument("--memory-budget", type=float, default=2**30, help="bytes (default 1 GiB)")
    ap.add_argument("--out", default=None, help=OUT_HELP)
    ap.add_argument("--smoke", action="store_true", help="2 x 2 members, 4 steps (the tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seeds, args.lrs, args.steps, args.batch_size, args.train_loop_members = 2, 2, 4, 8, 1
    args.out = results_dir(args.out, args.smoke)
    return args


def main(argv=None) -> None:
    args = _args(argv)
    from jaxicl.models.attention import sweep_init
    from jaxicl.prng import seed_key
    from jaxicl.tasks import linear_regression as lr_task
    from jaxicl.train import TrainConfig, regression_loss, train
    from jaxicl.train import estimate_memory, sweep_mesh, train_sweep
    from jaxicl.train.sweep_spec import Axis, grid

    task = lr_task.LinearRegression(dim=args.dim, n_context=10)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, steps_per_call=args.steps,
                      log_every=args.steps)
    init, graphdef = sweep_init(args.dim + 1)
    loss_fn = regression_loss(graphdef)
    lrs = tuple(float(v) for v in np.geomspace(1e-4, 1e-2, args.lrs))
    members = [m | {"init_scale": 0.002}
               for m in grid((Axis("train.seed", tuple(range(args.seeds))), Axis("train.lr", lrs)))]
    n, mesh = len(members), sweep_mesh(1)

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        jax.block_until_ready(jax.tree.leaves(out.params if hasattr(out, "params") else out.state.params))
        return time.perf_counter() - start, out

    walls = {}  # unrounded wall seconds of the ways timed so far

    def vmapped_and_loop() -> dict:
        # chunk_size=n: all at once, without the memory measure (one more compilation where all fit) that train_sweep
        # makes to choose a chunk on a device that reports its memory (GPU, TPU) and not on a CPU
        walls["vmapped"], vmapped = timed(lambda: train_sweep(loss_fn, lr_task.sample, task, cfg, init, members,
                                                              mesh=mesh, chunk_size=n, progress=False))
        walls["loop"], looped = timed(lambda: train_sweep(loss_fn, lr_task.sample, task, cfg, init, members,
                                                          mesh=mesh, chunk_size=1, progress=False))
        same = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(vmapped.params),
                                                                 jax.tree.leaves(looped.params)))
        return {"vmapped": _row(walls["vmapped"], n, args.steps), "loop": _row(walls["loop"], n, args.steps),
                "max_abs_param_diff_vmapped_vs_loop": same, "ratio_loop_over_vmapped": walls["loop"] / walls["vmapped"]}

    def train_loop() -> dict:
        k = min(args.train_loop_members, n)
        start = time.perf_counter()
        for m in members[:k]:
            c = dataclasses.replace(cfg, seed=m["train.seed"], lr=m["train.lr"])
            out = train(loss_fn, lr_task.sample, task, c, init(seed_key(c.seed), init_scale=0.002),
                        progress=False)
            jax.block_until_ready(jax.tree.leaves(out.state.params))
        walls["train_loop"] = (time.perf_counter() - start) * n / k
        row = {"train_loop": _row(walls["train_loop"], n, args.steps) | {"timed_members": k, "extrapolated_to": n}}
        return row | ({"ratio_train_loop_over_vmapped": walls["train_loop"] / walls["vmapped"]} if "vmapped" in walls
                      else {})

    def memory() -> dict:
        est = estimate_memory(loss_fn, lr_task.sample, task, cfg, init, members, mesh=mesh)
        return {"memory": {"budget_bytes": args.memory_budget, "fixed_bytes": est.fixed,
                           "per_member_bytes": est.per_member, "bytes_for_this_grid": est.bytes_for(n),
                           "largest_stack_in_budget": est.largest_stack(args.memory_budget)}}

    stages = {"vmapped_and_loop": vmapped_and_loop, **({"train_loop": train_loop} if args.train_loop_members else {}),
              "steady": lambda: {"steady": _steady(loss_fn, lr_task.sample, task, cfg, init, members, mesh)},
              "memory": memory}
    results = {"smoke": args.smoke, "members": n, "steps": args.steps, "batch_size": args.batch_size,
               "task_dim": args.dim, "model": "gd_equivalence LSA (1 linear attention layer)",
               "devices": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
               "load_avg_1min_at_start": os.getloadavg()[0], "platform": platform.platform(), "jax": jax.__version__,
               "matmul_precision": jax.config.jax_default_matmul_precision or "default"}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sweep_vs_loop.json")
    for name, stage in stages.items():  # each stage's results are on disk before the next starts
        try:
            results |= stage()
        except Exception as e:  # noqa: BLE001 - recorded; the other stages still run
            traceback.print_exc()
            results.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"
        table = _write(path, results)
    print(table)
    print(f"-> {path} and its .md table")
    if "failed" in results:
        raise SystemExit(f"sweep_vs_loop: {list(results['failed'])} failed (see `failed` in {path})")


def _write(path: str, results: dict) -> str:
    """Writes the results as JSON at `path` (through a rename, so a killed run leaves the last whole file) and their
    table next to it as .md; returns the table."""
    with open(path + ".partial", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".partial", path)
    table = _table(results)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(table + "\n")
    return table


def _steady(loss_fn, sample, task, cfg, init, members, mesh) -> dict:
    """Execution only: the compiled chunk program on all members at once vs one member per call; every call's inputs
    and fresh states (the chunk donates them) are built and placed on the device before the clock starts."""
    from jaxicl.train.sweep_program import build_program, member_sharding

    prog = build_program(loss_fn, sample, task, cfg, init, members, None)
    n, steps = len(members), cfg.steps
    with jax.set_mesh(mesh):
        def arguments(idx) -> tuple:
            """(states, task params) of members idx, on the device."""
            sharding = member_sharding(mesh, len(idx))
            a = prog.inputs(np.asarray(idx), sharding)
            return jax.block_until_ready((prog.states(a, sharding), a["task"]))

        def run(states_and_task):
            states, _ = prog.run_chunk(*states_and_task, steps)
            return jax.block_until_ready(states.step)

        run(arguments(range(n))), run(arguments([0]))  # compile both shapes
        stack, each = arguments(range(n)), [arguments([i]) for i in range(n)]
        start = time.perf_counter()
        run(stack)
        t_vmap = time.perf_counter() - start
        start = time.perf_counter()
        for one in each:
            run(one)
        t_loop = time.perf_counter() - start
    return {"vmapped": _row(t_vmap, n, steps), "loop": _row(t_loop, n, steps), "ratio_loop_over_vmapped":
            round(t_loop / t_vmap, 2)}


def _row(wall: float, members: int, steps: int) -> dict:
    return {"wall_s": round(wall, 3), "member_steps_per_s": round(members * steps / wall, 1)}


def _table(r: dict) -> str:
    """The results as Markdown: the parts done so far, and the stages that failed."""
    smoke = f"{SMOKE_NOTE}; " if r["smoke"] else ""
    lines = [f"{smoke}{r['members']} members x {r['steps']} steps, batch {r['batch_size']}, {r['devices']}, "
             f"load avg {r['load_avg_1min_at_start']:.1f} on {r['cpu_count']} cpus, matmul precision "
             f"{r['matmul_precision']}", "",
             "| way | wall time (s, incl. compile) | member-steps/s |", "|---|---|---|"]
    for way in ("vmapped", "loop", "train_loop"):
        if way in r:
            note = " (extrapolated)" if way == "train_loop" else ""
            lines.append(f"| {way}{note} | {r[way]['wall_s']} | {r[way]['member_steps_per_s']} |")
    ratios = [f"{name} / vmapped: {r[key]:.1f}x" for name, key in (("loop", "ratio_loop_over_vmapped"),
                                                                     ("train() loop", "ratio_train_loop_over_vmapped"))
              if key in r]
    lines += ["", "ratio " + "; ".join(ratios)] if ratios else [""]
    if "steady" in r:
        s = r["steady"]
        lines.append(f"steady state (compiled, execution only): vmapped {s['vmapped']['wall_s']} s "
                     f"({s['vmapped']['member_steps_per_s']} member-steps/s), loop {s['loop']['wall_s']} s "
                     f"({s['loop']['member_steps_per_s']} member-steps/s): ratio {s['ratio_loop_over_vmapped']}x")
    if "memory" in r:
        m = r["memory"]
        lines.append(f"memory: {m['per_member_bytes']} B/member + {m['fixed_bytes']} B fixed; this grid "
                     f"{m['bytes_for_this_grid']} B; largest stack in {m['budget_bytes']:.3g} B: "
                     f"{m['largest_stack_in_budget']}")
    lines += [f"failed: {stage}: {why}" for stage, why in r.get("failed", {}).items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
