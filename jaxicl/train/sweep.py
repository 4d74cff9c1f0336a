"""Vmapped sweeps: many members (seeds x hyperparameters x task parameters) trained by one program.

Members are stacked along a leading axis and trained by the engine's `train_step`, vmapped over
members inside one jitted lax.scan; the member axis is sharded over the "members" axis of a 2-D
mesh (members x data), each member's batch over "data". A member's values enter as arrays:

  train.seed                        the init key and the data key (as in a single run)
  train.lr / weight_decay /         per-member optimiser hyperparameters in the optimiser state
    warmup_steps                    (optax.inject_hyperparams; schedules are lr * unit schedule)
  task.<f>                          keyword f of the sampler, as an array (linear_regression:
                                    noise_std, n_tasks, n_context); the base task config holds each
                                    swept field's largest value (the pool size, the context length)
  <f> (no prefix)                   keyword f of `init(key, **fields) -> params` (e.g. init_scale)

A context-length axis keeps one shape: prompts have the longest context and a member with fewer
pairs gets front padding with a loss mask (jaxicl.tasks.linear_regression). Linear attention
ignores the padding up to a scale its weights absorb; softmax attention does not ignore it.
`evaluate` receives every swept task field as a keyword (e.g. noise_std and n_context), so each
member is evaluated on its own task; a sweep whose evaluate does not take them is refused.

Not sweepable: fields that change shapes or code paths (train.steps, batch_size, optimizer,
schedule; task.dim, format; model sizes).

Inside the member vmap (spmd_axis_name "members", explicit sharding, jax 0.12) indexing a constant
table with a per-member index, or jnp.searchsorted, fails to trace ("Resource axis: members ... not
found"); samplers and evaluate functions use one-hot sums or jnp.where lookups instead.

A member whose loss or updated parameters become non-finite is frozen at its last finite state:
its update and step counter are held, so its step records where it diverged (and a resumed run
finds it frozen again); the others continue unchanged. When the stack does not fit in memory the
members run in equal chunks (the last one padded) that share one compiled program.
"""

import dataclasses
import inspect
import json
import math
import os
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxicl.tasks.batching import DATA_AXIS, Sampler, check_divisible
from jaxicl.train.checkpoint import CheckpointStore
from jaxicl.train.config import TrainConfig
from jaxicl.train.loop import LossFn, chunk_boundaries, check_resumable, data_key, train_step
from jaxicl.train.metrics import MetricsWriter, kept_on_resume, read_metrics
from jaxicl.train.optim import SWEEPABLE_OPTIMIZER_FIELDS, sweep_optimizer
from jaxicl.train.state import TrainState
from jaxicl.train.sweep_spec import member_config
from jaxicl.validation import ConfigError, check_positive

MEMBER_AXIS = "members"
SWEEPABLE_TRAIN_FIELDS = ("seed",) + SWEEPABLE_OPTIMIZER_FIELDS


@dataclasses.dataclass
class SweepResult:
    members: list[dict]  # {path: value} per member
    params: object  # stacked final parameters [M, ...] (host numpy); a diverged member's last finite ones
    diverged: dict[int, int]  # member -> step whose update made its loss or parameters non-finite
    train_rows: list[dict]  # metrics rows with "member" and the member's values
    eval_rows: list[dict]
    chunk_size: int

    def member_params(self, i: int):
        return jax.tree.map(lambda x: x[i], self.params)


def sweep_mesh(member_devices: int | None = None, data_devices: int = 1) -> jax.sharding.Mesh:
    """A 2-D mesh (members x data) over the first member_devices * data_devices devices."""
    n = jax.device_count()
    member_devices = n // data_devices if member_devices is None else member_devices
    if member_devices < 1 or data_devices < 1 or member_devices * data_devices > n:
        raise ConfigError(f"sweep mesh {member_devices} x {data_devices} needs 1 <= devices <= {n}")
    return jax.make_mesh((member_devices, data_devices), (MEMBER_AXIS, DATA_AXIS),
                         devices=jax.devices()[:member_devices * data_devices])


def _keywords(fn) -> tuple[str, ...]:
    return tuple(n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY
                 or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty))


