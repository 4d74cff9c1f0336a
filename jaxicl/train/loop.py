"""The training engine: looped, jitted, data-parallel steps; metrics, progress and checkpoints on the host.

Each step samples its batch on device from fold_in(data_key, step), born sharded over the mesh's
"data" axis; parameters and optimiser state are replicated, so the compiler inserts the
gradient all-reduce. The host only calls the compiled chunk of steps, writes metrics, moves the
progress bar, evaluates and checkpoints between chunks (jaxicl.train.chunks). All host side effects
happen on process 0; every process runs the same compiled calls and the orbax saves (multi-host safe).
A loss that takes no batch (sample=None: a full-batch or closed-form objective) trains the same way.
"""

import dataclasses
import json
import os
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxicl import outputs
from jaxicl.tasks.batching import Sampler, check_divisible
from jaxicl.train.checkpoint import CheckpointStore, check_resumable, remove_checkpoints
from jaxicl.train.chunks import ChunkPrograms, EvalSchedule, check_eval_schedule, drive, evaluates_at
from jaxicl.train.config import TrainConfig
from jaxicl.train.mesh import check_data_mesh, data_mesh, portable, replicated
from jaxicl.train.metrics import MetricsWriter, kept_on_resume, read_metrics
from jaxicl.train.optim import freeze_non_params, make_optimizer, scheduled_lr
from jaxicl.train.run_lock import exclusive
from jaxicl.train.state import TrainState, init_state
from jaxicl.train.step import ROW_KEYS, LossFn, check_metrics, run_steps
from jaxicl.validation import ConfigError


class NonFiniteLossError(FloatingPointError):
    """The loss or the updated parameters became NaN or inf; the run stopped before saving the bad state."""


@dataclasses.dataclass
class TrainResult:
    state: TrainState  # on the training mesh's devices, usable outside it without jax.set_mesh (mesh.portable)
    train_rows: list[dict]  # logged train metrics, oldest first (the whole run when resumed from out_dir)
    eval_rows: list[dict]
    info: dict  # run metadata (also out_dir/run.json): flops_per_step (XLA cost analysis: write_run_info) and
    # trained_on(mesh): devices, backend, device_kind


def stored_config(task_cfg, cfg: TrainConfig, extra: dict | None, eval_every: EvalSchedule | None) -> dict:
    """The config stored with a run's checkpoints: its train and task sections (task {} without a task), the matmul
    precision in force (jax.default_matmul_precision: on a GPU or TPU it changes the results) and the evaluation
    schedule (None without an evaluate function; a resume with another would mix two schedules' eval rows). As given:
    CheckpointStore stores it as JSON (normalise_config), and a run without out_dir never serialises it."""
    return {"train": dataclasses.asdict(cfg), "task": task_section(task_cfg),
            "matmul_precision": jax.config.jax_default_matmul_precision, "eval_every": eval_every, **(extra or {})}


def task_section(task_cfg) -> dict:
    """The stored config's task section: a dataclass's fields, a dict as given, {} for None; ConfigError otherwise."""
    if task_cfg is None:
        return {}
    if isinstance(task_cfg, dict):
        return dict(task_cfg)
    if dataclasses.is_dataclass(task_cfg) and not isinstance(task_cfg, type):
        return dataclasses.asdict(task_cfg)
    raise ConfigError(f"task_cfg must be a dataclass instance, a dict or None (the sampler's first argument, stored "
                      f"with the run's config), got {type(task_cfg).__name__}")


def trained_on(mesh: jax.sharding.Mesh) -> dict:
    """Where a run trains, for run.json: {"devices": the mesh's device count, "backend": their platform ("cpu", "gpu",
    "tpu"), "device_kind": e.g. "NVIDIA H100 80GB HBM3"}. The backend decides what JAX's default matmul precision
    computes (TF32 on an NVIDIA GPU), yet it stays out of the stored config: a run may resume on another backend."""
    device = mesh.devices.flat[0]
    return {"devices": mesh.devices.size, "backend": device.platform, "device_kind": device.device_kind}


