"""The training engine: scanned, jitted, data-parallel steps; metrics, progress and checkpoints on the host.

Each step samples its batch on device from fold_in(data_key, step), born sharded over the mesh's
"data" axis; parameters and optimiser state are replicated, so the compiler inserts the
gradient all-reduce. The host only calls the compiled chunk of steps, writes metrics, moves the
progress bar, evaluates and checkpoints between chunks. All host side effects happen on process 0;
every process runs the same compiled calls and the orbax saves (multi-host safe).
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

from jaxicl.prompt import Prompt
from jaxicl.tasks.batching import Sampler, check_divisible, sample_batch
from jaxicl.train.checkpoint import CheckpointStore
from jaxicl.train.config import TrainConfig
from jaxicl.train.mesh import data_mesh, portable, replicated
from jaxicl.train.metrics import MetricsWriter, read_metrics
from jaxicl.train.optim import make_optimizer
from jaxicl.train.state import TrainState
from jaxicl.validation import ConfigError, check_positive

LossFn = Callable[[object, Prompt], tuple[jax.Array, dict]]  # (params, batch) -> (loss, aux metrics)
DATA_STREAM = 0xDA7A  # folded into the seed for the data key, so data and init keys differ
EVAL_STREAM = 0xE7A1  # folded into the seed for evaluation prompts, never used for training batches


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the run stopped before saving the bad state."""


@dataclasses.dataclass
class TrainResult:
    state: TrainState  # on the training mesh's devices, usable outside it without jax.set_mesh (mesh.portable)
    train_rows: list[dict]  # logged train metrics, oldest first (the whole run when resumed from out_dir)
    eval_rows: list[dict]


def train_step(state: TrainState, *, loss_fn: LossFn, sample: Sampler, task_cfg, batch_size: int,
               tx: optax.GradientTransformation, task_params: dict | None = None) -> tuple[TrainState, dict]:
    """One step on the batch sampled from fold_in(state.key, state.step); returns the new state and metrics.

    task_params: (possibly traced) values of task fields passed to `sample` as keywords (sweeps).
    """
    batch = sample_batch(sample, task_cfg, jax.random.fold_in(state.key, state.step), batch_size,
                         task_params=task_params)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                        step=state.step + 1)
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}


def run_steps(state: TrainState, *, n: int, loss_fn: LossFn, sample: Sampler, task_cfg, batch_size: int,
              tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """n training steps as one lax.scan; returns the new state and per-step metrics [n]."""
    step = partial(train_step, loss_fn=loss_fn, sample=sample, task_cfg=task_cfg, batch_size=batch_size, tx=tx)
    return jax.lax.scan(lambda s, _: step(s), state, length=n)


def data_key(seed) -> jax.Array:
    """The base key of a run's training batches (seed may be traced, e.g. per sweep member)."""
    return jax.random.fold_in(jax.random.key(seed), DATA_STREAM)


def eval_key(seed) -> jax.Array:
    """The key of a run's held-out evaluation prompts (differs from data_key(seed) and the init key)."""
    return jax.random.fold_in(jax.random.key(seed), EVAL_STREAM)


def init_state(params, cfg: TrainConfig, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), data_key(cfg.seed))


def chunk_boundaries(start: int, cfg: TrainConfig, eval_every: int) -> list[int]:
    """Steps after which the host regains control: chunk ends, checkpoints, evaluations, the end."""
    ends = {cfg.steps}
    for every in (cfg.steps_per_call, cfg.checkpoint_every, eval_every):
        if every:
            ends.update(range(every, cfg.steps, every))
    return sorted(e for e in ends if e > start)


def normalise_config(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg))


def check_resumable(stored: dict, current: dict, checkpoint_step: int) -> None:
    """Raises ConfigError when a checkpoint at checkpoint_step cannot continue into the run `current`.

    Every field must match, except that train.steps may change when the schedule is constant (then
    the resumed run equals an uninterrupted run of the new length) and the checkpoint is not past it.
    A warmup-cosine schedule decays to 0 at train.steps, so a run resumed with other steps would
    follow a schedule that neither the old nor the new uninterrupted run has: refused.
    """
    stored, current = normalise_config(stored), normalise_config(current)
    if not stored:
        return
    diffs = [f"{section}.{k}: checkpoint {stored.get(section, {}).get(k)!r} vs now {v!r}"
             for section, fields in current.items() if isinstance(fields, dict)
             for k, v in fields.items()
             if not (section == "train" and k == "steps") and stored.get(section, {}).get(k) != v]
    if diffs:
        raise ConfigError("cannot resume: the checkpoint was made with another config: " + "; ".join(diffs)
                          + "; train into a new output directory, or keep the checkpoint's config")
    before, now = stored["train"]["steps"], current["train"]["steps"]
    if before != now and current["train"]["schedule"] != "constant":
        raise ConfigError(f"cannot resume: train.steps: checkpoint {before} vs now {now}, and "
                          f"train.schedule={current['train']['schedule']!r} depends on train.steps (it decays to 0 "
                          f"there), so the resumed run would follow neither run's schedule; keep train.steps={before} "
                          f"or train into a new output directory")
    if checkpoint_step > now:
        raise ConfigError(f"cannot resume: the checkpoint is at step {checkpoint_step}, past train.steps={now}; "
                          f"use train.steps >= {checkpoint_step} or a new output directory")