def split_fields(paths, sample: Sampler, init: Callable) -> dict[str, list[str]]:
    """Sorts swept paths into train / task / init groups; raises ConfigError naming unsweepable fields."""
    groups = {"train": [], "task": [], "init": []}
    task_ok, init_ok = _keywords(sample), _keywords(init)
    for path in paths:
        head, _, name = path.partition(".")
        if head == "train":
            if name not in SWEEPABLE_TRAIN_FIELDS:
                raise ConfigError(f"train.{name} cannot be swept (it changes shapes, the loop or the optimiser's code); "
                                  f"sweepable train fields: {SWEEPABLE_TRAIN_FIELDS}")
            groups["train"].append(name)
        elif head == "task":
            if name not in task_ok:
                raise ConfigError(f"task.{name} cannot be swept: {sample.__module__}.sample does not take it as an "
                                  f"array keyword (it changes shapes or the sampling code); sweepable task fields: "
                                  f"{task_ok}")
            groups["task"].append(name)
        elif "." not in path and path in init_ok:
            groups["init"].append(path)
        else:
            raise ConfigError(f"{path} cannot be swept: it is neither a sweepable train field {SWEEPABLE_TRAIN_FIELDS}, "
                              f"a task field the sampler takes {task_ok}, nor a keyword of init {init_ok}")
    return groups


def check_takes_task_fields(evaluate: Callable, fields: list[str]) -> None:
    """Raises ConfigError unless evaluate takes every swept task field as a keyword (or **kwargs).

    A member is evaluated on its own task: evaluate(params, **{field: member's value}).
    """
    params = inspect.signature(evaluate).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    missing = [f for f in fields if f not in _keywords(evaluate)]
    if missing:
        raise ConfigError(f"evaluate must take every swept task field as a keyword, so each member is evaluated on "
                          f"its own task; {getattr(evaluate, '__name__', evaluate)} does not take {missing} "
                          f"(add them, or **task_params, and pass them to the sampler)")


def _member_arrays(members: list[dict], prefix: str, names: list[str], default) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        values = [m[f"{prefix}{n}"] for m in members]
        out[n] = np.asarray(values, np.int32 if all(isinstance(v, int) for v in values) else np.float32)
    if default is not None:
        out.setdefault("seed", np.full(len(members), default, np.int32))
    return out


@dataclasses.dataclass(frozen=True)
class _Program:
    """The compiled pieces of a sweep and its per-member input arrays (host numpy, [M])."""

    make_states: Callable  # (seed [C], opt hyperparams, init fields) -> stacked TrainState [C]
    run_chunk: Callable  # (states, task params, n) -> (states, metrics [C, n]); donates states
    eval_chunk: Callable | None  # (params, task params) -> {name: [C]}
    arrays: dict

    def inputs(self, idx: np.ndarray, sharding: NamedSharding) -> dict:
        return jax.device_put(jax.tree.map(lambda a: a[idx], self.arrays), sharding)

    def states(self, a: dict, sharding: NamedSharding) -> TrainState:
        """Fresh stacked states, every leaf sharded over the member axis (unbatched leaves included)."""
        return jax.device_put(self.make_states(a["seed"], a["opt"], a["init"]), sharding)


def _program(loss_fn: LossFn, sample: Sampler, task_cfg, cfg: TrainConfig, init: Callable, members: list[dict],
             evaluate: Callable | None) -> _Program:
    if not members:
        raise ConfigError("a sweep needs at least one member")
    if any(set(m) != set(members[0]) for m in members):
        raise ConfigError(f"every sweep member must set the same fields, e.g. {sorted(members[0])}")
    groups = split_fields(list(members[0]), sample, init)
    for m in members:  # every member must be a valid config (errors name the field)
        member_config(_Pair(cfg, task_cfg), {p: v for p, v in m.items() if "." in p})
    base_task = dataclasses.replace(task_cfg, **{n: max(m[f"task.{n}"] for m in members) for n in groups["task"]})
    opt_fields = [n for n in groups["train"] if n != "seed"]
    tx = sweep_optimizer(cfg, tuple(opt_fields))
    arrays = {"seed": _member_arrays(members, "train.", ["seed"] if "seed" in groups["train"] else [],
                                     cfg.seed)["seed"],
              "opt": _member_arrays(members, "train.", opt_fields, None),
              "task": _member_arrays(members, "task.", groups["task"], None),
              "init": _member_arrays(members, "", groups["init"], None)}

    def new_state(seed, hp, init_kw):
        params = init(jax.random.key(seed), **init_kw)
        opt_state = tx.init(params)
        for name, value in hp.items():
            opt_state.hyperparams[name] = jnp.asarray(value, opt_state.hyperparams[name].dtype)
        return TrainState(params, opt_state, jnp.zeros((), jnp.int32), data_key(seed))

    def member_steps(state, task_params, n):
        def body(s, _):
            new, metrics = train_step(s, loss_fn=loss_fn, sample=sample, task_cfg=base_task, batch_size=cfg.batch_size,
                                      tx=tx, task_params=task_params or None)
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.tree.norm(new.params))
            keep = partial(jax.tree.map, lambda a, b: jnp.where(ok, a, b))
            new = new.replace(params=keep(new.params, s.params), opt_state=keep(new.opt_state, s.opt_state),
                              step=jnp.where(ok, new.step, s.step))
            return new, {**metrics, "ok": ok}

        return jax.lax.scan(body, state, length=n)

    if evaluate:
        check_takes_task_fields(evaluate, groups["task"])

    def member_eval(params, task_params):
        return evaluate(params, **task_params)

    vmap = partial(jax.vmap, spmd_axis_name=MEMBER_AXIS)
    return _Program(vmap(new_state),  # eager: compiling it costs more than running it once
                    jax.jit(vmap(member_steps, in_axes=(0, 0, None)), static_argnums=2, donate_argnums=0),
                    jax.jit(vmap(member_eval)) if evaluate else None, arrays)


