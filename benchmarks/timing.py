"""Wall-clock helpers shared by the benchmarks: the best of repeated calls, and a compiled chunk of training steps."""

import time
from collections.abc import Callable
from functools import partial

import jax
import numpy as np

from jaxicl.train import TrainConfig, data_mesh, replicated
from jaxicl.train.chunks import lower_chunk
from jaxicl.train.cpu_matmuls import compile_chunk
from jaxicl.train.optim import make_optimizer
from jaxicl.train.state import init_state
from jaxicl.train.step import run_steps


def best_seconds(fn, repeats: int) -> float:
    """Best of `repeats` wall seconds of fn() (its result blocked on)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved GFLOP/s of one n x n float32 matmul (jitted, XLA's default products): the peak the training steps are
    measured against."""
    x = jax.random.normal(jax.random.key(0), (n, n))
    matmul = jax.jit(lambda a: a @ a)
    return 2 * n**3 / best_seconds(lambda: matmul(x), repeats + 1) / 1e9


def compiled_chunk(loss_fn, sample, task, params, cfg: TrainConfig, num_devices: int | None = None
                   ) -> tuple[Callable[[], object], float]:
    """cfg.steps training steps (on-device sampling included) compiled as one chunk (a loop of a runtime trip count) on
    the batch sharded over the first num_devices devices (all by default), lowered as the engine lowers its chunks;
    returns a function that runs it from the initial state (blocking on the result) and the compile seconds."""
    tx = make_optimizer(cfg)
    mesh = data_mesh(num_devices)
    with jax.set_mesh(mesh):
        state = jax.device_put(init_state(params, cfg.seed, tx, prng_impl=cfg.prng_impl), replicated(mesh))
        chunk = jax.jit(partial(run_steps, rows=cfg.steps, loss_fn=loss_fn, sample=sample, task_cfg=task,
                                batch_size=cfg.batch_size, tx=tx))
        start = time.perf_counter()
        compiled = compile_chunk(lower_chunk(chunk, state), cfg.cpu_matmuls)  # as the engine lowers its chunks
        compile_s = time.perf_counter() - start

    def run():
        with jax.set_mesh(mesh):
            return jax.block_until_ready(compiled(state, np.int32(cfg.steps)))
    return run, compile_s


def chunk_throughput(loss_fn, sample, task, params, cfg: TrainConfig, repeats: int = 3,
                     num_devices: int | None = None) -> dict:
    """compile_s and steady-state steps/s of compiled_chunk: the best of repeats calls after a warm-up call."""
    run, compile_s = compiled_chunk(loss_fn, sample, task, params, cfg, num_devices)
    run()  # the warm-up, not among the timed calls (it was one of the repeats + 1 the best was taken of)
    return {"compile_s": compile_s, "steps_per_s": cfg.steps / best_seconds(run, repeats)}