def train(loss_fn: LossFn, sample: Sampler, task_cfg, cfg: TrainConfig, params, *,
          out_dir: str | None = None, mesh: jax.sharding.Mesh | None = None, resume: bool = True,
          evaluate: Callable[[object], dict] | None = None, eval_every: int = 0,
          run_config: dict | None = None, tx: optax.GradientTransformation | None = None,
          progress: bool = True, desc: str = "train") -> TrainResult:
    """Trains `params` (any pytree, the same on every process) on prompts of `sample(task_cfg, key)`.

    out_dir gets metrics.jsonl and checkpoints/ (none are written when out_dir is None). With
    resume=True a run continues from the latest checkpoint in out_dir and produces the same
    losses and parameters as an uninterrupted run. `evaluate(params) -> {name: scalar}` runs at
    step 0, every eval_every steps and at the end (eval rows in metrics.jsonl). `tx` overrides
    the optimiser built from cfg. Raises NonFiniteLossError at the first non-finite loss,
    without saving the bad state.
    """
    mesh = data_mesh() if mesh is None else mesh
    tx = make_optimizer(cfg) if tx is None else tx
    check_positive("eval_every", eval_every, allow_zero=True)
    config = {"train": dataclasses.asdict(cfg), "task": dataclasses.asdict(task_cfg), **(run_config or {})}
    with jax.set_mesh(mesh):
        check_divisible(cfg.batch_size)
        sharding = replicated(mesh)
        # a copy on this mesh, wherever params live (host, another mesh): the compiled steps donate the
        # state, never the caller's arrays (device_put alone may reuse the caller's buffer on a device)
        params = jax.tree.map(jnp.copy, jax.device_put(params, sharding))
        state = jax.device_put(init_state(params, cfg, tx), sharding)
        store = CheckpointStore(os.path.join(out_dir, "checkpoints"), keep=cfg.keep_checkpoints,
                                config=config) if out_dir else None
        if store and resume and store.steps():
            check_resumable(store.config(), config, store.steps()[-1])
            state = store.restore(state, sharding)
        start = int(state.step)
        metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
        writer = MetricsWriter(metrics_path, resume_step=start)
        chunk = jax.jit(partial(run_steps, loss_fn=loss_fn, sample=sample, task_cfg=task_cfg,
                                batch_size=cfg.batch_size, tx=tx), static_argnames="n", donate_argnums=0)
        train_rows, eval_rows = [], []

        def run_eval():
            row = {"step": int(state.step), "split": "eval",
                   **{k: float(v) for k, v in jax.device_get(evaluate(state.params)).items()}}
            eval_rows.append(row)
            writer.write([row])

        if evaluate and start == 0:
            run_eval()
        bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not progress or jax.process_index() != 0,
                   dynamic_ncols=True)
        try:
            for end in chunk_boundaries(start, cfg, eval_every):
                first = int(state.step)
                state, metrics = chunk(state, n=end - first)
                metrics = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
                steps = np.arange(first, end)
                bad = ~np.isfinite(metrics["loss"])
                logged = (steps % cfg.log_every == 0) | (steps == cfg.steps - 1)
                stop = int(np.argmax(bad)) if bad.any() else len(steps)
                rows = [{"step": int(s), "split": "train", **{k: float(v[i]) for k, v in metrics.items()}}
                        for i, s in enumerate(steps[:stop]) if logged[i]]
                train_rows += rows
                writer.write(rows)
                if bad.any():
                    last = store.steps()[-1] if store and store.steps() else None
                    raise NonFiniteLossError(
                        f"non-finite loss {metrics['loss'][stop]} at step {int(steps[stop])}; the run stopped "
                        f"without saving it. Last good checkpoint: "
                        f"{f'step {last} in {store.directory}' if last is not None else 'none'}")
                bar.update(end - first)
                bar.set_postfix(loss=f"{metrics['loss'][-1]:.4g}")
                if evaluate and (end == cfg.steps or (eval_every and end % eval_every == 0)):
                    run_eval()
                if store and (end == cfg.steps or (cfg.checkpoint_every and end % cfg.checkpoint_every == 0)):
                    store.save(state)
        finally:
            bar.close()
            if store:
                store.close()
    if metrics_path and jax.process_index() == 0:
        train_rows, eval_rows = read_metrics(metrics_path, "train"), read_metrics(metrics_path, "eval")
    return TrainResult(portable(state), train_rows, eval_rows)