def write_run_info(out_dir: str | None, info: dict, chunk: ChunkPrograms, *args, members: int = 1) -> dict:
    """{"flops_per_step": ..., **info}, also written to out_dir/run.json: XLA's count of one step of the run's `chunk`
    for one of the `members` its stack trains (a sweep's). Where no chunk was compiled (a rerun of a finished run) it
    is the count run.json holds, on process 0 (the one that writes it), else (a run stopped between its final
    checkpoint and run.json) that of the chunk lowered, not compiled, for its arguments `args` (state, ...)."""
    path = os.path.join(out_dir, "run.json") if out_dir else None
    held = {}
    if path and chunk.program is None and outputs.is_primary():
        if os.path.exists(path):
            with open(path) as f:
                held = json.load(f)
        if "flops_per_step" not in held:
            chunk.lower(*args)
    flops = chunk.flops_per_step
    info = {"flops_per_step": held.get("flops_per_step", flops / members if flops else None), **info}
    if path:
        outputs.write_json(path, info)
    return info


def train(loss_fn: LossFn, sample: Sampler | None, task_cfg, cfg: TrainConfig, params, *,
          out_dir: str | None = None, mesh: jax.sharding.Mesh | None = None, resume: bool = True,
          evaluate: Callable[[object], dict] | None = None, eval_every: EvalSchedule = 0,
          run_config: dict | None = None, tx: optax.GradientTransformation | None = None,
          progress: bool = True, desc: str = "train", buffers=None) -> TrainResult:
    """Trains `params` (any pytree, the same on every process) on prompts of `sample(task_cfg, key)`.

    Its plain arrays and nnx.Param variables train; any other nnx.Variable in it (nnx.split(model) returns them all:
    a frozen projection, a fixed positional table, a mask) stays as given: zero updates and no optimiser state, from
    the config's optimiser or `tx` (jaxicl.train.optim.freeze_non_params). State the loss itself updates goes in
    `buffers`.

    task_cfg: a dataclass instance, a dict (stored as given) or None. sample=None: loss_fn(params, None) needs no batch
    (task_cfg may then be None).
    out_dir gets metrics.jsonl, run.json and checkpoints/ (nothing is written when out_dir is None).
    mesh: an Explicit "data" axis and no other axis of size > 1 (check_data_mesh); default data_mesh(), all devices.
    With resume=True a run continues from the latest checkpoint in out_dir and produces the same
    losses and parameters as an uninterrupted run; resume=False deletes out_dir's checkpoints and starts afresh.
    loss_fn's aux values are scalars named other than the engine's metrics (step.check_metrics: refused at trace
    time, before the first step). `evaluate(params) -> {name: scalar}` (names other than step, split and member;
    refused at its first call) runs at step 0, every eval_every steps (or at the steps of a tuple
    eval_every) and at the end (eval rows in metrics.jsonl), as written under the training mesh: the loss runs with
    the mesh's axes in auto sharding, evaluate does not, so a model that gathers from a table (an nnx.Embed) is
    evaluated on a batch drawn with sample_batch(..., axis=None), or gathers through jaxicl.models.gpt.lookup. `tx`
    overrides the optimiser built from cfg; the stored config cannot describe it (a resume is checked against cfg's
    optimiser fields), so give each tx its own out_dir.
    buffers: state the loss updates outside the optimiser (then loss_fn(params, batch, buffers) -> (loss, (aux, new
    buffers)) and evaluate(params, buffers); checkpointed, in the result's state).
    Raises NonFiniteLossError at the first step whose loss or updated parameters are not finite, without saving the
    bad state (nor logging that step).
    """
    mesh = data_mesh() if mesh is None else mesh
    check_data_mesh(mesh)
    learning_rate = partial(scheduled_lr, cfg) if tx is None else None
    tx = make_optimizer(cfg) if tx is None else freeze_non_params(tx)
    check_eval_schedule(eval_every, cfg.steps)
    config = stored_config(task_cfg, cfg, run_config, eval_every if evaluate else None)
    step_kw = dict(loss_fn=loss_fn, sample=sample, task_cfg=task_cfg, batch_size=cfg.batch_size, tx=tx,
                   learning_rate=learning_rate, stop_loss=cfg.stop_loss)
    with jax.set_mesh(mesh), exclusive(out_dir):
        if sample is not None:
            check_divisible(cfg.batch_size)
        sharding = replicated(mesh)
        # a copy on this mesh, wherever params live (host, another mesh): the compiled steps donate the
        # state, never the caller's arrays (device_put alone may reuse the caller's buffer on a device)
        params, buffers = jax.tree.map(jnp.copy, jax.device_put((params, buffers), sharding))
        state = jax.device_put(init_state(params, cfg.seed, tx, buffers, cfg.prng_impl), sharding)
        if out_dir and not resume:
            remove_checkpoints(os.path.join(out_dir, "checkpoints"))
        store = CheckpointStore(os.path.join(out_dir, "checkpoints"), keep=cfg.keep_checkpoints,
                                config=config) if out_dir else None
        if store and store.steps():
            try:
                check_resumable(store.config(), config, store.steps()[-1], store.directory)
                state = store.restore(state, sharding)
            except BaseException:
                store.close()
                raise
        start = int(state.step)
        metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
        ran = dataclasses.replace(cfg, steps=store.config()["train"]["steps"]) if start else cfg  # the checkpoint's
        writer = MetricsWriter(metrics_path, keep=lambda r: kept_on_resume(r, start, cfg, eval_every),
                               keep_until_saved=lambda r: kept_on_resume(r, start, ran, eval_every))
        chunk = ChunkPrograms(jax.jit(partial(run_steps, rows=cfg.steps_per_call, **step_kw), donate_argnums=0),
                              cfg.cpu_matmuls)
        train_rows, eval_rows = [], []
        bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not progress or not outputs.is_primary(),
                   dynamic_ncols=True)

        # the steps whose evaluation is in metrics.jsonl and whose checkpoint is saved (kept_on_resume's rule)
        evaluated_at = start if start and evaluates_at(start, eval_every) else None
        saved_at = start if start else None

        def run_eval(state):
            nonlocal evaluated_at
            evaluated_at = int(state.step)
            values = evaluate(*_model_state(state))
            check_metrics(values, ROW_KEYS, "evaluate")
            row = {"step": evaluated_at, "split": "eval", **{k: float(v) for k, v in jax.device_get(values).items()}}
            eval_rows.append(row)
            writer.write([row])

        def on_metrics(first, end, metrics):
            metrics = {k: np.asarray(v)[:end - first] for k, v in jax.device_get(metrics).items()}
            stopped = metrics.pop("stopped", np.zeros(end - first, bool))
            steps = np.arange(first, end)
            bad = ~np.isfinite(metrics["loss"]) | ~np.isfinite(metrics["param_rms"])
            done = int(np.argmax(stopped)) if stopped.any() else None  # the step whose loss fell below stop_loss
            logged = (steps % cfg.log_every == 0) | (steps == cfg.steps - 1) | (np.arange(len(steps)) == done)
            stop = int(np.argmax(bad)) if bad.any() else len(steps) if done is None else done + 1
            rows = [{"step": int(s), "split": "train", **{k: float(v[i]) for k, v in metrics.items()}}
                    for i, s in enumerate(steps[:stop]) if logged[i]]
            train_rows.extend(rows)
            writer.write(rows)
            if bad.any():
                last = store.steps()[-1] if store and store.steps() else None
                what = "loss" if not np.isfinite(metrics["loss"][stop]) else "parameters after the update"
                raise NonFiniteLossError(
                    f"non-finite {what} at step {int(steps[stop])} (loss {metrics['loss'][stop]}, parameter RMS "
                    f"{metrics['param_rms'][stop]}); the run stopped without saving it. Last good checkpoint: "
                    f"{f'step {last} in {store.directory}' if last is not None else 'none'}")
            bar.update(end - first)
            bar.set_postfix(loss=f"{metrics['loss'][stop - 1]:.4g}")
            return None if done is None else first + done

        def on_state(end, state, final):  # twice at one step when the run stops (stop_loss) at a boundary
            nonlocal saved_at
            if evaluate and (final or evaluates_at(end, eval_every)) and evaluated_at != end:
                run_eval(state)
            if store and (final or (cfg.checkpoint_every and end % cfg.checkpoint_every == 0)) and saved_at != end:
                store.save(state)
                writer.saved()
                saved_at = end

        try:
            if evaluate and start == 0:
                run_eval(state)
            state = drive(state, start, cfg, eval_every, run_chunk=lambda s, n: chunk(s, n=n),
                          on_metrics=on_metrics, on_state=on_state)
        finally:
            bar.close()
            if store:
                store.close()
        info = write_run_info(out_dir, trained_on(mesh), chunk, state)
    if metrics_path and outputs.is_primary():
        train_rows, eval_rows = read_metrics(metrics_path, "train"), read_metrics(metrics_path, "eval")
    return TrainResult(portable(state), train_rows, eval_rows, info)


def _model_state(state: TrainState) -> tuple:
    """(params,) or (params, buffers): what the loss and the evaluation of a run receive."""
    return (state.params,) if state.buffers is None else (state.params, state.buffers)
