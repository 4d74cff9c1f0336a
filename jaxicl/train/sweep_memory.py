"""How many sweep members fit in device memory, from XLA's memory analysis of a chunk's compiled programs."""

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxicl.tasks.batching import Sampler
from jaxicl.train.chunks import lower_chunk
from jaxicl.train.config import TrainConfig
from jaxicl.train.cpu_matmuls import compile_chunk
from jaxicl.train.mesh import MEMBER_AXIS, default_sweep_mesh
from jaxicl.train.step import LossFn
from jaxicl.train.sweep_program import SweepProgram, build_program, member_sharding
from jaxicl.validation import ConfigError


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of a chunk: fixed + per_member * members (from XLA's memory analysis of its programs)."""

    fixed: int
    per_member: int
    granularity: int  # chunk sizes are multiples of the mesh's member axis

    def bytes_for(self, members: int) -> int:
        return self.fixed + self.per_member * members

    def largest_stack(self, budget: float) -> int:
        n = int((budget - self.fixed) // max(self.per_member, 1))
        n -= n % self.granularity
        if n < self.granularity:
            raise ConfigError(f"memory_budget={budget:.3g} bytes holds no chunk: {self.granularity} member(s) need "
                              f"{self.bytes_for(self.granularity):.3g} bytes")
        return n


def estimate_memory(loss_fn: LossFn, sample: Sampler | None, task_cfg, cfg: TrainConfig, init: Callable,
                    members: list[dict], *, mesh: jax.sharding.Mesh | None = None,
                    evaluate: Callable | None = None) -> MemoryEstimate:
    """Bytes of a chunk of train_sweep(...) with these arguments (chunk_memory), as fixed + per_member * chunk."""
    return program_memory(build_program(loss_fn, sample, task_cfg, cfg, init, members, evaluate), cfg,
                          mesh or default_sweep_mesh(len(members)))


def program_memory(prog: SweepProgram, cfg: TrainConfig, mesh: jax.sharding.Mesh) -> MemoryEstimate:
    """Bytes of a sweep's chunk as fixed + per_member * chunk: chunk_memory of 2g and 4g members (g = the mesh's
    member devices), fitted (XLA compiles g members differently, often cheaper per member: a fit from g and 2g was
    up to 25% under the memory of larger chunks). A guide: train_sweep measures the chunk it picks (chunk_in_budget)."""
    g = mesh.shape[MEMBER_AXIS]
    two, four = chunk_memory(prog, cfg, mesh, 2 * g), chunk_memory(prog, cfg, mesh, 4 * g)
    per = max((four - two) // (2 * g), 1)
    return MemoryEstimate(max(two - per * 2 * g, 0), per, g)


def chunk_in_budget(prog: SweepProgram, cfg: TrainConfig, mesh: jax.sharding.Mesh, budget: float,
                    n_members: int) -> int:
    """The chunk size (a multiple of g, the mesh's member devices) whose chunk_memory fits `budget` bytes per device:
    all `n_members` (rounded up to g) where they fit; else the largest that fits, searched between 2g and all
    (largest_in_budget: a chunk's memory is not linear in its members, so a fit alone can miss the budget).

    Compiles a chunk's programs (training, and evaluation where given) at 1 size where all members fit, else at most
    2 + 2 ceil(log2(n_members / g)) sizes (4 or 5 where memory is linear in the members).
    """
    g = mesh.shape[MEMBER_AXIS]
    measure = functools.cache(functools.partial(chunk_memory, prog, cfg, mesh))
    n = largest_in_budget(measure, budget, -(-n_members // g) * g, g)
    if n is None:
        raise ConfigError(f"memory_budget={budget:.3g} bytes holds no chunk: {g} member(s) need {measure(g):.3g} "
                          f"bytes")
    return n


def largest_in_budget(measure: Callable[[int], int], budget: float, start: int, unit: int) -> int | None:
    """The largest multiple of unit, at most start (itself a multiple of unit), whose measure fits the budget; None
    where unit does not fit. start where it fits; else a search between 2 unit (unit where 2 unit does not fit) and
    start that takes in turn the size where the line through the measures at the bracket's ends crosses the budget
    and the bracket's midpoint (the memory of compiled programs is not linear in the size: the line alone can miss
    by many units). Assumes measure does not fall as the size grows; either way the result fits and the result +
    unit does not (or the result is start). measure is called once per size (cached here): once where start fits,
    else at most 2 + 2 ceil(log2(start / unit)) times, 4 or 5 where it is linear in the size."""
    measure = functools.cache(measure)
    if measure(start) <= budget:
        return start
    if start == unit:
        return None
    lo, hi = 2 * unit, start
    if lo == hi or measure(lo) > budget:
        return unit if measure(unit) <= budget else None
    on_line = True
    while hi - lo > unit:  # measure(lo) <= budget < measure(hi)
        if on_line:
            crossing = lo + (budget - measure(lo)) * (hi - lo) / (measure(hi) - measure(lo))
            n = min(max(int(crossing) // unit * unit, lo + unit), hi - unit)
        else:
            n = lo + (hi - lo) // unit // 2 * unit
        lo, hi = (n, hi) if measure(n) <= budget else (lo, n)
        on_line = not on_line
    return lo


def chunk_memory(prog: SweepProgram, cfg: TrainConfig, mesh: jax.sharding.Mesh, c: int) -> int:
    """Bytes per device of a chunk of c members, from XLA's memory analysis (arguments + outputs + temporaries -
    donated aliases): its training program (the one program that runs every chunk of steps, whatever their number:
    metrics of cfg.steps_per_call steps) or, where the sweep evaluates and it is larger, its evaluation: evaluate's
    vmapped program, plus the training state it does not take (optimiser state, step and key), held meanwhile."""
    with jax.set_mesh(mesh):
        sharding = member_sharding(mesh, c)
        a = prog.inputs(np.zeros(c, int), sharding)
        state = prog.states(a, sharding)
        train = compile_chunk(lower_chunk(prog.run_chunk, state, a["task"]), cfg.cpu_matmuls).memory_analysis()
        if prog.eval_chunk is None:
            return _total(train)
        evaluation = prog.eval_chunk.lower(state.params, a["task"]).compile().memory_analysis()
    held = train.argument_size_in_bytes - evaluation.argument_size_in_bytes
    return max(_total(train), _total(evaluation) + held)


def _total(m) -> int:
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def device_budget(mesh: jax.sharding.Mesh, fraction: float = 0.8) -> float | None:
    """fraction of the smallest device memory of the mesh (None where the backend does not say, e.g. CPU). Each
    process reads its own devices (another's refuse), and every process gets the same answer."""
    stats = [d.memory_stats() for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limits = [s["bytes_limit"] for s in stats if s and "bytes_limit" in s]
    smallest = float(min(limits)) if limits and len(limits) == len(stats) else -1.0
    if jax.process_count() > 1:  # a float: bytes overflow int32 without x64
        every = multihost_utils.process_allgather(np.asarray(smallest))
        smallest = float(every.min()) if (every > 0).all() else -1.0
    return fraction * smallest if smallest > 0 else None
