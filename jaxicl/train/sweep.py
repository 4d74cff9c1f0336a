"""Vmapped sweeps: many members (seeds x hyperparameters x task parameters) trained by one program.

Members are stacked along a leading axis and trained by the engine's `train_step`, vmapped over
members inside one jitted loop of steps (jaxicl.train.sweep_program); the member axis is sharded over
the "members" axis of a 2-D mesh (members x data) (a stack of one member is not: member_sharding),
each member's batch over "data". A member's values enter as arrays (jaxicl.train.sweep_fields):

  train.seed                        the init key and the data key (as in a single run)
  train.lr / weight_decay /         per-member optimiser hyperparameters in the optimiser state
    warmup_steps                    (optax.inject_hyperparams; schedules are lr * unit schedule)
  task.<f>                          keyword f of the sampler, as an array (linear_regression:
                                    noise_std, n_tasks, n_context); prompts take the shape of the
                                    largest swept value (the pool size, the context length)
  <f> (no prefix)                   keyword f of `init(key, **fields) -> params` (e.g. init_scale)

A train or task field may be named by the last part of its path where no other field's path ends
in it and init takes no such keyword (seed, lr, noise_std), as on the command line
(jaxicl.config_paths); the result, the metrics and the stored config name it in full.

A context-length axis keeps one shape: prompts have the longest context and a member with fewer
pairs gets front padding with a loss mask (jaxicl.tasks.linear_regression). Linear attention
ignores the padding up to a scale its weights absorb; softmax attention does not ignore it.
`evaluate` receives every swept task field as a keyword (e.g. noise_std and n_context), so each
member is evaluated on its own task; a sweep whose evaluate does not take them is refused.

Not sweepable: fields that change shapes or code paths (train.steps, batch_size, optimizer,
schedule; task.dim, format; model sizes). A diverging member is frozen at its last finite state
while the others go on. When the stack does not fit in memory the members run in equal chunks (the
last one shorter) that share one compiled program; each chunk is padded to a multiple of the mesh's
member devices with copies of its last member. The stored config names the swept fields and
their values ({"swept": [...]}), never one member's value as the run's.
"""

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from jaxicl import outputs
from jaxicl.tasks.batching import Sampler, check_divisible
from jaxicl.train.checkpoint import (CheckpointStore, check_all_resumable, latest_checkpoint, pad_rows,
                                     remove_checkpoints)
from jaxicl.train.chunks import ChunkPrograms, EvalSchedule, check_eval_schedule, drive, evaluates_at
from jaxicl.train.config import TrainConfig
from jaxicl.train.loop import stored_config, trained_on, write_run_info
from jaxicl.train.mesh import MEMBER_AXIS, check_spans_processes, default_sweep_mesh
from jaxicl.train.metrics import MetricsWriter, kept_on_resume, read_metrics
from jaxicl.train.run_lock import exclusive
from jaxicl.train.state import TrainState
from jaxicl.train.step import LossFn
from jaxicl.train.sweep_fields import mark_swept, swept_values
from jaxicl.train.sweep_memory import chunk_in_budget, chunk_memory, device_budget
from jaxicl.train.sweep_program import SweepProgram, build_program, member_sharding
from jaxicl.validation import ConfigError, check_integer, check_positive


@dataclasses.dataclass
class SweepResult:
    members: list[dict]  # {path: value} per member
    params: object  # stacked final parameters [M, ...] (host numpy); a diverged member's last finite ones
    diverged: dict[int, int]  # member -> step whose update made its loss or parameters non-finite
    train_rows: list[dict]  # metrics rows with "member" and the member's values
    eval_rows: list[dict]
    chunk_size: int  # members per chunk (trained padded to a multiple of the mesh's member devices)
    info: dict  # run metadata (also out_dir/run.json): flops_per_step of one member, devices, backend, device_kind

    def member_params(self, i: int):
        return jax.tree.map(lambda x: x[i], self.params)


