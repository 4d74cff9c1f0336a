"""The host side of training: compiled chunks of steps, with the host's work between them.

The host regains control at chunk boundaries (every steps_per_call steps, at checkpoints,
evaluations and the end). Between plain boundaries it never stalls the device: chunk k+1 is
dispatched before chunk k's metrics are fetched. Where it needs the state itself (evaluate,
checkpoint, finish) it first handles the metrics of the chunk that produced it.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.prng import unrolled_threefry
from jaxicl.train.config import TrainConfig
from jaxicl.train.cpu_matmuls import compile_chunk
from jaxicl.validation import ConfigError

EvalSchedule = int | tuple[int, ...]  # evaluate every k steps (0: never), or at the listed steps


def check_eval_schedule(eval_every: EvalSchedule, steps: int) -> None:
    """ConfigError unless eval_every is an int >= 0 or a tuple of steps in [1, steps]."""
    if isinstance(eval_every, tuple):
        bad = [s for s in eval_every if not (isinstance(s, int) and 1 <= s <= steps)]
        if bad:
            raise ConfigError(f"eval_every: the evaluation steps must be integers in [1, {steps}], got {bad}")
    elif not isinstance(eval_every, int) or eval_every < 0:
        raise ConfigError(f"eval_every must be an int >= 0 or a tuple of steps, got {eval_every!r}")


def evaluates_at(end: int, eval_every: EvalSchedule) -> bool:
    """Whether the schedule evaluates after step `end` (the end of the run is the caller's to add)."""
    if isinstance(eval_every, tuple):
        return end in eval_every
    return bool(eval_every) and end % eval_every == 0


class ChunkPrograms:
    """A jitted chunk function `fn(state, *args, n) -> (state, metrics [.., rows])` whose trip count n is an int32
    scalar argument (jaxicl.train.step.loop_steps), lowered (lower_chunk) and compiled once, at the first call: every
    chunk of a run, whatever its length, runs that one program, so a run resumed, extended, or cut into other chunks
    by its evaluations and checkpoints takes the same steps bit for bit. Its products on CPU are by `cpu_matmuls`'s
    library.

    flops_per_step is XLA's cost analysis of the lowered chunk, which counts its while loop's body (one step) once.
    None where the backend does not say.
    """

    def __init__(self, fn: Callable, cpu_matmuls: str):
        self.fn, self.cpu_matmuls, self.program, self.flops_per_step = fn, cpu_matmuls, None, None

    def __call__(self, state, *args, n: int):
        if self.program is None:
            self.program = compile_chunk(self.lower(state, *args), self.cpu_matmuls)
        return self.program(state, *args, np.int32(n))

    def lower(self, state, *args) -> jax.stages.Lowered:
        """The chunk lowered for these arguments (not compiled); sets flops_per_step."""
        lowered = lower_chunk(self.fn, state, *args)
        self.flops_per_step = lowered_flops(lowered)
        return lowered


def lower_chunk(fn: Callable, state, *args) -> jax.stages.Lowered:
    """The jitted chunk function fn(state, *args, n) lowered for every trip count n (an int32 scalar), its random draws
    through the unrolled threefry (jaxicl.prng)."""
    with unrolled_threefry():
        return fn.lower(state, *args, jax.ShapeDtypeStruct((), jnp.int32))


def lowered_flops(lowered) -> float | None:
    """XLA's FLOP count of a lowered program (before the backend's optimisations); None where the backend gives
    none."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis must not stop a run
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def chunk_boundaries(start: int, cfg: TrainConfig, eval_every: EvalSchedule) -> list[int]:
    """Steps after which the host regains control: chunk ends, checkpoints, evaluations, the end."""
    ends = {cfg.steps, *(eval_every if isinstance(eval_every, tuple) else ())}
    for every in (cfg.steps_per_call, cfg.checkpoint_every, 0 if isinstance(eval_every, tuple) else eval_every):
        if every:
            ends.update(range(every, cfg.steps, every))
    return sorted(e for e in ends if start < e <= cfg.steps)


def needs_state(end: int, cfg: TrainConfig, eval_every: EvalSchedule) -> bool:
    """Whether the host uses the state after step `end` (an evaluation, a checkpoint, the end)."""
    return end == cfg.steps or evaluates_at(end, eval_every) or evaluates_at(end, cfg.checkpoint_every)


def drive(state, start: int, cfg: TrainConfig, eval_every: EvalSchedule, *, run_chunk: Callable,
          on_metrics: Callable[[int, int, dict], int | None], on_state: Callable[[int, object, bool], None]):
    """Runs the chunks from step `start` to cfg.steps; returns the final state.

    run_chunk(state, n) -> (state, metrics [.., rows >= n], the first n rows the chunk's steps') is asynchronous
    (jitted). on_metrics(first, end, metrics) handles a chunk's metrics (fetch, log, raise on divergence) one chunk late
    where it can, and returns the step at which the run stopped early (cfg.stop_loss), if it did. on_state(end, state,
    final) evaluates and checkpoints where needs_state, and at the end (final=True) however it ends.
    """
    pending = None
    for end in chunk_boundaries(start, cfg, eval_every):
        state, metrics = run_chunk(state, end - start)
        if pending and (stopped := on_metrics(*pending)) is not None:
            on_state(stopped, state, True)  # the chunk just run left the stopped state as it was
            return state
        pending = (start, end, metrics)
        if needs_state(end, cfg, eval_every):
            stopped = on_metrics(*pending)
            pending = None
            on_state(end if stopped is None else stopped, state, end == cfg.steps or stopped is not None)
            if stopped is not None:
                return state
        start = end
    return state