def _default_mesh(n_members: int) -> jax.sharding.Mesh:
    return sweep_mesh(math.gcd(jax.device_count(), n_members))


def _device_budget(mesh: jax.sharding.Mesh, fraction: float = 0.8) -> float | None:
    """fraction of the smallest device memory of the mesh (None where the backend does not say, e.g. CPU)."""
    stats = [d.memory_stats() for d in mesh.devices.flat]
    limits = [s["bytes_limit"] for s in stats if s and "bytes_limit" in s]
    return fraction * min(limits) if limits and len(limits) == len(stats) else None


def train_sweep(loss_fn: LossFn, sample: Sampler, task_cfg, cfg: TrainConfig, init: Callable, members: list[dict], *,
                out_dir: str | None = None, mesh: jax.sharding.Mesh | None = None, resume: bool = True,
                chunk_size: int | None = None, memory_budget: float | None = None,
                evaluate: Callable[[object], dict] | None = None, eval_every: int = 0,
                run_config: dict | None = None, progress: bool = True, desc: str = "sweep") -> SweepResult:
    """Trains every member of `members` ([{path: value}], see the module docstring) at once.

    init(key, **init_fields) -> params builds one member's parameters from jax.random.key(seed).
    out_dir gets sweep.json, metrics.jsonl (rows carry "member" and its values) and
    checkpoints/chunk<k>/ holding the stacked state; a rerun resumes exactly. chunk_size bounds the
    members trained at once; memory_budget (bytes per device) chooses it from the compiled program's memory
    (estimate_memory); neither: 80% of the device memory where the backend reports it (GPU, TPU),
    else all at once. evaluate(params, **swept task fields) -> {name: scalar} is vmapped.
    The default mesh puts gcd(devices, chunk) devices on the members axis.
    """
    check_positive("eval_every", eval_every, allow_zero=True)
    prog = _program(loss_fn, sample, task_cfg, cfg, init, members, evaluate)
    mesh = mesh or _default_mesh(chunk_size or len(members))
    memory_budget = memory_budget or (None if chunk_size else _device_budget(mesh))
    if memory_budget is not None and chunk_size is None:
        chunk_size = estimate_memory(loss_fn, sample, task_cfg, cfg, init, members, mesh=mesh,
                                     _prog=prog).largest_stack(memory_budget)
    n_dev = mesh.shape[MEMBER_AXIS]
    size = -(-min(chunk_size or len(members), len(members)) // n_dev) * n_dev  # a multiple of the member devices
    chunks = [np.arange(lo, min(lo + size, len(members))) for lo in range(0, len(members), size)]
    config = {"train": dataclasses.asdict(cfg), "task": dataclasses.asdict(task_cfg),
              "sweep": {"members": members, "chunk_size": size}, **(run_config or {})}
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    if out_dir and jax.process_index() == 0:
        _write_sweep_json(out_dir, members, {}, size, cfg)
    rows, finals, diverged = {"train": [], "eval": []}, [], {}
    bar = tqdm(total=len(chunks) * cfg.steps, desc=desc, dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    with jax.set_mesh(mesh):
        check_divisible(cfg.batch_size)
        for k, idx in enumerate(chunks):
            store = CheckpointStore(os.path.join(out_dir, "checkpoints", f"chunk{k}"), keep=cfg.keep_checkpoints,
                                    config=config) if out_dir else None
            try:
                state = _train_chunk(prog, cfg, members, idx, size, mesh, store, config, resume, metrics_path, rows, bar,
                                     eval_every, fresh_file=k == 0 and not resume)
            finally:
                if store:
                    store.close()
            member_step = np.asarray(jax.device_get(state.step))[:len(idx)]
            diverged.update({int(m): int(s) for m, s in zip(idx, member_step) if s < cfg.steps})
            finals.append(jax.tree.map(lambda x: np.asarray(x)[:len(idx)], jax.device_get(state.params)))
    bar.close()
    if diverged and jax.process_index() == 0:
        tqdm.write(f"{desc}: {len(diverged)} member(s) diverged and were frozen at their last finite state "
                   f"(member: step) {diverged}; the others trained on unchanged")
    if out_dir and jax.process_index() == 0:
        _write_sweep_json(out_dir, members, diverged, size, cfg)
        rows = {s: read_metrics(metrics_path, s) for s in rows}
    params = jax.tree.map(lambda *xs: np.concatenate(xs), *finals)
    return SweepResult(list(members), params, diverged, rows["train"], rows["eval"], size)


def _train_chunk(prog: _Program, cfg: TrainConfig, members: list[dict], idx: np.ndarray, size: int, mesh,
                 store: CheckpointStore | None, config: dict, resume: bool, metrics_path: str | None, rows: dict,
                 bar, eval_every: int, fresh_file: bool) -> TrainState:
    """Trains members idx (padded to `size` with copies of the last) to cfg.steps; returns their stacked state."""
    sharding = NamedSharding(mesh, P(MEMBER_AXIS))
    a = prog.inputs(np.concatenate([idx, np.full(size - len(idx), idx[-1])]), sharding)
    state, start = prog.states(a, sharding), 0
    if store and resume and store.steps():
        check_resumable(store.config(), config, store.steps()[-1])
        state, start = store.restore(state, sharding), store.steps()[-1]
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    # rows of other chunks stay; this chunk's rows from `start` on are written again
    writer = MetricsWriter(metrics_path, keep=lambda r: not fresh_file and (
        not lo <= r.get("member", -1) < hi or kept_on_resume(r, start)))
    bar.update(start)

    def log(split, steps, values, ok=None):
        new = [{"step": int(s), "split": split, "member": int(m), **members[m],
                **{n: float(v[i, j]) for n, v in values.items()}}
               for j, s in enumerate(steps) for i, m in enumerate(idx) if ok is None or ok[i, j]]
        rows[split].extend(new)
        writer.write(new)

    def log_eval(step):
        log("eval", [step], {n: np.asarray(v)[:len(idx), None]
                             for n, v in jax.device_get(prog.eval_chunk(state.params, a["task"])).items()})

    if prog.eval_chunk and start == 0:
        log_eval(0)
    for end in chunk_boundaries(start, cfg, eval_every):
        state, metrics = prog.run_chunk(state, a["task"], end - start)
        metrics = {n: np.asarray(v)[:len(idx)] for n, v in jax.device_get(metrics).items()}
        steps = np.arange(start, end)
        logged = (steps % cfg.log_every == 0) | (steps == cfg.steps - 1)
        ok = metrics.pop("ok")[:, logged]
        log("train", steps[logged], {n: v[:, logged] for n, v in metrics.items()}, ok)
        if prog.eval_chunk and (end == cfg.steps or (eval_every and end % eval_every == 0)):
            log_eval(end)
        if store and (end == cfg.steps or (cfg.checkpoint_every and end % cfg.checkpoint_every == 0)):
            store.save(state, step=end)
        bar.update(end - start)
        start = end
    return state


@dataclasses.dataclass(frozen=True)
class _Pair:
    train: TrainConfig
    task: object


def _write_sweep_json(out_dir: str, members: list[dict], diverged: dict, chunk_size: int, cfg: TrainConfig) -> None:
    os.makedirs(out_dir, exist_ok=True)
    fields = list(members[0])
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump({"fields": fields, "members": members, "diverged": {str(k): v for k, v in diverged.items()},
                   "chunk_size": chunk_size, "steps": cfg.steps}, f, indent=1)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the compiled chunk program: fixed + per_member * members (from XLA's memory analysis)."""

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


def estimate_memory(loss_fn: LossFn, sample: Sampler, task_cfg, cfg: TrainConfig, init: Callable,
                    members: list[dict], *, mesh: jax.sharding.Mesh | None = None, _prog: _Program | None = None
                    ) -> MemoryEstimate:
    """Bytes of a sweep's chunk program as fixed + per_member * chunk (XLA's memory analysis).

    Compiles the chunk of cfg.steps_per_call steps for g and 2g members (g = the mesh's member
    devices) and fits the two totals (arguments + outputs + temporaries - donated aliases).
    """
    prog = _prog or _program(loss_fn, sample, task_cfg, cfg, init, members, None)
    mesh = mesh or _default_mesh(len(members))
    g = mesh.shape[MEMBER_AXIS]
    n = min(cfg.steps_per_call, cfg.steps)

    def total(c):
        with jax.set_mesh(mesh):
            sharding = NamedSharding(mesh, P(MEMBER_AXIS))
            a = prog.inputs(np.zeros(c, int), sharding)
            m = prog.run_chunk.lower(prog.states(a, sharding), a["task"], n).compile().memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

    one, two = total(g), total(2 * g)
    per = max((two - one) // g, 1)
    return MemoryEstimate(max(one - per * g, 0), per, g)