def train_sweep(loss_fn: LossFn, sample: Sampler | None, task_cfg, cfg: TrainConfig, init: Callable,
                members: list[dict], *, out_dir: str | None = None, mesh: jax.sharding.Mesh | None = None,
                resume: bool = True, chunk_size: int | None = None, memory_budget: float | None = None,
                evaluate: Callable[[object], dict] | None = None, eval_every: EvalSchedule = 0,
                run_config: dict | None = None, progress: bool = True, desc: str = "sweep") -> SweepResult:
    """Trains every member of `members` ([{path: value}], see the module docstring) at once.

    init(key, **init_fields) -> params builds one member's parameters from jaxicl.prng.seed_key(seed) (what
    jax.random.key(seed) gives under JAX's defaults; a lone run equal to the member builds its parameters from it
    too). sample=None: the loss takes no batch, as in train (loss_fn(params, None)).
    out_dir gets sweep.json, run.json, metrics.jsonl (rows carry "member" and its values) and
    checkpoints/chunk<k>/ holding the stacked state; a rerun resumes exactly (on another mesh, to float rounding:
    another program, whose stack may be padded otherwise), and one that any chunk's checkpoint refuses (another
    config) is refused before anything is written (resume=False deletes the checkpoints and starts afresh).
    chunk_size bounds the members per chunk (the mesh pads each chunk to a multiple of its member devices); without it
    a rerun keeps the chunk size of out_dir's checkpoints (so one on a device with other memory, or on a mesh with
    other member devices, resumes them; refused up front where those chunks need more than memory_budget, or than
    the device's memory), else memory_budget (bytes per device) chooses it from the memory of a chunk's compiled
    programs, training and (given) evaluate (chunk_in_budget); neither: 80% of the device memory where the backend
    reports it (GPU, TPU), else all at once. evaluate(params, **swept task fields) -> {name: scalar} is vmapped. The
    default mesh puts gcd(devices, chunk) devices on the members axis (in a run of several processes, the same number
    from each: jaxicl.train.mesh.default_sweep_mesh); a given mesh must hold devices of every process.
    """
    check_eval_schedule(eval_every, cfg.steps)
    if chunk_size is not None:  # -1 crashed, 0 meant "not given", True was stored as the chunk size
        check_integer("chunk_size", chunk_size)
        check_positive("chunk_size", chunk_size)
    if memory_budget is not None:  # 0 meant "not given"
        check_positive("memory_budget", memory_budget)
    if mesh is not None and MEMBER_AXIS not in mesh.axis_names:
        raise ConfigError(f"mesh: a sweep needs a mesh with a {MEMBER_AXIS!r} axis (jaxicl.train.sweep_mesh), got "
                          f"axes {mesh.axis_names}")
    if mesh is not None:
        check_spans_processes(mesh)
    prog = build_program(loss_fn, sample, task_cfg, cfg, init, members, evaluate)
    members = prog.members  # every field by its full name
    # a rerun keeps the chunks its checkpoints hold: one chosen from the memory of another device would be refused
    trained = _trained_chunk_size(out_dir) if chunk_size is None and out_dir and resume else None
    chunk_size = chunk_size or trained
    mesh = mesh or default_sweep_mesh(chunk_size or len(members))
    memory_budget = memory_budget or (None if chunk_size else device_budget(mesh))
    if memory_budget is not None and chunk_size is None:
        chunk_size = chunk_in_budget(prog, cfg, mesh, memory_budget, len(members))
    # the members per chunk (sweep.chunk_size, as the checkpoints hold them: the mesh does not change them), and the
    # stack trained: those padded to a multiple of the member devices with copies of the chunk's last member
    per = min(chunk_size or len(members), len(members))
    size = -(-per // mesh.shape[MEMBER_AXIS]) * mesh.shape[MEMBER_AXIS]
    if trained:
        _check_trained_chunk_fits(prog, cfg, mesh, per, size, memory_budget or device_budget(mesh, fraction=1.0),
                                  out_dir)
    chunks = [np.arange(lo, min(lo + per, len(members))) for lo in range(0, len(members), per)]
    swept = swept_values([{(p if "." in p else f"init.{p}"): v for p, v in m.items()} for m in members])
    # the members in order: a rerun with another order or pairing of the same values must not resume into them
    config = mark_swept({**stored_config(task_cfg, cfg, run_config, eval_every if evaluate else None),
                         "sweep": {"chunk_size": per, "members": members}}, swept)
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    with exclusive(out_dir):
        if out_dir:
            # every chunk's checkpoint before any chunk trains: refused at chunk k > 0, a rerun had retrained chunks < k
            # and rewritten their metrics.jsonl rows; refused here, it leaves out_dir as it was
            if resume:
                held = check_all_resumable([_chunk_dir(out_dir, k) for k in range(len(chunks))], config)
            else:
                remove_checkpoints(os.path.join(out_dir, "checkpoints"))
                held = []
            _write_sweep_json(out_dir, members, _resumed_diverged(out_dir, [chunks[k] for k in held]), per, cfg)
        rows, finals, diverged = {"train": [], "eval": []}, [], {}
        bar = tqdm(total=len(chunks) * cfg.steps, desc=desc, dynamic_ncols=True,
                   disable=not progress or not outputs.is_primary())
        with jax.set_mesh(mesh):
            if sample is not None:
                check_divisible(cfg.batch_size)
            sharding = member_sharding(mesh, size)
            run_chunk = ChunkPrograms(prog.run_chunk, cfg.cpu_matmuls)
            for k, idx in enumerate(chunks):
                store = (CheckpointStore(_chunk_dir(out_dir, k), keep=cfg.keep_checkpoints, config=config)
                         if out_dir else None)
                try:
                    state, task_inputs = _train_chunk(prog, run_chunk, cfg, members, idx, size, sharding, store,
                                                      metrics_path, rows, bar, eval_every)
                finally:
                    if store:
                        store.close()
                member_step = _fetch(state.step)[:len(idx)]
                diverged.update({int(m): int(s) for m, s in zip(idx, member_step) if s < cfg.steps})
                finals.append(jax.tree.map(lambda x: x[:len(idx)], _fetch(state.params)))
            info = write_run_info(out_dir, {**trained_on(mesh), "chunk_size": per}, run_chunk, state, task_inputs,
                                  members=size)
        bar.close()
        if diverged and outputs.is_primary():
            tqdm.write(f"{desc}: {len(diverged)} member(s) diverged and were frozen at their last finite state "
                       f"(member: step) {diverged}; the others trained on unchanged")
        if out_dir:
            _write_sweep_json(out_dir, members, diverged, per, cfg)
    if metrics_path and outputs.is_primary():
        rows = {s: read_metrics(metrics_path, s) for s in rows}
    params = jax.tree.map(lambda *xs: np.concatenate(xs), *finals)
    return SweepResult(list(members), params, diverged, rows["train"], rows["eval"], per, info)


def _fetch(tree):
    """Host numpy copies of the (member-sharded) arrays of tree, whole on every process: in a multi-process run a
    process addresses only its own members' shards, and jax.device_get refuses the others."""
    return multihost_utils.process_allgather(tree, tiled=True)


def _train_chunk(prog: SweepProgram, run_chunk: ChunkPrograms, cfg: TrainConfig, members: list[dict], idx: np.ndarray,
                 size: int, sharding: NamedSharding, store: CheckpointStore | None, metrics_path: str | None,
                 rows: dict, bar, eval_every: EvalSchedule) -> tuple[TrainState, dict]:
    """Trains members idx (padded to `size` with copies of the last) to cfg.steps; returns their stacked state and
    the task inputs run_chunk takes with it."""
    a = prog.inputs(pad_rows(idx, size), sharding)
    state, start, ran = prog.states(a, sharding), 0, cfg
    if store and store.steps():  # resumable: train_sweep checked every chunk first
        state, start = store.restore(state, sharding, members=len(idx)), store.steps()[-1]
        ran = dataclasses.replace(cfg, steps=store.config()["train"]["steps"])  # the run that wrote the checkpoint
    lo, hi = int(idx[0]), int(idx[-1]) + 1

    def keep(row, cfg=cfg):  # which rows of metrics.jsonl a chunk starting at `start` keeps (under cfg's steps)
        # this chunk's as a lone run keeps them; the earlier chunks' (their writers ran first in this sweep); the others
        # only where this chunk holds this sweep's checkpoint: with none, they are another run's (nothing kept at
        # chunk 0, as a lone run from step 0 clears the file)
        member = row.get("member", -1)
        if lo <= member < hi:
            return kept_on_resume(row, start, cfg, eval_every)
        return 0 <= member < lo or member >= hi and start > 0

    writer = MetricsWriter(metrics_path, keep=keep, keep_until_saved=lambda row: keep(row, ran))
    bar.update(start)

    def log(split, steps, values, ok=None):
        new = [{"step": int(s), "split": split, "member": int(m), **members[m],
                **{n: float(v[i, j]) for n, v in values.items()}}
               for j, s in enumerate(steps) for i, m in enumerate(idx) if ok is None or ok[i, j]]
        rows[split].extend(new)
        writer.write(new)

    def log_eval(state, step):
        values = _fetch(prog.eval_chunk(state.params, a["task"]))
        log("eval", [step], {n: v[:len(idx), None] for n, v in values.items()})

    def on_metrics(first, end, metrics):
        metrics = {n: v[:len(idx), :end - first] for n, v in _fetch(metrics).items()}
        steps = np.arange(first, end)
        logged = (steps % cfg.log_every == 0) | (steps == cfg.steps - 1)
        ok = metrics.pop("ok")
        log("train", steps[logged], {n: v[:, logged] for n, v in metrics.items()}, ok[:, logged])
        bar.update(end - first)
        if ok[:, -1].any():  # the chunk's training members at its last step
            bar.set_postfix(median_loss=f"{np.median(metrics['loss'][ok[:, -1], -1]):.4g}")

    def on_state(end, state, final):
        if prog.eval_chunk and (final or evaluates_at(end, eval_every)):
            log_eval(state, end)
        if store and (final or (cfg.checkpoint_every and end % cfg.checkpoint_every == 0)):
            store.save(state, step=end)
            writer.saved()

    if prog.eval_chunk and start == 0:
        log_eval(state, 0)
    return drive(state, start, cfg, eval_every, run_chunk=lambda s, n: run_chunk(s, a["task"], n=n),
                 on_metrics=on_metrics, on_state=on_state), a["task"]


def _chunk_dir(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"chunk{k}")


def _trained_chunk_size(out_dir: str) -> int | None:
    """The chunk size (sweep.chunk_size) of the sweep whose first chunk's checkpoint out_dir holds, None where it holds
    none; process 0's answer on every process."""
    latest = latest_checkpoint(_chunk_dir(out_dir, 0))
    size = ((latest[0].get("sweep") or {}).get("chunk_size") or 0) if latest else 0
    if jax.process_count() > 1:
        size = int(multihost_utils.broadcast_one_to_all(np.asarray(size)))
    return size or None


def _check_trained_chunk_fits(prog: SweepProgram, cfg: TrainConfig, mesh: jax.sharding.Mesh, per: int, size: int,
                              budget: float | None, out_dir: str) -> None:
    """Refuses, before anything compiles to run, to resume chunks of `per` members (those out_dir's checkpoints
    hold), trained as stacks of `size` on this mesh, whose compiled programs need more than `budget` bytes per device
    (memory_budget, else the whole device where the backend reports its memory; None: not checked)."""
    if budget is not None and (need := chunk_memory(prog, cfg, mesh, size)) > budget:
        raise ConfigError(f"{out_dir}: its checkpoints hold chunks of {per} members (sweep.chunk_size), whose "
                          f"programs need {need:.3g} bytes per device, more than {budget:.3g} (memory_budget, else "
                          f"the device's memory): resume where they fit, or pass resume=False to start afresh in "
                          f"chunks that fit")


def _resumed_diverged(out_dir: str, resumed: list[np.ndarray]) -> dict[int, int]:
    """The diverged members (member -> step) that out_dir/sweep.json records among the chunks `resumed` (their
    members' indices) from their checkpoints: sweep.json keeps them while this run trains, so a rerun interrupted
    before it rewrites the map does not leave them reported as healthy ({} where nothing is resumed)."""
    path = os.path.join(out_dir, "sweep.json")
    if not resumed or not os.path.exists(path):
        return {}
    with open(path) as f:
        recorded = json.load(f)["diverged"]
    members = set(np.concatenate(resumed).tolist())
    return {int(m): step for m, step in recorded.items() if int(m) in members}


def _write_sweep_json(out_dir: str, members: list[dict], diverged: dict, chunk_size: int, cfg: TrainConfig) -> None:
    outputs.write_json(os.path.join(out_dir, "sweep.json"),
                       {"fields": list(members[0]), "members": members,
                        "diverged": {str(k): v for k, v in diverged.items()}, "chunk_size": chunk_size,
                        "steps": cfg.steps})
